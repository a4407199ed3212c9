"""A balancer's pools joined to a zone and taken out of it (``zone.py`` is the region
itself): which records the pools need, binding each pool to its records, and, when a
reload moves the workers to a zone of a new layout, seeding it with what they knew."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

from .config import Pool
from .pool_runtime import PoolRuntime
from .zone import PoolLayout, Zone, layout_digest

__all__ = ["join", "layouts_of", "leave"]

logger = logging.getLogger("rr_middleware")


def layouts_of(pools: Mapping[str, Pool]) -> list[PoolLayout]:
    """The records a zone holds for ``pools``."""
    return [
        PoolLayout(
            prefix,
            [upstream.identity for upstream in pool.members],
            discovered=pool.discovery is not None,
        )
        for prefix, pool in pools.items()
    ]


def join(
    runtimes: Mapping[str, PoolRuntime], name: str, *, follows_layout: bool, seed: bool
) -> Zone:
    """Attach to zone ``name`` (followed by the layout's digest with ``follows_layout``)
    and share every pool's state there. With ``seed``, a zone this process creates starts
    from what the pools know now (a reload), not from nothing."""
    layouts = layouts_of({prefix: runtime.pool for prefix, runtime in runtimes.items()})
    if follows_layout:
        name = f"{name}-{layout_digest(layouts)}"
    zone = Zone(name, layouts)
    zone.attach()
    members = [member for runtime in runtimes.values() for member in runtime.members]
    known = [(m, copy.copy(m.health), m.drained, m.weight_override) for m in members]
    for index, runtime in enumerate(runtimes.values()):
        runtime.share(zone.pool(index))
        if runtime.checker is not None:
            runtime.checker.lead = zone.lead
    if seed and zone.created:
        for member, health, drained, weight in known:
            member.health, member.drained, member.weight_override = health, drained, weight
        for runtime in runtimes.values():
            if runtime.shared is not None:
                runtime.shared.seed(runtime.members)
                runtime.sync()
    logger.info("zone %s: attached as worker %d (%s)", name, zone.slot, zone.directory)
    return zone


def leave(runtimes: Mapping[str, PoolRuntime], zone: Zone) -> None:
    """Flush this process's counters, keep what the zone says last in this process,
    detach."""
    for runtime in runtimes.values():
        if runtime.shared is not None:
            # What any worker decided last (a drain, a weight, an ejection), not what this
            # one last happened to load (it loads at its next pick, and may have served
            # none since): a reload seeds the next zone from it.
            runtime.sync()
            runtime.shared.flush(runtime.members)
        if runtime.checker is not None:
            runtime.checker.lead = None
        runtime.share(None)
    zone.detach()
