"""A running balancer taken to new pools without dropping a request: what a reload does.

The new configuration is compared with the running one, prefix by prefix:

- **a new prefix**: a new pool, its discovery and health checks started (waiting, at most
  its ``startup_timeout``, for its first members) before it takes traffic;
- **a prefix gone**: the pool takes no new request; its checks and discovery stop, and
  the requests and WebSockets in flight there finish;
- **only the upstream list changed**: the list is applied as a discovery update is
  (``PoolRuntime.set_members``): an upstream that stays keeps its health, counters,
  connections and place in the rotation, a new one starts as a static upstream does
  (slow start if set), a removed one finishes what it has in flight;
- **any other option changed**: the pool is rebuilt from the new value, and each upstream
  it keeps carries over its health, counters, drain and weight override (and, when its
  connection limit and transport are unchanged, its in-flight slots and rotation state
  stay with the very same member).

The middleware's routes (``Route``) stay as they are: a configuration that removes a pool
a route sends to is refused (ValueError) before anything changes. Everything between the
old and the new routing happens in one step of the event loop, so
a request sees the old pools or the new ones, never a mix. With a zone whose layout
changed (a pool or a static upstream added or removed), the workers move to a zone named
for the new layout, the first to arrive seeding it with what it knew (see ``runtime.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Protocol

from .config import Pool, normalize_pool_key
from .members import Member
from .sticky import check_cookies_apart

if TYPE_CHECKING:
    from .pool_runtime import PoolRuntime
    from .zone import Zone

__all__ = ["Changes", "Reconfigurable", "reconfigure"]

logger = logging.getLogger("rr_middleware")


class Reconfigurable(Protocol):
    """What a reconfiguration needs of the ``Balancer`` (``runtime.py``)."""

    pools: dict[str, PoolRuntime]
    zone: Zone | None
    routes: list[Any]

    def build_runtime(self, prefix: str, pool: Pool) -> PoolRuntime: ...
    def layout_changes(self, pools: dict[str, Pool]) -> bool: ...
    def leave_zone(self) -> None: ...
    def join_zone(self, *, seed: bool = False) -> None: ...
    def routes_changed(self) -> None: ...
    def link_mirrors(self) -> None: ...


@dataclasses.dataclass
class Changes:
    """What a reconfiguration did, prefix by prefix (for the log and the admin API)."""

    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    rebuilt: list[str] = dataclasses.field(default_factory=list)
    members: dict[str, str] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.rebuilt or self.members)

    def describe(self) -> str:
        parts = [f"pool {p} added" for p in self.added]
        parts += [f"pool {p} removed" for p in self.removed]
        parts += [f"pool {p} rebuilt (options changed)" for p in self.rebuilt]
        parts += [f"pool {p}: {what}" for p, what in self.members.items()]
        return "; ".join(parts) if parts else "nothing changed"


async def reconfigure(balancer: Reconfigurable, pools: dict[str, Pool]) -> Changes:
    """Take ``balancer`` to ``pools`` (normalised prefixes); see the module docstring."""
    _check_routes(balancer, pools)
    running = balancer.pools
    changes = Changes()
    fresh: dict[str, PoolRuntime] = {}
    for prefix, pool in pools.items():
        old = running.get(prefix)
        if old is None:
            changes.added.append(prefix)
            fresh[prefix] = balancer.build_runtime(prefix, pool)
        elif not _same_options(old.pool, pool):
            changes.rebuilt.append(prefix)
            fresh[prefix] = _rebuilt(balancer, old, pool)
    changes.removed = [prefix for prefix in running if prefix not in pools]
    await _start(list(fresh.values()))

    # From here to the routing swap: no await, so no request sees half of it. A zone is
    # left and joined again around it when pools are new or its layout changes.
    rezone = balancer.zone is not None and (bool(fresh) or balancer.layout_changes(pools))
    if rezone:
        balancer.leave_zone()
    retired = [running[p] for p in [*changes.removed, *changes.rebuilt]]
    new_pools: dict[str, PoolRuntime] = {}
    for prefix, pool in pools.items():
        runtime = fresh.get(prefix) or running[prefix]
        if prefix not in fresh:
            _apply_members(runtime, pool, changes)
        new_pools[prefix] = runtime
    running.clear()
    running.update(new_pools)
    balancer.link_mirrors()
    if rezone:
        balancer.join_zone(seed=True)
    balancer.routes_changed()

    for runtime in retired:
        await runtime.stop()
    return changes


def _check_routes(balancer: Reconfigurable, pools: dict[str, Pool]) -> None:
    """The middleware's routes stay as they are: every pool they send to must stay, and
    a pool known by a name only must be one of those (ValueError, before any change)."""
    targets = {key for state in balancer.routes for key in state.route.targets}
    for key in sorted(targets - set(pools)):
        raise ValueError(f"pool {key!r} is the target of a route: it cannot be removed")
    mirrored = set()
    for key, pool in pools.items():
        if pool.mirror is not None:
            target = normalize_pool_key(pool.mirror)
            if target not in pools or target == key:
                raise ValueError(f"pool {key!r}: mirror {pool.mirror!r} is not another pool")
            mirrored.add(target)
    for key in pools:
        if key[0] != "/" and key not in targets | mirrored:
            raise ValueError(f"pool {key!r} has a name, not a prefix, and nothing reaches it")
    routes = [state.route for state in balancer.routes]
    check_cookies_apart(((key, pool.sticky) for key, pool in pools.items()), routes)


def _same_options(old: Pool, new: Pool) -> bool:
    """Whether two pools differ in nothing but their upstream list (an upstream that
    stays with other TLS settings, or renewed TLS files, is another option: the member
    needs a transport of its own)."""
    tls = {u.identity: u.tls for u in old.members}
    return all(
        getattr(old, field.name) == getattr(new, field.name)
        for field in dataclasses.fields(Pool)
        if field.name != "upstreams"
    ) and all(tls.get(u.identity, u.tls) == u.tls for u in new.members)


def _apply_members(runtime: PoolRuntime, pool: Pool, changes: Changes) -> None:
    before = {m.upstream.identity: m.upstream.weight for m in runtime.members}
    runtime.pool = pool
    if pool.discovery is not None:
        return  # the members are discovery's, and it did not change
    after = {u.identity: u.weight for u in pool.members}
    if before == after and [m.upstream.identity for m in runtime.members] == list(after):
        return
    added = sum(1 for identity in after if identity not in before)
    removed = sum(1 for identity in before if identity not in after)
    reweighed = sum(1 for i, w in after.items() if i in before and before[i] != w)
    what = [f"{n} {word}" for n, word in ((added, "added"), (removed, "removed")) if n]
    what += [f"{reweighed} reweighed"] if reweighed else []
    changes.members[runtime.name] = "upstreams " + ", ".join(what or ["reordered"])
    runtime.set_members(list(pool.members), ramp=True)


def _rebuilt(balancer: Reconfigurable, old: PoolRuntime, pool: Pool) -> PoolRuntime:
    """A new runtime for ``pool`` whose upstreams in common with ``old`` carry on."""
    new = balancer.build_runtime(prefix=old.name, pool=pool)
    if new.sticky is not None and old.sticky is not None:
        new.sticky.carry_on(old.sticky)  # a random key: the cookies out there stay valid
    # Its copies in flight and their counts carry on (``Balancer.link_mirrors``).
    if pool.mirror is not None:
        new.mirror, old.mirror = old.mirror, None
    if pool.discovery is not None and pool.discovery == old.pool.discovery:
        # The same source: start from what it last said rather than from nothing.
        new.set_members([m.upstream for m in old.members])
    previous = {m.upstream.identity: m for m in old.members}
    members: list[Member] = []
    for member in new.members:
        kept = previous.get(member.upstream.identity)
        if kept is None:
            members.append(member)
        elif kept.transport is member.transport and kept.limiter.limit == pool.max_connections:
            kept.upstream = member.upstream
            kept.latency.retune(pool.ewma_decay)
            # Its requests in flight, and those to come, count in the new pool's load.
            limiter = kept.limiter
            limiter.load.in_flight -= limiter.active
            new.load.in_flight += limiter.active
            limiter.load = new.load
            members.append(kept)
        else:
            member.health, member.stats = kept.health, kept.stats
            member.drained, member.weight_override = kept.drained, kept.weight_override
            member.latency = kept.latency
            member.latency.retune(pool.ewma_decay)
            members.append(member)
    new.members = members
    old.successor = new  # its requests in flight report to the members new now serves
    # Built on the old pool's policy, as a discovery update is: the estimates it knew
    # stay (never seeded again as newcomers), and so does the rotation.
    new.hashing = None
    new.policy = old.hashing.fallback if old.hashing is not None else old.policy
    new.refresh()
    return new


async def _start(runtimes: list[PoolRuntime]) -> None:
    """Start discovery and checks of pools about to take traffic; wait, at most each
    source's ``startup_timeout``, for the first members of those that have none yet."""
    for runtime in runtimes:
        runtime.start_discovery()
    waiting = [
        runtime.watcher
        for runtime in runtimes
        if runtime.watcher is not None and not runtime.members
    ]
    arrived = await asyncio.gather(*(w.wait_first(w.source.startup_timeout) for w in waiting))
    for watcher, came in zip(waiting, arrived, strict=True):
        if not came:
            logger.error(
                "pool %s: no upstreams from %s within %ss; it answers 503 until they arrive",
                watcher.pool_name,
                watcher.source.describe(),
                watcher.source.startup_timeout,
            )
    for runtime in runtimes:
        runtime.start_checks()
