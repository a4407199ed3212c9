"""The ASGI apps the benchmark serves, each in its own uvicorn subprocess.

Every factory is configured through environment variables (set by ``bench_proxy.py``), so
uvicorn can load it with ``--factory``:

``BENCH_NAME``       the upstream's name, sent back in ``x-upstream`` (upstreams only);
``BENCH_UPSTREAMS``  comma-separated upstream base URLs (proxies only);
``BENCH_PREFIXES``   number of pool prefixes for ``middleware_app`` (default 1: only ``/api``);
``BENCH_MAX_CONNECTIONS``  ``max_connections`` of those pools (default: Pool's own, 100).
``BENCH_TRANSPORT``        ``aiohttp`` for the optional aiohttp transport (default: built-in).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rr_middleware import AiohttpTransport, Pool, RoundRobinMiddleware

UPSTREAM_BODY = b"Hello, world!"  # 13 bytes
LOCAL_BODY = "local"
PROXY_PREFIX = "/api"


def _log_to_stderr() -> None:
    """Warnings of every logger (rr_middleware, asyncio, aiohttp) with their level, so the
    harness can find them in the server's log."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def upstream_app() -> ASGIApp:
    """The upstream: a fixed 13-byte body with a Content-Length, whatever the path, and an
    ``x-upstream`` header naming the server (``BENCH_NAME``), so the harness can check
    that a proxy spreads requests over both upstreams."""
    _log_to_stderr()
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(UPSTREAM_BODY)).encode("ascii")),
            (b"x-upstream", os.environ.get("BENCH_NAME", "upstream").encode("ascii")),
        ],
    }
    body = {"type": "http.response.body", "body": UPSTREAM_BODY}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send(start)
            await send(body)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    return app


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

    def pool() -> Pool:
        return Pool(upstreams, max_connections=limit) if limit else Pool(upstreams)

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
    app = bare_app()
    transport = AiohttpTransport() if os.environ.get("BENCH_TRANSPORT") == "aiohttp" else None
    app.add_middleware(RoundRobinMiddleware, pools=_pools(count, _upstreams()), transport=transport)
    return app


def asgiproxy_app() -> ASGIApp:
    """asgiproxy 0.2's simple proxy app, alternating between the upstreams per request.

    Built as ``asgiproxy.__main__.make_app`` builds it (BaseURLProxyConfigMixin with the
    Host header rewritten to the upstream's), except that ``get_upstream_url`` cycles over
    the upstream base URLs so both proxies spread their load the same way. asgiproxy's own
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
