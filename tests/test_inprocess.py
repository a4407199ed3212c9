"""The way users test their app: in-process upstreams, no sockets.

A FastAPI host app with its own routes, ``RoundRobinMiddleware`` added with
``Upstream(url, app=...)`` members (reached through ``httpx.ASGITransport``) or with an
``httpx.MockTransport``, driven by Starlette's ``TestClient`` or by ``httpx.AsyncClient``
under ``asgi_lifespan.LifespanManager``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from rr_middleware import Pool, ResponseAborted, RoundRobinMiddleware, Upstream

from .upstream_app import UpstreamApp

# ------------------------------------------------------------------------------ fixtures


class Raising:
    """An upstream that raises before it responds."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        raise RuntimeError("upstream bug (test)")


async def raising_mid_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An upstream that starts a 200 announcing 100 bytes, sends 10, then raises."""
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
    )
    await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
    raise RuntimeError("upstream dies mid-body (test)")


async def raising_mid_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same without a Content-Length: a streamed body cut short."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
    raise RuntimeError("upstream dies mid-stream (test)")


def fastapi_backend(name: str) -> FastAPI:
    backend = FastAPI()

    @backend.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, Any]:
        return {"id": item_id, "served_by": name, "q": request.query_params.get("q")}

    @backend.post("/items")
    async def create(request: Request) -> dict[str, Any]:
        return {"created": await request.json(), "served_by": name}

    return backend


def make_host(pools: dict[str, Any], **options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/local")
    async def local() -> dict[str, str]:
        return {"local": "yes"}

    @app.post("/local/echo")
    async def local_echo(request: Request) -> dict[str, str]:
        return {"got": (await request.body()).decode()}

    app.add_middleware(RoundRobinMiddleware, pools=pools, **options)
    return app


@pytest.fixture
def a() -> UpstreamApp:
    return UpstreamApp("a")


@pytest.fixture
def b() -> UpstreamApp:
    return UpstreamApp("b")


@pytest.fixture
def app(a: UpstreamApp, b: UpstreamApp) -> FastAPI:
    return make_host(
        {"/api": Pool([Upstream("http://a.internal", app=a), Upstream("http://b.internal", app=b)])}
    )


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def find_middleware(app: FastAPI) -> RoundRobinMiddleware:
    """The middleware instance inside a started FastAPI app's middleware stack."""
    node: Any = app.middleware_stack
    while node is not None:
        if isinstance(node, RoundRobinMiddleware):
            return node
        node = getattr(node, "app", None)
    raise AssertionError("RoundRobinMiddleware not in the stack (app not started?)")


def header(record: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in record["headers"] if n == name]


# ---------------------------------------------------------------------------- rotation


def test_requests_rotate_between_upstreams(
    client: TestClient, a: UpstreamApp, b: UpstreamApp
) -> None:
    served = [client.get("/api/echo").json()["server"] for _ in range(6)]
    assert served == ["a", "b", "a", "b", "a", "b"]
    assert len(a.requests) == len(b.requests) == 3


def test_rotation_is_shared_by_all_paths_of_a_pool(client: TestClient) -> None:
    served = [client.get(path).headers["x-upstream"] for path in ("/api/x", "/api/y", "/api")]
    assert served == ["a", "b", "a"]


def test_weighted_pool_in_process() -> None:
    heavy, light = UpstreamApp("heavy"), UpstreamApp("light")
    pool = Pool(
        [
            Upstream("http://heavy.internal", weight=3, app=heavy),
            Upstream("http://light.internal", weight=1, app=light),
        ]
    )
    with TestClient(make_host({"/api": pool})) as client:
        served = [client.get("/api/x").headers["x-upstream"] for _ in range(8)]
    assert served.count("heavy") == 6
    assert served.count("light") == 2


# ------------------------------------------------------------------------ local routes


def test_local_routes_are_untouched(client: TestClient, a: UpstreamApp, b: UpstreamApp) -> None:
    assert client.get("/local").json() == {"local": "yes"}
    assert client.post("/local/echo", content=b"hi").json() == {"got": "hi"}
    assert a.requests == []
    assert b.requests == []


@pytest.mark.parametrize("path", ["/apix", "/apix/y", "/", "/nothing", "/ap"])
def test_paths_outside_the_prefix_reach_the_host_app(
    client: TestClient, a: UpstreamApp, b: UpstreamApp, path: str
) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    assert "x-upstream" not in response.headers
    assert a.requests == []
    assert b.requests == []


