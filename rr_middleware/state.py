"""Run-time state of pools and upstreams, owned by one middleware instance.

The configuration dataclasses stay plain; what changes while serving (connection slots,
the balancer's position, which transport carries an upstream's traffic) lives here.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .balancing import RoundRobin, Weighted, balancer_for
from .config import Pool, Upstream
from .transport.base import UpstreamTransport

__all__ = ["ConnectionLimiter", "PoolState", "UpstreamState"]


class ConnectionLimiter:
    """At most ``limit`` exchanges in flight with one upstream; the rest wait in FIFO order.

    Not an ``asyncio.Semaphore``: its waiters must not bind to one event loop, because a
    ``TestClient`` used without ``with`` runs every request in a new loop.
    """

    __slots__ = ("_waiters", "active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()

    async def acquire(self, timeout: float) -> bool:
        """Take a slot; False if none came free within ``timeout`` seconds."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
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


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class UpstreamState:
    """One upstream as the middleware serves it."""

    __slots__ = ("limiter", "transport", "upstream")

    def __init__(self, upstream: Upstream, transport: UpstreamTransport | None, limit: int):
        self.upstream = upstream
        #: None: the middleware's default transport, opened with the lifespan.
        self.transport = transport
        self.limiter = ConnectionLimiter(limit)

    @property
    def weight(self) -> int:
        return self.upstream.weight

    def __repr__(self) -> str:
        return f"<UpstreamState {self.upstream.url} in_flight={self.limiter.active}>"


class PoolState:
    """One pool as the middleware serves it: its members and their balancer."""

    __slots__ = ("balancer", "members", "pool", "pool_name", "prefix")

    def __init__(self, prefix: str, pool: Pool, members: list[UpstreamState]) -> None:
        self.pool_name = prefix
        self.prefix = prefix.encode("ascii") if prefix != "/" else b""
        self.pool = pool
        self.members = members
        self.balancer: RoundRobin[UpstreamState] | Weighted[UpstreamState] = balancer_for(members)
