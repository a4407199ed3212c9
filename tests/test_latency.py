"""Latency-aware balancing (``policy="peak_ewma"``): the estimate on an injected clock, the
policy's picks, and real uvicorn upstreams one of which a test slows down and speeds up
while a steady load runs through the proxy.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware import Pool
from rr_middleware.balancing import LeastLatency, build
from rr_middleware.config import FieldError
from rr_middleware.gateway_config import load_config
from rr_middleware.latency import LatencyWindow, PeakEwma, seed

from .proxy import aclient, running_proxy
from .slowable_upstream import slowable_upstreams

# -- the estimate, on an injected clock ------------------------------------------------------


def test_first_answer_sets_the_estimate_and_a_peak_replaces_it() -> None:
    ewma = PeakEwma(decay=10.0)
    assert ewma.estimate is None
    assert ewma.value(5.0) == 0.0
    ewma.observe(0.010, now=0.0)
    assert ewma.value(0.0) == 0.010
    ewma.observe(0.500, now=0.001)  # one slow answer is believed at once
    assert ewma.value(0.001) == 0.500


def test_a_faster_answer_is_blended_by_the_time_since_the_last() -> None:
    ewma = PeakEwma(decay=10.0)
    ewma.observe(0.100, now=0.0)
    ewma.observe(0.010, now=2.0)
    kept = math.exp(-2.0 / 10.0)
    assert ewma.value(2.0) == pytest.approx(0.100 * kept + 0.010 * (1 - kept))
    # Many answers a millisecond apart move it as far as one answer after the same time.
    fast = PeakEwma(decay=10.0)
    fast.observe(0.100, now=0.0)
    for step in range(1, 2001):
        fast.observe(0.010, now=step / 1000)
    assert fast.value(2.0) == pytest.approx(ewma.value(2.0), rel=1e-3)


def test_the_estimate_decays_towards_zero_without_answers_and_reading_changes_nothing() -> None:
    ewma = PeakEwma(decay=10.0)
    ewma.observe(0.200, now=100.0)
    assert ewma.value(110.0) == pytest.approx(0.200 / math.e)
    assert ewma.value(130.0) == pytest.approx(0.200 * math.exp(-3))
    assert ewma.value(110.0) == pytest.approx(0.200 / math.e)  # reads did not decay it
    assert ewma.value(90.0) == 0.200  # a clock read before the answer: as it is


def test_newcomers_start_at_the_median_of_their_peers() -> None:
    peers = [PeakEwma(10.0) for _ in range(3)]
    for ewma, seconds in zip(peers, (0.010, 0.030, 0.500), strict=True):
        ewma.observe(seconds, now=0.0)
    newcomer, unknown = PeakEwma(10.0), PeakEwma(10.0)
    seed([newcomer], [*peers, unknown], now=0.0)
    assert newcomer.value(0.0) == 0.030
    peers[0].observe(0.020, now=0.0)  # even count: the mean of the middle two
    seed([newcomer], [*peers[:2], unknown], now=0.0)
    assert newcomer.value(0.0) == pytest.approx(0.025)
    seed([newcomer], [unknown], now=0.0)  # none to go by: from nothing
    assert newcomer.estimate is None


def test_window_quantile_comes_after_enough_answers() -> None:
    window = LatencyWindow(0.95, size=100, every=10, minimum=50)
    for i in range(40):
        window.record(i / 1000)
    assert window.quantile is None
    for i in range(40, 200):
        window.record(i / 1000)
    assert window.quantile == pytest.approx(0.195, abs=0.006)  # the last 100: 100..199 ms


# -- the policy ------------------------------------------------------------------------------


class Member:
    __slots__ = ("in_flight", "latency", "name")

    def __init__(self, name: str, in_flight: int = 0) -> None:
        self.name = name
        self.in_flight = in_flight
        self.latency = PeakEwma(decay=10.0)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(members: list[Member], clock: Clock, weights: list[int] | None = None) -> Any:
    return build(
        "peak_ewma",
        members,
        weights or [1] * len(members),
        random.Random(7),
        estimates=[m.latency for m in members],
        clock=clock,
    )


def test_a_slow_upstream_is_left_out_until_its_estimate_decays() -> None:
    clock = Clock()
    a, b, slow = Member("a"), Member("b"), Member("slow")
    balancer = policy([a, b, slow], clock)
    for member, seconds in ((a, 0.002), (b, 0.002), (slow, 0.200)):
        member.latency.observe(seconds, clock.now)
    picks = Counter(balancer.pick().name for _ in range(3000))
    assert picks["slow"] == 0
    assert picks["a"] > 900
    assert picks["b"] > 900
    # tau * ln(0.200 / 0.002) = 46 s later it is as cheap as the others again.
    clock.now += 60.0
    a.latency.observe(0.002, clock.now)
    b.latency.observe(0.002, clock.now)
    picks = Counter(balancer.pick().name for _ in range(3000))
    assert picks["slow"] > 500


def test_cost_is_latency_times_load_over_weight() -> None:
    clock = Clock()
    a, b = Member("a"), Member("b")
    for member in (a, b):
        member.latency.observe(0.010, clock.now)
    balancer = policy([a, b], clock, weights=[2, 1])
    a.in_flight, b.in_flight = 1, 1  # costs 0.010 * 2 / 2 against 0.010 * 2 / 1
    assert {balancer.pick().name for _ in range(50)} == {"a"}
    a.in_flight, b.in_flight = 2, 0  # 0.010 * 3 / 2 against 0.010 * 1 / 1
    assert {balancer.pick().name for _ in range(50)} == {"b"}
    b.latency.observe(0.100, clock.now)  # ten times slower: a again, though busier
    assert {balancer.pick().name for _ in range(50)} == {"a"}
    assert balancer.pick([a]) is b
    assert balancer.pick([a, b]) is None


def test_a_returning_upstream_starts_at_the_median_not_at_zero() -> None:
    clock = Clock()
    a, b, c, back = Member("a"), Member("b"), Member("c"), Member("back")
    for member, seconds in ((a, 0.010), (b, 0.020), (c, 0.040), (back, 0.001)):
        member.latency.observe(seconds, clock.now)
    first = policy([a, b, c, back], clock)
    clock.now += 300.0  # "back" was ejected meanwhile; its old estimate decayed to ~0
    for member, seconds in ((a, 0.010), (b, 0.020), (c, 0.040)):
        member.latency.observe(seconds, clock.now)
    without = build("peak_ewma", [a, b, c], [1, 1, 1], random.Random(1), first, None,
                    [m.latency for m in (a, b, c)], clock)  # fmt: skip
    assert back.latency.value(clock.now) < 1e-6
    again = build("peak_ewma", [a, b, c, back], [1] * 4, random.Random(1), without, None,
                  [m.latency for m in (a, b, c, back)], clock)  # fmt: skip
    assert isinstance(again, LeastLatency)
    assert back.latency.value(clock.now) == pytest.approx(0.020)
    assert a.latency.value(clock.now) == pytest.approx(0.010)  # the others untouched


def test_config_and_toml(tmp_path: Path) -> None:
    pool = Pool(["http://a:1"], policy="peak_ewma", ewma_decay=2.5)
    assert pool.ewma_decay == 2.5
    for bad in (0, -1.0, "10", math.inf):
        with pytest.raises(FieldError) as caught:
            Pool(["http://a:1"], ewma_decay=bad)
        assert caught.value.field == "ewma_decay"
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[pools."/api"]\nupstreams = ["http://10.0.0.1:8000"]\n'
        'policy = "peak_ewma"\newma_decay = 5\n'
    )
    loaded = load_config(path).pools["/api"]
    assert (loaded.policy, loaded.ewma_decay) == ("peak_ewma", 5.0)


# -- real upstreams under load ---------------------------------------------------------------


async def steady_load(
    http: httpx.AsyncClient, url: Callable[[int], str], seconds: float, clients: int
) -> list[tuple[str, float]]:
    """``clients`` closed-loop clients for ``seconds``: (upstream, latency) per answer."""
    results: list[tuple[str, float]] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def one_client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await http.get(url(next(counter)))
            assert response.status_code == 200, response.text
            results.append((response.headers["x-upstream"], time.monotonic() - started))

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return results


def share(results: list[tuple[str, float]], name: str) -> float:
    return sum(1 for who, _ in results if who == name) / len(results)


def waited(results: list[tuple[str, float]], seconds: float) -> float:
    """The share of the requests answered after ``seconds`` or more."""
    return sum(1 for _, latency in results if latency >= seconds) / len(results)


def quantile(results: list[tuple[str, float]], q: float) -> float:
    latencies = sorted(latency for _, latency in results)
    return latencies[int(q * (len(latencies) - 1))]


@pytest.mark.slow
@pytest.mark.anyio
async def test_peak_ewma_shuns_a_slow_upstream_and_takes_it_back() -> None:
    """One of three upstreams slowed by 200 ms: round robin (a pool of the same upstreams,
    in the same run) keeps sending it a third; peak_ewma a few percent within seconds, with
    a p99 far below round robin's; back to about a third once it is fast again.
    ``ewma_decay=2``: a shorter tau than the default 10 s, so the recovery (a few tau)
    fits a test."""
    with slowable_upstreams(3) as (apps, urls):
        pools = {"/rr": Pool(urls), "/ewma": Pool(urls, policy="peak_ewma", ewma_decay=2.0)}
        with running_proxy(pools) as (proxy, _):
            async with aclient() as http:

                async def both(seconds: float) -> tuple[list[Any], list[Any]]:
                    rr, ewma = await asyncio.gather(
                        steady_load(http, lambda i: f"{proxy.url}/rr/x?i={i}", seconds, 4),
                        steady_load(http, lambda i: f"{proxy.url}/ewma/x?i={i}", seconds, 4),
                    )
                    return rr, ewma

                await both(1.0)  # warm: connections, estimates
                apps[2].delay = 0.2
                await both(1.5)  # the slowdown is noticed
                rr, ewma = await both(4.0)
                for name, results in (("round robin", rr), ("peak_ewma", ewma)):
                    print(
                        f"{name}: slow upstream's share {share(results, 'c'):.1%}, p90 "
                        f"{quantile(results, 0.9) * 1000:.0f} ms, p99 "
                        f"{quantile(results, 0.99) * 1000:.0f} ms ({len(results)} requests)"
                    )
                assert 0.25 < share(rr, "c") < 0.42
                assert share(ewma, "c") < 0.10
                # Every process of the test shares one interpreter on a busy machine: the
                # fast answers' own tail is long, so the clients that waited 200 ms or
                # more are counted, and the p99s compared, not halved.
                assert waited(rr, 0.2) > 0.25
                assert waited(ewma, 0.2) < 0.10
                assert quantile(ewma, 0.99) < quantile(rr, 0.99)

                apps[2].delay = 0.0
                started = time.monotonic()
                while True:
                    ewma = await steady_load(http, lambda i: f"{proxy.url}/ewma/x?i={i}", 2.0, 4)
                    if share(ewma, "c") > 0.22:
                        break
                    assert time.monotonic() - started < 30, f"still {share(ewma, 'c'):.1%}"
                print(f"recovered to {share(ewma, 'c'):.1%} in {time.monotonic() - started:.1f} s")


def test_an_undrained_upstream_starts_at_the_pools_median() -> None:
    """Through the pool's runtime: drained, its estimate goes stale (decays towards zero);
    back in rotation, it starts at the median of the others, not at that stale zero."""
    from rr_middleware.pool_runtime import PoolRuntime
    from rr_middleware.transport.base import UpstreamTransport

    class Unused(UpstreamTransport):
        async def send(self, request: Any) -> Any:
            raise AssertionError("no request is sent")

    clock = Clock()
    urls = [f"http://127.0.0.1:{port}" for port in (1, 2, 3, 4)]
    pool = Pool(urls, policy="peak_ewma", clock=clock, random=random.Random(3))
    runtime = PoolRuntime("/api", pool, lambda upstream: Unused())
    members = {m.upstream.url[-1]: m for m in runtime.members}
    for name, seconds in (("1", 0.010), ("2", 0.020), ("3", 0.040), ("4", 0.002)):
        members[name].latency.observe(seconds, clock.now)
    runtime.drain(urls[3])
    clock.now += 600.0
    for name, seconds in (("1", 0.010), ("2", 0.020), ("3", 0.040)):
        members[name].latency.observe(seconds, clock.now)
    assert members["4"].latency.value(clock.now) < 1e-6
    runtime.undrain(urls[3])
    assert members["4"].latency.value(clock.now) == pytest.approx(0.020)
    picks = Counter(runtime.pick([]).upstream.url[-1] for _ in range(300))  # type: ignore[union-attr]
    assert picks["4"] < 200  # not flooded: about its fair share against 1 and 2
    row = next(r for r in runtime.snapshot() if r["url"] == urls[3])
    assert row["latency_ewma"] == pytest.approx(0.020)
    assert row["cost"] == pytest.approx(0.020 + 1e-6)


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["least_requests", "peak_ewma"])
async def test_an_upstream_failing_fast_draws_the_load_unless_its_status_counts(
    policy: str,
) -> None:
    """What docs/balancing.md warns of: one of two upstreams answers 500 at once, the other
    200 after 20 ms. With the default ``unhealthy_statuses`` (500 not in it), a policy that
    prefers the idle or the fast sends most requests to the failing one; with 500 listed,
    passive ejection takes it out after ``max_fails`` and the other gets nearly all.
    ``ewma_decay=0.5`` and a second of load first: one slow first answer (a busy machine)
    is a peak peak_ewma would otherwise remember for the whole test."""
    with slowable_upstreams(2) as (apps, urls):
        apps[0].fail_with = 500
        apps[1].delay = 0.02
        counted = frozenset({500, 502, 503, 504})
        options: dict[str, Any] = {"policy": policy, "retries": 0, "ewma_decay": 0.5}
        pools = {
            "/default": Pool(urls, **options),
            "/counted": Pool(urls, **options, unhealthy_statuses=counted),
        }
        with running_proxy(pools) as (proxy, _):
            async with aclient() as http:

                async def failed_share(prefix: str, seconds: float) -> float:
                    statuses: list[int] = []
                    deadline = time.monotonic() + seconds

                    async def one_client() -> None:
                        while time.monotonic() < deadline:
                            response = await http.get(f"{proxy.url}{prefix}/x")
                            statuses.append(response.status_code)

                    await asyncio.gather(*(one_client() for _ in range(4)))
                    assert set(statuses) <= {200, 500}, Counter(statuses)
                    return statuses.count(500) / len(statuses)

                await asyncio.gather(failed_share("/default", 1.0), failed_share("/counted", 1.0))
                default, counted_share = await asyncio.gather(
                    failed_share("/default", 1.5), failed_share("/counted", 1.5)
                )
    print(f"{policy}: 500s {default:.1%} by default, {counted_share:.1%} with 500 counted")
    assert default > 0.6  # most: 77-84 % (least_requests), 89-97 % (peak_ewma) seen
    assert counted_share < 0.1
