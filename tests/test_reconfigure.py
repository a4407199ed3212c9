"""``Balancer.reconfigure``: a running balancer taken to new pools, as a reload does, in
one process with in-process upstreams (``tests/test_reload.py`` runs the gateway)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from rr_middleware import Balancer, HealthCheck, Pool, RoundRobinMiddleware, Route, Upstream
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
