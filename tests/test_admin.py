"""The admin API in one process: authorization, every action, and every refusal, against
real upstreams (``tests/test_admin_gateway.py`` drives rr-gateway's workers)."""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request

from rr_middleware import RoundRobinMiddleware
from rr_middleware import admin as admin_module
from rr_middleware.errors import FieldError

from .servers import serve
from .upstream_app import UpstreamApp

TOKEN = "admin-s3cret"
DEADLINE = 10.0
AUTH_LINE = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
AUTH = {"authorization": f"Bearer {TOKEN}"}
URLS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def upstreams() -> Iterator[None]:
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, serve(UpstreamApp("c")) as c:
        URLS.update(a=a.url, b=b.url, c=c.url)
        yield


def app_with(**options: Any) -> RoundRobinMiddleware:
    pools = {"/api": [URLS["a"], URLS["b"]], "/found": [URLS["c"]]}
    return RoundRobinMiddleware(Starlette(), pools=pools, admin_path="/_admin", **options)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app_with(admin_token=TOKEN)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


async def served(client: httpx.AsyncClient, n: int = 6) -> Counter[str]:
    return Counter([(await client.get("/api/x")).headers["x-upstream"] for _ in range(n)])


async def admin(client: httpx.AsyncClient, action: str, **body: Any) -> httpx.Response:
    return await client.post(f"/_admin/{action}", json=body, headers=AUTH)


@pytest.mark.anyio
async def test_every_action_changes_what_the_upstreams_see(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    b = URLS["b"]
    caplog.set_level(logging.WARNING, "rr_middleware")
    response = await admin(client, "drain", pool="/api", url=b)
    assert response.json() == {"ok": True, "done": f"pool /api: {b} drained"}
    assert await served(client) == {"a": 6}
    assert f"admin: 127.0.0.1 (bearer token) asked to drain: pool /api: {b}" in caplog.text
    assert (await admin(client, "undrain", pool="/api", url=b + "/")).status_code == 200
    assert (await admin(client, "weight", pool="/api", url=b, weight=2)).status_code == 200
    assert await served(client) == {"a": 2, "b": 4}
    assert (await admin(client, "weight", pool="/api", url=b, weight=None)).status_code == 200
    assert await served(client) == {"a": 3, "b": 3}
    # An added upstream serves at once; a removed one no more.
    added = await admin(client, "add", pool="/api", url=URLS["c"], weight=1)
    assert added.status_code == 200, added.text
    assert await served(client) == {"a": 2, "b": 2, "c": 2}
    assert (await admin(client, "remove", pool="/api", url=URLS["a"])).status_code == 200
    assert await served(client) == {"b": 3, "c": 3}
    state = (await client.get("/_admin/state", headers=AUTH)).json()
    api = next(pool for pool in state["pools"] if pool["prefix"] == "/api")
    assert [row["url"] for row in api["upstreams"]] == [b, URLS["c"]]
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("action", "body", "status", "message"),
    [
        ("drain", {"pool": "/nope", "url": "a"}, 404, "no pool '/nope'"),
        ("drain", {"pool": "/api", "url": "http://z.internal"}, 404, "has no upstream"),
        ("remove", {"pool": "/api", "url": "http://z.internal"}, 404, "has no upstream"),
        ("drain", {"pool": "/api"}, 400, "url is required"),
        ("weight", {"pool": "/api", "url": "a"}, 400, "weight is required"),
        ("weight", {"pool": "/api", "url": "a", "weight": -1}, 400, ">= 0"),
        ("weight", {"pool": "/api", "url": "a", "weight": "2"}, 400, ">= 0"),
        ("add", {"pool": "/api", "url": "ftp://x"}, 400, "must start with http"),
        ("add", {"pool": "/api", "url": "a"}, 400, "already has"),
        ("remove", {"pool": "/found", "url": "c"}, 400, "last upstream"),
        ("reload", {}, 400, "no configuration file"),
    ],
)
@pytest.mark.anyio
async def test_bad_requests_say_what_is_wrong(
    client: httpx.AsyncClient, action: str, body: dict[str, Any], status: int, message: str
) -> None:
    if body.get("url") in URLS:  # a name: the upstream's real URL
        body = {**body, "url": URLS[body["url"]]}
    response = await admin(client, action, **body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.anyio
async def test_malformed_requests_are_400_or_405(client: httpx.AsyncClient) -> None:
    response = await client.post("/_admin/drain", content=b"{nope", headers=AUTH)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]
    response = await client.post("/_admin/drain", content=b"[1]", headers=AUTH)
    assert response.status_code == 400
    response = await client.get("/_admin/drain", headers=AUTH)
    assert (response.status_code, response.headers["allow"]) == (405, "POST")


