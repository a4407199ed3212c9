"""Property tests of the balancing policies (``rr_middleware.balancing``).

``SmoothWeighted`` is checked pick for pick against a plain transcription of nginx's smooth
weighted round robin (``nginx_reference``), then for the properties that follow from that
algorithm. Each bound asserted here was first checked on the reference itself; see
``test_smooth_weighted_is_smooth`` for how each one follows from the algorithm.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rr_middleware.balancing import (
    POLICIES,
    LeastRequests,
    SmoothWeighted,
    WeightedRandom,
    build,
)

SETTINGS = settings(max_examples=200, deadline=None)

#: 1 to 12 upstreams of weight 0 to 20, as in a pool (weight 0: never picked).
weight_lists = st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=12)
#: The same with at least one upstream that may be picked.
live_weight_lists = weight_lists.filter(lambda weights: sum(weights) > 0)


class Member:
    """Stands in for an ``UpstreamState``: a name and an in-flight count; equal only to
    itself, as upstream states are."""

    __slots__ = ("in_flight", "name")

    def __init__(self, name: str, in_flight: int = 0) -> None:
        self.name = name
        self.in_flight = in_flight

    def __repr__(self) -> str:
        return f"<{self.name} in_flight={self.in_flight}>"


def make_members(count: int) -> list[Member]:
    return [Member(f"m{i}") for i in range(count)]


def nginx_reference(weights: Sequence[int], picks: int) -> list[int | None]:
    """nginx's smooth weighted round robin, as ngx_http_upstream_get_peer does it.

    Each pick adds every eligible (weight > 0) upstream's weight to its current weight,
    takes the largest current weight (the first upstream on ties) and subtracts the total
    of the weights from the winner. Returns the index picked each time (None: no upstream).
    """
    current = [0] * len(weights)
    total = sum(w for w in weights if w > 0)
    picked: list[int | None] = []
    for _ in range(picks):
        best: int | None = None
        for index, weight in enumerate(weights):
            if weight <= 0:
                continue
            current[index] += weight
            if best is None or current[index] > current[best]:
                best = index
        if best is not None:
            current[best] -= total
        picked.append(best)
    return picked


def picked_indices(
    balancer: SmoothWeighted[Member], members: list[Member], picks: int
) -> list[int]:
    position = {id(member): index for index, member in enumerate(members)}
    indices = []
    for _ in range(picks):
        member = balancer.pick()
        assert member is not None
        indices.append(position[id(member)])
    return indices


def longest_run(sequence: Sequence[int], value: int) -> int:
    """The longest run of ``value`` in ``sequence`` read as a cycle (it repeats)."""
    if all(item == value for item in sequence):
        return len(sequence)
    longest = run = 0
    for item in list(sequence) * 2:
        run = run + 1 if item == value else 0
        longest = max(longest, run)
    return longest


# -- round_robin: nginx's sequence, exactly ----------------------------------------------


@SETTINGS
@given(weights=weight_lists)
def test_smooth_weighted_matches_nginx_reference(weights: list[int]) -> None:
    members = make_members(len(weights))
    balancer = SmoothWeighted(members, weights)
    total = sum(weights)
    picks = 3 * total if total else 3  # three whole cycles
    expected = nginx_reference(weights, picks)
    got = [balancer.pick() for _ in range(picks)]
    assert [None if m is None else members.index(m) for m in got] == expected


@SETTINGS
@given(weights=live_weight_lists, seed=st.integers(0, 2**32 - 1))
def test_build_round_robin_is_smooth_weighted(weights: list[int], seed: int) -> None:
    members = make_members(len(weights))
    balancer = build("round_robin", members, weights, random.Random(seed))
    assert isinstance(balancer, SmoothWeighted)
    total = sum(weights)
    assert picked_indices(balancer, members, 2 * total) == nginx_reference(weights, 2 * total)


def names(balancer: SmoothWeighted[Member], picks: int) -> str:
    return "".join(member.name for member in (balancer.pick() for _ in range(picks)) if member)


def test_weights_5_1_1_give_the_nginx_sequence() -> None:
    members = [Member("a"), Member("b"), Member("c")]
    balancer = SmoothWeighted(members, [5, 1, 1])
    assert names(balancer, 7 * 4) == "aabacaa" * 4
    assert nginx_reference([5, 1, 1], 7) == [0, 0, 1, 0, 2, 0, 0]


@pytest.mark.parametrize("weight", [1, 3, 20])
def test_equal_weights_rotate(weight: int) -> None:
    members = [Member("a"), Member("b"), Member("c")]
    assert names(SmoothWeighted(members, [weight] * 3), 9) == "abcabcabc"


def test_equal_weights_rotate_past_zero_weights() -> None:
    members = [Member("a"), Member("x"), Member("b"), Member("c"), Member("y")]
    assert names(SmoothWeighted(members, [2, 0, 2, 2, 0]), 9) == "abcabcabc"


# -- round_robin: smoothness -------------------------------------------------------------


@SETTINGS
@given(weights=live_weight_lists)
def test_smooth_weighted_is_smooth(weights: list[int]) -> None:
    """Bounds that follow from the algorithm, on the balancer and on the reference.

    With ``c_i(t)`` upstream i's current weight after ``t`` picks and ``k_i(t)`` the number
    of times it was picked, ``c_i(t) = t*w_i - W*k_i(t)`` (W: total weight). Then:

    * after W picks every current weight is 0 again, so the sequence has period W and any
      W consecutive picks (aligned or not) hold each upstream exactly ``w_i`` times;
    * the winner's value is the largest of values summing to W, hence > 0, so every
      current weight stays > -W: after t picks, ``k_i(t) <= ceil(t*w_i/W)``;
    * over a window of L picks, ``k_i`` grows by ``(L*w_i - c_i(end) + c_i(start)) / W``.
      Current weights stay > -W (above) and, on every case searched (up to 64 upstreams),
      below 1.2*W, so no window strays 2 picks from its share ``L*w_i/W``; and a run of L
      picks of one upstream satisfies ``L*(W - w_i) = c_i(start) - c_i(end) < 2*W``.

    The simpler ``run <= ceil(w/(W-w)) + 1`` does NOT hold for nginx's algorithm: weights
    [1, 1, 20] give a run of 14 (the two light upstreams come back to back), not <= 11.
    """
    members = make_members(len(weights))
    total = sum(weights)
    sequence = picked_indices(SmoothWeighted(members, weights), members, 2 * total)
    assert sequence == nginx_reference(weights, 2 * total)
    assert sequence[:total] == sequence[total:]  # period W
    cycle = sequence[:total]
    counts = Counter(cycle)
    for index, weight in enumerate(weights):
        assert counts[index] == weight  # weight 0: never
        if weight == 0:
            continue
        # Every window of W consecutive picks (any start): exactly w_i picks.
        doubled = cycle * 2
        window = doubled[:total].count(index)
        for start in range(total):
            assert window == weight
            window += (doubled[start + total] == index) - (doubled[start] == index)
        # Prefix counts never get ahead of the share by a whole pick.
        seen = 0
        for t, item in enumerate(sequence, start=1):
            seen += item == index
            assert seen <= math.ceil(t * weight / total)
        # Any window of any length: |k - L*w/W| < 2, i.e. |D(end) - D(start)| < 2W with
        # D(t) = W*k(t) - t*w (checked over windows starting anywhere in two periods).
        lowest = highest = 0
        deviation = 0
        seen = 0
        for t, item in enumerate(sequence, start=1):
            seen += item == index
            d = total * seen - t * weight
            deviation = max(deviation, d - lowest, highest - d)
            lowest, highest = min(lowest, d), max(highest, d)
        assert deviation < 2 * total
        # Runs: L * (W - w_i) < 2W.
        if weight < total:
            assert longest_run(cycle, index) * (total - weight) < 2 * total


def test_run_bound_of_the_brief_fails_for_nginx_itself() -> None:
    """Why the run bound above is 2W/(W-w) and not ceil(w/(W-w)) + 1."""
    sequence = nginx_reference([1, 1, 20], 22)
    assert sequence == nginx_reference([1, 1, 20], 44)[22:]
    run = longest_run([i for i in sequence if i is not None], 2)
    assert run == 14 > math.ceil(20 / 2) + 1
    assert run * 2 < 2 * 22


# -- every policy: weight 0, tried, empty ------------------------------------------------


@SETTINGS
@given(
    weights=weight_lists,
    policy=st.sampled_from(POLICIES),
    seed=st.integers(0, 2**32 - 1),
    loads=st.lists(st.integers(0, 5), min_size=12, max_size=12),
)
def test_weight_zero_is_never_picked(
    weights: list[int], policy: str, seed: int, loads: list[int]
) -> None:
    members = [Member(f"m{i}", loads[i]) for i in range(len(weights))]
    balancer = build(policy, members, weights, random.Random(seed))
    for _ in range(50):
        member = balancer.pick()
        if sum(weights) == 0:
            assert member is None
        else:
            assert member is not None
            assert weights[members.index(member)] > 0


@SETTINGS
@given(data=st.data(), weights=live_weight_lists)
def test_a_retry_takes_no_turn_of_the_round_robin(data: st.DataObject, weights: list[int]) -> None:
    """Retries and hedges in between leave the first tries exactly nginx's sequence.
    (Taking a turn, a retry gave the upstream tried first the next request too: with two
    upstreams, every first try, so a slow one hedged every time was asked first every
    time.)"""
    members = [Member(f"m{i}", 0) for i in range(len(weights))]
    plain = SmoothWeighted(members, weights)
    expected = [plain.pick() for _ in range(3 * sum(weights))]
    balancer = SmoothWeighted(members, weights)
    for want in expected:
        first = balancer.pick()
        assert first is want
        if data.draw(st.booleans(), label="retried"):
            retry = balancer.pick([first])
            others = [m for m, w in zip(members, weights, strict=True) if w > 0 and m is not first]
            assert (retry in others) if others else retry is None


def test_a_slow_upstream_hedged_every_time_keeps_its_share_of_first_tries() -> None:
    a, b = Member("a", 0), Member("b", 0)
    balancer = SmoothWeighted([a, b], [1, 1])
    firsts = []
    for _ in range(10):
        first = balancer.pick()
        firsts.append(first.name if first else None)
        if first is a:  # slow: hedged to the other
            assert balancer.pick([a]) is b
    assert firsts == ["a", "b"] * 5


@SETTINGS
@given(data=st.data(), weights=live_weight_lists, policy=st.sampled_from(POLICIES))
def test_pick_never_returns_a_tried_upstream(
    data: st.DataObject, weights: list[int], policy: str
) -> None:
    loads = data.draw(st.lists(st.integers(0, 5), min_size=len(weights), max_size=len(weights)))
    members = [Member(f"m{i}", load) for i, load in enumerate(loads)]
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    balancer = build(policy, members, weights, rng)
    for _ in range(data.draw(st.integers(0, 30), label="picks before")):
        balancer.pick()
    eligible = [m for m, w in zip(members, weights, strict=True) if w > 0]
    # Any subset of the upstreams (weight 0 ones too) that leaves one eligible untried.
    tried = data.draw(
        st.lists(st.sampled_from(members), unique_by=id, max_size=len(members)).filter(
            lambda t: any(m not in t for m in eligible)
        ),
        label="tried",
    )
    for _ in range(5):  # several retries in a row, each from wherever the sequence is
        member = balancer.pick(tried)
        assert member is not None
        assert member not in tried
        assert member in eligible

    everything = data.draw(st.permutations(members), label="all tried")
    assert balancer.pick(everything) is None
    assert balancer.pick(eligible) is None
    assert balancer.pick() is not None  # and the balancer goes on afterwards


@pytest.mark.parametrize("policy", POLICIES)
def test_no_upstream_picks_none(policy: str) -> None:
    rng = random.Random(0)
    assert build(policy, [], [], rng).pick() is None
    members = make_members(3)
    assert build(policy, members, [0, 0, 0], rng).pick() is None
    assert build(policy, members, [0, 0, 0], rng).pick(members[:1]) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_single_upstream(policy: str) -> None:
    member, other = Member("a"), Member("zero")
    balancer = build(policy, [other, member], [0, 4], random.Random(0))
    assert [balancer.pick() for _ in range(5)] == [member] * 5
    assert balancer.pick([member]) is None
    assert balancer.pick([other]) is member


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        build("fastest", [], [], random.Random(0))


# -- least_requests: power of two choices -------------------------------------------------


class RecordingSampler:
    """Wraps a LeastRequests balancer's sampler and remembers the indices it drew."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.draws: list[int] = []

    def index(self) -> int:
        value: int = self.sampler.index()
        self.draws.append(value)
        return value


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("busy", "idle"), [(1, 0), (7, 3), (100, 99)])
def test_least_requests_of_two_always_takes_the_less_busy(seed: int, busy: int, idle: int) -> None:
    a, b = Member("a", busy), Member("b", idle)
    for members in ([a, b], [b, a]):
        balancer = LeastRequests(members, [1, 1], random.Random(seed))
        assert [balancer.pick() for _ in range(200)] == [b] * 200


