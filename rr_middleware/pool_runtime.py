"""One pool while the app serves: its members, and which of them may take the next request.

The eligible set is rebuilt only when something changes (a health transition, an ejection
expiring, a slow-start step, a drain, a membership change from discovery), so a pick does
no scan. Requests reach members only through ``attempt()`` (``attempt.py``), which reports
each outcome here exactly once (``succeeded``, ``failed``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import TYPE_CHECKING, Any

from .affinity import ConsistentHash, HashRing, PointCache, cookie_value, key_reader
from .attempt import Attempt
from .balancing import Policy, build
from .budget import RetryBudget
from .config import Pool
from .discovery.base import Watcher
from .headers import TrustedProxies, client_address
from .health import CheckResult, HealthChecker
from .hedging import HedgedAttempt, Hedging
from .hooks import PoolHooks
from .latency import cost, recorder
from .members import Member, PoolLoad
from .rewrite import ResponseRewriter
from .sticky import Affinity, StickyValues
from .tracing import AttemptTracer, tracer
from .transport.base import UpstreamTransport
from .upstream import Upstream

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import Scope

    from .counters import UpstreamStats
    from .mirroring import Mirror
    from .transport.base import UpstreamRequest
    from .zone import ZonePool

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
        #: The prefix stripped (X-Forwarded-Prefix); a pool keyed by a name gets its
        #: first route's from the middleware.
        self.prefix = prefix.encode("ascii") if prefix.startswith("/") and prefix != "/" else b""
        self.pool = pool
        self._resolve = resolve
        #: Maps the upstreams' redirects and cookies back to the client's addresses.
        self.rewriter: ResponseRewriter | None = None
        if pool.rewrite_redirects or pool.rewrite_cookies:
            self.rewriter = ResponseRewriter(pool.rewrite_redirects, pool.rewrite_cookies)
        #: The pool's guard, on_request and on_response (None: it has none).
        self.hooks = PoolHooks.of(prefix, pool)
        #: OpenTelemetry client spans (None: off, or OpenTelemetry not installed).
        self.tracer: AttemptTracer | None = tracer() if pool.tracing else None
        #: The pool's records in a zone shared with other worker processes (``zone.py``),
        #: while attached; and the zone generation this process last loaded.
        self.shared: ZonePool | None = None
        self._shared_generation = -1
        #: Requests in flight on all the members (bounded-load hashing reads it).
        self.load = PoolLoad()
        self.members = [self._member(upstream) for upstream in pool.members]
        self.clock = pool.clock
        self.rng = pool.random if pool.random is not None else random.Random()
        #: Called with an attempt's latency estimate and seconds when its response
        #: headers come (None: nothing needs them; see ``latency.recorder``).
        #: Retries and hedges in flight against requests active (``budget.py``).
        self.budget = RetryBudget(pool.retry_budget, pool.retry_budget_min)
        #: When to hedge, and the hedges sent and won (``hedging.py``); None: never.
        self.hedging = Hedging.of(pool)
        window = self.hedging.window if self.hedging is not None else None
        self.record_latency = recorder(window, self.clock, pool.policy == "peak_ewma")
        self.eligible: list[Member] = []
        self.policy: Policy[Member] = build(self._fallback_policy, [], [], self.rng)
        #: ``policy="hash"``: the ring over the eligible members (also ``policy``).
        self.hashing: ConsistentHash[Member] | None = None
        self._points = PointCache()
        self._read_key = key_reader(pool.hash_on) if pool.hash_on is not None else None
        #: ``sticky=``: each member's cookie value; the eligible members by value.
        self.sticky = StickyValues(pool.sticky, prefix) if pool.sticky is not None else None
        self._pinned: dict[bytes, Member] = {}
        #: Whether requests carry an ``affinity()`` (read without a call when not).
        self.affine = self._read_key is not None or self.sticky is not None
        #: ``mirror=``: the copies to the mirror pool (the Balancer links it).
        self.mirror: Mirror | None = None
        #: Requests that came with a hash key, without one, and with a sticky cookie
        #: that reached its upstream (status page).
        self.affinity_counts = {"keyed": 0, "unkeyed": 0, "sticky_kept": 0, "sticky_set": 0}
        self.all_down = False
        self._next_change = math.inf
        #: The pool that replaced this one in a reload (``reconfigure.py``), if any.
        self.successor: PoolRuntime | None = None
        #: Keeps the members in step with ``pool.discovery`` while the app serves.
        self.watcher: Watcher | None = None
        if pool.discovery is not None:
            self.watcher = Watcher(prefix, pool.discovery, self.set_members)
        self.checker: HealthChecker | None = None
        if pool.health_check is not None:
            self.checker = HealthChecker(
                prefix,
                pool.health_check,
                lambda: self.members,
                self.clock,
                self.rng,
                self.apply_checks,
            )
        self.refresh()

    @property
    def in_flight(self) -> int:
        """Requests in flight on the pool's upstreams."""
        return self.load.in_flight

    @property
    def _fallback_policy(self) -> str:
        pool = self.pool
        return pool.hash_fallback if pool.policy == "hash" else pool.policy

    def _member(self, upstream: Upstream) -> Member:
        pool = self.pool
        member = Member(
            upstream, self._resolve(upstream), pool.max_connections, self.load, pool.ewma_decay
        )
        if self.shared is not None:
            self.shared.bind(member)
        return member

    # -- life ---------------------------------------------------------------------------

    def start_discovery(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def start_checks(self) -> None:
        if self.checker is not None:
            self.checker.start()

    async def stop(self) -> None:
        if self.mirror is not None:
            await self.mirror.stop()
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
            if member.drained or member.weight <= 0 or not health.healthy:
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
            weights.append(member.weight * tenths)
        self.all_down = not eligible
        if self.all_down and pool.on_all_down == "try_all":
            # Panic mode (Envoy's name; the seed's behaviour too): better to try every
            # upstream than to refuse all traffic because every check says down.
            eligible = [m for m in self.members if not m.drained and m.weight > 0]
            weights = [m.weight for m in eligible]
        self.eligible = eligible
        self._build_policies(eligible, weights, resume_after)
        self._next_change = next_change
        if self.successor is not None:
            # Retired by a reload: the outcome of a request it still serves (an
            # ejection, a recovery) changes the shared health, which the pool that
            # replaced it must apply too.
            self.successor.refresh()

    def _build_policies(
        self, eligible: list[Member], weights: list[int], resume_after: Member | None
    ) -> None:
        hashing = self.hashing
        previous = hashing.fallback if hashing is not None else self.policy
        name = self._fallback_policy
        policy = build(
            name,
            eligible,
            weights,
            self.rng,
            previous,
            resume_after,
            estimates=[m.latency for m in eligible] if name == "peak_ewma" else None,
            clock=self.clock,
        )
        if self.pool.policy == "hash":
            if hashing is not None and hashing.ring.reusable(eligible, weights):
                ring = hashing.ring
            else:
                identities = [m.upstream.identity.encode("ascii") for m in eligible]
                ring = HashRing(eligible, weights, identities, self._points)
            spills = hashing.spills if hashing is not None else 0
            self.hashing = ConsistentHash(ring, policy, self.pool.balance_factor, self.load)
            self.hashing.spills = spills
            self.policy = self.hashing
        else:
            self.policy = policy
        sticky = self.sticky
        if sticky is not None:
            self._pinned = {sticky.value(m.upstream.identity): m for m in eligible}

    def refresh_if_due(self) -> None:
        """Apply what time alone changed (an ejection that ran out, a slow-start step)."""
        if self._next_change != math.inf and self.clock() >= self._next_change:
            self.refresh()

    def pick(self, tried: list[Member], affinity: Affinity | None = None) -> Member | None:
        """The upstream for the next attempt, or None when none may be tried. With an
        ``affinity`` (``affinity()``): its sticky upstream if eligible, else its hash
        key's, else the policy's."""
        shared = self.shared
        if shared is not None and shared.generation != self._shared_generation:
            self.sync()  # another worker changed what the pool knows
        elif self._next_change != math.inf and self.clock() >= self._next_change:
            self.refresh()  # what time alone changed (refresh_if_due, inline: every request)
        member = self.policy.pick(tried) if affinity is None else self._affine_pick(affinity, tried)
        while member is not None and member.health.half_open and not self.all_down:
            if self._claim_probe(member):
                self.refresh(resume_after=member)  # the probe was a turn of the rotation
                break
            self.refresh()  # another worker probes it: pick again
            member = (
                self.policy.pick(tried) if affinity is None else self._affine_pick(affinity, tried)
            )
        return member

    def affinity(self, scope: Scope, trusted: TrustedProxies) -> Affinity | None:
        """Where this request asks to go (its sticky cookie, its hash key); None for a
        pool with neither ``sticky`` nor ``policy="hash"``. ``hash_on="client"`` is the
        client's address as ``trusted`` proxies tell it (``client_address``)."""
        read_key, sticky = self._read_key, self.sticky
        if read_key is None and sticky is None:
            return None
        if self.pool.hash_on == "client":
            peer = scope.get("client")
            address = client_address(scope["headers"], peer[0] if peer else None, trusted)
            key = address.encode("ascii", "replace") if address is not None else None
        else:
            key = read_key(scope) if read_key is not None else None
        pinned = cookie_value(scope["headers"], sticky.name) if sticky is not None else None
        if read_key is not None:
            self.affinity_counts["keyed" if key is not None else "unkeyed"] += 1
        return Affinity(key, pinned)

    def _affine_pick(self, affinity: Affinity, tried: list[Member]) -> Member | None:
        pinned = affinity.pinned
        if pinned is not None:
            member = self._pinned.get(pinned)
            if member is not None and member not in tried and not member.health.half_open:
                self.affinity_counts["sticky_kept"] += 1
                return member
        hashing = self.hashing
        if affinity.key is not None and hashing is not None:
            return hashing.pick_key(affinity.key, tried)
        return self.policy.pick(tried)

    def sticky_header(
        self, member: Member, affinity: Affinity | None
    ) -> tuple[bytes, bytes] | None:
        """The ``Set-Cookie`` pinning the client to ``member``, unless its cookie already
        does (None)."""
        sticky = self.sticky
        if sticky is None:
            return None
        value = sticky.value(member.upstream.identity)
        if affinity is not None and affinity.pinned == value:
            return None
        self.affinity_counts["sticky_set"] += 1
        return sticky.set_cookie(value)

    def _claim_probe(self, member: Member) -> bool:
        """Make ``member``'s next request the one probe of a half-open upstream, across
        every worker sharing the pool (False: another worker's request probes it now)."""
        pool = self.pool
        now = self.clock()
        with self._writing(member):
            health = member.health
            if health.ejected_until is not None and not health.expire_ejection(now):
                return False
            if health.probing and now < health.probe_deadline:
                return False
            health.half_open = health.probing = True
            health.probe_deadline = now + pool.pool_timeout + pool.connect_timeout + pool.timeout
        return True

    def _writing(self, member: Member) -> contextlib.AbstractContextManager[None]:
        """Around a change to ``member``'s health: with a zone, it is loaded fresh under
        the zone's write lock first and stored for every worker after."""
        shared = self.shared
        if shared is None or member.record is None:
            return contextlib.nullcontext()
        return shared.writing_member(member)

    def share(self, shared: ZonePool | None) -> None:
        """Keep this pool's state in a zone shared with other worker processes (None: in
        this process alone again, from what it last knew)."""
        self.shared = shared
        for member in self.members:
            member.record = member.zone_base = None
            if shared is not None:
                shared.bind(member)
        self.sync()

    def sync(self) -> None:
        """Load what the zone says of every member (health, drain, weight) and rebuild."""
        shared = self.shared
        if shared is not None:
            self._shared_generation = shared.load_members(self.members)
        self.refresh()

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

    def attempt(
        self, tried: list[Member], *, slot: bool = True, affinity: Affinity | None = None
    ) -> Attempt:
        """The lease for one try of a request: ``async with pool.attempt(tried) as a``.
        ``slot=False`` takes no ``max_connections`` slot (a WebSocket's); ``affinity``
        where the request asks to go (``affinity(scope)``)."""
        return Attempt(self, tried, slot, affinity)

    def hedged_attempt(
        self,
        tried: list[Member],
        hedging: Hedging,
        build: Callable[[Upstream], UpstreamRequest],
        affinity: Affinity | None = None,
    ) -> HedgedAttempt:
        """An attempt raced against hedges (``hedging.py``), used as ``attempt()``'s;
        ``build`` makes the request for each upstream tried. The first try goes where
        ``affinity`` asks, the hedges where the policy picks."""
        return HedgedAttempt(self, tried, hedging, self.budget, build, affinity)

    # -- outcomes (only an Attempt reports them) ------------------------------------------

    def succeeded(self, member: Member) -> None:
        member.stats.successes += 1
        if not member.health.half_open:
            return
        with self._writing(member):
            recovered = member.health.record_success(self.clock())
        if recovered:
            member.stats.transitions += 1
            logger.warning(
                "pool %s: upstream %s recovered (half-open probe succeeded)",
                self.name,
                member.upstream.url,
            )
            self.refresh()

    def failed(self, member: Member, kind: str, status: int = 0) -> None:
        """A failed exchange: ``kind``, or ``status``, one of the pool's unhealthy ones."""
        if status:
            member.stats.status_failure(status)
        else:
            member.stats.failure(kind)
        pool = self.pool
        if len(self.members) < 2 and not member.health.half_open:
            return  # a pool of one is never ejected: there is nowhere else to go
        with self._writing(member):
            probing = member.health.half_open
            ejected = member.health.record_failure(self.clock(), pool.max_fails, pool.fail_timeout)
        if ejected:
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

    def apply_checks(self, results: list[tuple[Member, CheckResult]]) -> list[str]:
        """Apply a round of active checks (the health checker's results); returns each
        member's transition ("up", "down" or "") in order. With a zone, the round is
        applied to the shared health (only the leading process probes)."""
        check = self.pool.health_check
        assert check is not None
        shared = self.shared
        transitions = []
        with shared.writing() if shared is not None else contextlib.nullcontext():
            for member, result in results:
                if shared is not None and member.record is not None:
                    shared.load_member(member)
                transition = member.health.record_check(result, check) or ""
                if shared is not None and member.record is not None:
                    shared.store_member(member)
                    shared.count_check(member, result.ok, bool(transition))
                else:
                    member.stats.checks["pass" if result.ok else "fail"] += 1
                    member.stats.transitions += bool(transition)
                transitions.append(transition)
        if any(transitions):
            self.refresh()
        return transitions

    # -- operations -----------------------------------------------------------------------

    def drain(self, url: str) -> None:
        """Send ``url`` no new requests; those in flight finish."""
        self._set_drained(url, True)

    def undrain(self, url: str) -> None:
        """Send ``url`` requests again."""
        self._set_drained(url, False)

    def set_weight(self, url: str, weight: int | None) -> None:
        """Give ``url`` another weight while the app serves (None: its configured one
        again); with a zone, in every worker."""
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)):
            raise ValueError(f"weight must be an integer >= 0 or None, got {weight!r}")
        if weight is not None and weight < 0:
            raise ValueError(f"weight must be an integer >= 0 or None, got {weight!r}")
        member = self._member_at(url)
        if member.weight_override != weight:
            member.weight_override = weight
            if self.shared is not None:
                self.shared.set_weight(member, weight)
            configured = f"back to its configured {member.upstream.weight}"
            logger.warning(
                "pool %s: upstream %s weight %s",
                self.name,
                url,
                configured if weight is None else weight,
            )
            self.refresh()

    def _member_at(self, url: str) -> Member:
        for member in self.members:
            if member.upstream.url == url:
                return member
        raise ValueError(f"pool {self.name}: no upstream {url!r}")

    def _set_drained(self, url: str, drained: bool) -> None:
        member = self._member_at(url)
        if member.drained != drained:
            member.drained = drained
            if self.shared is not None:
                self.shared.set_drained(member, drained)
            logger.warning(
                "pool %s: upstream %s %s",
                self.name,
                url,
                "drained" if drained else "back in rotation",
            )
            self.refresh()

    # -- membership (discovery) -----------------------------------------------------------

    def set_members(self, upstreams: list[Upstream], *, ramp: bool = False) -> None:
        """Make ``upstreams`` the pool's members, as a diff: an upstream that stays keeps
        its state (health, counters, connections, place in the rotation; a new weight is
        taken); a removed one gets no new requests while those in flight finish; a new one
        starts as a static upstream does (healthy until checked, slow start if set: always
        with ``ramp``, else once discovery has delivered its first list)."""
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
                if ramp or (self.watcher is not None and self.watcher.updates):
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
        if removed:
            self._points.keep_only({m.upstream.identity.encode("ascii") for m in members})
            if self.sticky is not None:
                self.sticky.forget({m.upstream.identity for m in members})
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

    def affinity_status(self) -> dict[str, int] | None:
        """Requests with and without a hash key, keys spilled past a full upstream
        (bounded load), sticky cookies kept and set; None for a pool using neither."""
        if self._read_key is None and self.sticky is None:
            return None
        spilled = self.hashing.spills if self.hashing is not None else 0
        return {**self.affinity_counts, "spilled": spilled}

    def counters(self) -> list[tuple[Member, UpstreamStats]]:
        """Each member with its counters (``in_flight`` and ``websockets`` set): this
        process's, or with a zone, the sum over every worker sharing it."""
        shared = self.shared
        if shared is not None:
            return shared.totals(self.members)
        rows = []
        for member in self.members:
            stats = member.stats
            stats.in_flight, stats.websockets = member.in_flight, member.websockets
            rows.append((member, stats))
        return rows

    def snapshot(self) -> list[dict[str, Any]]:
        """Per upstream (the current members): url, weight, effective weight, health
        (active), ejection (passive), half-open, drained, eligible, in flight, open
        WebSockets, requests and failures (exchanges with an outcome), the latency
        estimate and cost (``policy="peak_ewma"``; else None), last check. With
        a zone: what every worker sharing it knows, and their totals."""
        return [row for row, _ in self.rows()]

    def rows(self) -> list[tuple[dict[str, Any], UpstreamStats]]:
        """``snapshot()``'s rows, each with the counters it was made from."""
        if self.shared is not None and self.shared.generation != self._shared_generation:
            self.sync()
        else:
            self.refresh_if_due()
        now = self.clock()
        eligible = {id(m) for m in self.eligible}
        return [
            (self._row(member, stats, now, eligible), stats) for member, stats in self.counters()
        ]

    def _row(
        self, member: Member, stats: UpstreamStats, now: float, eligible: set[int]
    ) -> dict[str, Any]:
        health = member.health
        tenths, _ = health.ramp(now, self.pool.slow_start)
        last = health.last_check
        latency = member.latency
        ewma = latency.value(now) if latency.estimate is not None else None
        return {
            "url": member.upstream.url,
            "weight": member.weight,
            "effective_weight": member.weight * tenths / 10,
            "healthy": health.healthy,
            "ejected": health.ejected_until is not None,
            "ejected_until": health.ejected_until,
            "half_open": health.half_open,
            "drained": member.drained,
            "eligible": id(member) in eligible and not self.all_down,
            "in_flight": stats.in_flight,
            "websockets": stats.websockets,
            "requests": stats.requests,
            "failures": stats.failures,
            # policy="peak_ewma": the latency estimate (s) and the cost a pick compares.
            "latency_ewma": ewma,
            "cost": cost(ewma, stats.in_flight, member.weight)
            if self.pool.policy == "peak_ewma"
            else None,
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
