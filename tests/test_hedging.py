"""Hedged requests (``Pool(hedge_after=..., max_hedges=1)``) through real uvicorn upstreams:
the tail they cut, what they cost, that the losing exchange is cancelled cleanly, and the
requests that are never hedged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware import Pool
from rr_middleware.config import FieldError
from rr_middleware.errors import UpstreamBroken
from rr_middleware.gateway_config import load_config
from rr_middleware.pool_runtime import PoolRuntime
from rr_middleware.transport.base import UpstreamRequest, UpstreamTransport

from .polling import settled
from .proxy import InProcessProxy, aclient, running_proxy
from .servers import RunningServer
from .slowable_upstream import SlowableUpstream, slowable_upstreams


def test_config_and_toml(tmp_path: Path) -> None:
    assert Pool(["http://a:1"]).hedge_after is None
    assert Pool(["http://a:1"], hedge_after="p99.9", max_hedges=2).max_hedges == 2
    for name, bad in (
        ("hedge_after", "95%"),
        ("hedge_after", "p100"),
        ("hedge_after", 0),
        ("hedge_after", True),
        ("max_hedges", 0),
    ):
        with pytest.raises(FieldError) as caught:
            Pool(["http://a:1"], **{name: bad})
        assert caught.value.field == name
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[pools."/a"]\nupstreams = ["http://10.0.0.1:8000"]\nhedge_after = "p95"\n'
        'max_hedges = 2\n[pools."/b"]\nupstreams = ["http://10.0.0.1:8000"]\n'
        "hedge_after = 0.25\n"
    )
    pools = load_config(path).pools
    assert (pools["/a"].hedge_after, pools["/a"].max_hedges) == ("p95", 2)
    assert pools["/b"].hedge_after == 0.25


def counts(apps: list[SlowableUpstream]) -> dict[str, int]:
    return {
        "seen": sum(a.seen for a in apps),
        "delayed": sum(a.delayed for a in apps),
        "delayed_done": sum(a.delayed_done for a in apps),
        "disconnects": sum(a.disconnects for a in apps),
    }


async def closed_loop(
    http: httpx.AsyncClient, base: str, seconds: float, clients: int
) -> list[float]:
    """``clients`` clients for ``seconds``; each answer checked to be its own request's
    (a connection returned to the pool mid-response would hand one the rest of
    another's). Returns the latencies."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    numbers = iter(range(10**9))

    async def client() -> None:
        while time.monotonic() < deadline:
            n = next(numbers)
            started = time.monotonic()
            response = await http.get(f"{base}/x?i={n}")
            assert response.status_code == 200, response.text
            assert json.loads(response.content)["query"] == f"i={n}"
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def p99(latencies: list[float]) -> float:
    return sorted(latencies)[int(0.99 * (len(latencies) - 1))]


@pytest.mark.slow
@pytest.mark.anyio
async def test_p95_hedging_cuts_the_tail_and_cancels_the_losers() -> None:
    """One of three upstreams holds every 10th of its requests 1 s. Unhedged, that is
    about 3 % of the requests: the p99 is a second. With ``hedge_after="p95"`` the p99
    falls well below, the hedges stay under 10 % of the requests, every held request
    sees its client leave (the loser's connection closed), and afterwards nothing is
    in flight or held in the budget."""
    with slowable_upstreams(3) as (apps, urls):
        apps[2].slow_every = 10
        pools = {"/plain": Pool(urls), "/hedged": Pool(urls, hedge_after="p95")}
        with running_proxy(pools) as (proxy, middleware):
            hedged: PoolRuntime = middleware.balancer["/hedged"]
            async with aclient() as http:
                plain = await closed_loop(http, f"{proxy.url}/plain", 5.0, 4)
                await closed_loop(http, f"{proxy.url}/hedged", 1.0, 4)  # fills the window
                assert hedged.hedging is not None
                assert hedged.hedging.delay() is not None
                before, sent_before = counts(apps), hedged.hedging.sent
                latencies = await closed_loop(http, f"{proxy.url}/hedged", 6.0, 4)
                await settled(lambda: all(m.in_flight == 0 for m in hedged.members))
                await settled(lambda: counts(apps)["delayed"] == sum(
                    counts(apps)[k] for k in ("delayed_done", "disconnects")
                ))  # fmt: skip
            after = counts(apps)
            sent = hedged.hedging.sent - sent_before
            delta = {k: after[k] - before[k] for k in after}
            print(
                f"unhedged p99 {p99(plain) * 1000:.0f} ms ({len(plain)} requests); hedged p99 "
                f"{p99(latencies) * 1000:.0f} ms ({len(latencies)} requests), hedge after "
                f"{hedged.hedging.delay() * 1000:.1f} ms, {sent} hedges "
                f"({sent / len(latencies):.1%} extra load), {hedged.hedging.won} won; "
                f"upstreams held {delta['delayed']} requests, {delta['disconnects']} cancelled"
            )
            assert p99(plain) >= 1.0
            assert p99(latencies) < 0.5
            assert 0 < sent < 0.10 * len(latencies)
            assert delta["delayed"] > 0
            assert delta["disconnects"] >= 0.9 * delta["delayed"]
            assert hedged.budget.retrying == 0
            assert hedged.budget.active == 0


@pytest.mark.slow
@pytest.mark.anyio
async def test_fast_server_errors_do_not_pull_the_hedging_quantile_down() -> None:
    """Two of three upstreams fail at once with 500 (not retried), the third answers in
    50 ms. The pool's p50 is that of its answers' time, 50 ms: counting the errors'
    instant answers it fell to about a millisecond, and every good request was hedged
    after that long, doubling the load on the one healthy upstream."""
    with slowable_upstreams(3) as (apps, urls):
        apps[0].delay = 0.05
        apps[1].fail_with = apps[2].fail_with = 500
        with running_proxy({"/api": Pool(urls, hedge_after="p50")}) as (proxy, middleware):
            runtime: PoolRuntime = middleware.balancer["/api"]
            assert runtime.hedging is not None
            async with aclient() as http:
                statuses = Counter[int]()
                while sum(statuses.values()) < 300:
                    answers = await asyncio.gather(
                        *(http.get(f"{proxy.url}/api/x") for _ in range(6))
                    )
                    statuses.update(response.status_code for response in answers)
            assert statuses[500] > statuses[200] > 30
            delay = runtime.hedging.delay()
            print(f"{statuses}: hedge after {delay}")
            assert delay is not None
            assert delay >= 0.04


async def test_peak_ewma_learns_from_a_hedge_it_lost_that_an_upstream_is_slow() -> None:
    """``peak_ewma`` with hedging: an upstream that answers in 2 s loses every race to a
    fast one after 50 ms and is cancelled. Its time so far raises its estimate, so the
    next requests go to the fast one first; before, the slow one, never observed, kept
    the lowest estimate and was asked first every time, each request waiting 50 ms for
    its hedge."""
    with slowable_upstreams(2) as (apps, urls):
        slow, fast = apps
        slow.delay = 2.0
        pools = {"/api": Pool(urls, policy="peak_ewma", hedge_after=0.05)}
        with running_proxy(pools) as (proxy, _):
            async with aclient() as http:
                for n in range(10):
                    response = await http.get(f"{proxy.url}/api/x{n}")
                    assert response.status_code == 200
                    assert response.headers["x-upstream"] == fast.inner.name
    assert fast.seen == 10
    assert slow.seen <= 2, slow.seen  # once, maybe twice while the estimates settle


@pytest.fixture
async def slow_pool(upstreams: list[RunningServer]) -> AsyncIterator[tuple[str, PoolRuntime]]:
    """A proxy whose pool ``/api`` hedges after 50 ms (``/nrn``: and retries POSTs);
    every request asks its upstream to sleep 300 ms first."""
    urls = [u.url for u in upstreams]
    pools = {
        "/api": Pool(urls, hedge_after=0.05, retry_body_limit=1024),
        "/nrn": Pool(urls, hedge_after=0.05, retry_non_idempotent=True),
    }
    with running_proxy(pools) as (proxy, middleware):
        yield proxy.url, middleware.balancer["/api"]


def hedges(pool: PoolRuntime) -> int:
    assert pool.hedging is not None
    return pool.hedging.sent


@pytest.mark.anyio
async def test_get_is_hedged_post_and_streaming_uploads_are_not(
    slow_pool: tuple[str, PoolRuntime], upstreams: list[RunningServer]
) -> None:
    url, pool = slow_pool

    def requests_seen() -> int:
        return sum(len(u.app.requests) for u in upstreams)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"u" * 1024

    async with aclient() as http:
        sleep = "?action=sleep&s=0.3"
        response = await http.get(f"{url}/api/x{sleep}")
        assert response.status_code == 200
        assert hedges(pool) == 1
        await settled(lambda: requests_seen() == 2)  # both got it; the loser was cancelled

        seen = requests_seen()
        cases: list[tuple[str, Any]] = [
            ("POST", {"content": b"order"}),  # not idempotent
            ("PUT", {"content": body()}),  # streamed: 8 KiB past retry_body_limit
            ("PUT", {"content": b"x" * 2048}),  # whole, but past retry_body_limit
        ]
        for method, options in cases:
            response = await http.request(method, f"{url}/api/x{sleep}", **options)
            assert response.status_code == 200, (method, response.text)
        assert hedges(pool) == 1
        assert requests_seen() == seen + 3

        response = await http.post(f"{url}/nrn/x{sleep}", content=b"order")
        assert response.status_code == 200
        await settled(lambda: requests_seen() == seen + 5)  # retry_non_idempotent: hedged


@pytest.mark.anyio
async def test_status_and_metrics_tell_costs_budget_and_hedges(
    upstreams: list[RunningServer],
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    urls = [u.url for u in upstreams]
    pool = Pool(urls, policy="peak_ewma", hedge_after=0.05)
    async with InProcessProxy(pool) as proxy:
        await proxy.http.get("/api/x?action=sleep&s=0.2")  # hedged once
        for _ in range(20):  # every upstream drawn at least once
            assert (await proxy.http.get("/api/x")).status_code == 200
        shown = proxy.middleware.balancer.status()["pools"][0]
        registry = CollectorRegistry(auto_describe=True)
        registry.register(proxy.middleware.balancer.prometheus_collector())
        text = generate_latest(registry).decode()
    # At least the sleeping request; a quick one may be too, on a loaded machine.
    sent = shown["hedging"]["sent"]
    assert sent >= 1
    assert shown["hedging"]["delay"] == 0.05
    assert 0 <= shown["hedging"]["won"] <= sent
    assert shown["retry_budget"] == {
        "fraction": 0.2,
        "minimum": 3,
        "active": 0,
        "in_flight": 0,
        "limit": 3.0,
        "refused": 0,
    }
    rows = shown["upstreams"]
    assert all(row["latency_ewma"] is not None and row["latency_ewma"] > 0 for row in rows)
    assert all(row["cost"] >= row["latency_ewma"] for row in rows)  # weight 1, in flight 0
    assert f'rr_pool_hedges_total{{pool="/api"}} {float(sent)}' in text
    assert 'rr_pool_retries_refused_total{pool="/api"} 0.0' in text
    assert text.count("rr_upstream_latency_ewma_seconds{") == 3


# -- the race, in process, on a scripted transport -------------------------------------------


class Answer:
    """A whole 200 response naming its upstream."""

    def __init__(self, name: str) -> None:
        self.status = 200
        self.headers = [(b"content-length", b"%d" % len(name)), (b"x-upstream", name.encode())]
        self._body = name.encode()
        self.closed = False

    def body_complete(self) -> bool:
        return True

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body

    async def aclose(self) -> None:
        self.closed = True


class Scripted(UpstreamTransport):
    """Each upstream (by port) waits its delay, then answers or raises its error; counts
    the sends it started and the ones cancelled while waiting."""

    def __init__(self, script: dict[int, tuple[float, Exception | None]]) -> None:
        self.script = script
        self.started: list[int] = []
        self.cancelled: list[int] = []

    async def send(self, request: UpstreamRequest) -> Any:
        port = request.upstream.port
        delay, error = self.script[port]
        self.started.append(port)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled.append(port)
            raise
        if error is not None:
            raise error
        return Answer(str(port))


def scripted_pool(script: dict[int, tuple[float, Exception | None]], **options: Any) -> Pool:
    return Pool(
        [f"http://127.0.0.1:{port}" for port in script],
        transport=Scripted(script),
        policy="round_robin",
        hedge_after=0.05,
        **options,
    )


def idle(pool: PoolRuntime) -> bool:
    return all(m.in_flight == 0 for m in pool.members) and pool.budget.retrying == 0


@pytest.mark.anyio
async def test_the_first_headers_win_and_the_slow_try_is_cancelled() -> None:
    pool = scripted_pool({1: (5.0, None), 2: (0.0, None)})
    transport = pool.transport
    assert isinstance(transport, Scripted)
    async with InProcessProxy(pool) as proxy:
        response = await proxy.http.get("/api/x")
        assert (response.status_code, response.text) == (200, "2")
        assert (transport.started, transport.cancelled) == ([1, 2], [1])
        rows = {row["url"][-1]: row for row in proxy.pool.snapshot()}
        assert rows["1"]["requests"] == 0  # late, not wrong: no outcome
        assert rows["2"]["requests"] == 1
        assert proxy.pool.hedging is not None
        assert (proxy.pool.hedging.sent, proxy.pool.hedging.won) == (1, 1)
        assert idle(proxy.pool)


@pytest.mark.anyio
async def test_a_try_failing_leaves_the_race_to_the_other() -> None:
    # The first fails after the hedge went out (at 50 ms); the hedge answers later. The
    # margins are wide for a loaded machine.
    pool = scripted_pool({1: (0.3, UpstreamBroken("reset")), 2: (0.6, None)})
    async with InProcessProxy(pool) as proxy:
        response = await proxy.http.get("/api/x")
        assert (response.status_code, response.text) == (200, "2")
        rows = {row["url"][-1]: row for row in proxy.pool.snapshot()}
        assert rows["1"]["failures"] == 1  # the failure is held against its upstream
        assert idle(proxy.pool)


@pytest.mark.anyio
async def test_every_try_failing_is_the_attempt_failing() -> None:
    # retries=0: the hedge failed too, so the client gets the failure's status.
    failing = {1: (0.3, UpstreamBroken("reset")), 2: (0.3, UpstreamBroken("reset"))}
    async with InProcessProxy(scripted_pool(failing, retries=0)) as proxy:
        response = await proxy.http.get("/api/x")
        assert response.status_code == 502
        assert sum(row["failures"] for row in proxy.pool.snapshot()) == 2
        assert idle(proxy.pool)


@pytest.mark.anyio
async def test_the_client_leaving_cancels_every_try() -> None:
    pool = scripted_pool({1: (5.0, None), 2: (5.0, None)})
    transport = pool.transport
    assert isinstance(transport, Scripted)
    async with InProcessProxy(pool) as proxy:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(proxy.http.get("/api/x"), 1.0)
        await settled(lambda: len(transport.cancelled) == 2)
        assert sorted(transport.started) == [1, 2]
        assert idle(proxy.pool)
        assert proxy.pool.budget.active == 0


@pytest.mark.anyio
async def test_no_hedge_over_budget() -> None:
    pool = scripted_pool({1: (0.2, None), 2: (0.0, None)}, retry_budget=0.0, retry_budget_min=0)
    async with InProcessProxy(pool) as proxy:
        response = await proxy.http.get("/api/x")
        assert (response.status_code, response.text) == (200, "1")  # waited for the first
        assert proxy.pool.hedging is not None
        assert proxy.pool.hedging.sent == 0
        assert proxy.pool.budget.refused == 1