# ----------------------------------------------------------------------- request parts


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [
        ("/api/items/7", "/items/7"),
        ("/api/a/b/c/", "/a/b/c/"),
        ("/api", "/"),
        ("/api/", "/"),
        ("/api/caf%C3%A9/a%2Fb", "/caf%C3%A9/a%2Fb"),
    ],
)
def test_prefix_is_stripped_and_path_kept_raw(
    client: TestClient, path: str, upstream_path: str
) -> None:
    record = client.get(path).json()
    assert record["raw_path"] == upstream_path
    assert header(record, "x-forwarded-prefix") == ["/api"]


def test_post_body_reaches_the_upstream_intact(client: TestClient, a: UpstreamApp) -> None:
    body = bytes(range(256)) * 64
    response = client.post("/api/upload", content=body)
    assert response.status_code == 200
    record = response.json()
    assert record["method"] == "POST"
    assert record["body"].encode("latin-1") == body
    assert header(record, "content-length") == [str(len(body))]
    assert a.requests[0]["body"].encode("latin-1") == body


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_and_bodies(client: TestClient, method: str) -> None:
    record = client.request(method, "/api/thing", content=b'{"k": 1}').json()
    assert record["method"] == method
    assert record["body"] == '{"k": 1}'


def test_json_post_to_a_fastapi_upstream() -> None:
    pool = Pool(
        [
            Upstream("http://a.internal", app=fastapi_backend("a")),
            Upstream("http://b.internal", app=fastapi_backend("b")),
        ]
    )
    with TestClient(make_host({"/api": pool})) as client:
        first = client.post("/api/items", json={"name": "x", "n": [1, 2]})
        second = client.get("/api/items/42", params={"q": "hello world"})
    assert first.status_code == 200
    assert first.json() == {"created": {"name": "x", "n": [1, 2]}, "served_by": "a"}
    assert second.json() == {"id": 42, "served_by": "b", "q": "hello world"}


def test_query_string_is_forwarded_byte_for_byte(client: TestClient) -> None:
    query = "b=2&a=1&a=3&sp=a%20b&plus=a+b&e=&utf=%C3%A9"
    record = client.get(f"/api/search?{query}").json()
    assert record["query"] == query
    assert record["raw_path"] == "/search"


def test_request_headers_reach_the_upstream(client: TestClient) -> None:
    response = client.get(
        "/api/x",
        headers=[
            ("X-Custom", "one"),
            ("Authorization", "Bearer t0k3n"),
            ("Connection", "x-secret"),
            ("X-Secret", "dropped"),
            ("User-Agent", "my-test/1.0"),
        ],
    )
    record = response.json()
    assert header(record, "x-custom") == ["one"]
    assert header(record, "authorization") == ["Bearer t0k3n"]
    assert header(record, "user-agent") == ["my-test/1.0"]
    assert header(record, "x-secret") == []
    assert header(record, "connection") == []
    # The upstream's own Host, and the client's host in X-Forwarded-Host.
    assert header(record, "host") == ["a.internal"]
    assert header(record, "x-forwarded-host") == ["testserver"]
    assert header(record, "x-forwarded-proto") == ["http"]
    assert header(record, "x-forwarded-for") == ["testclient"]


def test_spoofed_forwarding_headers_are_replaced(client: TestClient) -> None:
    record = client.get(
        "/api/x", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example"}
    ).json()
    assert header(record, "x-forwarded-for") == ["testclient"]
    assert header(record, "x-forwarded-host") == ["testserver"]


def test_preserve_host_passes_the_clients_host(a: UpstreamApp) -> None:
    pool = Pool([Upstream("http://a.internal", app=a)], preserve_host=True, strip_prefix=False)
    with TestClient(make_host({"/api": pool})) as client:
        record = client.get("/api/x").json()
    assert header(record, "host") == ["testserver"]
    assert record["raw_path"] == "/api/x"
    assert header(record, "x-forwarded-prefix") == []


def test_base_path_of_the_upstream_is_prepended(a: UpstreamApp) -> None:
    pool = Pool([Upstream("http://a.internal:8080/v1", app=a)])
    with TestClient(make_host({"/api": pool})) as client:
        record = client.get("/api/items?x=1").json()
    assert record["raw_path"] == "/v1/items"
    assert record["query"] == "x=1"
    assert header(record, "host") == ["a.internal:8080"]


# ---------------------------------------------------------------------------- responses


