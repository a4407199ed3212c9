"""Routes beyond the prefix (``rr_middleware.matching``): conditions on host, method,
headers, cookies and query choose the pool; weighted splits between pools (canaries);
the order routes are tried in; and what matches nothing reaching the host app. Through
the middleware under uvicorn to real uvicorn upstreams, each pool one upstream named
after it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware import Pool, RoundRobinMiddleware, Route
from rr_middleware.errors import FieldError
from rr_middleware.gateway import describe
from rr_middleware.gateway_config import load_config

from .proxy import client, host_app, running_proxy
from .raw_client import RawClient, raw_request
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp

pytestmark = pytest.mark.usefixtures("no_asyncio_errors")


@pytest.fixture
def named() -> Iterator[dict[str, RunningServer]]:
    """One real upstream per pool: stable, canary, admin, beta."""
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(serve(UpstreamApp(name)))
            for name in ("stable", "canary", "admin", "beta")
        }


def pools_of(named: dict[str, RunningServer], *names: str) -> dict[str, Any]:
    """``/api`` (stable) and the named pools (every other by default)."""
    names = names or ("canary", "admin", "beta")
    return {"/api": Pool([named["stable"].url])} | {n: Pool([named[n].url]) for n in names}


def served_by(response: httpx.Response) -> str:
    """The pool whose upstream answered, or "host" for the host app."""
    return response.headers.get("x-upstream", "host")


def test_conditions_choose_the_pool(named: dict[str, RunningServer]) -> None:
    routes = [
        Route("/api", pool="admin", methods=["DELETE"]),
        Route("/api", pool="admin", host="admin.example.com"),
        Route("/api", pool="canary", headers={"x-canary": "always"}),
        Route("/api", pool="beta", cookies={"beta": True}),
        Route("/api", pool="beta", query={"variant": re.compile(r"^b\d+$")}),
        Route("/api/v2", pool="canary", headers={"x-v2": True}),
    ]
    with running_proxy(pools_of(named), routes=routes) as (proxy, _), client() as http:
        url = f"{proxy.url}/api/x"

        def to(**request: Any) -> str:
            return served_by(http.request(request.pop("method", "GET"), url, **request))

        assert to() == "stable"  # no route matches: the prefix's own pool
        assert to(method="DELETE") == "admin"
        assert to(headers={"host": "Admin.Example.com:8443"}) == "admin"
        assert to(headers={"host": "example.com"}) == "stable"
        assert to(headers={"x-canary": "always"}) == "canary"
        assert to(headers={"x-canary": "never"}) == "stable"
        assert to(headers={"cookie": "beta=1"}) == "beta"
        assert to(params={"variant": "b12"}) == "beta"
        assert to(params={"variant": "a12"}) == "stable"
        # The first route that matches wins: DELETE beats the header.
        assert to(method="DELETE", headers={"x-canary": "always"}) == "admin"
        # A longer prefix's route first; not matching, the shorter prefix's routes.
        assert served_by(http.get(f"{proxy.url}/api/v2/x", headers={"x-v2": "1"})) == "canary"
        v2_canary = http.get(f"{proxy.url}/api/v2/x", headers={"x-canary": "always"})
        assert served_by(v2_canary) == "canary"
        assert served_by(http.get(f"{proxy.url}/api/v2/x")) == "stable"
        # Outside every prefix: the host app, as always.
        assert http.get(f"{proxy.url}/local").text == "host local"


def test_a_prefix_with_only_routes_falls_through_when_none_match(
    named: dict[str, RunningServer],
) -> None:
    routes = [Route("/beta", pool="beta", headers={"x-beta": False}, cookies={"opt": "in"})]
    pools = pools_of(named, "beta")
    with running_proxy(pools, routes=routes) as (proxy, middleware), client() as http:
        opted = http.get(f"{proxy.url}/beta/x", headers={"cookie": "opt=in"})
        assert served_by(opted) == "beta"
        assert opted.json()["raw_path"] == "/x"  # the route's prefix is stripped
        assert http.get(f"{proxy.url}/beta/x").status_code == 404  # the host app's
        refused = http.get(f"{proxy.url}/beta/x", headers={"cookie": "opt=in", "x-beta": "1"})
        assert served_by(refused) == "host"
        routes_status = middleware.status()["routes"]
    assert routes_status == [
        {
            "prefix": "/beta",
            "match": {"headers": {"x-beta": False}, "cookies": {"opt": "in"}},
            "matched": 1,
            "sent": {"beta": 1},
        }
    ]


def pipelined(proxy: RunningServer, count: int, headers: list[tuple[str, str]]) -> Counter[str]:
    """Which pool answered each of ``count`` pipelined GETs of /api/x."""
    answered: Counter[str] = Counter()
    request = raw_request("GET", "/api/x?action=status&code=200", [("Host", "p"), *headers])
    with RawClient(proxy.port) as raw:
        for start in range(0, count, 250):
            batch = min(250, count - start)
            raw.send(request * batch)
            for _ in range(batch):
                status, response_headers = raw.read_head()
                raw.read_body(response_headers)
                assert status == 200
                answered[dict(response_headers)[b"x-upstream"].decode()] += 1
    return answered


@pytest.mark.slow
def test_a_canary_split_95_5(named: dict[str, RunningServer]) -> None:
    """10,000 requests split 95/5 within 1 % absolute; a forcing header always reaches
    the canary; a keyed client stays on its side across 1,000 requests."""
    routes = [
        Route("/api", pool="canary", headers={"x-canary": "always"}),
        Route("/api", split={"/api": 95, "canary": 5}, stick_on="cookie:session"),
    ]
    with running_proxy(pools_of(named, "canary"), routes=routes) as (proxy, middleware):
        split = pipelined(proxy, 10_000, [])
        assert abs(split["canary"] / 10_000 - 0.05) <= 0.01, split
        assert abs(split["stable"] / 10_000 - 0.95) <= 0.01, split
        assert pipelined(proxy, 200, [("X-Canary", "always")]) == {"canary": 200}
        sides = Counter()
        for user in range(40):
            seen = pipelined(proxy, 25, [("Cookie", f"session=user-{user}")])
            assert len(seen) == 1, seen  # never flips
            sides.update(seen)
        assert set(sides) == {"stable", "canary"} or sides["stable"] == 1000
        status = middleware.status()["routes"]
    assert status[1]["sent"]["canary"] >= 400


def test_a_keyed_client_never_flips(named: dict[str, RunningServer]) -> None:
    routes = [Route("/api", split={"/api": 50, "canary": 50}, stick_on="header:x-user")]
    with running_proxy(pools_of(named, "canary"), routes=routes) as (proxy, _):
        first = pipelined(proxy, 1000, [("X-User", "alice")])
        assert len(first) == 1, first
        sides = {next(iter(pipelined(proxy, 5, [("X-User", f"u{i}")]))) for i in range(30)}
    assert sides == {"stable", "canary"}


def test_routes_are_validated() -> None:
    with pytest.raises(FieldError) as caught:
        Route("/api")
    assert caught.value.field == "pool"
    for options, field in [
        ({"pool": "a", "split": {"a": 1, "b": 1}}, "pool"),
        ({"split": {"a": 1}}, "split"),
        ({"split": {"a": 0, "b": 0}}, "split"),
        ({"split": {"a": -1, "b": 1}}, "split"),
        ({"pool": "a", "headers": {"x": 1}}, "headers"),
        ({"pool": "a", "cookies": {"a b": "x"}}, "cookies"),
        ({"pool": "a", "methods": "GET"}, "methods"),
        ({"pool": "a", "host": "a b"}, "host"),
        ({"pool": "a", "stick_on": "client"}, "stick_on"),
        ({"split": {"a": 1, "b": 1}, "stick_on": "nonsense"}, "stick_on"),
    ]:
        with pytest.raises(FieldError) as caught:
            Route("/api", **options)
        assert caught.value.field == field, options
    with pytest.raises(FieldError) as caught:
        Route("api", pool="a")
    assert caught.value.field == "prefix"


def test_routes_name_existing_pools_and_named_pools_need_a_route() -> None:
    pools = {"/api": Pool(["http://10.0.0.1:8000"]), "canary": Pool(["http://10.0.0.2:8000"])}
    with pytest.raises(FieldError, match="no route or mirror names it"):
        RoundRobinMiddleware(host_app(), pools=pools)
    with pytest.raises(FieldError, match="names no pool 'canry'"):
        RoundRobinMiddleware(host_app(), pools=pools, routes=[Route("/api", pool="canry")])
    with pytest.raises(ValueError, match="must be a path prefix starting with '/' or a name"):
        RoundRobinMiddleware(host_app(), pools={"9lives": Pool(["http://10.0.0.1:8000"])})


def test_routes_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[pools."/api"]
upstreams = ["http://10.0.0.1:8000"]

[pools.canary]
upstreams = ["http://10.0.0.2:8000"]

[[routes]]
prefix = "/api"
pool = "canary"
headers = { x-canary = "always", x-debug = true, x-build = { regex = "^rc" } }
methods = ["GET", "HEAD"]

[[routes]]
prefix = "/api"
split = { "/api" = 95, canary = 5 }
stick_on = "cookie:session"
"""
    )
    config = load_config(path)
    routes = config.app.balancer.routes
    first, second = (state.route for state in routes)
    assert first.pool == "canary"
    assert first.headers["x-canary"] == "always"
    assert first.headers["x-debug"] is True
    assert first.headers["x-build"].pattern == "^rc"
    assert first.methods == frozenset({"GET", "HEAD"})
    assert second.split == {"/api": 95, "canary": 5}
    assert second.stick_on == "cookie:session"
    printed = describe(config).splitlines()  # rr-gateway --check
    routes_part = printed[printed.index("[[routes]]") :]
    for line in [
        'pool = "canary"',
        'methods = ["GET", "HEAD"]',
        'headers = { x-canary = "always", x-debug = true, x-build = { regex = "^rc" } }',
        'split = { "/api" = 95, canary = 5 }',
        'stick_on = "cookie:session"',
    ]:
        assert line in routes_part, routes_part
    assert routes_part.count("[[routes]]") == 2


