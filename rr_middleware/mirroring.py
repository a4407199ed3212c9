"""Mirroring (shadowing): a copy of a pool's requests to another pool, answer discarded.

``Pool(mirror="shadow", mirror_fraction=0.1)`` copies one request in ten to the pool
keyed ``"shadow"`` (a name or a prefix in ``pools=``): same method, path (as sent to the
primary), headers and body; only ``Host`` is the mirror upstream's (unless the pool
preserves the client's). nginx's ``mirror``, Envoy's ``request_mirror_policies``.

The copy never touches the client's request: it is started as a task of its own once
the request's body is read (only a body read whole within ``mirror_body_limit`` is
copied; a longer or still streaming one is skipped, and counted), and the primary goes on
at once. Its answer is read and dropped; its failures are counted, never reported to the
client and never held against the primary pool. At most ``mirror_max_in_flight`` copies
are in flight; past that a copy is dropped (and counted) rather than queued, so a slow
or hanging mirror costs the primary nothing but those tasks, each bounded by the mirror
pool's own timeouts. Copies in flight when the app stops are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ProxyError
from .tasks import cancel_and_wait
from .transport.base import UpstreamRequest, UpstreamResponse

if TYPE_CHECKING:
    from .attempt import Attempt
    from .config import Pool
    from .members import Member


class _Target(Protocol):
    """What a mirror needs of the pool it copies to (a ``PoolRuntime``)."""

    name: str
    pool: Pool

    def attempt(self, tried: list[Member]) -> Attempt: ...


__all__ = ["Mirror"]

logger = logging.getLogger("rr_middleware")


class Mirror:
    """The copies one pool sends to its mirror pool, and their counts."""

    __slots__ = ("_rng", "_tasks", "counts", "fraction", "limit", "max_in_flight", "target")

    def __init__(
        self,
        target: _Target,
        fraction: float,
        body_limit: int,
        max_in_flight: int,
        rng: random.Random,
    ) -> None:
        self.target = target
        self.fraction = fraction
        self.limit = body_limit
        self.max_in_flight = max_in_flight
        self._rng = rng
        self._tasks: set[asyncio.Task[None]] = set()
        #: Copies started, dropped (too many in flight), skipped (body not whole within
        #: the limit), failed (no answer from the mirror), answered.
        self.counts = {"sent": 0, "dropped": 0, "skipped": 0, "failed": 0, "answered": 0}

    def retarget(self, target: _Target, pool: Pool, rng: random.Random) -> None:
        """Follow a reconfiguration: the mirror pool's runtime and the source pool's
        options now (the copies in flight and the counts stay)."""
        self.target = target
        self.fraction = pool.mirror_fraction
        self.limit = pool.mirror_body_limit
        self.max_in_flight = pool.mirror_max_in_flight
        self._rng = rng

    def chosen(self) -> bool:
        """Whether this request is one of the mirrored fraction."""
        return self.fraction >= 1.0 or self._rng.random() < self.fraction

    def submit(
        self,
        method: str,
        suffix: bytes,
        headers: list[tuple[bytes, bytes]],
        has_host: bool,
        body: bytes | None,
    ) -> None:
        """Send a copy of this request, in a task of its own (or count why not)."""
        if body is not None and len(body) > self.limit:
            self.counts["skipped"] += 1
            return
        if len(self._tasks) >= self.max_in_flight:
            self.counts["dropped"] += 1
            return
        self.counts["sent"] += 1
        task = asyncio.get_running_loop().create_task(
            self._copy(method, suffix, headers, has_host, body)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def skip(self) -> None:
        """A chosen request whose body is not whole within the limit."""
        self.counts["skipped"] += 1

    async def _copy(
        self,
        method: str,
        suffix: bytes,
        headers: list[tuple[bytes, bytes]],
        has_host: bool,
        body: bytes | None,
    ) -> None:
        target = self.target
        pool = target.pool
        try:
            async with target.attempt([]) as attempt:
                upstream = attempt.upstream
                path = upstream.base_path + suffix
                request = UpstreamRequest(
                    method=method,
                    upstream=upstream,
                    target=path if path.startswith(b"/") else b"/" + path,
                    headers=headers if has_host else [*headers, (b"host", upstream.host_header)],
                    body=body,
                    connect_timeout=pool.connect_timeout,
                    read_timeout=pool.timeout,
                )
                response = await attempt.send(request)
                try:
                    # Read to the end, so the connection can be reused; but for at most
                    # the pool's timeout in all: an answer that never ends (an event
                    # stream) would hold this copy, and its place, for good.
                    await asyncio.wait_for(_drain(response), pool.timeout)
                except asyncio.TimeoutError:
                    pass  # it answered; the rest is dropped with its connection
                finally:
                    await response.aclose()
            self.counts["answered"] += 1
        except ProxyError as exc:
            self.counts["failed"] += 1
            logger.debug("pool %s: mirrored %s failed: %s", target.name, method, exc)
        except Exception:  # a copy must never fail anything else: logged, counted
            self.counts["failed"] += 1
            logger.exception("pool %s: mirrored %s failed", target.name, method)

    async def stop(self) -> None:
        """Cancel the copies in flight (the app stops) and wait for them to end."""
        tasks = list(self._tasks)
        await cancel_and_wait(tasks)
        for task in tasks:  # collect outcomes so none is reported as never retrieved
            if not task.cancelled():
                task.exception()

    def status(self) -> dict[str, Any]:
        return {"pool": self.target.name, "in_flight": len(self._tasks), **self.counts}


async def _drain(response: UpstreamResponse) -> None:
    while await response.read():
        pass
