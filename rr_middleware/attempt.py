"""The lease one try of a request holds on one upstream, from the pick to the end of the
response (httpx's ``_send_single_request`` is the model for this layer).

It is the one place where a request meets a member: it picks, takes a connection slot,
times the exchange, and on exit records the outcome into health, ejection and counters
exactly once. Nothing else reports outcomes, and nothing releases a slot by hand.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from .errors import NoUpstream, PoolTimeout, ProxyError, UpstreamError, UpstreamProtocolError
from .tracing import TRACED

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Pool
    from .latency import PeakEwma
    from .members import Member
    from .sticky import Affinity
    from .tracing import AttemptTracer
    from .transport.base import UpstreamRequest, UpstreamResponse
    from .upstream import Upstream

__all__ = ["Attempt"]


class Outcomes(Protocol):
    """What an attempt needs of its pool (``PoolRuntime``)."""

    name: str
    pool: Pool
    record_latency: Callable[[PeakEwma, float, bool], None] | None
    tracer: AttemptTracer | None

    def pick(self, tried: list[Member], affinity: Affinity | None = None) -> Member | None: ...
    def succeeded(self, member: Member) -> None: ...
    def failed(self, member: Member, kind: str, status: int = 0) -> None: ...


class Attempt:
    """One try of one request on one upstream: the lease from the pick to the end of the
    response (httpx's ``_send_single_request`` is the model for this layer).

    ``async with pool.attempt(tried) as attempt``: picks an upstream not in ``tried`` (and
    adds it; ``NoUpstream`` if none is left) and takes one of its connection slots within
    ``pool_timeout`` (``PoolTimeout``). ``send()`` sends the request and times the
    response headers. On exit the slot is released and the outcome recorded, exactly once:

    - the block ended normally: a success, unless the status was one of the pool's
      ``unhealthy_statuses`` (recorded as a failure when the headers came);
    - an ``UpstreamError`` escaped, or ``fail(error)`` was called: a failure of its kind,
      if it ``counts`` against the upstream;
    - anything else (the client left, its body failed, a server shutting down): no
      outcome, since it says nothing of the upstream. A half-open probe left without one
      lets another request probe once its time is up.
    """

    __slots__ = (
        "_affinity",
        "_recorded",
        "_slot",
        "_tried",
        "member",
        "runtime",
        "started",
        "status",
    )

    def __init__(
        self, runtime: Outcomes, tried: list[Member], slot: bool, affinity: Affinity | None
    ) -> None:
        self.runtime = runtime
        self._tried = tried
        self._slot = slot
        self._affinity = affinity
        self._recorded = False
        self.status = 0  # the response's, once its headers came

    async def __aenter__(self) -> Attempt:
        runtime = self.runtime
        affinity = self._affinity
        member = (
            runtime.pick(self._tried) if affinity is None else runtime.pick(self._tried, affinity)
        )
        if member is None:
            raise NoUpstream(f"pool {runtime.name}: no upstream left to try")
        self._tried.append(member)
        self.member = member
        if self._slot:
            limiter = member.limiter
            if limiter.active < limiter.limit and not limiter.waiting:
                limiter.active += 1  # the common case, without a coroutine to wait in
                limiter.load.in_flight += 1
            else:
                timeout = runtime.pool.pool_timeout
                if not await limiter.acquire(timeout):
                    url = member.upstream.url
                    raise PoolTimeout(f"{url}: no free connection within {timeout}s")
        self.started = time.monotonic()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        member = self.member
        if self._slot:
            member.limiter.release()
        if self._recorded:
            return
        if exc is None:
            self._record(None)
        elif isinstance(exc, UpstreamError):
            self._record(exc)

    @property
    def upstream(self) -> Upstream:
        return self.member.upstream

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request`` to this attempt's upstream; return once its headers came."""
        tracer = self.runtime.tracer
        if tracer is None or TRACED.get() is None:
            response = await self.member.transport.send(request)
        else:  # a client span (``tracing.py``)
            response = await tracer.send(self.member, request)
        status = response.status
        if not 200 <= status <= 599:  # any transport: the ASGI server could not send it
            await response.aclose()
            raise UpstreamProtocolError(f"upstream answered status {status:03d}")
        member = self.member
        stats = member.stats
        elapsed = time.monotonic() - self.started
        stats.headers_latency.record(elapsed)
        record_latency = self.runtime.record_latency
        if record_latency is not None:
            record_latency(member.latency, elapsed, status >= 500)
        stats.codes[status] = stats.codes.get(status, 0) + 1
        self.status = status
        if status in self.runtime.pool.unhealthy_statuses:
            self._unhealthy(status)
        return response

    def answered(self, status: int) -> None:
        """The upstream answered ``status`` (its headers came): counted, and a status in
        the pool's ``unhealthy_statuses`` is this attempt's outcome, a failure."""
        stats = self.member.stats
        stats.codes[status] = stats.codes.get(status, 0) + 1
        self.status = status
        if status in self.runtime.pool.unhealthy_statuses:
            self._unhealthy(status)

    def _unhealthy(self, status: int) -> None:
        self._recorded = True
        self.runtime.failed(self.member, f"status {status}", status)

    def succeeded(self) -> None:
        """Record a success now, before the block ends (a WebSocket's, at its handshake)."""
        if not self._recorded:
            self._record(None)

    def fail(self, error: ProxyError) -> None:
        """Record ``error`` as this attempt's outcome now, before the block ends."""
        if not self._recorded and isinstance(error, UpstreamError):
            self._record(error)

    def abandon(self) -> None:
        """No outcome: this upstream was not asked (it cannot take this request)."""
        self._recorded = True

    def _record(self, error: UpstreamError | None) -> None:
        self._recorded = True
        if error is None:
            self.runtime.succeeded(self.member)
        elif error.counts:
            self.runtime.failed(self.member, error.kind)
