"""When an upstream is unhealthy: active checks (HAProxy's rise/fall) and passive ejection
(nginx's max_fails/fail_timeout, with a half-open probe).

``UpstreamHealth`` holds one upstream's state and applies the rules; it never reads a
clock itself (the pool passes ``now``), so thresholds, windows and half-open probing are
tested with an injected clock and no sleeps. ``probe`` runs one active check through the
same transport as traffic; ``HealthChecker`` runs a pool's checks while the app serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .config import HealthCheck
from .counters import UpstreamStats
from .errors import UpstreamError, UpstreamTimeout
from .tasks import cancel_and_wait
from .transport.base import UpstreamRequest, UpstreamTransport
from .upstream import Upstream

__all__ = ["USER_AGENT", "CheckResult", "Checked", "HealthChecker", "UpstreamHealth", "probe"]

logger = logging.getLogger("rr_middleware")

USER_AGENT = b"rr-middleware-health/0.1"
_MAX_CHECK_BODY = 64 * 1024  # read (and discard) at most this much of a check's body


@dataclass(frozen=True)
class CheckResult:
    """One active check: passed or not, the status (0 if none came), what failed, when,
    and how long it took."""

    ok: bool
    status: int
    error: str | None
    at: float
    latency: float


class UpstreamHealth:
    """One upstream's health: active (``healthy``) and passive (``ejected_until``)."""

    __slots__ = (
        "check_fails",
        "check_passes",
        "ejected_until",
        "fails",
        "half_open",
        "healthy",
        "last_check",
        "probe_deadline",
        "probing",
        "recovered_at",
        "window_start",
    )

    def __init__(self) -> None:
        self.healthy = True  # upstreams start healthy; the first check result counts
        self.check_passes = 0
        self.check_fails = 0
        self.last_check: CheckResult | None = None
        self.fails = 0
        self.window_start = 0.0
        self.ejected_until: float | None = None
        self.half_open = False
        self.probing = False
        self.probe_deadline = 0.0
        self.recovered_at: float | None = None  # for slow start

    # -- active -------------------------------------------------------------------------

    def record_check(self, result: CheckResult, check: HealthCheck) -> str | None:
        """Count a check; return "up" or "down" when the state changes."""
        self.last_check = result
        if result.ok:
            self.check_passes += 1
            self.check_fails = 0
            if not self.healthy and self.check_passes >= check.rise:
                self.healthy = True
                self.recovered_at = result.at
                return "up"
        else:
            self.check_fails += 1
            self.check_passes = 0
            if self.healthy and self.check_fails >= check.fall:
                self.healthy = False
                return "down"
        return None

    # -- passive ------------------------------------------------------------------------

    def record_failure(self, now: float, max_fails: int, fail_timeout: float) -> str | None:
        """Count a failed exchange; return "ejected" when it takes the upstream out."""
        if self.half_open:
            # The one probe after an ejection failed: out for another fail_timeout.
            self.half_open = self.probing = False
            self.ejected_until = now + fail_timeout
            return "ejected"
        if max_fails <= 0 or self.ejected_until is not None:
            return None
        if now - self.window_start > fail_timeout:
            self.window_start = now
            self.fails = 0
        self.fails += 1
        if self.fails >= max_fails:
            self.fails = 0
            self.ejected_until = now + fail_timeout
            return "ejected"
        return None

    def record_success(self, now: float) -> str | None:
        """Count a good exchange; return "recovered" when it ends a half-open probe."""
        if self.half_open:
            self.half_open = self.probing = False
            self.fails = 0
            self.recovered_at = now
            return "recovered"
        return None

    def expire_ejection(self, now: float) -> bool:
        """Past ``ejected_until``: turn half-open (one request may probe). True if so."""
        if self.ejected_until is not None and now >= self.ejected_until:
            self.ejected_until = None
            self.half_open = True
            self.probing = False
            return True
        return False

    def ramp(self, now: float, slow_start: float) -> tuple[int, float | None]:
        """Slow start: the share of weight in tenths (1..10) and when it next grows."""
        if slow_start <= 0 or self.recovered_at is None:
            return 10, None
        elapsed = now - self.recovered_at
        if elapsed >= slow_start:
            self.recovered_at = None
            return 10, None
        tenths = 1 + int(9 * elapsed / slow_start)
        next_step = self.recovered_at + tenths * slow_start / 9
        while next_step <= now and tenths < 10:  # float rounding at a step's very instant
            tenths += 1
            next_step = self.recovered_at + tenths * slow_start / 9
        if tenths >= 10:
            self.recovered_at = None
            return 10, None
        return tenths, next_step


