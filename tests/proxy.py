"""The proxy under test: the middleware under real uvicorn, around a small host app
(``running_proxy``) or around a probe that reports, from the proxy's own event loop, its
task count and its open upstream connections (``fault_proxy``, for the fault and stall
tests); or driven in process through its lifespan (``InProcessProxy``). Plus the clients
the tests talk to it with, and what its own error answers must look like.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from rr_middleware import Pool, RoundRobinMiddleware

from .leaks import LeakLog
from .servers import RunningServer, serve

SETTLE = 5.0  # the longest any test waits for connections or tasks to settle

# The headers a proxy must not pass on (RFC 9110 §7.6.1, RFC 9112 §9.6), as the tests know them.
HOP_BY_HOP_NAMES = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


# --------------------------------------------------------------------------- under uvicorn


def host_app() -> Starlette:
    """The app the middleware wraps: two local routes, everything else 404."""

    async def local(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host local")

    async def apix(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host apix")

    return Starlette(routes=[Route("/local", local), Route("/apix", apix)])


def plain_host_app() -> Starlette:
    """An app whose ``/`` answers "host", and nothing else."""
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse("host"))])


@contextmanager
def running_proxy(
    pools: dict[str, Any], **options: Any
) -> Iterator[tuple[RunningServer, RoundRobinMiddleware]]:
    """The middleware around ``host_app()``, served by uvicorn; yields (server, middleware).
    uvicorn runs with ``proxy_headers=False``, so that the only code deciding about
    ``X-Forwarded-*`` is the middleware's."""
    middleware = RoundRobinMiddleware(host_app(), pools=pools, **options)
    with serve(middleware, proxy_headers=False) as server:
        yield server, middleware


class ProxyProbe:
    """The host app the middleware wraps: ``/debug/state`` answers, from the proxy's own
    event loop, how many asyncio tasks exist on it and how many upstream connections the
    middleware's default transport holds. ``tasks_at_shutdown``: the coroutine names of
    the tasks alive on the loop as the host app's own lifespan shutdown runs, which is
    after the middleware's own shutdown (it handles the message before passing it on)."""

    def __init__(self) -> None:
        self.middleware: RoundRobinMiddleware | None = None
        self.tasks_at_shutdown: list[str] | None = None

    def app(self) -> Starlette:
        async def state(request: Request) -> JSONResponse:
            assert self.middleware is not None
            transport: Any = self.middleware.transport
            return JSONResponse(
                {"tasks": len(asyncio.all_tasks()), "connections": transport.open_connections}
            )

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            self.tasks_at_shutdown = [
                getattr(task.get_coro(), "__qualname__", repr(task.get_coro()))
                for task in asyncio.all_tasks()
            ]

        return Starlette(routes=[Route("/debug/state", state)], lifespan=lifespan)


@contextmanager
def fault_proxy(
    pools: dict[str, Any], log: LeakLog | None = None, **config: Any
) -> Iterator[tuple[RunningServer, RoundRobinMiddleware, ProxyProbe]]:
    """The middleware around a ``ProxyProbe`` app under uvicorn. Start it after the
    upstreams: ``log`` (if given) is attached once uvicorn has configured its loggers."""
    probe = ProxyProbe()
    middleware = RoundRobinMiddleware(probe.app(), pools=pools)
    probe.middleware = middleware
    with serve(middleware, proxy_headers=False, **config) as server:
        if log is not None:
            log.watch()
        yield server, middleware, probe


def proxy_state(http: httpx.Client, proxy: RunningServer) -> dict[str, int]:
    response = http.get(f"{proxy.url}/debug/state")
    assert response.status_code == 200, response.text
    state: dict[str, int] = response.json()
    return state


def settle(
    http: httpx.Client, proxy: RunningServer, done: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    """Poll the proxy (one request per poll) until ``done(state)``, or ``SETTLE`` seconds
    have passed; the last state seen, settled or not."""
    deadline = time.monotonic() + SETTLE
    while True:
        state = proxy_state(http, proxy)
        if done(state) or time.monotonic() > deadline:
            return state


async def aproxy_state(http: httpx.AsyncClient, proxy: RunningServer) -> dict[str, int]:
    response = await http.get(f"{proxy.url}/debug/state")
    assert response.status_code == 200, response.text
    state: dict[str, int] = response.json()
    return state


async def asettle(
    http: httpx.AsyncClient, proxy: RunningServer, done: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    deadline = time.monotonic() + SETTLE
    while True:
        state = await aproxy_state(http, proxy)
        if done(state) or time.monotonic() > deadline:
            return state


# --------------------------------------------------------------------------- in process


class InProcessProxy:
    """The middleware around ``plain_host_app()`` with one pool at ``/api``, through its
    lifespan, driven in process (``async with``)."""

    def __init__(self, pool: Pool, **options: Any) -> None:
        self.middleware = RoundRobinMiddleware(plain_host_app(), pools={"/api": pool}, **options)
        #: The pool's runtime (snapshot, drain, members).
        self.pool = self.middleware.balancer["/api"]
        self.lifespan = LifespanManager(self.middleware, startup_timeout=30)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.lifespan.app), base_url="http://proxy"
        )

    async def __aenter__(self) -> InProcessProxy:
        await self.lifespan.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.lifespan.__aexit__(*exc)

    async def who(self, n: int) -> list[str]:
        """Which upstream answered each of ``n`` GETs."""
        names = []
        for _ in range(n):
            response = await self.http.get("/api/x")
            assert response.status_code == 200, response.text
            names.append(response.headers["x-upstream"])
        return names

    def members(self) -> list[str]:
        return [row["url"] for row in self.pool.snapshot()]

    def row(self, url: str) -> dict[str, Any]:
        return next(row for row in self.pool.snapshot() if row["url"] == url)


# --------------------------------------------------------------------------- clients


def client(**options: Any) -> httpx.Client:
    # trust_env=False: the test client itself must never go through an env proxy.
    return httpx.Client(trust_env=False, timeout=10, **options)


def aclient(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10, **options)


def assert_generic_error(response: httpx.Response, status: int, upstream_urls: list[str]) -> None:
    """``response`` is the proxy's own error answer ``status``: short, and telling nothing
    of the upstreams (no address, no port, no cause)."""
    assert response.status_code == status
    body = response.text
    assert len(body) < 100, body
    for leak in ("127.0.0.1", "Errno", "refused", "Traceback", "aiohttp", "Error:"):
        assert leak not in body, body
    for url in upstream_urls:
        assert url not in body
        assert url.rsplit(":", 1)[1] not in body, body