@pytest.mark.anyio
async def test_no_token_no_answer(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        response = await client.post(
            "/_admin/drain", json={"pool": "/api", "url": URLS["a"]}, headers=headers
        )
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/_admin/state", headers=headers)).status_code == 401
    assert await served(client) == {"a": 3, "b": 3}  # nothing was drained


@pytest.mark.anyio
async def test_a_guard_may_allow_instead_of_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RR_ADMIN_TOKEN", raising=False)

    def local(request: Request) -> bool:
        return request.headers.get("x-operator") == "yes"

    async with LifespanManager(app_with(admin_guard=local)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            assert (await client.get("/_admin/state")).status_code == 401
            allowed = await client.get("/_admin/state", headers={"x-operator": "yes"})
            assert allowed.status_code == 200


def test_the_token_comes_from_the_environment_and_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RR_ADMIN_TOKEN", raising=False)
    with pytest.raises(FieldError) as caught:
        app_with()
    assert caught.value.field == "admin_path"
    assert "RR_ADMIN_TOKEN" in str(caught.value)
    monkeypatch.setenv("RR_ADMIN_TOKEN", TOKEN)
    app_with()  # the variable is enough


@pytest.mark.anyio
@pytest.mark.parametrize("pool", ["/api", "/api/"])
async def test_the_gateway_applies_a_change_to_a_pool_named_as_the_file_does_or_not(
    pool: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rr-gateway: a pool may be named "/api/" as well as "/api" (as drain takes it); an
    upstream it says it added is in the pool, and one it says it removed is gone."""
    from rr_middleware.gateway_admin import STATE_ENV
    from rr_middleware.reload import Reloader

    monkeypatch.setenv("RR_ADMIN_TOKEN", "t0ken")
    monkeypatch.delenv(STATE_ENV, raising=False)  # one worker: the changes in memory
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[middleware]\nadmin_path = "/_rr/admin"\n\n'
        '[pools."/api"]\nupstreams = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]\n'
    )
    reloader = Reloader(path, {})
    app = reloader.load().app
    auth = {"authorization": "Bearer t0ken"}
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            added = await http.post(
                "/_rr/admin/add", json={"pool": pool, "url": "http://10.0.0.9:8000"}, headers=auth
            )
            after_add = [m.upstream.url for m in app.balancer["/api"].members]
            removed = await http.post(
                "/_rr/admin/remove",
                json={"pool": pool, "url": "http://10.0.0.1:8000"},
                headers=auth,
            )
            after_remove = [m.upstream.url for m in app.balancer["/api"].members]
    assert (added.status_code, removed.status_code) == (200, 200)
    assert "http://10.0.0.9:8000" in after_add
    assert after_remove == ["http://10.0.0.2:8000", "http://10.0.0.9:8000"]


@pytest.mark.anyio
async def test_a_pool_named_with_a_trailing_slash_takes_added_and_removed_upstreams(
    client: httpx.AsyncClient,
) -> None:
    """The admin API names a pool as drain does ("/api/" is "/api"): add and remove
    work with it, not a 500."""
    added = await admin(client, "add", pool="/api/", url="http://10.0.0.9:8000")
    removed = await admin(client, "remove", pool="/api/", url="http://10.0.0.9:8000")
    assert (added.status_code, removed.status_code) == (200, 200)


def test_a_body_that_stalls_is_answered_408_and_the_connection_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under uvicorn: a client that says 100 bytes and sends 10 (or whose connection died
    unseen) gets 408 once ``BODY_TIMEOUT`` has passed, not a request held for good, and
    the connection closes, since the rest of its body was never read."""
    monkeypatch.setattr(admin_module, "BODY_TIMEOUT", 0.5)
    with serve(app_with(admin_token=TOKEN)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
            started = time.monotonic()
            sock.sendall(
                b"POST /_admin/drain HTTP/1.1\r\nHost: gw\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                b'{"pool": "'
            )
            answer = b""
            while chunk := sock.recv(65536):  # until the proxy closes the connection
                answer += chunk
            waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    assert b"did not arrive within 0.5s" in body
    assert 0.5 <= waited < DEADLINE


@pytest.mark.parametrize(
    ("request_line", "auth", "status"),
    [("POST /_admin/drain", b"", 401), ("GET /_admin/drain", AUTH_LINE, 405)],
)
def test_an_answer_given_before_the_body_closes_the_connection(
    request_line: str, auth: bytes, status: int
) -> None:
    """Refused before its body is read (no token, the wrong method): the answer comes at
    once and the connection closes, so a client dripping that body holds nothing and the
    rest of it is never read as a next request."""
    with serve(app_with(admin_token=TOKEN)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
            sock.sendall(
                request_line.encode()
                + b" HTTP/1.1\r\nHost: gw\r\n"
                + auth
                + b"Content-Length: 100\r\n\r\n"
                + b"x" * 10
            )
            answer = b""
            while chunk := sock.recv(65536):  # until the proxy closes the connection
                answer += chunk
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"connection: close" in head.lower()
