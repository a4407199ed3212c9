"""Run-time state of pools and upstreams, owned by one middleware instance.

The configuration dataclasses stay plain; what changes while serving lives here: the
connection slots, each upstream's health, the set of upstreams eligible for traffic and
the balancer over it. The eligible set is rebuilt only when something changes (a health
transition, an ejection expiring, a slow-start step, a drain, a membership change from
discovery), so a pick does no scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .balancing import Balancer, build
from .config import Pool, Upstream
from .health import CheckResult, UpstreamHealth, probe
from .metrics import UpstreamStats
from .transport.base import UpstreamTransport

if TYPE_CHECKING:
    from .discovery import Watcher

__all__ = ["ConnectionLimiter", "PoolRuntime", "UpstreamState"]

logger = logging.getLogger("rr_middleware")


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

    __slots__ = (
        "drained",
        "failures",
        "health",
        "limiter",
        "requests",
        "stats",
        "transport",
        "upstream",
        "websockets",
    )

    def __init__(self, upstream: Upstream, transport: UpstreamTransport | None, limit: int):
        self.upstream = upstream
        #: None: the middleware's default transport, opened with the lifespan.
        self.transport = transport
        self.limiter = ConnectionLimiter(limit)
        self.health = UpstreamHealth()
        self.drained = False
        self.requests = 0
        self.failures = 0
        self.websockets = 0  # open WebSocket connections (not limited by max_connections)
        self.stats = UpstreamStats()

    @property
    def in_flight(self) -> int:
        return self.limiter.active

    def __repr__(self) -> str:
        return f"<UpstreamState {self.upstream.url} in_flight={self.in_flight}>"


class PoolRuntime:
    """One pool as a middleware serves it: members, their health, and the balancer.

    ``make_member`` turns an ``Upstream`` into its ``UpstreamState`` (with the transport
    it is reached by); the pool's static upstreams are made at once, discovered ones as
    they arrive (``set_members``).
    """

    def __init__(
        self, prefix: str, pool: Pool, make_member: Callable[[Upstream], UpstreamState]
    ) -> None:
        self.name = prefix
        self.prefix = prefix.encode("ascii") if prefix != "/" else b""
        self.pool = pool
        self.make_member = make_member
        self.members = [make_member(upstream) for upstream in pool.members]
        #: Keeps the members in step with ``pool.discovery``, while the lifespan runs.
        self.watcher: Watcher | None = None
        self._checks_due: asyncio.Event | None = None
        self.clock = pool.clock
        self.rng = pool.random if pool.random is not None else random.Random()
        self.eligible: list[UpstreamState] = []
        self.balancer: Balancer[UpstreamState] = build(pool.policy, [], [], self.rng)
        self.all_down = False
        self._next_change = math.inf
        self._checker: asyncio.Task[None] | None = None
        self.refresh()
        pool._runtime = self  # pool.snapshot() and pool.drain() read this

    # -- eligibility --------------------------------------------------------------------

    def refresh(self, resume_after: UpstreamState | None = None) -> None:
        """Rebuild the set of upstreams that may take traffic, and its balancer (which
        carries on after ``resume_after``, by default after its predecessor's last pick)."""
        now = self.clock()
        pool = self.pool
        eligible: list[UpstreamState] = []
        weights: list[int] = []
        next_change = math.inf
        for member in self.members:
            health = member.health
            if member.drained or member.upstream.weight <= 0 or not health.healthy:
                continue
            if health.ejected_until is not None and not health.expire_ejection(now):
                next_change = min(next_change, health.ejected_until)
                continue
            if health.half_open and health.probing:
                # Exactly one request probes a half-open upstream. Should its outcome
                # never be reported (the client left first), another may probe once it
                # has had all the time a request gets.
                if now < health.probe_deadline:
                    next_change = min(next_change, health.probe_deadline)
                    continue
                health.probing = False
            tenths, ramp_step = health.ramp(now, pool.slow_start)
            if ramp_step is not None:
                next_change = min(next_change, ramp_step)
            eligible.append(member)
            weights.append(member.upstream.weight * tenths)
        self.all_down = not eligible
        if self.all_down and pool.on_all_down == "try_all":
            # Panic mode (Envoy's name; the seed's behaviour too): better to try every
            # upstream than to refuse all traffic because every check says down.
            eligible = [m for m in self.members if not m.drained and m.upstream.weight > 0]
            weights = [m.upstream.weight for m in eligible]
        self.eligible = eligible
        self.balancer = build(pool.policy, eligible, weights, self.rng, self.balancer, resume_after)
        self._next_change = next_change

    def pick(self, tried: list[UpstreamState]) -> UpstreamState | None:
        """The upstream for the next attempt, or None when none may be tried."""
        if self._next_change != math.inf and self.clock() >= self._next_change:
            self.refresh()
        member = self.balancer.pick(tried)
        if member is not None and member.health.half_open and not self.all_down:
            pool = self.pool
            member.health.probing = True
            member.health.probe_deadline = (
                self.clock() + pool.pool_timeout + pool.connect_timeout + pool.timeout
            )
            self.refresh(resume_after=member)  # the probe was a turn of the rotation
        return member

    @property
    def panic(self) -> bool:
        """True while no upstream is eligible on its own health and the pool routes to
        them all anyway (``on_all_down="try_all"``, Envoy's panic mode). Not when every
        upstream is drained or weighs 0: then there is nowhere to route."""
        return self.all_down and bool(self.eligible)

    def more_to_try(self, tried: list[UpstreamState]) -> bool:
        """Whether a member not yet tried by this request remains (membership may have
        changed since the request started)."""
        return any(member not in tried for member in self.members)

    def retry_after(self) -> int:
        """Seconds a client should wait when every upstream is down (at least 1)."""
        now = self.clock()
        ejections = [m.health.ejected_until for m in self.members if m.health.ejected_until]
        check = self.pool.health_check
        waits = [until - now for until in ejections]
        if check is not None:
            waits.append(check.interval)
        return max(1, math.ceil(min(waits))) if waits else 1

    # -- outcomes -------------------------------------------------------------------------

    def report_success(self, member: UpstreamState) -> None:
        member.requests += 1
        if member.health.half_open and member.health.record_success(self.clock()):
            member.stats.transitions += 1
            logger.warning(
                "pool %s: upstream %s recovered (half-open probe succeeded)",
                self.name,
                member.upstream.url,
            )
            self.refresh()

    def report_failure(self, member: UpstreamState, kind: str) -> None:
        member.requests += 1
        member.failures += 1
        member.stats.failure(kind)
        pool = self.pool
        if len(self.members) < 2 and not member.health.half_open:
            return  # a pool of one is never ejected: there is nowhere else to go
        probing = member.health.half_open
        if member.health.record_failure(self.clock(), pool.max_fails, pool.fail_timeout):
            member.stats.ejections += 1
            member.stats.transitions += 1
            logger.warning(
                "pool %s: upstream %s ejected for %ss (%s; last: %s)",
                self.name,
                member.upstream.url,
                pool.fail_timeout,
                "its half-open probe failed" if probing else f"{pool.max_fails} failures",
                kind,
            )
            self.refresh()

    def set_drained(self, url: str, drained: bool) -> None:
        for member in self.members:
            if member.upstream.url == url:
                if member.drained != drained:
                    member.drained = drained
                    logger.warning(
                        "pool %s: upstream %s %s",
                        self.name,
                        url,
                        "drained" if drained else "back in rotation",
                    )
                    self.refresh()
                return
        raise ValueError(f"pool {self.name}: no upstream {url!r}")

    # -- membership (discovery) -----------------------------------------------------------

    def set_members(self, upstreams: list[Upstream]) -> None:
        """Make ``upstreams`` the pool's members, as a diff: an upstream that stays keeps
        its state (health, counters, connections, place in the rotation; a new weight is
        taken); a removed one gets no new requests while those in flight finish; a new one
        starts as a static upstream does (healthy until checked, slow start if set)."""
        current = {_identity(m.upstream): m for m in self.members}
        members: list[UpstreamState] = []
        added: list[UpstreamState] = []
        reweighed = False
        now = self.clock()
        seen: set[str] = set()
        for upstream in upstreams:
            identity = _identity(upstream)
            if identity in seen:
                logger.warning(
                    "pool %s: %s listed twice by discovery; using it once", self.name, upstream.url
                )
                continue
            seen.add(identity)
            member = current.pop(identity, None)
            if member is None:
                member = self.make_member(upstream)
                if self.watcher is not None and self.watcher.updates:
                    member.health.recovered_at = now  # a newcomer ramps up (slow start)
                added.append(member)
            elif member.upstream.weight != upstream.weight:
                logger.warning(
                    "pool %s: upstream %s weight %d -> %d",
                    self.name,
                    upstream.url,
                    member.upstream.weight,
                    upstream.weight,
                )
                member.upstream = upstream
                reweighed = True
            members.append(member)
        removed = list(current.values())
        if not (added or removed or reweighed) and members == self.members:
            return
        for member in added:
            logger.warning("pool %s: upstream %s joined", self.name, member.upstream.url)
        for member in removed:
            logger.warning(
                "pool %s: upstream %s left (%d in flight finish there)",
                self.name,
                member.upstream.url,
                member.in_flight,
            )
        if not members:
            logger.warning("pool %s: no upstreams left; answering 503", self.name)
        self.members = members
        self.refresh()
        if added and self._checks_due is not None:
            self._checks_due.set()  # check newcomers now, not an interval from now

    # -- active checks --------------------------------------------------------------------

    def start_checks(self, default: UpstreamTransport) -> None:
        if self.pool.health_check is not None and self._checker is None:
            self._checks_due = asyncio.Event()
            self._checker = asyncio.ensure_future(self._check_forever(default))

    async def stop_checks(self) -> None:
        self._checks_due = None
        checker, self._checker = self._checker, None
        if checker is not None:
            checker.cancel()
            await asyncio.wait((checker,))

    async def check_now(self, default: UpstreamTransport) -> None:
        """Check every upstream once, concurrently, and apply the results."""
        check = self.pool.health_check
        if check is None:
            return
        now = self.clock()
        members = self.members  # replaced, never mutated, when membership changes
        results = await asyncio.gather(
            *(probe(m.transport or default, m.upstream, check, now) for m in members)
        )
        changed = False
        for member, result in zip(members, results, strict=True):
            member.stats.checks["pass" if result.ok else "fail"] += 1
            transition = member.health.record_check(result, check)
            if transition is not None:
                member.stats.transitions += 1
                changed = True
                _log_check_transition(self.name, member, transition, result, check)
        if changed:
            self.refresh()

    async def _check_forever(self, default: UpstreamTransport) -> None:
        check = self.pool.health_check
        assert check is not None
        due = self._checks_due
        assert due is not None
        while True:
            due.clear()
            await self.check_now(default)
            spread = check.jitter * (2 * self.rng.random() - 1)
            # Sleep an interval, or less when newcomers arrive to be checked.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(due.wait(), check.interval * (1 + spread))

    # -- introspection --------------------------------------------------------------------

    def refresh_if_due(self) -> None:
        """Apply what time alone changed (an ejection that ran out, a slow-start step),
        for readers that come when no request did."""
        if self._next_change != math.inf and self.clock() >= self._next_change:
            self.refresh()

    def discovery_status(self) -> dict[str, Any] | None:
        """Where the members come from, when they last changed, and the last failure
        (None once the source answers again); None for a static pool."""
        source = self.pool.discovery
        if source is None:
            return None
        watcher = self.watcher
        return {
            "source": source.describe(),
            "running": watcher is not None and watcher.running,
            "updates": watcher.updates if watcher else 0,
            "updated_at": watcher.updated_at if watcher else None,
            "error": watcher.error if watcher else None,
            "members": len(self.members),
        }

    def snapshot(self) -> list[dict[str, Any]]:
        self.refresh_if_due()
        now = self.clock()
        eligible = {id(m) for m in self.eligible}
        rows = []
        for member in self.members:
            health = member.health
            tenths, _ = health.ramp(now, self.pool.slow_start)
            last = health.last_check
            rows.append(
                {
                    "url": member.upstream.url,
                    "weight": member.upstream.weight,
                    "effective_weight": member.upstream.weight * tenths / 10,
                    "healthy": health.healthy,
                    "ejected": health.ejected_until is not None,
                    "ejected_until": health.ejected_until,
                    "half_open": health.half_open,
                    "drained": member.drained,
                    "eligible": id(member) in eligible and not self.all_down,
                    "in_flight": member.in_flight,
                    "websockets": member.websockets,
                    "requests": member.requests,
                    "failures": member.failures,
                    "last_check": None
                    if last is None
                    else {
                        "ok": last.ok,
                        "status": last.status,
                        "error": last.error,
                        "at": last.at,
                        "latency": last.latency,
                    },
                }
            )
        return rows


def _identity(upstream: Upstream) -> str:
    """Two configurations of one server (say, another weight) are the same member."""
    return upstream.origin + upstream.base_path.decode("ascii")


def _log_check_transition(
    pool: str, member: UpstreamState, transition: str, result: CheckResult, check: Any
) -> None:
    if transition == "down":
        logger.warning(
            "pool %s: upstream %s is DOWN after %d failed checks (last: %s)",
            pool,
            member.upstream.url,
            check.fall,
            result.error,
        )
    else:
        logger.warning(
            "pool %s: upstream %s is UP after %d passed checks",
            pool,
            member.upstream.url,
            check.rise,
        )
