"""What a discovery source is, and the loop that keeps a pool's members in step with one.

A source (``ConsulDiscovery``, ``DNSDiscovery``, or your own) is plain configuration with
one method, ``watch()``: an async generator that yields the pool's whole member list each
time it changes and raises ``DiscoveryError`` when the registry cannot be read. Every call
to ``watch()`` starts afresh with state of its own (its HTTP client, its Consul index), so
one source object may serve several middleware instances without sharing anything.

``Watcher`` runs one source for one pool: it applies each list (the pool diffs it against
its members), signals the first one so the lifespan can wait for it, and on failure keeps
the last good members and retries with capped exponential backoff; it never gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from ..errors import FieldError
from ..tasks import cancel_and_wait
from ..upstream import Upstream

__all__ = ["Discovery", "DiscoveryError", "Watcher", "check_seconds", "upstream_at"]

logger = logging.getLogger("rr_middleware")


class DiscoveryError(Exception):
    """The registry could not be read (unreachable, refused, answered nonsense)."""


@runtime_checkable
class Discovery(Protocol):
    """A source of pool members. ``startup_timeout`` bounds how long the lifespan waits
    for the first list; after a failure the watch restarts after ``retry_initial``
    seconds, doubling up to ``retry_max``; ``describe()`` names the source in logs and on
    the status page."""

    startup_timeout: float
    retry_initial: float
    retry_max: float

    def watch(self) -> AsyncIterator[list[Upstream]]: ...

    def describe(self) -> str: ...


class Watcher:
    """Keeps one pool's members in step with its discovery source while the app runs."""

    def __init__(
        self,
        pool_name: str,
        source: Discovery,
        apply: Callable[[list[Upstream]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool_name = pool_name
        self.source = source
        self.apply = apply
        self.clock = clock
        self.updates = 0
        self.updated_at: float | None = None  # wall clock, for the status page
        self.error: str | None = None  # the last failure, None once a read succeeds again
        self._rng = random.Random()
        self._first: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._first = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())

    async def wait_first(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first member list; True if it came."""
        if self._first is None:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first.wait(), timeout)
        return self._first.is_set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # A source may await asyncio.wait_for (the DNS one does), which can lose a
            # cancellation: see cancel_and_wait.
            await cancel_and_wait((task,))

    def _applied(self, upstreams: list[Upstream]) -> None:
        if not upstreams and not self.updates:
            logger.warning(
                "pool %s: %s lists no upstreams; answering 503 until some arrive",
                self.pool_name,
                self.source.describe(),
            )
        self.apply(upstreams)
        self.updates += 1
        self.updated_at = self.clock()
        if self.error is not None:
            logger.warning("pool %s: %s answers again", self.pool_name, self.source.describe())
        self.error = None
        assert self._first is not None
        self._first.set()

    async def _run(self) -> None:
        source = self.source
        delay = source.retry_initial
        while True:
            try:
                lists = source.watch()
                try:
                    async for upstreams in lists:
                        self._applied(upstreams)
                        delay = source.retry_initial
                finally:
                    close = getattr(lists, "aclose", None)  # async generators hold resources
                    if close is not None:
                        await close()
                problem = "its watch ended"
            except DiscoveryError as exc:
                problem = str(exc)
            except Exception as exc:  # a bug in a source must not end discovery for good
                logger.exception("pool %s: %s failed", self.pool_name, self.source.describe())
                problem = f"{type(exc).__name__}: {exc}"
            self.error = problem
            wait = delay * self._rng.uniform(0.8, 1.2)  # workers must not retry in step
            kept = (
                "keeping the upstreams it last returned"
                if self.updates
                else "no upstreams yet (the pool answers 503)"
            )
            logger.warning(
                "pool %s: %s failed (%s); %s; retrying in %.1fs",
                self.pool_name,
                self.source.describe(),
                problem,
                kept,
                wait,
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, source.retry_max)


def check_seconds(
    owner: str, name: str, value: Any, *, allow_zero: bool = False, maximum: float = math.inf
) -> None:
    """Validate option ``name`` of ``owner`` (``"consul"``), given in seconds; a
    ``FieldError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError.of(owner, name, f"must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or value > maximum:
        limit = f" and at most {maximum:g}" if maximum != math.inf else ""
        floor = ">= 0" if allow_zero else "> 0"
        raise FieldError.of(owner, name, f"must be {floor}{limit} seconds, got {value!r}")


def upstream_at(scheme: str, host: str, port: int, weight: int = 1) -> Upstream:
    """The ``Upstream`` for an address a registry returned (IPv6 in brackets)."""
    netloc = f"[{host}]" if ":" in host else host
    return Upstream(f"{scheme}://{netloc}:{port}", weight=weight)
