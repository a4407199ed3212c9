"""How an upstream is picked for a request: the three policies, each O(1)-ish per pick.

``round_robin`` (default) is nginx's smooth weighted round robin, exactly: each pick adds
every eligible upstream's weight to its current weight, takes the largest (the first one
on ties) and subtracts the total from the winner. Weights {5, 1, 1} give ``a a b a c a a``;
equal weights give plain round robin. nginx walks every upstream on every pick; here the
upstreams are grouped by weight, which gives the same sequence at a cost that depends on
the number of *distinct* weights, not of upstreams (see ``SmoothWeighted``).

``least_requests`` is the power of two random choices on in-flight requests, weight-aware
(Envoy's default): two distinct upstreams drawn at random, the one with fewer in-flight
requests per unit of weight wins. ``peak_ewma`` is the same draw, compared on latency
times load: each upstream's peak EWMA of response-header latency (``latency.py``) *
(in-flight + 1) / weight, Finagle's and Linkerd's cost. ``random`` is weighted random.

Every policy picks among the *eligible* upstreams it was built with (the pool rebuilds it
when health, weights or membership change) and takes ``tried``: upstreams already tried
for this request are never picked again for its retry. A round robin's retry or hedge
takes no turn (``SmoothWeighted.pick``).
"""

from __future__ import annotations

import random as random_module
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from .latency import FLOOR, PeakEwma, seed

__all__ = [
    "POLICIES",
    "LeastLatency",
    "LeastRequests",
    "Policy",
    "SmoothWeighted",
    "WeightedRandom",
    "build",
]


class _Member(Protocol):
    @property
    def in_flight(self) -> int: ...


M = TypeVar("M", bound=_Member)


class Policy(Protocol[M]):
    def pick(self, tried: Sequence[M] = ()) -> M | None: ...


def _first_untried(members: Sequence[M], tried: Sequence[M]) -> M | None:
    for member in members:
        if member not in tried:
            return member
    return None


class _WeightClass(Generic[M]):
    """Upstreams sharing one weight. Inside a class the smooth weighted sequence takes
    them in order, once per round: ``taken`` is how many full rounds are done, ``next``
    who is due in the current one."""

    __slots__ = ("members", "next", "taken", "weight")

    def __init__(self, weight: int, members: list[tuple[int, M]]) -> None:
        self.weight = weight
        self.members = members  # (position in the pool's order, member)
        self.taken = 0
        self.next = 0


