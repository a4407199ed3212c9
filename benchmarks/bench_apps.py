"""The ASGI apps the benchmark serves, each in its own server process (uvicorn, or granian
for the ``*-granian`` contenders): ``upstream_app``, ``bare_app``, ``middleware_app``,
``fallthrough_apps`` (bare and middleware apps in one process, picked by path),
``forwarder_app`` (the smallest stream forwarder) and ``asgiproxy_app``.

Every factory is configured through environment variables (set by ``bench_proxy.py``), so
uvicorn can load it with ``--factory``:

``BENCH_NAME``       the upstream's name, sent back in ``x-upstream`` (upstreams only);
``BENCH_UPSTREAMS``  comma-separated upstream base URLs (proxies only);
``BENCH_PREFIXES``   number of pool prefixes for ``middleware_app`` (default 1: only ``/api``);
``BENCH_MAX_CONNECTIONS``  ``max_connections`` of those pools (default: Pool's own, 100).
``BENCH_TRANSPORT``        ``aiohttp`` for the optional aiohttp transport (default: built-in).
``BENCH_EVERYTHING``       ``1``: every feature on (active health checks every second,
                           passive ejection, retries on 503, metrics and status pages).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import parse_qsl, urljoin, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rr_middleware import AiohttpTransport, HealthCheck, Pool, RoundRobinMiddleware

UPSTREAM_BODY = b"Hello, world!"  # 13 bytes
POST_RESPONSE_BYTES = 1024 * 1024  # what the upstream's /post answers
STREAM_CHUNK = 256 * 1024  # the upstream's /download sends its body in pieces this size
LOCAL_BODY = "local"
PROXY_PREFIX = "/api"


def _log_to_stderr() -> None:
    """Warnings of every logger (rr_middleware, asyncio, aiohttp) with their level, so the
    harness can find them in the server's log."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def upstream_app() -> ASGIApp:
    """The upstream: a fixed 13-byte body with a Content-Length on any path but the few
    below, and an ``x-upstream`` header naming the server (``BENCH_NAME``), so the harness
    can check that a proxy spreads requests over both upstreams.

    ``/post`` reads the request body and answers 1 MiB; ``/download?bytes=N`` streams N
    bytes (with a Content-Length), counting what uvicorn has taken so far; ``/sent``
    answers that count (so the harness sees whether a slow reader holds the upstream
    back); ``/upload`` reads the body and answers how many bytes it had.
    """
    _log_to_stderr()
    name = os.environ.get("BENCH_NAME", "upstream").encode("ascii")
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(UPSTREAM_BODY)).encode("ascii")),
            (b"x-upstream", name),
        ],
    }
    body = {"type": "http.response.body", "body": UPSTREAM_BODY}
    post_body = b"x" * POST_RESPONSE_BYTES
    chunk = b"\0" * STREAM_CHUNK
    sent = [0]

    def _start(length: int) -> Message:
        headers = [(b"content-length", b"%d" % length), (b"x-upstream", name)]
        return {"type": "http.response.start", "status": 200, "headers": headers}

    async def _drain(receive: Receive) -> int:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return size

    async def _special(path: str, scope: Scope, receive: Receive, send: Send) -> bool:
        if path == "/post":
            await _drain(receive)
            await send(_start(len(post_body)))
            await send({"type": "http.response.body", "body": post_body})
        elif path == "/upload":
            answer = b"%d" % await _drain(receive)
            await send(_start(len(answer)))
            await send({"type": "http.response.body", "body": answer})
        elif path == "/sent":
            answer = b"%d" % sent[0]
            await send(_start(len(answer)))
            await send({"type": "http.response.body", "body": answer})
        elif path == "/download":
            query = dict(parse_qsl(scope.get("query_string", b"").decode()))
            remaining = int(query.get("bytes", "0"))
            sent[0] = 0
            await send(_start(remaining))
            while remaining > 0:
                piece = chunk if remaining >= STREAM_CHUNK else chunk[:remaining]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                remaining -= len(piece)
                sent[0] += len(piece)
            await send({"type": "http.response.body", "body": b""})
        else:
            return False
        return True

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path[-6:] != "/hello" and await _special(path, scope, receive, send):
                return
            await send(start)
            await send(body)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    return app


