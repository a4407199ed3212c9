"""The lifespan with real upstreams: the default (aiohttp) transport's session opens on
startup and closes on shutdown, around the host app's own lifespan, without leaks.

Leaks are looked for explicitly: ``no_leaks()`` records every ResourceWarning and every
asyncio "Unclosed ..." / "Task was destroyed ..." report emitted in its block, after a
forced garbage collection, so a leak fails the test that caused it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from rr_middleware import Pool, RoundRobinMiddleware
from rr_middleware.transport import Http1Transport

from .leaks import no_leaks
from .servers import RunningServer


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")


def host_app(events: list[str] | None = None, *, fail_startup: bool = False) -> FastAPI:
    """A host app with a lifespan (recorded in ``events``), lifespan state and a local route."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if events is not None:
            events.append("startup")
        if fail_startup:
            raise RuntimeError("database unreachable (test)")
        yield {"db": "connected"}
        if events is not None:
            events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/local")
    async def local(request: Request) -> dict[str, str]:
        return {"db": request.state.db}

    return app


def session_of(mw: RoundRobinMiddleware) -> Any:
    """The default transport's open connection set (its "session"), or None."""
    transport = mw.transport
    assert isinstance(transport, Http1Transport)
    return transport._connections


def next_middleware(app: FastAPI) -> RoundRobinMiddleware:
    """The middleware instance inside a started FastAPI app's middleware stack."""
    node: Any = app.middleware_stack
    while not isinstance(node, RoundRobinMiddleware):
        node = node.app
    return node


async def served_by(client: httpx.AsyncClient, count: int, path: str = "/api/x") -> list[str]:
    names = []
    for _ in range(count):
        response = await client.get(path)
        assert response.status_code == 200, response.text
        names.append(response.json()["server"])
    return names


# --------------------------------------------------------------------- open and close


@pytest.mark.anyio
async def test_session_opens_on_startup_and_closes_on_shutdown(
    upstreams: list[RunningServer],
) -> None:
    a, b, _ = upstreams
    with no_leaks() as leaks:
        mw = RoundRobinMiddleware(host_app(), pools={"/api": [a.url, b.url]})
        assert session_of(mw) is None  # nothing is opened at construction
        async with LifespanManager(mw) as manager:
            session = session_of(mw)
            assert session is not None
            assert not session.closed
            async with client_for(manager.app) as client:
                assert await served_by(client, 4) == ["a", "b", "a", "b"]
            # Two keep-alive connections, one per upstream, pooled for reuse.
            assert mw.transport.open_connections == 2  # type: ignore[attr-defined]
        assert session_of(mw) is None
        assert session.closed
        assert mw.transport.open_connections == 0  # type: ignore[attr-defined]
        del session, mw, manager
    assert leaks == []


@pytest.mark.anyio
async def test_host_lifespan_and_state_still_work(upstreams: list[RunningServer]) -> None:
    a, b, c = upstreams
    events: list[str] = []
    with no_leaks() as leaks:
        mw = RoundRobinMiddleware(host_app(events), pools={"/api": [a.url, b.url, c.url]})
        async with LifespanManager(mw) as manager:
            assert events == ["startup"]
            async with client_for(manager.app) as client:
                local = await client.get("/local")
                assert await served_by(client, 3) == ["a", "b", "c"]
        assert events == ["startup", "shutdown"]
        assert local.json() == {"db": "connected"}
        assert session_of(mw) is None
        del mw, manager
    assert leaks == []


def test_testclient_with_block_and_real_upstreams(upstreams: list[RunningServer]) -> None:
    a, b, c = upstreams
    events: list[str] = []
    with no_leaks() as leaks:
        app = host_app(events)
        app.add_middleware(RoundRobinMiddleware, pools={"/api": Pool([a.url, b.url, c.url])})
        with TestClient(app) as client:
            names = [client.get("/api/x").json()["server"] for _ in range(6)]
            assert client.get("/local").json() == {"db": "connected"}
            mw = next_middleware(app)
            session = session_of(mw)
            assert not session.closed
        assert names == ["a", "b", "c", "a", "b", "c"]
        assert events == ["startup", "shutdown"]
        assert session.closed
        assert session_of(mw) is None
        del client, app, mw, session
    assert leaks == []


# ------------------------------------------------------------------------ startup failure