async def probe(
    transport: UpstreamTransport,
    upstream: Upstream,
    check: HealthCheck,
    now: float,
) -> CheckResult:
    """One active check of ``upstream``: GET ``check.path`` with the upstream's own Host,
    a short User-Agent, no cookies and no credentials, within ``check.timeout``. ``now``
    (the pool's clock) stamps the result."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    request = UpstreamRequest(
        method="GET",
        upstream=upstream,
        target=upstream.base_path + check.path.encode("ascii"),
        headers=[(b"host", upstream.host_header), (b"user-agent", USER_AGENT)],
        body=None,
        connect_timeout=check.timeout,
        read_timeout=check.timeout,
    )
    status = 0
    try:
        status = await asyncio.wait_for(_exchange(transport, request), check.timeout)
    except (asyncio.TimeoutError, UpstreamTimeout):
        # The check's own deadline and the transport's read deadline are the same
        # number; whichever fires first, the check reports it the same way.
        error: str | None = f"timeout: no answer within {check.timeout}s"
    except UpstreamError as exc:
        error = f"{exc.kind}: {exc}"
    except Exception as exc:  # a transport bug must not end the checker
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None if status in check.expect else f"status {status}"
    return CheckResult(
        ok=error is None,
        status=status,
        error=error,
        at=now,
        latency=loop.time() - started,
    )


async def _exchange(transport: UpstreamTransport, request: UpstreamRequest) -> int:
    response = await transport.send(request)
    try:
        read = 0
        while read <= _MAX_CHECK_BODY and (chunk := await response.read()):
            read += len(chunk)
        return response.status
    finally:
        await response.aclose()


class Checked(Protocol):
    """What a checker needs of a pool member."""

    @property
    def upstream(self) -> Upstream: ...
    @property
    def transport(self) -> UpstreamTransport: ...
    @property
    def health(self) -> UpstreamHealth: ...
    @property
    def stats(self) -> UpstreamStats: ...


class HealthChecker:
    """A pool's active checks while the app serves: every member checked at once, every
    ``interval`` seconds give or take ``jitter`` (so a fleet of workers does not probe in
    lockstep), and newcomers from discovery at once (``check_soon``). ``apply`` takes a
    round's results and returns each member's transition ("up", "down" or "").

    ``lead``, when set (worker processes sharing a zone), says whether this process is the
    one that probes; the others ask again every interval, so one of them takes over
    within an interval of the prober's end.
    """

    def __init__(
        self,
        name: str,
        check: HealthCheck,
        members: Callable[[], Sequence[Any]],
        clock: Callable[[], float],
        rng: random.Random,
        apply: Callable[[list[tuple[Any, CheckResult]]], list[str]],
    ) -> None:
        self.name = name
        self.check = check
        self._members = members
        self._clock = clock
        self._rng = rng
        self._apply = apply
        self.lead: Callable[[], bool] | None = None
        self._due: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._due = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._due = None
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait((task,))  # the interval's wait_for can lose a cancellation

    def check_soon(self) -> None:
        """Check now rather than an interval from now (new members arrived)."""
        if self._due is not None:
            self._due.set()

    async def check_now(self) -> None:
        """Check every member once, concurrently, and apply the results."""
        check = self.check
        now = self._clock()
        members = list(self._members())  # replaced, never mutated, when membership changes
        results = await asyncio.gather(
            *(probe(m.transport, m.upstream, check, now) for m in members)
        )
        pairs = list(zip(members, results, strict=True))
        for (member, result), transition in zip(pairs, self._apply(pairs), strict=True):
            if transition:
                self._log_transition(member, transition, result)

    async def _run(self) -> None:
        due = self._due
        assert due is not None
        check = self.check
        while True:
            due.clear()
            if self.lead is None or self.lead():
                await self.check_now()
            spread = check.jitter * (2 * self._rng.random() - 1)
            # Sleep an interval, or less when newcomers arrive to be checked.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(due.wait(), check.interval * (1 + spread))

    def _log_transition(self, member: Checked, transition: str, result: CheckResult) -> None:
        if transition == "down":
            logger.warning(
                "pool %s: upstream %s is DOWN after %d failed checks (last: %s)",
                self.name,
                member.upstream.url,
                self.check.fall,
                result.error,
            )
        else:
            logger.warning(
                "pool %s: upstream %s is UP after %d passed checks",
                self.name,
                member.upstream.url,
                self.check.rise,
            )