def forwarder_app() -> ASGIApp:
    """The least any ASGI proxy must do for a stream, as a floor to compare with, on a
    fresh connection to the first upstream per request (``_Leg``: what the socket reads is
    handed on as it is, no buffer, no copy). ``/api/upload``: read the body with
    ``receive()`` and write each message as it comes (chunk-framed when the client sent no
    Content-Length), then answer what the upstream answered. ``/api/download``: send the
    GET, then each read of the upstream's Content-Length body as one body message. No
    routing, no header handling, no pooling, no error handling, no deadlines: only the data
    path. Any other request gets a local 13-byte answer (the harness's readiness check).
    """
    _log_to_stderr()
    host, _, port = _upstreams()[0].removeprefix("http://").partition(":")
    local = {"type": "http.response.body", "body": UPSTREAM_BODY}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _lifespan(receive, send)
            return
        path = scope["path"]
        if path not in (PROXY_PREFIX + "/upload", PROXY_PREFIX + "/download"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send(local)
            return
        loop = asyncio.get_running_loop()
        transport, leg = await loop.create_connection(_Leg, host, int(port))
        try:
            if path.endswith("/upload"):
                await _forward_upload(dict(scope["headers"]), receive, leg)
            else:
                query = scope["query_string"]
                transport.write(b"GET /download?%s HTTP/1.1\r\nhost: up\r\n\r\n" % query)
            head, piece = b"", b""
            while b"\r\n\r\n" not in head:
                head += await leg.read()
            head, _, piece = head.partition(b"\r\n\r\n")
            remaining = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
            headers = [(b"content-length", b"%d" % remaining)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while True:
                remaining -= len(piece)
                more = remaining > 0
                await send({"type": "http.response.body", "body": piece, "more_body": more})
                if not more:
                    return
                piece = await leg.read()
                if not piece:
                    raise ConnectionError("the upstream closed in the body")
        finally:
            transport.close()

    return app


class _Leg(asyncio.Protocol):
    """An upstream connection as bare as asyncio allows: each piece the socket delivers is
    queued as it is and read once; writes wait only while the transport asks to."""

    def __init__(self) -> None:
        self.pieces: collections.deque[bytes] = collections.deque()
        self.closed = False
        self.wakeup: asyncio.Future[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.pieces.append(data)
        if len(self.pieces) > 1:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> None:
        self.closed = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def read(self) -> bytes:
        """The next piece read from the socket; b"" at its end."""
        while not self.pieces:
            if self.closed:
                return b""
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        piece = self.pieces.popleft()
        if not self.pieces:
            self.transport.resume_reading()
        return piece

    async def write(self, *data: bytes) -> None:
        self.transport.writelines(data)
        await self.writable.wait()


async def _forward_upload(headers: dict[bytes, bytes], receive: Receive, leg: _Leg) -> None:
    length = headers.get(b"content-length")
    framing = b"content-length: %s" % length if length else b"transfer-encoding: chunked"
    await leg.write(b"POST /upload HTTP/1.1\r\nhost: up\r\n%s\r\n\r\n" % framing)
    more = True
    while more:
        message = await receive()
        body = message.get("body", b"")
        if length:
            await leg.write(body)
        elif body:
            await leg.write(b"%x\r\n" % len(body), body, b"\r\n")
        more = message.get("more_body", False)
    if not length:
        await leg.write(b"0\r\n\r\n")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _upstreams() -> list[str]:
    urls = [u.strip() for u in os.environ.get("BENCH_UPSTREAMS", "").split(",") if u.strip()]
    if not urls:
        raise RuntimeError("BENCH_UPSTREAMS must list at least one upstream URL")
    return urls


async def _local(request: Request) -> PlainTextResponse:
    return PlainTextResponse(LOCAL_BODY)


def bare_app() -> Starlette:
    """A Starlette app with one local route, ``/local``, and no middleware."""
    _log_to_stderr()
    return Starlette(routes=[Route("/local", _local)])


def _pools(count: int, upstreams: list[str]) -> dict[str, Pool]:
    """``/api`` plus ``count - 1`` other prefixes, half one segment deep, half two.
    ``BENCH_MAX_CONNECTIONS`` sets each pool's ``max_connections`` (per upstream)."""
    limit = int(os.environ.get("BENCH_MAX_CONNECTIONS") or 0)
    options: dict[str, Any] = {"max_connections": limit} if limit else {}
    if _everything():
        options["health_check"] = HealthCheck(path="/health", interval=1.0)
        options["retry_on_statuses"] = frozenset({503})

    def pool() -> Pool:
        return Pool(upstreams, **options)

    pools = {PROXY_PREFIX: pool()}
    for i in range(count - 1):
        prefix = f"/svc{i:02d}" if i % 2 == 0 else f"/v2/svc{i:02d}"
        pools[prefix] = pool()
    return pools


def middleware_app() -> Starlette:
    """``bare_app`` with RoundRobinMiddleware: ``/api`` -> every upstream, round robin."""
    _log_to_stderr()
    count = int(os.environ.get("BENCH_PREFIXES", "1"))
    if count < 1:
        raise RuntimeError("BENCH_PREFIXES must be >= 1")
    return _with_middleware(count)


def _with_middleware(count: int) -> Starlette:
    app = bare_app()
    transport = AiohttpTransport() if os.environ.get("BENCH_TRANSPORT") == "aiohttp" else None
    extra: dict[str, Any] = {}
    if _everything():
        extra = {"metrics_path": "/metrics", "status_path": "/status"}
    app.add_middleware(
        RoundRobinMiddleware, pools=_pools(count, _upstreams()), transport=transport, **extra
    )
    return app


def fallthrough_apps() -> ASGIApp:
    """Three apps in one process, behind one server, picked per request by the first path
    segment, which is cut off: ``/bare/local`` is ``bare_app``'s ``/local``, ``/mw1/local``
    the same app wrapped in the middleware with one pool (``/api``), ``/mw50/local`` with
    50 prefixes. The apps share the process, its heap, its server and its moment, so the
    difference between their request rates is the middleware's, not the processes'."""
    _log_to_stderr()
    apps: dict[str, ASGIApp] = {
        "/bare": bare_app(),
        "/mw1": _with_middleware(1),
        "/mw50": _with_middleware(50),
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespans(list(apps.values()), scope, receive, send)
            return
        path: str = scope["path"]
        cut = path.find("/", 1)
        inner = {**scope, "path": path[cut:], "raw_path": scope["raw_path"][cut:]}
        await apps[path[:cut]](inner, receive, send)

    return app


async def _lifespans(apps: list[ASGIApp], scope: Scope, receive: Receive, send: Send) -> None:
    """Run each app's lifespan beside the others (a middleware starts its pools and timers
    there): startup completes when every app's has, shutdown likewise."""
    boxes = [(asyncio.Queue[Message](), asyncio.Queue[Message]()) for _ in apps]
    tasks = [
        asyncio.ensure_future(a({**scope}, inbox.get, outbox.put))
        for a, (inbox, outbox) in zip(apps, boxes, strict=True)
    ]
    try:
        while True:
            message = await receive()
            phase = message["type"].removeprefix("lifespan.")
            for inbox, _ in boxes:
                inbox.put_nowait(message)
            answers = [await asyncio.wait_for(out.get(), 30.0) for _, out in boxes]
            failed = [m for m in answers if m["type"].endswith(".failed")]
            await send(failed[0] if failed else {"type": f"lifespan.{phase}.complete"})
            if phase == "shutdown" or failed:
                return
    finally:
        for task in tasks:
            task.cancel()


def _everything() -> bool:
    return os.environ.get("BENCH_EVERYTHING") == "1"


def asgiproxy_app() -> ASGIApp:
    """asgiproxy 0.2's simple proxy app, alternating between the upstreams per request.

    Built as ``asgiproxy.__main__.make_app`` builds it (BaseURLProxyConfigMixin with the
    Host header rewritten to the upstream's), except that ``get_upstream_url`` cycles over
    the upstream base URLs so both proxies spread their load the same way, and strips the
    ``/api`` prefix as the middleware does. asgiproxy's own
    defaults are kept, including ``ProxyContext(max_concurrency=20)``. Its simple app
    ignores the lifespan; the wrapper closes its aiohttp session on shutdown.
    """
    _log_to_stderr()
    from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
    from asgiproxy.context import ProxyContext
    from asgiproxy.simple_proxy import make_simple_proxy_app

    bases = _upstreams()

    class AlternatingConfig(BaseURLProxyConfigMixin, ProxyConfig):
        upstream_base_url = bases[0]
        rewrite_host_header = urlsplit(bases[0]).netloc

        def __init__(self) -> None:
            self._cycle: Iterator[tuple[str, str]] = itertools.cycle(
                [(base, urlsplit(base).netloc) for base in bases]
            )

        def get_upstream_url(self, scope: Scope) -> str:
            # Called just before process_client_headers, with no await in between, so the
            # Host rewrite below always matches the URL picked here.
            base, self.rewrite_host_header = next(self._cycle)
            path: str = scope["path"]
            # The prefix is stripped, as the middleware's pools strip it by default.
            if path.startswith(PROXY_PREFIX + "/"):
                path = path[len(PROXY_PREFIX) :]
            return urljoin(base, path)

    context = ProxyContext(AlternatingConfig())
    proxy = make_simple_proxy_app(context)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await proxy(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await context.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app