@pytest.mark.parametrize("code", [200, 201, 202, 400, 401, 403, 404, 418, 429, 500, 502, 503])
def test_status_codes_pass_through(client: TestClient, code: int) -> None:
    response = client.get(f"/api/x?action=status&code={code}")
    assert response.status_code == code
    assert response.content == b"status body"
    assert response.headers["x-upstream"] == "a"


@pytest.mark.parametrize("code", [204, 304])
def test_bodiless_status_codes_pass_through(client: TestClient, code: int) -> None:
    response = client.get(f"/api/x?action=status&code={code}")
    assert response.status_code == code
    assert response.content == b""


def test_repeated_set_cookie_headers_pass_through(client: TestClient) -> None:
    response = client.get("/api/x?action=cookies&n=3")
    assert response.headers.get_list("set-cookie") == [  # Path=/ is the pool's root
        "c0=v0; Path=/api",
        "c1=v1; Path=/api",
        "c2=v2; Path=/api",
    ]
    assert response.text == "cookies"


def test_multi_chunk_body_is_relayed_whole(client: TestClient) -> None:
    response = client.get("/api/x?action=stream&n=4&size=3")
    assert response.status_code == 200
    assert response.content == b"AAABBBCCCDDD"


def test_compressed_body_is_not_decoded_by_the_proxy(client: TestClient) -> None:
    response = client.get("/api/x?action=gzip")
    assert response.headers["content-encoding"] == "gzip"
    assert response.text == "hello gzip " * 100  # decoded by the test client, not the proxy


def test_head_request(client: TestClient) -> None:
    response = client.head("/api/x?action=big&size=1000")
    assert response.status_code == 200
    assert response.content == b""


# ------------------------------------------------------------------------- failing upstreams


def test_upstream_that_raises_gives_the_client_a_500() -> None:
    raising = Raising()
    healthy = UpstreamApp("ok")
    app = make_host(
        {
            "/boom": Pool([Upstream("http://boom.internal", app=raising)]),
            "/ok": Pool([Upstream("http://ok.internal", app=healthy)]),
        }
    )
    with TestClient(app) as client:
        response = client.get("/boom/x")
        # As under a real server: a plain 500, and the exception text stays in the log.
        assert response.status_code == 500
        assert response.content == b"Internal Server Error"
        assert b"upstream bug" not in response.content
        assert raising.calls == 1
        # Neither the host app nor other pools are affected.
        assert client.get("/local").json() == {"local": "yes"}
        assert client.get("/ok/x").json()["server"] == "ok"
        assert client.get("/boom/again").status_code == 500


def test_a_raising_upstream_is_answered_not_retried_on_a_second_member(b: UpstreamApp) -> None:
    # ASGITransport turns the exception into a 500 response: an answer, not a connection
    # failure, so the request is not replayed on the next member.
    raising = Raising()
    pool = Pool([Upstream("http://boom.internal", app=raising), Upstream("http://b", app=b)])
    with TestClient(make_host({"/api": pool})) as client:
        assert client.get("/api/x").status_code == 500
        assert client.get("/api/x").headers["x-upstream"] == "b"
    assert raising.calls == 1
    assert len(b.requests) == 1


@pytest.mark.parametrize("upstream", [raising_mid_body, raising_mid_stream])
def test_upstream_failing_mid_body_is_not_a_complete_response(upstream: Any) -> None:
    # The library promises that an upstream failing after the response started aborts
    # the client's response (ResponseAborted), "never a silently truncated response".
    app = make_host({"/api": Pool([Upstream("http://mid.internal", app=upstream)])})
    with TestClient(app) as client:
        try:
            response = client.get("/api/x")
        except ResponseAborted:
            return
    assert response.status_code >= 500, (
        f"a truncated upstream body was delivered as a complete response: "
        f"{response.status_code} {dict(response.headers)} {response.content!r}"
    )


# --------------------------------------------------------------------- httpx.MockTransport


