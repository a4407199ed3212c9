"""Traffic policy end to end: consistent hashing with bounded load and sticky cookies,
through the middleware under uvicorn to real uvicorn upstreams (in process where
membership changes: discovery's ``set_members``).

The pure properties of the ring are in ``tests/test_affinity.py``; here, what a client
sees: which upstream answers (``x-upstream``), and the cookie it is given.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware import Balancer, Pool, RoundRobinMiddleware, Route, StickyCookie, Upstream
from rr_middleware.config_mapping import ConfigError
from rr_middleware.errors import FieldError
from rr_middleware.gateway_config import load_config
from rr_middleware.headers import TrustedProxies, client_address
from rr_middleware.sticky import SECRET_ENV

from .proxy import InProcessProxy, aclient, client, running_proxy
from .raw_client import RawClient, raw_request
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp

pytestmark = pytest.mark.usefixtures("no_asyncio_errors")

NAMES = "abcde"


@pytest.fixture
def five() -> Iterator[list[RunningServer]]:
    """Five real uvicorn upstreams, named a to e."""
    with ExitStack() as stack:
        yield [stack.enter_context(serve(UpstreamApp(name))) for name in NAMES]


def who_answers(proxy: RunningServer, keys: list[str], batch: int = 250) -> dict[str, str]:
    """Which upstream answered a GET carrying each key in ``X-User``: pipelined on one
    keep-alive connection (the proxy takes them one at a time), ``batch`` at once."""
    answered: dict[str, str] = {}
    with RawClient(proxy.port) as raw:
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            raw.send(
                b"".join(
                    raw_request(
                        "GET",
                        "/api/x?action=status&code=200",
                        [("Host", "proxy"), ("X-User", key)],
                    )
                    for key in chunk
                )
            )
            for key in chunk:
                status, headers = raw.read_head()
                raw.read_body(headers)
                assert status == 200
                answered[key] = dict(headers)[b"x-upstream"].decode()
    return answered


# --------------------------------------------------------------------------- hashing


@pytest.mark.slow
def test_hash_spreads_keys_and_removing_one_moves_only_its_keys(
    five: list[RunningServer],
) -> None:
    """10,000 distinct keys over 5 upstreams: each within 10 % of its share; with one
    upstream gone, only its keys move (at most 1.3 x 1/5 of all), the others stay. One
    request at a time, so the bound on load never applies."""
    pool = Pool([s.url for s in five], policy="hash", hash_on="header:x-user")
    keys = [f"user-{i}" for i in range(10_000)]
    with running_proxy({"/api": pool}) as (proxy, middleware):
        before = who_answers(proxy, keys)
        counts = Counter(before.values())
        assert set(counts) == set(NAMES)
        assert all(abs(n - 2000) <= 200 for n in counts.values()), counts

        # The upstreams as discovery would say with c gone (no request is in flight).
        runtime = middleware.balancer["/api"]
        runtime.set_members([Upstream(s.url) for s in five if s.app.name != "c"])
        after = who_answers(proxy, keys)
    moved = [key for key in keys if after[key] != before[key]]
    assert all(before[key] == "c" for key in moved)
    assert len(moved) == counts["c"] <= 1.3 * len(keys) / 5
    assert "c" not in after.values()


def test_hash_weights_and_stability(five: list[RunningServer]) -> None:
    """A key always reaches the same upstream; weights set the shares."""
    weights = [1, 1, 1, 1, 4]
    pool = Pool(
        [Upstream(s.url, weight=w) for s, w in zip(five, weights, strict=True)],
        policy="hash",
        hash_on="query:user",
    )
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        first = {
            user: http.get(f"{proxy.url}/api/x", params={"user": user}).headers["x-upstream"]
            for user in map(str, range(400))
        }
        again = {
            user: http.get(f"{proxy.url}/api/x", params={"user": user}).headers["x-upstream"]
            for user in map(str, range(0, 400, 7))
        }
    assert all(first[user] == upstream for user, upstream in again.items())
    counts = Counter(first.values())
    assert counts["e"] > max(counts[n] for n in "abcd"), counts  # 4/8 of the keys vs 1/8


class Concurrency:
    """An upstream that holds each request until released and records how many it held
    at once at most."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = 0
        self.peak = 0
        self.release: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.5)  # held while the others arrive
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"x-upstream", self.name.encode())],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            self.active -= 1