@SETTINGS
@given(
    data=st.data(),
    count=st.integers(2, 40),
    seed=st.integers(0, 2**32 - 1),
    weighted=st.booleans(),
)
def test_least_requests_never_takes_the_busier_of_its_two_samples(
    data: st.DataObject, count: int, seed: int, weighted: bool
) -> None:
    loads = data.draw(st.lists(st.integers(0, 30), min_size=count, max_size=count))
    weights = (
        data.draw(st.lists(st.integers(1, 10), min_size=count, max_size=count))
        if weighted
        else [1] * count
    )
    members = [Member(f"m{i}", load) for i, load in enumerate(loads)]
    balancer = LeastRequests(members, weights, random.Random(seed))
    recorder = RecordingSampler(balancer._sampler)
    balancer._sampler = recorder  # type: ignore[assignment]
    for _ in range(30):
        recorder.draws.clear()
        picked = balancer.pick()
        assert picked is not None
        # The two distinct samples: the first draw, and the last (a draw equal to the
        # first is drawn again).
        i, j = recorder.draws[0], recorder.draws[-1]
        assert i != j
        assert picked in (members[i], members[j])
        other = members[j] if picked is members[i] else members[i]
        w_picked, w_other = weights[members.index(picked)], weights[members.index(other)]
        # in_flight / weight, compared without dividing.
        assert picked.in_flight * w_other <= other.in_flight * w_picked