class SmoothWeighted(Generic[M]):
    """nginx's smooth weighted round robin, computed per weight class.

    After ``t`` picks an upstream of weight ``w`` picked ``k`` times has current weight
    ``t*w - total*k``. Within a class of equal weights, those not yet picked this round
    all share the highest value, and nginx's first-on-ties rule takes them in order; so a
    class is summed up by one value and a cursor, and a pick compares one candidate per
    distinct weight. After ``total`` picks every current weight is back to zero, so the
    counters restart there.
    """

    def __init__(
        self,
        members: Sequence[M],
        weights: Sequence[int],
        resume_after: M | None = None,
        remember: bool = False,
    ) -> None:
        classes: dict[int, list[tuple[int, M]]] = {}
        for position, (member, weight) in enumerate(zip(members, weights, strict=True)):
            if weight > 0:
                classes.setdefault(weight, []).append((position, member))
        self._classes = [_WeightClass(w, m) for w, m in classes.items()]
        self._total = sum(w * len(m) for w, m in classes.items())
        self._members = [m for m, w in zip(members, weights, strict=True) if w > 0]
        self._step = 0
        # The last pick; with ``remember``, ``resume_after`` counts as one (a pick made
        # outside this balancer, like a half-open probe's, which the next rebuild follows).
        self.last: M | None = resume_after if remember else None
        if resume_after is not None and len(self._classes) == 1:
            # Rebuilt after a health or membership change: with equal weights, carry on
            # after the upstream picked last rather than start over at the first one.
            cls = self._classes[0]
            for index, (_, member) in enumerate(cls.members):
                if member is resume_after:
                    cls.next = (index + 1) % len(cls.members)
                    self._step = cls.next
                    break

    def _next(self) -> M | None:
        classes = self._classes
        if not classes:
            return None
        step = self._step + 1
        if len(classes) == 1:
            best = classes[0]
        else:
            total = self._total
            best = classes[0]
            best_value = step * best.weight - total * best.taken
            best_position = best.members[best.next][0]
            for cls in classes[1:]:
                value = step * cls.weight - total * cls.taken
                if value > best_value or (
                    value == best_value and cls.members[cls.next][0] < best_position
                ):
                    best, best_value, best_position = cls, value, cls.members[cls.next][0]
        member = best.members[best.next][1]
        best.next += 1
        if best.next == len(best.members):
            best.next = 0
            best.taken += 1
        if step == self._total:  # a whole cycle: every current weight is zero again
            step = 0
            for cls in classes:
                cls.taken = 0
        self._step = step
        self.last = member
        return member

    def pick(self, tried: Sequence[M] = ()) -> M | None:
        if not tried:
            return self._next()
        # A retry or a hedge takes no turn: it goes to the first untried upstream of the
        # turns to come, which stay as they were. Were it to take one, the upstream
        # whose turn came next would lose it, and the one tried first (often the slow
        # or failing one, the reason for the retry) would get the next request's first
        # try too: with two upstreams, every first try.
        classes = self._classes
        saved = (self._step, [(cls.next, cls.taken) for cls in classes], self.last)
        try:
            for _ in range(4):  # a few turns usually reach an untried upstream; else any
                member = self._next()
                if member not in tried:
                    return member
            return _first_untried(self._members, tried)
        finally:
            self._step, positions, self.last = saved
            for cls, (position, taken) in zip(classes, positions, strict=True):
                cls.next, cls.taken = position, taken


class _WeightedSampler(Generic[M]):
    """O(1) weighted sampling (Vose's alias method); plain uniform for equal weights."""

    __slots__ = ("_alias", "_count", "_members", "_probability", "_rng")

    def __init__(self, members: list[M], weights: list[int], rng: random_module.Random):
        self._members = members
        self._count = len(members)
        self._rng = rng
        self._probability: list[float] | None = None
        self._alias: list[int] = []
        if len(set(weights)) > 1:
            total = sum(weights)
            scaled = [w * self._count / total for w in weights]
            small = [i for i, p in enumerate(scaled) if p < 1.0]
            large = [i for i, p in enumerate(scaled) if p >= 1.0]
            probability = [1.0] * self._count
            alias = list(range(self._count))
            while small and large:
                low, high = small.pop(), large.pop()
                probability[low] = scaled[low]
                alias[low] = high
                scaled[high] -= 1.0 - scaled[low]
                (small if scaled[high] < 1.0 else large).append(high)
            self._probability = probability
            self._alias = alias

    def index(self) -> int:
        rng = self._rng
        i = int(rng.random() * self._count)
        probability = self._probability
        if probability is None or rng.random() < probability[i]:
            return i
        return self._alias[i]


class LeastRequests(Generic[M]):
    """Power of two choices on in-flight requests per unit of weight.

    The two candidates are drawn in proportion to weight (uniformly when weights are
    equal), and the one with fewer in-flight requests per unit of weight wins, the first
    drawn on ties: at low load the split follows the weights, under load it follows the
    load.
    """

    def __init__(self, members: Sequence[M], weights: Sequence[int], rng: random_module.Random):
        pairs = [(m, w) for m, w in zip(members, weights, strict=True) if w > 0]
        self._members = [m for m, _ in pairs]
        self._weights = [w for _, w in pairs]
        self._sampler = _WeightedSampler(self._members, self._weights, rng)

    def pick(self, tried: Sequence[M] = ()) -> M | None:
        members = self._members
        count = len(members)
        if count <= 1:
            return members[0] if count and (not tried or members[0] not in tried) else None
        i = self._sampler.index()
        j = self._sampler.index()
        while j == i:  # distinct candidates; a handful of draws even when one dominates
            j = self._sampler.index()
        a, b = members[i], members[j]
        if tried:
            a_tried, b_tried = a in tried, b in tried
            if a_tried and b_tried:
                return _first_untried(members, tried)
            if a_tried or b_tried:
                return b if a_tried else a
        return a if self._first_wins(i, j) else b

    def _first_wins(self, i: int, j: int) -> bool:
        # in_flight/weight compared without dividing.
        members = self._members
        return members[i].in_flight * self._weights[j] <= members[j].in_flight * self._weights[i]