@pytest.mark.parametrize("factor", [1.25, None])
def test_a_hot_key_is_bounded_under_concurrency(factor: float | None) -> None:
    """50 requests at once, all with one key: with the bound (1.25), no upstream holds
    more than ceil(1.25 x 50 / 5) = 13 of them; without it, one holds all 50."""
    apps = [Concurrency(name) for name in NAMES]
    with ExitStack() as stack:
        servers = [stack.enter_context(serve(app)) for app in apps]
        pool = Pool(
            [s.url for s in servers],
            policy="hash",
            hash_on="cookie:session",
            balance_factor=factor,
        )
        with running_proxy({"/api": pool}) as (proxy, middleware):

            async def burst() -> list[str]:
                async with aclient(limits=httpx.Limits(max_connections=50)) as http:
                    responses = await asyncio.gather(
                        *(
                            http.get(f"{proxy.url}/api/x", headers={"cookie": "session=hot"})
                            for _ in range(50)
                        )
                    )
                return [r.headers["x-upstream"] for r in responses]

            answered = asyncio.run(burst())
            status = middleware.status()["pools"][0]
    peaks = {app.name: app.peak for app in apps}
    if factor is None:
        assert len(set(answered)) == 1, peaks
        return
    assert max(peaks.values()) <= math.ceil(1.25 * 50 / 5), peaks
    assert len(set(answered)) >= 4, peaks
    assert status["affinity"]["keyed"] == 50
    assert status["affinity"]["spilled"] > 0


def test_a_request_without_the_key_is_balanced_by_the_fallback(
    upstreams: list[RunningServer],
) -> None:
    pool = Pool(
        [s.url for s in upstreams], policy="hash", hash_on="header:x-user", hash_fallback="random"
    )
    with running_proxy({"/api": pool}) as (proxy, middleware), client() as http:
        answered = {http.get(f"{proxy.url}/api/x").headers["x-upstream"] for _ in range(60)}
        status = middleware.status()["pools"][0]
    assert answered == {"a", "b", "c"}
    assert status["affinity"]["unkeyed"] == 60


# --------------------------------------------------------------------------- sticky cookie


def get(http: httpx.Client, url: str, cookie: str | None = None) -> httpx.Response:
    """GET with exactly this ``Cookie`` header (none kept from earlier answers)."""
    http.cookies.clear()
    response = http.get(url, headers={"cookie": cookie} if cookie is not None else {})
    assert response.status_code == 200, response.text
    return response


async def aget(http: httpx.AsyncClient, url: str, cookie: str | None = None) -> httpx.Response:
    http.cookies.clear()
    response = await http.get(url, headers={"cookie": cookie} if cookie is not None else {})
    assert response.status_code == 200, response.text
    return response


def cookie_of(response: httpx.Response, name: str = "rr_sticky") -> str | None:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header
    return None


