"""``Balancer.reconfigure``: a running balancer taken to new pools, as a reload does, in
one process with in-process upstreams (``tests/test_reload.py`` runs the gateway)."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from rr_middleware import (
    Balancer,
    HealthCheck,
    Pool,
    RoundRobinMiddleware,
    Route,
    StickyCookie,
    Upstream,
)
from rr_middleware.errors import UpstreamBroken
from rr_middleware.reload import Reloader

from .servers import serve
from .upstream_app import UpstreamApp

APPS = {name: UpstreamApp(name) for name in "abcd"}


def up(name: str, weight: int = 1) -> Upstream:
    return Upstream(f"http://{name}.internal", weight=weight, app=APPS[name])


@pytest.mark.anyio
async def test_upstreams_that_stay_keep_their_state_and_place() -> None:
    shared = {name: up(name) for name in "abc"}
    balancer = Balancer({"/api": Pool(list(shared.values()))})
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app) as manager:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://t")
        async with client:
            first = [(await client.get("/api/x")).headers["x-upstream"] for _ in range(4)]
            runtime = balancer["/api"]
            a, b, _ = runtime.members
            b.health.healthy = False  # as a failed active check would leave it
            runtime.refresh()
            requests_a = a.stats.requests
            changes = await balancer.reconfigure(
                {"/api": Pool([shared["a"], up("b", weight=1), up("d")])}
            )
            assert balancer["/api"] is runtime  # the same pool: its options did not change
            assert changes.describe() == "pool /api: upstreams 1 added, 1 removed"
            kept_a, kept_b, new_d = runtime.members
            assert (kept_a, kept_b) == (a, b)  # the very same members
            assert kept_a.stats.requests == requests_a
            assert not kept_b.health.healthy
            after = [(await client.get("/api/x")).headers["x-upstream"] for _ in range(4)]
    assert first == ["a", "b", "c", "a"]
    # a and d share the traffic (b is down; c is gone).
    assert sorted(after) == ["a", "a", "d", "d"]
    assert new_d.upstream.url == "http://d.internal"


@pytest.mark.anyio
async def test_pools_added_and_removed_are_routed_at_once() -> None:
    balancer = Balancer({"/api": Pool([up("a")]), "/old": Pool([up("b")])})
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app) as manager:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://t")
        async with client:
            assert (await client.get("/old/x")).headers["x-upstream"] == "b"
            assert (await client.get("/new/x")).status_code == 404
            changes = await balancer.reconfigure({"/api": Pool([up("a")]), "/new": Pool([up("c")])})
            assert (changes.added, changes.removed) == (["/new"], ["/old"])
            assert (await client.get("/new/x")).headers["x-upstream"] == "c"
            assert (await client.get("/old/x")).status_code == 404
            assert (await client.get("/api/x")).headers["x-upstream"] == "a"
            assert [p["prefix"] for p in balancer.status()["pools"]] == ["/api", "/new"]


@pytest.mark.anyio
async def test_changed_options_rebuild_the_pool_and_carry_its_upstreams_state() -> None:
    check = HealthCheck(path="/health", interval=60.0)
    balancer = Balancer({"/api": Pool([up("a"), up("b")], timeout=30.0, health_check=check)})
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app) as manager:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://t")
        async with client:
            await client.get("/api/x")
            old = balancer["/api"]
            old.drain("http://b.internal")
            a_stats = old.members[0].stats
            assert old.checker is not None
            changes = await balancer.reconfigure(
                {"/api": Pool([up("a"), up("b")], timeout=5.0, health_check=check)}
            )
            assert changes.rebuilt == ["/api"]
            new = balancer["/api"]
            assert new is not old
            assert new.pool.timeout == 5.0
            assert new.members[0].stats is a_stats  # counters carry on
            assert new.members[1].drained  # so does the drain
            assert old.checker._task is None  # the old pool's checks stopped
            served = {(await client.get("/api/x")).headers["x-upstream"] for _ in range(3)}
    assert served == {"a"}


@pytest.mark.anyio
async def test_routes_stay_and_keep_their_pools() -> None:
    """Routes are the middleware's: a reconfiguration that would take a routed pool away
    is refused before anything changes; one that rebuilds it routes to the new one."""
    pools = {"/api": Pool([up("a")]), "canary": Pool([up("b")])}
    routes = [Route("/api", pool="canary", headers={"x-canary": "yes"})]
    app = RoundRobinMiddleware(Starlette(), pools=pools, routes=routes)
    balancer = app.balancer
    async with LifespanManager(app) as manager:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://t")
        async with client:
            with pytest.raises(ValueError, match="'canary' is the target of a route"):
                await balancer.reconfigure({"/api": Pool([up("a")])})
            assert set(balancer.pools) == {"/api", "canary"}
            changes = await balancer.reconfigure(
                {"/api": Pool([up("a")]), "canary": Pool([up("c")], timeout=5.0)}
            )
            assert changes.rebuilt == ["canary"]
            canary = await client.get("/api/x", headers={"x-canary": "yes"})
            assert canary.headers["x-upstream"] == "c"
            assert (await client.get("/api/x")).headers["x-upstream"] == "a"


@pytest.mark.anyio
async def test_a_mirrored_pool_stays_linked_to_its_mirror() -> None:
    pools = {"/api": Pool([up("a")], mirror="shadow"), "shadow": Pool([up("b")])}
    balancer = Balancer(pools)
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app):
        with pytest.raises(ValueError, match="mirror 'shadow' is not another pool"):
            await balancer.reconfigure({"/api": Pool([up("a")], mirror="shadow")})
        await balancer.reconfigure(
            {"/api": Pool([up("a")], mirror="shadow"), "shadow": Pool([up("c")], timeout=5.0)}
        )
        mirror = balancer["/api"].mirror
        assert mirror is not None
        assert mirror.target is balancer.pools["shadow"]  # the rebuilt pool


def test_the_gateway_app_runs_outside_the_main_thread_too(tmp_path: Path) -> None:
    """create_app() in a thread of your own (no signals there): it serves, and a change
    of the file still reaches it through a reload."""
    path = tmp_path / "gateway.toml"
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b:
        path.write_text(f'[pools."/api"]\nupstreams = ["{a.url}"]\n')
        reloader = Reloader(path, {})
        outcome: dict[str, Any] = {}

        def run() -> None:
            async def main() -> None:
                app = reloader.load().app
                async with LifespanManager(app) as manager:
                    transport = httpx.ASGITransport(app=manager.app)
                    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                        outcome["before"] = (await c.get("/api/x")).headers["x-upstream"]
                        path.write_text(f'[pools."/api"]\nupstreams = ["{b.url}"]\n')
                        await reloader.reload("test")
                        outcome["after"] = (await c.get("/api/x")).headers["x-upstream"]

            asyncio.run(main())

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=30)
    assert outcome == {"before": "a", "after": "b"}


class _Holding:
    """An upstream answering its name; it holds a request to ``/hold`` until ``release``
    is set (at most 10 s)."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.release = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].endswith("/hold"):
            for _ in range(1000):
                if self.release.is_set():
                    break
                await asyncio.sleep(0.01)
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"x-upstream", self.name)],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.anyio
async def test_a_rebuilt_pool_counts_the_requests_on_the_upstreams_it_kept() -> None:
    """After a reload that changes an option, the pool's load still counts every request
    in flight: bounded-load hashing reads it, and a key must not spill off its upstream
    because the count stayed with the pool that was replaced."""
    apps = {name: _Holding(name) for name in "ab"}
    with serve(apps["a"]) as a, serve(apps["b"]) as b:

        def pool(timeout: float) -> Pool:
            return Pool([a.url, b.url], policy="hash", hash_on="header:x-key", timeout=timeout)

        balancer = Balancer({"/api": pool(30.0)})
        app = RoundRobinMiddleware(Starlette(), balancer=balancer)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            client = httpx.AsyncClient(transport=transport, base_url="http://t")
            async with client:
                key = {"x-key": "k"}
                home = (await client.get("/api/x", headers=key)).headers["x-upstream"]
                await balancer.reconfigure({"/api": pool(5.0)})
                runtime = balancer["/api"]
                held = asyncio.ensure_future(client.get("/api/hold", headers=key))
                for _ in range(500):  # until the held request is in flight (at most 5 s)
                    if any(m.in_flight for m in runtime.members):
                        break
                    await asyncio.sleep(0.01)
                in_flight = runtime.in_flight
                second = (await client.get("/api/x", headers=key)).headers["x-upstream"]
                for upstream in apps.values():
                    upstream.release.set()
                assert (await held).headers["x-upstream"] == home
    assert in_flight == 1
    assert second == home  # within its bound (2 of 2 requests in flight): no spill