@pytest.mark.anyio
async def test_host_startup_failure_is_reported_and_closes_our_client(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    events: list[str] = []
    with no_leaks() as leaks:
        mw = RoundRobinMiddleware(host_app(events, fail_startup=True), pools={"/api": [a.url]})
        with pytest.raises(RuntimeError, match="database unreachable"):
            async with LifespanManager(mw):
                pytest.fail("startup must not succeed")
        assert events == ["startup"]
        assert session_of(mw) is None
        del mw
    assert leaks == []


@pytest.mark.anyio
async def test_host_startup_failure_sends_startup_failed(upstreams: list[RunningServer]) -> None:
    # Driven by hand, to see the exact messages a server gets.
    mw = RoundRobinMiddleware(host_app(fail_startup=True), pools={"/api": [upstreams[0].url]})
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "lifespan.startup"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    with pytest.raises(RuntimeError, match="database unreachable"):
        await mw(scope, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "database unreachable" in sent[0]["message"]
    assert session_of(mw) is None


@pytest.mark.anyio
async def test_raw_host_app_crashing_in_startup_closes_our_client(
    upstreams: list[RunningServer],
) -> None:
    # A pure-ASGI host app whose lifespan raises after receiving lifespan.startup (without
    # sending lifespan.startup.failed itself). The server sees the startup fail; the
    # session the middleware opened on lifespan.startup must not be left open.
    async def raw_host(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            raise RuntimeError("raw host startup crash (test)")

    with no_leaks() as leaks:
        mw = RoundRobinMiddleware(raw_host, pools={"/api": [upstreams[0].url]})
        with pytest.raises(RuntimeError, match="raw host startup crash"):
            async with LifespanManager(mw):
                pytest.fail("startup must not succeed")
        session = session_of(mw)
        still_open = session is not None and not session.closed
        if session is not None:
            await session.close()  # keep the leak out of the other tests
        del mw, session
    assert not still_open, "the aiohttp session opened on lifespan.startup was left open"
    assert leaks == []


# ------------------------------------------------------------------------- independence


@pytest.mark.anyio
async def test_two_instances_share_nothing(upstreams: list[RunningServer]) -> None:
    a, b, _ = upstreams
    pool = Pool([a.url, b.url])  # one config object, used by both instances
    with no_leaks() as leaks:
        first = RoundRobinMiddleware(host_app(), pools={"/api": pool})
        second = RoundRobinMiddleware(host_app(), pools={"/api": pool})
        assert first.transport is not second.transport
        async with LifespanManager(second) as m2, client_for(m2.app) as c2:
            async with LifespanManager(first) as m1, client_for(m1.app) as c1:
                assert session_of(first) is not session_of(second)
                # Each instance keeps its own rotation.
                assert await served_by(c1, 3) == ["a", "b", "a"]
                assert await served_by(c2, 2) == ["a", "b"]
            # Closing the first leaves the second serving on its own open session.
            assert session_of(first) is None
            assert session_of(second) is not None
            assert not session_of(second).closed
            assert await served_by(c2, 3) == ["a", "b", "a"]
        assert session_of(second) is None
        del first, second, m1, m2
    assert leaks == []


@pytest.mark.anyio
async def test_lifespan_twice_with_the_same_instance(upstreams: list[RunningServer]) -> None:
    a, b, _ = upstreams
    events: list[str] = []
    with no_leaks() as leaks:
        mw = RoundRobinMiddleware(host_app(events), pools={"/api": [a.url, b.url]})
        sessions = []
        for _ in range(2):
            async with LifespanManager(mw) as manager, client_for(manager.app) as client:
                sessions.append(session_of(mw))
                assert len(await served_by(client, 2)) == 2
            assert session_of(mw) is None
        assert events == ["startup", "shutdown", "startup", "shutdown"]
        assert sessions[0] is not sessions[1]
        assert all(s.closed for s in sessions)
        del mw, sessions, manager
    assert leaks == []


@pytest.mark.anyio
async def test_a_transport_passed_in_is_not_closed_on_shutdown(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    transport = httpx.AsyncHTTPTransport()
    mw = RoundRobinMiddleware(host_app(), pools={"/api": [a.url]}, transport=transport)
    for _ in range(2):  # still usable after the first shutdown: it is the caller's
        async with LifespanManager(mw) as manager, client_for(manager.app) as client:
            assert await served_by(client, 1) == ["a"]
    await transport.aclose()


# ------------------------------------------------------------------ outside the lifespan


def test_request_after_shutdown_is_served_and_closed_with_its_event_loop(
    upstreams: list[RunningServer],
) -> None:
    # A request that arrives after lifespan shutdown is still served: the transport opens
    # a new session lazily. No second shutdown will come, so the end of the event loop
    # that opened it must close it.
    a = upstreams[0]
    mw = RoundRobinMiddleware(host_app(), pools={"/api": [a.url]})

    async def scenario() -> tuple[Any, Any]:
        async with LifespanManager(mw):
            first = session_of(mw)
        assert first.closed
        async with client_for(mw) as client:
            assert await served_by(client, 2) == ["a", "a"]
        late = session_of(mw)
        assert late is not None
        assert not late.closed
        return first, late

    _first, late = asyncio.run(scenario())
    assert late.closed, "a session reopened after shutdown outlived its event loop"


def test_requests_without_lifespan_leave_no_unclosed_session(
    upstreams: list[RunningServer],
) -> None:
    # TestClient without "with": no lifespan, and every request runs in a new event loop.
    a, b, _ = upstreams
    with no_leaks() as leaks:
        app = host_app()
        app.add_middleware(RoundRobinMiddleware, pools={"/api": [a.url, b.url]})
        client = TestClient(app)
        names = [client.get("/api/x").json()["server"] for _ in range(3)]
        del client, app
    assert names == ["a", "b", "a"]
    assert leaks == []