def test_sticky_cookie_pins_and_is_reissued_when_its_upstream_dies() -> None:
    apps = [UpstreamApp(name) for name in "abc"]
    with ExitStack() as stack:
        servers = [stack.enter_context(serve(app)) for app in apps]
        sticky = StickyCookie(max_age=600, secret="test secret")
        pool = Pool([s.url for s in servers], sticky=sticky)
        with running_proxy({"/api": pool}) as (proxy, _), client() as http:
            first = get(http, f"{proxy.url}/api/x")
            header = cookie_of(first)
            assert header is not None
            value = header.split(";")[0].split("=", 1)[1]
            attributes = [a.strip() for a in header.split(";")[1:]]
            assert attributes == ["Path=/api", "Max-Age=600", "HttpOnly", "SameSite=Lax"]
            # Opaque: neither the address nor a port of any upstream.
            assert "127.0.0.1" not in value
            assert not any(str(s.port) in value for s in servers)
            assert re.fullmatch(r"[A-Za-z0-9_-]{16}", value)

            pinned = first.headers["x-upstream"]
            cookie = f"theme=dark; rr_sticky={value}"
            responses = [get(http, f"{proxy.url}/api/x", cookie) for _ in range(100)]
            assert {r.headers["x-upstream"] for r in responses} == {pinned}
            assert not any(cookie_of(r) for r in responses)  # no need to set it again

            # Its upstream goes away: the next request succeeds elsewhere, re-pinned.
            index = "abc".index(pinned)
            servers[index].stop()
            moved = get(http, f"{proxy.url}/api/x", cookie)
            assert moved.headers["x-upstream"] != pinned
            new_header = cookie_of(moved)
            assert new_header is not None
            new_value = new_header.split(";")[0].split("=", 1)[1]
            assert new_value != value
            again = [get(http, f"{proxy.url}/api/x", f"rr_sticky={new_value}") for _ in range(20)]
            assert {r.headers["x-upstream"] for r in again} == {moved.headers["x-upstream"]}


def test_sticky_cookie_follows_a_drain(upstreams: list[RunningServer]) -> None:
    pool = Pool([s.url for s in upstreams], sticky=StickyCookie(name="pin", secret="k"))
    with running_proxy({"/api": pool}) as (proxy, middleware), client() as http:
        first = get(http, f"{proxy.url}/api/x")
        header = cookie_of(first, "pin")
        assert header is not None
        cookie = header.split(";")[0]
        pinned = first.headers["x-upstream"]
        url = next(s.url for s in upstreams if s.app.name == pinned)
        middleware.balancer["/api"].drain(url)
        drained = get(http, f"{proxy.url}/api/x", cookie)
        assert drained.headers["x-upstream"] != pinned
        assert cookie_of(drained, "pin") is not None
        middleware.balancer["/api"].undrain(url)
        back = get(http, f"{proxy.url}/api/x", cookie)  # the old cookie works again
        assert back.headers["x-upstream"] == pinned


async def test_sticky_values_survive_discovery_changes() -> None:
    """Members that stay keep their cookie value as discovery adds and removes others; a
    cookie of one that left is re-issued."""
    apps = {name: UpstreamApp(name) for name in "abcd"}

    def members(names: str) -> list[Upstream]:
        return [Upstream(f"http://{name}.internal:8000", app=apps[name]) for name in names]

    pool = Pool(members("abc"), sticky=StickyCookie(secret="shared"))
    async with InProcessProxy(pool) as proxy:
        first = await aget(proxy.http, "/api/x")
        header = cookie_of(first)
        assert header is not None
        value = header.split(";")[0].split("=", 1)[1]
        pinned = first.headers["x-upstream"]
        others = "".join(n for n in "abc" if n != pinned)
        proxy.pool.set_members(members(pinned + others[0] + "d"))  # one left, one joined
        kept = await aget(proxy.http, "/api/x", f"rr_sticky={value}")
        assert kept.headers["x-upstream"] == pinned
        assert cookie_of(kept) is None
        proxy.pool.set_members(members(others))  # the pinned one left
        moved = await aget(proxy.http, "/api/x", f"rr_sticky={value}")
        assert moved.headers["x-upstream"] in others
        assert cookie_of(moved) is not None