@pytest.mark.anyio
async def test_sticky_cookies_outlive_a_rebuild_without_a_shared_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a secret, a process keeps its own key: a reload that rebuilds the pool
    (any option changed) must not repin every sticky client."""
    monkeypatch.delenv("RR_STICKY_SECRET", raising=False)
    members = [up(name) for name in "abc"]

    def pool(timeout: float) -> Pool:
        return Pool(members, sticky=StickyCookie(), timeout=timeout)

    balancer = Balancer({"/api": pool(30.0)})
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app) as manager:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://t")
        async with client:
            first = await client.get("/api/x")
            cookie = first.headers["set-cookie"].partition(";")[0]
            changes = await balancer.reconfigure({"/api": pool(5.0)})
            assert changes.rebuilt == ["/api"]
            answers = [await client.get("/api/x", headers={"cookie": cookie}) for _ in range(3)]
    assert [r.headers["x-upstream"] for r in answers] == [first.headers["x-upstream"]] * 3
    assert all("set-cookie" not in r.headers for r in answers)


@pytest.mark.anyio
async def test_a_reload_keeps_the_mirror_copies_in_flight_and_their_counts() -> None:
    """A copy in flight when the pools are reloaded stays owned (the app's stop still
    ends it) and the mirror's counts go on from where they were, as counters must."""
    shadow = _Holding("s")
    with serve(shadow) as mirror_server:

        def pools(timeout: float) -> dict[str, Pool]:
            source = Pool([up("a")], mirror="shadow", timeout=timeout)
            return {"/api": source, "shadow": Pool([mirror_server.url])}

        balancer = Balancer(pools(30.0))
        app = RoundRobinMiddleware(Starlette(), balancer=balancer)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/api/hold")).status_code == 200
                mirror = balancer["/api"].mirror
                assert mirror is not None
                assert mirror.status()["in_flight"] == 1
                await balancer.reconfigure(pools(30.0))  # nothing changed
                await balancer.reconfigure(pools(5.0))  # /api rebuilt
                mirror = balancer["/api"].mirror
                assert mirror is not None
                status = mirror.status()
                shadow.release.set()
    assert (status["sent"], status["in_flight"]) == (1, 1)


