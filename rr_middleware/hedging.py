"""Hedged requests ("The Tail at Scale", Dean & Barroso, 2013; Envoy's hedge policy): when
an attempt's response headers have not come within ``hedge_after``, the same request goes
to another upstream as well, and the first headers win.

A pool hedges only requests that may be sent twice: idempotent methods (or any, with
``retry_non_idempotent``) whose body is empty or held whole within ``retry_body_limit``;
never a streaming upload, and never a WebSocket (``websocket.py`` does not come here).
``hedge_after`` is seconds, or ``"p95"`` (any ``"pNN"``): that quantile of the pool's
recent response-header latencies (``latency.LatencyWindow``; no hedging until 50 answers
came). At most ``max_hedges`` hedges per attempt, each one more ``hedge_after`` apart,
each taking a place in the pool's retry budget (``budget.py``): none is sent over budget.

The race is one object used as an ``Attempt`` (``HedgedAttempt``): each try is an
``Attempt`` of its own (pick, slot, outcome), run as a task. The first to bring response
headers is the winner, relayed as any attempt; every other is cancelled, which closes its
connection (the transport aborts an exchange cancelled before its headers, and a response
closed unread is never returned to the pool mid-body), frees its slot, and records no
outcome (a loser was not wrong, only late), its time so far going into the window and
its upstream's latency estimate (``peak_ewma``), as a lower bound of its latency. A try
that fails while another is still running leaves the race to it; when all failed, the
last failure is the attempt's, and the retry policy (``forwarding.py``) takes it from
there.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from .errors import ProxyError, UpstreamError
from .latency import LatencyWindow, parse_hedge_after
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from .attempt import Attempt
    from .budget import RetryBudget
    from .config import Pool
    from .members import Member
    from .sticky import Affinity
    from .transport.base import UpstreamRequest, UpstreamResponse
    from .upstream import Upstream

__all__ = ["HedgedAttempt", "Hedging"]

_Tasks = dict["asyncio.Future[UpstreamResponse]", "Attempt"]


class _Pool(Protocol):
    """What a race needs of its pool (``PoolRuntime``)."""

    def attempt(self, tried: list[Member], *, affinity: Affinity | None = None) -> Attempt: ...
    def more_to_try(self, tried: list[Member]) -> bool: ...


class Hedging:
    """A pool's hedging: when to hedge, and how many hedges were sent and won."""

    __slots__ = ("fixed", "max_hedges", "sent", "window", "won")

    def __init__(self, hedge_after: float | str, max_hedges: int) -> None:
        quantile = parse_hedge_after(hedge_after)
        self.fixed = None if quantile is not None else float(hedge_after)
        self.window = LatencyWindow(quantile) if quantile is not None else None
        self.max_hedges = max_hedges
        self.sent = 0
        self.won = 0

    @classmethod
    def of(cls, pool: Pool) -> Hedging | None:
        if pool.hedge_after is None:
            return None
        return cls(pool.hedge_after, pool.max_hedges)

    def delay(self) -> float | None:
        """Seconds after which an attempt is hedged now (None: not yet known)."""
        window = self.window
        return self.fixed if window is None else window.quantile