def test_replicas_sharing_the_secret_read_each_others_cookies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    monkeypatch.setenv(SECRET_ENV, "from the environment")
    one = Balancer({"/api": Pool(urls, sticky=StickyCookie())})["/api"]
    two = Balancer({"/api": Pool(urls, sticky=StickyCookie())})["/api"]
    assert one.sticky is not None
    assert two.sticky is not None
    assert [one.sticky.value(m.upstream.identity) for m in one.members] == [
        two.sticky.value(m.upstream.identity) for m in two.members
    ]
    own = Balancer({"/api": Pool(urls, sticky=StickyCookie(secret="mine"))})["/api"]
    assert own.sticky is not None
    assert own.sticky.value(urls[0] + "") != one.sticky.value(urls[0] + "")


async def test_a_random_secret_is_warned_about_at_startup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    caplog.set_level(logging.WARNING, logger="rr_middleware")
    pool = Pool([Upstream("http://a.internal", app=UpstreamApp("a"))], sticky=StickyCookie())
    async with InProcessProxy(pool):
        pass
    messages = [r.getMessage() for r in caplog.records]
    assert any("no secret" in m and SECRET_ENV in m for m in messages), messages
    caplog.clear()
    monkeypatch.setenv(SECRET_ENV, "set")
    async with InProcessProxy(pool):
        pass
    assert not any("no secret" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"name": "a b"}, "name"),
        ({"max_age": 0}, "max_age"),
        ({"path": "api"}, "path"),
        ({"secure": "yes"}, "secure"),
        ({"samesite": "lax"}, "samesite"),
        ({"samesite": "None"}, "samesite"),  # needs secure=True
        ({"secret": ""}, "secret"),
    ],
)
def test_sticky_options_are_validated(options: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError) as caught:
        StickyCookie(**options)
    assert caught.value.field == field
    with pytest.raises(FieldError) as caught:
        Pool(["http://10.0.0.1:8000"], sticky="yes")  # type: ignore[arg-type]
    assert caught.value.field == "sticky"


async def test_two_pools_may_not_set_the_same_sticky_cookie(tmp_path: Path) -> None:
    """Two sticky pools whose cookies share a name and a Path would each overwrite the
    other's pin in the browser, so neither would stick: refused when built, when
    reconfigured (the running pools stay), and in the gateway's file at the key."""
    shared = StickyCookie(path="/")

    def pools(second: StickyCookie) -> dict[str, Pool]:
        return {
            "/a": Pool(["http://10.0.0.1:8000"], sticky=shared),
            "/b": Pool(["http://10.0.0.2:8000"], sticky=second),
        }

    with pytest.raises(ValueError, match=r"pools '/a' and '/b' set the same sticky cookie"):
        Balancer(pools(shared))
    # Another name, or the default Path (each pool's prefix): both stick.
    Balancer(pools(StickyCookie(name="other", path="/")))
    balancer = Balancer(pools(StickyCookie()))
    with pytest.raises(ValueError, match=r"\(rr_sticky, Path=/\)"):
        await balancer.reconfigure(pools(shared))
    assert balancer["/b"].pool.sticky == StickyCookie()

    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[pools."/a"]
upstreams = ["http://10.0.0.1:8000"]
sticky = { path = "/" }

[pools."/b"]
upstreams = ["http://10.0.0.2:8000"]
sticky = { path = "/" }
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == 'pools."/b".sticky'
    assert "the cookie of pool '/a' too (rr_sticky, Path=/)" in str(caught.value)