@pytest.mark.slow
def test_websockets_follow_routes_and_hash_keys() -> None:
    """A WebSocket handshake is matched as a request is: the header route sends it to the
    canary; under the hashing pool one key always opens on one upstream."""
    from .test_websocket import WsUpstream, sync_client

    upstreams = [WsUpstream(name) for name in ("s1", "s2", "s3", "canary")]
    with ExitStack() as stack:
        for upstream in upstreams:
            upstream.url = stack.enter_context(serve(upstream.app)).url
        pools = {
            "/api": Pool([u.url for u in upstreams[:3]], policy="hash", hash_on="header:x-user"),
            "canary": Pool([upstreams[3].url]),
        }
        routes = [Route("/api", pool="canary", headers={"x-canary": "always"})]
        with running_proxy(pools, routes=routes) as (proxy, _):
            url = f"ws://127.0.0.1:{proxy.port}/api/hello"

            def opened_on(headers: dict[str, str]) -> str:
                with sync_client(url, additional_headers=headers) as ws:
                    name: str = ws.recv()
                return name

            assert opened_on({"x-canary": "always"}) == "canary"
            assert {opened_on({"x-user": "alice"}) for _ in range(6)} == {
                opened_on({"x-user": "alice"})
            }
            spread = {opened_on({"x-user": f"user-{i}"}) for i in range(30)}
    assert spread == {"s1", "s2", "s3"}