def test_least_requests_compares_in_flight_per_weight() -> None:
    heavy, light = Member("heavy", 2), Member("light", 1)
    balancer = LeastRequests([light, heavy], [1, 3], random.Random(3))
    # 2/3 < 1/1: the heavier upstream wins although it has more requests in flight.
    assert {balancer.pick() for _ in range(100)} == {heavy}
    heavy.in_flight = 4  # 4/3 > 1/1
    assert {balancer.pick() for _ in range(100)} == {light}


def test_least_requests_samples_every_pair() -> None:
    members = make_members(6)
    balancer = LeastRequests(members, [1] * 6, random.Random(11))
    shares = Counter(balancer.pick() for _ in range(12_000))
    assert set(shares) == set(members)  # all idle: ties go to the first sample, uniform
    assert all(abs(n / 12_000 - 1 / 6) < 0.03 for n in shares.values())


# -- random: weighted ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2024])
@pytest.mark.parametrize("weights", [[1, 1], [5, 1, 1], [1, 2, 5, 0, 2], [20, 1, 7, 3, 0, 9]])
def test_weighted_random_shares(seed: int, weights: list[int]) -> None:
    members = make_members(len(weights))
    balancer = WeightedRandom(members, weights, random.Random(seed))
    picks = 20_000
    shares = Counter(balancer.pick() for _ in range(picks))
    total = sum(weights)
    for member, weight in zip(members, weights, strict=True):
        assert abs(shares[member] / picks - weight / total) <= 0.03, (member, shares)


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("tasks", "upstreams"), [(300, 3), (1000, 7), (64, 64), (10, 4)])
async def test_concurrent_picks_spread_evenly(tasks: int, upstreams: int) -> None:
    members = make_members(upstreams)
    balancer = build("round_robin", members, [2] * upstreams, random.Random(0))
    landed: Counter[Member] = Counter()
    start = anyio.Event()

    async def request(delay: int) -> None:
        await start.wait()
        for _ in range(delay):  # requests arrive interleaved, not in task order
            await anyio.lowlevel.checkpoint()
        member = balancer.pick()
        assert member is not None
        member.in_flight += 1
        landed[member] += 1
        await anyio.lowlevel.checkpoint()
        member.in_flight -= 1

    rng = random.Random(tasks)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for _ in range(tasks):
                group.start_soon(request, rng.randrange(5))
            await anyio.lowlevel.checkpoint()
            start.set()
    assert sum(landed.values()) == tasks
    assert all(m.in_flight == 0 for m in members)
    for member in members:
        assert abs(landed[member] - tasks / upstreams) <= 1


def test_least_requests_follows_the_weights_at_low_load() -> None:
    light, heavy = Member("light", 0), Member("heavy", 0)
    balancer = LeastRequests([light, heavy], [1, 9], random.Random(5))
    shares = Counter(balancer.pick() for _ in range(10_000))
    # Nothing in flight: every pair ties, and the first candidate, drawn by weight, wins.
    assert 0.87 < shares[heavy] / 10_000 < 0.93