@pytest.mark.parametrize(
    ("host_a", "host_b", "refused"),
    [
        ("a.example.com", "b.example.com", False),  # a cookie is kept per host
        ("a.example.com", "a.example.com", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "*.example.org", False),
        (None, "b.example.com", True),  # a route without a host: any host
    ],
)
def test_pools_reached_by_routes_share_a_cookie_only_on_a_host_both_serve(
    host_a: str | None, host_b: str | None, refused: bool
) -> None:
    """Pools reached by routes only have the cookie's default Path, ``/``: they would
    overwrite each other's pins only where a host reaches both (the cookie has no
    Domain, so the browser keeps it per host)."""
    pools = {
        "/api": Pool(["http://10.0.0.9:8000"]),
        "site_a": Pool(["http://10.0.0.1:8000"], sticky=StickyCookie()),
        "site_b": Pool(["http://10.0.0.2:8000"], sticky=StickyCookie()),
    }
    routes = [
        Route("/", pool="site_a", host=host_a),
        Route("/", pool="site_b", host=host_b),
    ]

    async def host(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not reached")

    if refused:
        with pytest.raises(ValueError, match="pools 'site_a' and 'site_b' set the same"):
            RoundRobinMiddleware(host, pools=pools, routes=routes)
    else:
        RoundRobinMiddleware(host, pools=pools, routes=routes)


def test_traffic_options_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[pools."/api"]
upstreams = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
policy = "hash"
hash_on = "cookie:session"
hash_fallback = "least_requests"
balance_factor = 1.5

[pools."/app"]
upstreams = ["http://10.0.0.3:8000"]
balance_factor = false

[pools."/app".sticky]
name = "backend"
max_age = 3600
secure = true
samesite = "None"
secret = "s3cret"
"""
    )
    config = load_config(path)
    api, app = config.pools["/api"], config.pools["/app"]
    assert (api.policy, api.hash_on) == ("hash", "cookie:session")
    assert api.hash_fallback == "least_requests"
    assert api.balance_factor == 1.5
    assert app.balance_factor is None
    assert app.sticky == StickyCookie(
        name="backend", max_age=3600, secure=True, samesite="None", secret="s3cret"
    )


@pytest.mark.parametrize(
    ("chain", "peer", "trusted", "client"),
    [
        (None, "192.0.2.1", (), "192.0.2.1"),
        ("203.0.113.9", "192.0.2.1", (), "192.0.2.1"),  # an untrusted peer's header: ignored
        ("203.0.113.9", "10.0.0.2", ("10.0.0.0/8",), "203.0.113.9"),
        ("6.6.6.6, 203.0.113.9, 10.0.0.3", "10.0.0.2", ("10.0.0.0/8",), "203.0.113.9"),
        ("10.0.0.4, 10.0.0.3", "10.0.0.2", ("10.0.0.0/8",), "10.0.0.4"),
        (None, "10.0.0.2", ("10.0.0.0/8",), "10.0.0.2"),
        (None, None, ("*",), None),
    ],
)
def test_the_client_address_behind_trusted_proxies(
    chain: str | None, peer: str | None, trusted: tuple[str, ...], client: str | None
) -> None:
    headers = [(b"x-forwarded-for", chain.encode())] if chain is not None else []
    assert client_address(headers, peer, TrustedProxies(trusted)) == client


def test_hash_on_client_uses_the_address_trusted_proxies_give(
    upstreams: list[RunningServer],
) -> None:
    """Behind a trusted proxy (here the test itself, 127.0.0.1) the key is the address in
    X-Forwarded-For: one client keeps its upstream, many clients spread. Without trust,
    every request is from 127.0.0.1: one key."""
    pool = Pool([s.url for s in upstreams], policy="hash", hash_on="client")

    def answers(trusted: tuple[str, ...]) -> tuple[set[str], set[str]]:
        with (
            running_proxy({"/api": pool}, trusted_proxies=trusted) as (proxy, _),
            client() as http,
        ):
            one = {
                http.get(f"{proxy.url}/api/x", headers={"x-forwarded-for": "203.0.113.7"}).headers[
                    "x-upstream"
                ]
                for _ in range(10)
            }
            many = {
                http.get(
                    f"{proxy.url}/api/x", headers={"x-forwarded-for": f"198.51.100.{i}"}
                ).headers["x-upstream"]
                for i in range(60)
            }
        return one, many

    one, many = answers(("127.0.0.1",))
    assert len(one) == 1
    assert many == {"a", "b", "c"}
    one, many = answers(())
    assert len(one) == 1
    assert len(many) == 1
    assert one == many