@pytest.mark.anyio
async def test_a_rebuilt_peak_ewma_pool_keeps_its_latency_estimates() -> None:
    """A reload that changes an option must not forget which upstream is slow: the
    estimates carry over with the upstreams, as their health and counters do."""
    members = [up("a"), up("b")]

    def pool(timeout: float) -> Pool:
        return Pool(members, policy="peak_ewma", timeout=timeout)

    balancer = Balancer({"/api": pool(30.0)})
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app):
        old = balancer["/api"]
        now = old.clock()
        old.members[0].latency.observe(0.010, now)
        old.members[1].latency.observe(2.0, now)
        await balancer.reconfigure({"/api": pool(5.0)})
        new = balancer["/api"]
        assert new is not old
        upstreams = balancer.status()["pools"][0]["upstreams"]
        estimates = [u["latency_ewma"] for u in upstreams]
    assert estimates[0] == pytest.approx(0.010, rel=0.1)
    assert estimates[1] == pytest.approx(2.0, rel=0.1)


@pytest.mark.anyio
async def test_a_new_ewma_decay_applies_to_the_upstreams_a_rebuilt_pool_keeps() -> None:
    members = [up("a"), up("b")]
    clock = [100.0]

    def pool(decay: float) -> Pool:
        return Pool(members, policy="peak_ewma", ewma_decay=decay, clock=lambda: clock[0])

    balancer = Balancer({"/api": pool(10.0)})
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app):
        balancer["/api"].members[0].latency.observe(1.0, clock[0])
        await balancer.reconfigure({"/api": pool(1.0)})
        clock[0] += 1.0  # one new decay: the estimate is divided by e
        estimate = balancer.status()["pools"][0]["upstreams"][0]["latency_ewma"]
    assert estimate == pytest.approx(math.exp(-1.0), rel=0.01)


@pytest.mark.anyio
async def test_an_ejection_by_a_request_from_before_a_rebuild_reaches_the_new_pool() -> None:
    """A request in flight across a reload ends in the pool it started in: its failure
    ejecting an upstream must take that upstream out of the new pool's rotation too."""
    from .proxy import InProcessProxy
    from .test_hedging import Scripted

    script: dict[int, tuple[float, Exception | None]] = {1: (0.5, UpstreamBroken("reset"))}
    script[2] = (0.0, None)

    def pool(timeout: float) -> Pool:
        urls = [f"http://127.0.0.1:{port}" for port in script]
        return Pool(urls, transport=transport, retries=0, max_fails=1, timeout=timeout)

    transport = Scripted(script)
    async with InProcessProxy(pool(30.0)) as proxy:
        balancer = proxy.middleware.balancer
        early = asyncio.ensure_future(proxy.http.get("/api/x"))  # to port 1, first in turn
        for _ in range(500):  # until it is in flight (at most 5 s)
            if transport.started:
                break
            await asyncio.sleep(0.01)
        await balancer.reconfigure({"/api": pool(5.0)})
        assert (await early).status_code == 502
        assert balancer["/api"].members[0].health.ejected_until is not None
        after = [(await proxy.http.get("/api/x")).headers.get("x-upstream") for _ in range(4)]
    assert after == ["2"] * 4
