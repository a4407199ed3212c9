"""One upstream as a pool serves it: how it is reached, its connection slots, its health and
its counters. The pool's runtime (``pool_runtime.py``) decides who takes a request; this is
what it decides over.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .counters import UpstreamStats
from .health import UpstreamHealth
from .latency import PeakEwma
from .transport.base import UpstreamTransport
from .upstream import Upstream

__all__ = ["ConnectionLimiter", "Member", "PoolLoad"]


class PoolLoad:
    """The requests in flight on all of a pool's upstreams (the sum of their limiters'
    ``active``), kept as slots are taken and given back: bounded-load hashing reads it
    at every pick, so it is never summed."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0


class ConnectionLimiter:
    """At most ``limit`` exchanges in flight with one upstream; the rest wait in FIFO order.

    Not an ``asyncio.Semaphore``: its waiters must not bind to one event loop, because a
    ``TestClient`` used without ``with`` runs every request in a new loop.
    """

    __slots__ = ("_waiters", "active", "limit", "load")

    def __init__(self, limit: int, load: PoolLoad | None = None) -> None:
        self.limit = limit
        self.active = 0
        #: The pool's total, which every change of ``active`` changes too.
        self.load = load if load is not None else PoolLoad()
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def waiting(self) -> bool:
        """Whether requests wait for a slot (a free one goes to them first)."""
        return bool(self._waiters)

    async def acquire(self, timeout: float) -> bool:
        """Take a slot; False if none came free within ``timeout`` seconds."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            self.load.in_flight += 1
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        expiry = loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # a slot was handed to us as we were cancelled: pass it on
            raise
        finally:
            expiry.cancel()

    def release(self) -> None:
        """Give the slot back, handing it straight to the oldest live waiter if any."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.active -= 1
        self.load.in_flight -= 1


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Member:
    """One upstream of a pool, while the pool serves: ``upstream`` (its configuration; a
    new value replaces it when discovery changes its weight), ``transport`` (the one that
    reaches it, resolved once: its own, its pool's, or the balancer's), ``limiter`` (its
    ``max_connections`` slots), ``health`` (active and passive), ``stats`` (its counters),
    ``drained``, ``websockets`` (open ones; they take no slot) and ``latency`` (its peak
    EWMA of response-header latency, which ``policy="peak_ewma"`` feeds and reads)."""

    __slots__ = (
        "drained",
        "health",
        "latency",
        "limiter",
        "record",
        "stats",
        "transport",
        "upstream",
        "websockets",
        "weight_override",
        "zone_base",
    )

    def __init__(
        self,
        upstream: Upstream,
        transport: UpstreamTransport,
        limit: int,
        load: PoolLoad | None = None,
        decay: float = 10.0,
    ) -> None:
        self.upstream = upstream
        self.transport = transport
        self.limiter = ConnectionLimiter(limit, load)
        self.health = UpstreamHealth()
        self.stats = UpstreamStats()
        self.drained = False
        self.websockets = 0
        self.latency = PeakEwma(decay)
        #: A weight set while serving, over the configured one (None: the configured).
        self.weight_override: int | None = None
        #: Its record in a zone shared with other workers, and where this process's
        #: counters start in its slot there (see ``zone.py``); None without a zone.
        self.record: int | None = None
        self.zone_base: list[int | float] | None = None

    @property
    def weight(self) -> int:
        override = self.weight_override
        return self.upstream.weight if override is None else override

    @property
    def in_flight(self) -> int:
        return self.limiter.active

    def __repr__(self) -> str:
        return f"<Member {self.upstream.url} in_flight={self.in_flight}>"
