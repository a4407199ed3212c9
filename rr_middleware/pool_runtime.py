"""One pool while the app serves: its members, and which of them may take the next request.

The eligible set is rebuilt only when something changes (a health transition, an ejection
expiring, a slow-start step, a drain, a membership change from discovery), so a pick does
no scan. Requests reach members only through ``attempt()`` (``attempt.py``), which reports
each outcome here exactly once (``succeeded``, ``failed``).
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Any

from .attempt import Attempt
from .balancing import Policy, build
from .config import Pool
from .discovery.base import Watcher
from .health import HealthChecker
from .members import Member
from .transport.base import UpstreamTransport
from .upstream import Upstream

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PoolRuntime"]

logger = logging.getLogger("rr_middleware")


class PoolRuntime:
    """One pool while it serves: ``members`` (its upstreams, static or discovered), the
    ones ``eligible`` for traffic and the policy picking among them. Reached through the
    ``Balancer`` serving it: ``balancer["/api"]``.

    ``drain(url)``/``undrain(url)`` take an upstream out of rotation and back;
    ``snapshot()`` tells what the pool believes of each upstream. ``attempt(tried)`` is the
    lease a request holds on one upstream for one try.
    """

    def __init__(
        self, prefix: str, pool: Pool, resolve: Callable[[Upstream], UpstreamTransport]
    ) -> None:
        self.name = prefix
        self.prefix = prefix.encode("ascii") if prefix != "/" else b""
        self.pool = pool
        self._resolve = resolve
        self.members = [self._member(upstream) for upstream in pool.members]
        self.clock = pool.clock
        self.rng = pool.random if pool.random is not None else random.Random()
        self.eligible: list[Member] = []
        self.policy: Policy[Member] = build(pool.policy, [], [], self.rng)
        self.all_down = False
        self._next_change = math.inf
        #: Keeps the members in step with ``pool.discovery`` while the app serves.
        self.watcher: Watcher | None = None
        if pool.discovery is not None:
            self.watcher = Watcher(prefix, pool.discovery, self.set_members)
        self.checker: HealthChecker | None = None
        if pool.health_check is not None:
            self.checker = HealthChecker(
                prefix, pool.health_check, lambda: self.members, self.clock, self.rng, self.refresh
            )
        self.refresh()

    def _member(self, upstream: Upstream) -> Member:
        return Member(upstream, self._resolve(upstream), self.pool.max_connections)

    # -- life ---------------------------------------------------------------------------

    def start_discovery(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def start_checks(self) -> None:
        if self.checker is not None:
            self.checker.start()

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.checker is not None:
            await self.checker.stop()

    # -- eligibility --------------------------------------------------------------------

    def refresh(self, resume_after: Member | None = None) -> None:
        """Rebuild the set of upstreams that may take traffic, and its policy (which
        carries on after ``resume_after``, by default after its predecessor's last pick)."""
        now = self.clock()
        pool = self.pool
        eligible: list[Member] = []
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
        self.policy = build(pool.policy, eligible, weights, self.rng, self.policy, resume_after)
        self._next_change = next_change

    def refresh_if_due(self) -> None:
        """Apply what time alone changed (an ejection that ran out, a slow-start step)."""
        if self._next_change != math.inf and self.clock() >= self._next_change:
            self.refresh()

    def pick(self, tried: list[Member]) -> Member | None:
        """The upstream for the next attempt, or None when none may be tried."""
        if self._next_change != math.inf and self.clock() >= self._next_change:
            self.refresh()  # what time alone changed (refresh_if_due, inline: every request)
        member = self.policy.pick(tried)
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

    def more_to_try(self, tried: list[Member]) -> bool:
        """Whether a member not yet tried by this request remains (membership may have
        changed since the request started)."""
        return any(member not in tried for member in self.members)

    def retry_after(self) -> int:
        """Seconds a client should wait when every upstream is down (at least 1)."""
        now = self.clock()
        waits = [m.health.ejected_until - now for m in self.members if m.health.ejected_until]
        if self.pool.health_check is not None:
            waits.append(self.pool.health_check.interval)
        return max(1, math.ceil(min(waits))) if waits else 1

    def attempt(self, tried: list[Member], *, slot: bool = True) -> Attempt:
        """The lease for one try of a request: ``async with pool.attempt(tried) as a``.
        ``slot=False`` takes no ``max_connections`` slot (a WebSocket's)."""
        return Attempt(self, tried, slot)

    # -- outcomes (only an Attempt reports them) ------------------------------------------

    def succeeded(self, member: Member) -> None:
        member.stats.successes += 1
        if member.health.half_open and member.health.record_success(self.clock()):
            member.stats.transitions += 1
            logger.warning(
                "pool %s: upstream %s recovered (half-open probe succeeded)",
                self.name,
                member.upstream.url,
            )
            self.refresh()

    def failed(self, member: Member, kind: str, why: str = "") -> None:
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
                why or kind,
            )
            self.refresh()

    # -- operations -----------------------------------------------------------------------

    def drain(self, url: str) -> None:
        """Send ``url`` no new requests; those in flight finish."""
        self._set_drained(url, True)

    def undrain(self, url: str) -> None:
        """Send ``url`` requests again."""
        self._set_drained(url, False)

    def _set_drained(self, url: str, drained: bool) -> None:
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
        current = {m.upstream.identity: m for m in self.members}
        members: list[Member] = []
        added: list[Member] = []
        reweighed = False
        now = self.clock()
        seen: set[str] = set()
        for upstream in upstreams:
            if upstream.identity in seen:
                logger.warning(
                    "pool %s: %s listed twice by discovery; using it once", self.name, upstream.url
                )
                continue
            seen.add(upstream.identity)
            member = current.pop(upstream.identity, None)
            if member is None:
                member = self._member(upstream)
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
        self._log_membership(added, removed, members)
        self.members = members
        self.refresh()
        if added and self.checker is not None:
            self.checker.check_soon()  # check newcomers now, not an interval from now

    def _log_membership(
        self, added: list[Member], removed: list[Member], now: list[Member]
    ) -> None:
        for member in added:
            logger.warning("pool %s: upstream %s joined", self.name, member.upstream.url)
        for member in removed:
            logger.warning(
                "pool %s: upstream %s left (%d in flight finish there)",
                self.name,
                member.upstream.url,
                member.in_flight,
            )
        if not now:
            logger.warning("pool %s: no upstreams left; answering 503", self.name)

    # -- introspection --------------------------------------------------------------------

    def discovery_status(self) -> dict[str, Any] | None:
        """Where the members come from, when they last changed, and the last failure
        (None once the source answers again); None for a static pool."""
        watcher = self.watcher
        if watcher is None:
            return None
        return {
            "source": watcher.source.describe(),
            "running": watcher.running,
            "updates": watcher.updates,
            "updated_at": watcher.updated_at,
            "error": watcher.error,
            "members": len(self.members),
        }

    def snapshot(self) -> list[dict[str, Any]]:
        """Per upstream (the current members): url, weight, effective weight, health
        (active), ejection (passive), half-open, drained, eligible, in flight, open
        WebSockets, requests and failures (exchanges with an outcome), last check."""
        self.refresh_if_due()
        now = self.clock()
        eligible = {id(m) for m in self.eligible}
        return [self._row(member, now, eligible) for member in self.members]

    def _row(self, member: Member, now: float, eligible: set[int]) -> dict[str, Any]:
        health = member.health
        tenths, _ = health.ramp(now, self.pool.slow_start)
        last = health.last_check
        return {
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
            "requests": member.stats.requests,
            "failures": member.stats.failures,
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
