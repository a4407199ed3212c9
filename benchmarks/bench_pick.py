"""Time per pick of each balancing policy, for pools of 2 to 10,000 upstreams.

Each figure is the best of ``--repeats`` runs of ``--picks`` calls to ``pick()`` on a
balancer built once per pool (as ``PoolRuntime`` builds it), in nanoseconds per pick,
loop included (the empty loop's cost is printed under the table). The goal: each policy's
cost barely depends on the pool's size, within 2x from 2 to 10,000 upstreams. The
``naive nginx O(n)`` row is nginx's algorithm as nginx runs it (every upstream visited on
every pick) with the same 1/2/5 weights, for contrast; it gets fewer picks on large pools
so that it finishes in time. Run with ``.venv/bin/python benchmarks/bench_pick.py``.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence

from rr_middleware.balancing import build
from rr_middleware.latency import PeakEwma

SIZES = (2, 100, 1_000, 10_000)
SPREAD = (1, 2, 5)  # three distinct weights, spread across the pool


class Member:
    """Stands in for an ``UpstreamState``: all a balancer reads is ``in_flight``."""

    __slots__ = ("in_flight", "name")

    def __init__(self, name: str, in_flight: int) -> None:
        self.name = name
        self.in_flight = in_flight


class NaiveNginx:
    """nginx's smooth weighted round robin the way nginx computes it: O(n) per pick."""

    def __init__(self, members: Sequence[Member], weights: Sequence[int]) -> None:
        self._members = list(members)
        self._weights = list(weights)
        self._current = [0] * len(members)
        self._total = sum(weights)

    def pick(self, tried: Sequence[Member] = ()) -> Member | None:
        current = self._current
        best = -1
        best_value = 0
        for index, weight in enumerate(self._weights):
            if weight <= 0:
                continue
            value = current[index] + weight
            current[index] = value
            if best < 0 or value > best_value:
                best, best_value = index, value
        if best < 0:
            return None
        current[best] -= self._total
        return self._members[best]


def _members(size: int) -> list[Member]:
    rng = random.Random(size)
    return [Member(f"m{i}", rng.randrange(8)) for i in range(size)]


def _estimates(size: int) -> list[PeakEwma]:
    """A latency estimate per upstream, 1 to 50 ms, last observed a second ago."""
    rng = random.Random(size)
    estimates = [PeakEwma(10.0) for _ in range(size)]
    for estimate in estimates:
        estimate.observe(rng.uniform(0.001, 0.050), time.monotonic() - 1.0)
    return estimates


def _spread(size: int) -> list[int]:
    return [SPREAD[i % len(SPREAD)] for i in range(size)]


#: (row label, policy or "naive", weights for a pool of n upstreams)
ROWS: tuple[tuple[str, str, Callable[[int], list[int]]], ...] = (
    ("round_robin, equal weights", "round_robin", lambda n: [1] * n),
    ("round_robin, weights 1/2/5", "round_robin", _spread),
    ("least_requests", "least_requests", lambda n: [1] * n),
    ("peak_ewma", "peak_ewma", lambda n: [1] * n),
    ("random, weights 1/2/5", "random", _spread),
    ("naive nginx O(n), weights 1/2/5", "naive", _spread),
)


def _time_picks(pick: Callable[[], object], picks: int, repeats: int) -> float:
    """Best of ``repeats`` runs of ``picks`` calls, in ns per call."""
    best = float("inf")
    loop = range(picks)
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter_ns()
            for _ in loop:
                pick()
            elapsed = time.perf_counter_ns() - start
        finally:
            gc.enable()
        best = min(best, elapsed / picks)
    return best


def _noop() -> None:
    return None


def measure(picks: int, repeats: int) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    for label, policy, weights_for in ROWS:
        results[label] = {}
        for size in SIZES:
            members = _members(size)
            weights = weights_for(size)
            pick: Callable[[], Member | None]
            count = picks
            if policy == "naive":
                pick = NaiveNginx(members, weights).pick
                count = max(50, min(picks, 2_000_000 // size))  # O(n): fewer picks
            elif policy == "peak_ewma":
                pick = build(
                    policy,
                    members,
                    weights,
                    random.Random(size),
                    estimates=_estimates(size),
                ).pick
            else:
                pick = build(policy, members, weights, random.Random(size)).pick
            pick()  # warm-up
            results[label][size] = _time_picks(pick, count, repeats)
    return results


def render(results: dict[str, dict[int, float]], loop_ns: float) -> str:
    label_width = max(len(label) for label in results) + 2
    header = "policy".ljust(label_width) + "".join(f"{n:>10,}" for n in SIZES)
    header += f"{'max/min':>10}  goal <= 2x"
    lines = ["ns per pick (best of repeats)", header, "-" * len(header)]
    for label, row in results.items():
        values = [row[n] for n in SIZES]
        ratio = max(values) / min(values)
        verdict = "ok" if ratio <= 2 else "OVER"
        if label.startswith("naive"):
            verdict = "(reference)"
        cells = "".join(f"{v:>10.0f}" for v in values)
        lines.append(f"{label.ljust(label_width)}{cells}{ratio:>9.2f}x  {verdict}")
    lines.append(f"(empty loop: {loop_ns:.0f} ns per iteration, included above)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--picks", type=int, default=20_000, help="picks per repeat")
    parser.add_argument("--repeats", type=int, default=7, help="repeats; the best counts")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    loop_ns = _time_picks(_noop, args.picks, args.repeats)
    results = measure(args.picks, args.repeats)
    print(render(results, loop_ns))
    took = time.perf_counter() - started
    print(
        f"python {sys.version.split()[0]}; {args.picks:,} picks x {args.repeats} repeats; ", end=""
    )
    print(f"{took:.1f} s in all")
    over = [
        label
        for label, row in results.items()
        if not label.startswith("naive") and max(row.values()) > 2 * min(row.values())
    ]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