class LeastLatency(LeastRequests[M]):
    """Power of two choices on peak EWMA * (in-flight + 1) / weight (``peak_ewma``).

    ``estimates[i]`` is ``members[i]``'s latency estimate, read at ``clock()``. An
    estimate not in ``previous`` (the balancer this one replaces: a new, recovered,
    undrained upstream) starts at the median of the others' (``latency.seed``).
    """

    def __init__(
        self,
        members: Sequence[M],
        weights: Sequence[int],
        estimates: Sequence[PeakEwma],
        rng: random_module.Random,
        clock: Callable[[], float],
        previous: object = None,
    ) -> None:
        super().__init__(members, weights, rng)
        self._estimates = [e for e, w in zip(estimates, weights, strict=True) if w > 0]
        self._clock = clock
        # The estimates themselves, not their ids: an id may be reused once one is gone.
        known: set[PeakEwma] = previous._known if isinstance(previous, LeastLatency) else set()
        self._known: set[PeakEwma] = set(self._estimates)
        newcomers = [e for e in self._estimates if e not in known]
        if newcomers:
            peers = [e for e in self._estimates if e in known]
            seed(newcomers, peers, clock())

    def _first_wins(self, i: int, j: int) -> bool:
        now = self._clock()
        members = self._members
        estimates = self._estimates
        cost_i = (estimates[i].value(now) + FLOOR) * (members[i].in_flight + 1)
        cost_j = (estimates[j].value(now) + FLOOR) * (members[j].in_flight + 1)
        return cost_i * self._weights[j] <= cost_j * self._weights[i]


class WeightedRandom(Generic[M]):
    """Each pick independent, with probability proportional to weight."""

    def __init__(self, members: Sequence[M], weights: Sequence[int], rng: random_module.Random):
        pairs = [(m, w) for m, w in zip(members, weights, strict=True) if w > 0]
        self._members = [m for m, _ in pairs]
        self._sampler = _WeightedSampler(self._members, [w for _, w in pairs], rng)

    def pick(self, tried: Sequence[M] = ()) -> M | None:
        if not self._members:
            return None
        member = self._members[self._sampler.index()]
        if tried and member in tried:
            return _first_untried(self._members, tried)
        return member


POLICIES = ("round_robin", "least_requests", "peak_ewma", "random")


def build(
    policy: str,
    members: Sequence[M],
    weights: Sequence[int],
    rng: random_module.Random,
    previous: Policy[M] | None = None,
    resume_after: M | None = None,
    estimates: Sequence[PeakEwma] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Policy[M]:
    """The balancer for ``policy`` over ``members`` with these (effective) ``weights``.
    Round robin carries on after ``resume_after``, or after the last pick of ``previous``
    (the balancer it replaces). ``peak_ewma`` reads ``estimates`` (one per member) at
    ``clock()``."""
    if policy == "round_robin":
        if resume_after is not None:
            return SmoothWeighted(members, weights, resume_after, remember=True)
        last = previous.last if isinstance(previous, SmoothWeighted) else None
        return SmoothWeighted(members, weights, resume_after=last)
    if policy == "least_requests":
        return LeastRequests(members, weights, rng)
    if policy == "random":
        return WeightedRandom(members, weights, rng)
    if policy == "peak_ewma":
        if estimates is None:
            estimates = [PeakEwma(10.0) for _ in members]
        return LeastLatency(members, weights, estimates, rng, clock, previous)
    raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
