"""Auth and hooks on proxied paths: a pool's ``guard``, ``on_request`` and ``on_response``,
and forwarding from a FastAPI route (``Balancer.forward``) behind its dependencies; real
uvicorn upstreams that record what reached them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from rr_middleware import Balancer, Pool, RoundRobinMiddleware
from rr_middleware.hooks import ResponseHead

from .leaks import RssGrowth
from .proxy import assert_generic_error, client, running_proxy
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp, values


@pytest.fixture
def upstream() -> Iterator[RunningServer]:
    with serve(UpstreamApp("up")) as server:
        yield server


def reached(upstream: RunningServer) -> list[dict[str, Any]]:
    return upstream.app.requests  # type: ignore[no-any-return]


def hook_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rr_middleware" and r.exc_info]


# --------------------------------------------------------------------------- guard


def test_a_guard_refuses_before_the_upstream(upstream: RunningServer) -> None:
    def admins_only(request: Request) -> bool:
        return request.headers.get("x-role") == "admin"

    pool = Pool([upstream.url], guard=admins_only)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        refused = http.post(f"{proxy.url}/api/x", content=b"secret body")
        assert refused.status_code == 403
        assert refused.headers["connection"] == "close"  # its body was not read
        assert reached(upstream) == []
        allowed = http.get(f"{proxy.url}/api/x", headers={"x-role": "admin"})
        assert allowed.status_code == 200
        assert allowed.json()["raw_path"] == "/x"
        assert len(reached(upstream)) == 1


def test_an_async_guard_answers_401_or_redirects(upstream: RunningServer) -> None:
    async def login_required(request: Request) -> bool | Response:
        if request.cookies.get("session") == "ok":
            return True
        if request.headers.get("accept", "").startswith("text/html"):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return PlainTextResponse("401\n", 401, headers={"WWW-Authenticate": 'Bearer realm="api"'})

    pool = Pool([upstream.url], guard=login_required)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/api/page", headers={"accept": "text/html"})
        assert (response.status_code, response.headers["location"]) == (
            303,
            "/login?next=/api/page",
        )
        response = http.get(f"{proxy.url}/api/data")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="api"'
        assert reached(upstream) == []
        response = http.get(f"{proxy.url}/api/data", headers={"cookie": "session=ok"})
        assert response.status_code == 200
        assert values(reached(upstream)[0], "cookie") == ["session=ok"]


def test_a_guard_raising_http_exception_is_answered_as_fastapi_would(
    upstream: RunningServer,
) -> None:
    def guard(request: Request) -> bool:
        raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Basic"})

    pool = Pool([upstream.url], guard=guard)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/api/x")
    assert (response.status_code, response.text) == (401, "log in first")
    assert response.headers["www-authenticate"] == "Basic"
    assert reached(upstream) == []


@pytest.mark.parametrize("kind", ["raises", "returns None", "reads the body"])
def test_a_broken_guard_fails_closed(
    upstream: RunningServer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    async def guard(request: Request) -> Any:
        if kind == "raises":
            raise KeyError("secret-token-123")
        if kind == "reads the body":
            await request.body()
        return None

    caplog.set_level(logging.ERROR, logger="rr_middleware")
    pool = Pool([upstream.url], guard=guard)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        response = http.post(f"{proxy.url}/api/x", content=b"body")
    assert_generic_error(response, 500, [upstream.url])
    assert "secret-token" not in response.text
    assert reached(upstream) == []
    errors = [r for r in caplog.records if r.name == "rr_middleware"]
    assert len(errors) == 1, errors


def test_pool_hook_options_are_validated() -> None:
    for name in ("guard", "on_request", "on_response"):
        with pytest.raises(ValueError, match=rf"{name} must be a function or None, got 'x'"):
            Pool(["http://10.0.0.1"], **{name: "x"})
    with pytest.raises(ValueError, match="internal must be True or False"):
        Pool(["http://10.0.0.1"], internal=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hooks


def test_on_request_edits_exactly_what_goes_upstream(upstream: RunningServer) -> None:
    async def on_request(request: Request, headers: MutableHeaders) -> None:
        headers["x-internal-auth"] = "token-for-" + request.url.path
        headers["x-replaced"] = "new"
        del headers["cookie"]
        headers["content-length"] = "999"  # framing is the proxy's: ignored
        headers["connection"] = "close"  # hop-by-hop: ignored
        headers["host"] = "internal.example"  # the upstream's Host, replaced

    pool = Pool([upstream.url], on_request=on_request)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        sent = {"cookie": "a=1", "x-replaced": "old", "x-kept": "k"}
        record = http.post(f"{proxy.url}/api/x", content=b"hello", headers=sent).json()
    assert values(record, "x-internal-auth") == ["token-for-/api/x"]
    assert values(record, "x-replaced") == ["new"]
    assert values(record, "x-kept") == ["k"]
    assert values(record, "cookie") == []
    assert values(record, "content-length") == ["5"]
    assert values(record, "connection") == []
    assert values(record, "host") == ["internal.example"]
    assert record["body"] == "hello"


def test_on_request_short_circuits(upstream: RunningServer) -> None:
    def on_request(request: Request, headers: MutableHeaders) -> Response | None:
        if "x-api-key" not in headers:
            return PlainTextResponse("no key\n", 401)
        return None

    pool = Pool([upstream.url], on_request=on_request)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/api/x")
        assert (response.status_code, response.text) == (401, "no key\n")
        assert reached(upstream) == []
        assert http.get(f"{proxy.url}/api/x", headers={"x-api-key": "k"}).status_code == 200


def test_on_response_edits_status_and_headers(upstream: RunningServer) -> None:
    seen: list[str] = []

    def on_response(request: Request, response: ResponseHead) -> None:
        seen.append(response.upstream)
        response.headers["x-frame-options"] = "DENY"
        del response.headers["x-upstream"]
        if request.query_params.get("code") == "404":
            response.status = 410

    pool = Pool([upstream.url], on_response=on_response)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/api/x")
        assert response.headers["x-frame-options"] == "DENY"
        assert "x-upstream" not in response.headers
        assert response.json()["raw_path"] == "/x"
        gone = http.get(f"{proxy.url}/api/x?action=status&code=404")
        assert (gone.status_code, gone.text) == (410, "status body")
    assert seen == [upstream.url, upstream.url]


@pytest.mark.parametrize("hook", ["on_request", "on_response"])
def test_a_hook_that_raises_gives_500_logged_once(
    upstream: RunningServer, caplog: pytest.LogCaptureFixture, hook: str
) -> None:
    def broken(request: Request, _: Any) -> None:
        raise RuntimeError("db password is hunter2")

    caplog.set_level(logging.ERROR, logger="rr_middleware")
    pool = Pool([upstream.url], **{hook: broken})
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/api/x")
        assert_generic_error(response, 500, [upstream.url])
        assert "hunter2" not in response.text
        assert http.get(f"{proxy.url}/local").text == "host local"
    errors = hook_errors(caplog)
    assert len(errors) == 1, errors
    assert hook in errors[0].getMessage()
    assert len(reached(upstream)) == (0 if hook == "on_request" else 1)


# --------------------------------------------------------------------------- from a route


def current_user(request: Request) -> str:
    if request.headers.get("authorization") != "Bearer good":
        raise HTTPException(401, headers={"WWW-Authenticate": "Bearer"})
    return "alice"


def admin_app(upstream_url: str, **pool: Any) -> FastAPI:
    """A FastAPI app whose /admin routes forward to an internal pool, behind a login."""
    balancer = Balancer({"/admin": Pool([upstream_url], internal=True, **pool)})
    app = FastAPI()
    app.add_middleware(RoundRobinMiddleware, balancer=balancer)

    @app.api_route("/admin/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def admin(request: Request, user: str = Depends(current_user)) -> Response:
        return await balancer.forward(request, "/admin")

    @app.post("/form-then-forward")
    async def form(request: Request, user: str = Depends(current_user)) -> Response:
        await request.body()  # the route reads the body first
        return await balancer.forward(request, "/admin", path="/from-form")

    @app.get("/other")
    async def other() -> dict[str, str]:
        return {"other": "host"}

    return app


GOOD = {"authorization": "Bearer good"}


def test_forward_from_a_route_behind_a_dependency(upstream: RunningServer) -> None:
    with serve(admin_app(upstream.url)) as front, client() as http:
        refused = http.post(f"{front.url}/admin/users", content=b"x" * 1000)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert reached(upstream) == []

        record = http.get(f"{front.url}/admin/a%2Fb/c?q=1&q=2", headers=GOOD).json()
        assert record["raw_path"] == "/a%2Fb/c"  # raw path kept, prefix stripped
        assert record["query"] == "q=1&q=2"
        assert values(record, "x-forwarded-prefix") == ["/admin"]
        record = http.put(f"{front.url}/admin/item", headers=GOOD, content=b"payload").json()
        assert (record["method"], record["body"]) == ("PUT", "payload")
        record = http.post(f"{front.url}/form-then-forward", headers=GOOD, content=b"f=1").json()
        assert (record["raw_path"], record["body"]) == ("/from-form", "f=1")
        # The pool's own refusals still apply.
        assert http.get(f"{front.url}/admin/%2e%2e/x", headers=GOOD).status_code == 400
        assert http.get(f"{front.url}/other").json() == {"other": "host"}


def test_an_internal_pool_is_not_reachable_by_its_prefix(upstream: RunningServer) -> None:
    balancer = Balancer({"/admin": Pool([upstream.url], internal=True), "/api": [upstream.url]})
    app = FastAPI()
    app.add_middleware(RoundRobinMiddleware, balancer=balancer)
    with serve(app) as front, client() as http:
        assert http.get(f"{front.url}/admin/x").status_code == 404  # FastAPI's: no route
        assert http.get(f"{front.url}/api/x").status_code == 200
    assert [r["raw_path"] for r in reached(upstream)] == ["/x"]


@pytest.mark.anyio
async def test_forward_needs_the_middleware() -> None:
    balancer = Balancer({"/admin": ["http://10.0.0.1"]})
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(RuntimeError, match="add_middleware"):
        await balancer.forward(request, "/admin")
    RoundRobinMiddleware(FastAPI(), balancer=balancer)
    with pytest.raises(KeyError, match="no pool at '/nope'"):
        await balancer.forward(request, "/nope")


def test_guard_and_hooks_apply_to_forwarding_from_a_route(upstream: RunningServer) -> None:
    def on_request(request: Request, headers: MutableHeaders) -> None:
        headers["x-user"] = "alice"

    app = admin_app(
        upstream.url, guard=lambda r: "x-blocked" not in r.headers, on_request=on_request
    )
    with serve(app) as front, client() as http:
        blocked = http.get(f"{front.url}/admin/x", headers={**GOOD, "x-blocked": "1"})
        assert blocked.status_code == 403
        record = http.get(f"{front.url}/admin/x", headers=GOOD).json()
    assert values(record, "x-user") == ["alice"]
    assert len(reached(upstream)) == 1


@pytest.mark.slow
def test_a_gibibyte_streams_through_a_route_with_flat_memory(upstream: RunningServer) -> None:
    """The route's response is the relay: 1 GiB from the upstream reaches the client
    while the process (upstream, proxy and client in one) grows by far less."""
    size = 1 << 30
    with serve(admin_app(upstream.url)) as front, client() as http:
        assert http.get(f"{front.url}/admin/warm", headers=GOOD).status_code == 200
        received = 0
        with RssGrowth() as memory:
            url = f"{front.url}/admin/big?action=slowbody&size={size}&chunk=262144"
            with http.stream("GET", url, headers=GOOD) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw(1 << 20):
                    received += len(chunk)
    assert received == size
    assert memory.growth < 64 << 20, f"grew by {memory.growth >> 20} MiB"


class CountingSink:
    """An upstream that reads a request body and keeps only its size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.sizes.append(size)
        body = b"%d" % size
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.mark.slow
def test_a_gibibyte_upload_streams_through_a_route_with_flat_memory() -> None:
    size = 1 << 30
    chunk = b"u" * (1 << 20)
    sink = CountingSink()

    def body() -> Iterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    with serve(sink) as upstream, serve(admin_app(upstream.url)) as front, client() as http:
        refused = http.post(f"{front.url}/admin/up", content=body())
        assert refused.status_code == 401  # the dependency: nothing went upstream
        assert sink.sizes == []
        with RssGrowth() as memory:
            headers = {**GOOD, "content-length": str(size)}
            response = http.post(f"{front.url}/admin/up", content=body(), headers=headers)
    assert (response.status_code, response.text) == (200, str(size))
    assert sink.sizes == [size]
    assert memory.growth < 64 << 20, f"grew by {memory.growth >> 20} MiB"


def test_an_internal_pool_keyed_by_a_name(upstream: RunningServer) -> None:
    balancer = Balancer({"admin": Pool([upstream.url], internal=True), "/api": [upstream.url]})
    app = FastAPI()
    app.add_middleware(RoundRobinMiddleware, balancer=balancer)

    @app.get("/panel/{rest:path}")
    async def panel(request: Request, rest: str) -> Response:
        return await balancer.forward(request, "admin", path="/" + rest)

    @app.get("/report")
    async def report(request: Request) -> Response:
        return await balancer.forward(request, "admin", path="/reports/latest")

    with serve(app) as front, client() as http:
        record = http.get(f"{front.url}/panel/a/b?q=1").json()
        assert record["raw_path"] == "/a/b"
        assert values(record, "x-forwarded-prefix") == ["/panel"]  # what was taken off
        record = http.get(f"{front.url}/report").json()
        assert record["raw_path"] == "/reports/latest"
        assert values(record, "x-forwarded-prefix") == []  # nothing was
        assert http.get(f"{front.url}/admin/x").status_code == 404