class HedgedAttempt:
    """One attempt of a request, hedged: ``async with``, ``send()``, then what the
    winning try says (``member``, ``status``, ``fail()``...), as of an ``Attempt``."""

    __slots__ = (
        "_affinity",
        "_budget",
        "_build",
        "_hedges",
        "_hedging",
        "_open",
        "_runtime",
        "_tried",
        "winner",
    )

    def __init__(
        self,
        runtime: _Pool,
        tried: list[Member],
        hedging: Hedging,
        budget: RetryBudget,
        build: Callable[[Upstream], UpstreamRequest],
        affinity: Affinity | None = None,
    ) -> None:
        self._runtime = runtime
        self._affinity = affinity
        self._tried = tried
        self._hedging = hedging
        self._budget = budget
        self._build = build
        self._open: list[Attempt] = []  # entered, not yet ended
        self._hedges: list[Attempt] = []  # the hedges, each holding a place in the budget

    async def __aenter__(self) -> HedgedAttempt:
        first = self._runtime.attempt(self._tried, affinity=self._affinity)
        await first.__aenter__()
        self._open.append(first)
        self.winner = first
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for attempt in self._open:
            if attempt is not self.winner:
                attempt.abandon()
            await attempt.__aexit__(exc_type, exc, tb)
        self._open.clear()
        for _ in self._hedges:
            self._budget.release()
        self._hedges.clear()

    # -- what the winner says ---------------------------------------------------------------

    @property
    def member(self) -> Member:
        return self.winner.member

    @property
    def upstream(self) -> Upstream:
        return self.winner.member.upstream

    @property
    def status(self) -> int:
        return self.winner.status

    @property
    def started(self) -> float:
        return self.winner.started

    def fail(self, error: ProxyError) -> None:
        self.winner.fail(error)

    # -- the race ---------------------------------------------------------------------------

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request`` to the first upstream, hedging while no headers come; the
        first response's headers win."""
        first = self.winner
        delay = self._hedging.delay()
        if delay is None:
            return await first.send(request)
        tasks: _Tasks = {asyncio.ensure_future(first.send(request)): first}
        won: list[asyncio.Future[UpstreamResponse]] = []
        try:
            return await self._race(tasks, delay, won)
        finally:
            await self._end_losers(tasks, won)

    async def _race(
        self, tasks: _Tasks, delay: float, won: list[asyncio.Future[UpstreamResponse]]
    ) -> UpstreamResponse:
        pending = set(tasks)
        may_hedge = True
        failure: UpstreamError | None = None
        while pending:
            hedge_now = may_hedge and len(tasks) <= self._hedging.max_hedges
            done, pending = await asyncio.wait(
                pending,
                timeout=delay if hedge_now else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                may_hedge = self._hedge(tasks, pending)
                continue
            for task in done:
                attempt = tasks[task]
                error = task.exception()
                if error is None:
                    won.append(task)
                    self.winner = attempt
                    self._hedging.won += attempt in self._hedges
                    return task.result()
                if not isinstance(error, UpstreamError):
                    raise error
                if attempt in self._open:  # it entered: its outcome is this failure
                    failure = error
                    self.winner = attempt
                    self._open.remove(attempt)
                    await attempt.__aexit__(type(error), error, error.__traceback__)
                elif failure is None:  # no upstream or slot for a hedge
                    failure = error
                if attempt in self._hedges:
                    self._hedges.remove(attempt)
                    self._budget.release()
        assert failure is not None
        raise failure

    def _hedge(self, tasks: _Tasks, pending: set[asyncio.Future[UpstreamResponse]]) -> bool:
        """Start one more try, if the budget has a place and an upstream is left;
        whether another may follow."""
        runtime = self._runtime
        if not runtime.more_to_try(self._tried) or not self._budget.admit():
            return False
        hedge = runtime.attempt(self._tried)
        self._hedges.append(hedge)
        self._hedging.sent += 1
        task = asyncio.ensure_future(self._run_hedge(hedge))
        tasks[task] = hedge
        pending.add(task)
        return True

    async def _run_hedge(self, hedge: Attempt) -> UpstreamResponse:
        await hedge.__aenter__()  # the pick and a slot; NoUpstream, PoolTimeout
        self._open.append(hedge)
        return await hedge.send(self._build(hedge.upstream))

    async def _end_losers(self, tasks: _Tasks, won: list[asyncio.Future[UpstreamResponse]]) -> None:
        """Cancel every try but the winner (all, when the request ends without one),
        close what they got, free their slots and budget places; their time so far goes
        into the latency window."""
        losers = [task for task in tasks if task not in won]
        await cancel_and_wait(losers)  # a loser's connect (wait_for) can lose one
        now = time.monotonic()
        for task in losers:
            attempt = tasks[task]
            if not task.cancelled() and task.exception() is None:
                await task.result().aclose()  # headers came with the winner's: unread
            if attempt in self._open:
                self._open.remove(attempt)
                record = attempt.runtime.record_latency
                if record is not None and not attempt.status:
                    # No headers in this long: at least that, for the window and for its
                    # upstream's estimate (``peak_ewma``), which a slow upstream that only
                    # ever loses would otherwise never raise.
                    record(attempt.member.latency, now - attempt.started, False)
                attempt.abandon()
                await attempt.__aexit__(None, None, None)
            if attempt in self._hedges:
                self._hedges.remove(attempt)
                self._budget.release()