class Recorder:
    """A MockTransport handler that records what reached it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(
            201,
            headers=[("x-mock", request.url.host), ("set-cookie", "a=1"), ("set-cookie", "b=2")],
            content=b"from " + request.url.host.encode(),
        )


def test_mock_transport_on_a_pool() -> None:
    recorder = Recorder()
    pool = Pool(
        ["http://x.internal:8080/v1", "http://y.internal"], transport=httpx.MockTransport(recorder)
    )
    with TestClient(make_host({"/api": pool})) as client:
        first = client.post("/api/items?q=1", content=b"payload", headers={"X-Custom": "c"})
        second = client.get("/api/other")
    assert (first.status_code, first.content) == (201, b"from x.internal")
    assert first.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert second.content == b"from y.internal"
    sent = recorder.requests[0]
    assert sent.method == "POST"
    assert str(sent.url) == "http://x.internal:8080/v1/items?q=1"
    assert sent.url.raw_path == b"/v1/items?q=1"
    assert sent.headers["host"] == "x.internal:8080"
    assert sent.headers["x-custom"] == "c"
    assert sent.headers["x-forwarded-prefix"] == "/api"
    assert sent.content == b"payload"
    assert recorder.requests[1].headers["host"] == "y.internal"
    assert recorder.requests[1].url.raw_path == b"/other"


def test_mock_transport_on_the_middleware() -> None:
    recorder = Recorder()
    app = make_host(
        {"/api": ["http://x.internal", "http://y.internal"], "/v2": ["http://z.internal"]},
        transport=httpx.MockTransport(recorder),
    )
    with TestClient(app) as client:
        hosts = [client.get("/api/r").headers["x-mock"] for _ in range(4)]
        assert client.get("/v2/r").headers["x-mock"] == "z.internal"
        assert client.get("/local").json() == {"local": "yes"}
        mw = find_middleware(app)
    assert hosts == ["x.internal", "y.internal", "x.internal", "y.internal"]
    assert len(recorder.requests) == 5
    # A transport passed in stays the user's: the middleware does not own it.
    assert mw.balancer._own_transport is False


def test_pool_and_upstream_transports_override_the_middleware_transport(a: UpstreamApp) -> None:
    default, pool_level, upstream_level = Recorder(), Recorder(), Recorder()
    app = make_host(
        {
            "/d": ["http://d.internal"],
            "/p": Pool(["http://p.internal"], transport=httpx.MockTransport(pool_level)),
            "/u": Pool(
                [
                    Upstream("http://u.internal", transport=httpx.MockTransport(upstream_level)),
                    Upstream("http://app.internal", app=a),
                ],
                transport=httpx.MockTransport(pool_level),
            ),
        },
        transport=httpx.MockTransport(default),
    )
    with TestClient(app) as client:
        assert client.get("/d/x").headers["x-mock"] == "d.internal"
        assert client.get("/p/x").headers["x-mock"] == "p.internal"
        assert client.get("/u/x").headers["x-mock"] == "u.internal"
        assert client.get("/u/x").headers["x-upstream"] == "a"
    assert [len(r.requests) for r in (default, pool_level, upstream_level)] == [1, 1, 1]


def test_mock_connect_error_is_retried_on_the_next_member() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "down.internal":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, content=b"up")

    pool = Pool(
        ["http://down.internal", "http://up.internal"], transport=httpx.MockTransport(handler)
    )
    with TestClient(make_host({"/api": pool})) as client:
        assert [client.post("/api/x", content=b"b").content for _ in range(2)] == [b"up", b"up"]
    # The retry took no turn of the round robin: the second request's first try is the
    # turn after the first's, up; then down's turn comes again.
    assert calls == ["down.internal", "up.internal", "up.internal"]
    with TestClient(make_host({"/api": pool})) as client:
        assert [client.post("/api/x", content=b"b").content for _ in range(3)] == [b"up"] * 3
    assert calls[3:] == [
        "down.internal",
        "up.internal",
        "up.internal",
        "down.internal",
        "up.internal",
    ]


def test_mock_every_member_down_is_a_502() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    pool = Pool(["http://a.internal", "http://b.internal"], transport=httpx.MockTransport(handler))
    with TestClient(make_host({"/api": pool})) as client:
        response = client.get("/api/x")
    assert response.status_code == 502
    assert response.text == "502 Bad Gateway\n"


def test_mock_read_timeout_is_a_504() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    pool = Pool(["http://a.internal", "http://b.internal"], transport=httpx.MockTransport(handler))
    with TestClient(make_host({"/api": pool})) as client:
        assert client.get("/api/x").status_code == 504


# ------------------------------------------------------------------------- no lifespan


def test_requests_work_without_the_lifespan(a: UpstreamApp, b: UpstreamApp) -> None:
    pool = Pool([Upstream("http://a.internal", app=a), Upstream("http://b.internal", app=b)])
    app = make_host({"/api": pool})
    client = TestClient(app)  # no "with": no lifespan, every request in a new event loop
    served = [client.get("/api/x").headers["x-upstream"] for _ in range(4)]
    assert served == ["a", "b", "a", "b"]
    assert client.post("/api/x", content=b"body").json()["body"] == "body"
    assert client.get("/local").json() == {"local": "yes"}
    # In-process upstreams never touch the default (socket) transport.
    assert find_middleware(app).transport.open_connections == 0


def test_mock_transport_without_the_lifespan() -> None:
    recorder = Recorder()
    client = TestClient(
        make_host({"/api": ["http://x.internal"]}, transport=httpx.MockTransport(recorder))
    )
    assert client.get("/api/a").status_code == 201
    assert client.get("/api/b").status_code == 201
    assert [r.url.raw_path for r in recorder.requests] == [b"/a", b"/b"]


def test_middleware_wrapping_the_app_directly(a: UpstreamApp) -> None:
    host = make_host({"/unused": ["http://unused.internal"]})
    app = RoundRobinMiddleware(host, pools={"/api": Pool([Upstream("http://a.internal", app=a)])})
    with TestClient(app) as client:
        assert client.get("/api/x").headers["x-upstream"] == "a"
        assert client.get("/local").json() == {"local": "yes"}


# ---------------------------------------------------------------------------- async


@pytest.mark.anyio
async def test_async_client_under_lifespan_manager(a: UpstreamApp, b: UpstreamApp) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        events.append("startup")
        yield {"greeting": "hello"}
        events.append("shutdown")

    host = FastAPI(lifespan=lifespan)

    @host.get("/local")
    async def local(request: Request) -> dict[str, str]:
        return {"greeting": request.state.greeting}

    host.add_middleware(
        RoundRobinMiddleware,
        pools={
            "/api": Pool(
                [Upstream("http://a.internal", app=a), Upstream("http://b.internal", app=b)]
            )
        },
    )
    async with LifespanManager(host) as manager:
        assert events == ["startup"]
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            served = [(await client.get("/api/x")).headers["x-upstream"] for _ in range(4)]
            posted = await client.post("/api/submit?k=v", content=b"async body")
            local = await client.get("/local")
    assert events == ["startup", "shutdown"]
    assert served == ["a", "b", "a", "b"]
    record = posted.json()
    assert (record["method"], record["raw_path"], record["query"]) == ("POST", "/submit", "k=v")
    assert record["body"] == "async body"
    assert header(record, "x-forwarded-host") == ["proxy.test"]
    assert header(record, "x-forwarded-for") == ["127.0.0.1"]
    assert local.json() == {"greeting": "hello"}


@pytest.mark.anyio
async def test_async_client_streams_a_multi_chunk_body(a: UpstreamApp) -> None:
    app = make_host({"/api": Pool([Upstream("http://a.internal", app=a)])})
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/api/x?action=stream&n=3&size=4")
            echo = await client.get("/api/x")
    assert response.content == b"AAAABBBBCCCC"
    assert json.loads(echo.content)["server"] == "a"


# ------------------------------------------------------------- bodies the framing tells


async def _forward_raw(http_version: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
    """One request straight into the middleware, as a server describes it, with its body
    in one message; returns what the upstream recorded and how often receive() ran."""
    upstream = UpstreamApp("a")
    middleware = RoundRobinMiddleware(
        make_host({}), pools={"/api": Pool([Upstream("http://a.internal", app=upstream)])}
    )
    await middleware.startup()
    received: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append("body" if not received else "more")
        if len(received) == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}  # the response is complete by then

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": "POST" if body else "GET",
        "scheme": "http",
        "path": "/api/echo",
        "raw_path": b"/api/echo",
        "query_string": b"action=echo",
        "root_path": "",
        "headers": [(b"host", b"front"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    try:
        await middleware(scope, receive, send)
    finally:
        await middleware.shutdown()
    assert sent[0]["status"] == 200
    return upstream.requests[0], received


async def test_an_http2_body_without_a_length_reaches_the_upstream() -> None:
    """HTTP/2 may carry a body with neither Content-Length nor Transfer-Encoding: it is
    read and forwarded, not taken for an empty one."""
    record, received = await _forward_raw("2", [], b"abc")
    assert record["body"] == "abc"
    assert received[0] == "body"


async def test_an_http1_request_its_framing_says_is_empty_is_forwarded_unread() -> None:
    """An HTTP/1.1 GET with no Content-Length and no Transfer-Encoding has no body (RFC
    9112 §6.3): it is forwarded without waiting on receive() for the empty message."""
    record, received = await _forward_raw("1.1", [], b"")
    assert (record["method"], record["body"]) == ("GET", "")
    assert received == []
    record, received = await _forward_raw("1.1", [(b"content-length", b"3")], b"abc")
    assert record["body"] == "abc"
