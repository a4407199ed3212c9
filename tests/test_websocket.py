"""WebSockets through the pools, end to end: real uvicorn upstreams, the proxy under uvicorn.

The upstreams are small Starlette apps (``WsUpstream``) that record every handshake they
see and every close they get; the client is the ``websockets`` library talking TCP to the
proxy. Nothing waits on a sleep: the tests wait on queues with bounded timeouts, and poll
``snapshot()`` against a deadline where a counter is what they check (the one sleep
paces messages to show that traffic resets the idle timeout). Every server here runs with
``log_config=None`` so that uvicorn does not reconfigure logging and the ``leaks`` fixture
sees every error any server logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import queue
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect

from rr_middleware import Pool, PoolRuntime, RoundRobinMiddleware, Upstream

from .polling import wait_for
from .servers import RunningServer, bind_socket, dead_url, serve
from .upstream_app import values

WAIT = 5.0  # seconds: the bound on any single wait for something that should happen now
MiB = 1024 * 1024
MODES = ("reject", "deny", "bye", "bye-after-first", "crash", "hello", "stream", "flood", "echo")
CRASH = "upstream crashes (test)"
# uvicorn's websockets-sansio logs this after an app answers with websocket.http.response:
# a uvicorn bug, not the proxy's.
SPURIOUS = "ASGI callable returned without completing handshake."


# ------------------------------------------------------------------------------- upstreams


class WsUpstream:
    """A Starlette WebSocket app answering every path; what it does is the first path
    segment found in ``MODES`` (default ``echo``):

    ``reject`` closes before accepting (uvicorn answers 403); ``deny`` answers a plain
    HTTP 401; ``bye`` accepts and closes with 4001 "bye"; ``bye-after-first`` does so after
    the first message; ``crash`` raises after the first message; ``hello`` sends its name,
    then echoes; ``stream`` sends "tick" until the other side closes (``flood``: 64 KiB
    messages); ``echo`` echoes text
    and bytes as they came.
    Accepts with subprotocol ``chat.v1`` when it is offered.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = ""  # set once served
        self.handshakes: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closes: queue.Queue[tuple[int, str]] = queue.Queue()
        self.app = Starlette(routes=[WebSocketRoute("/{path:path}", self.endpoint)])

    def handshake(self) -> dict[str, Any]:
        return self.handshakes.get(timeout=WAIT)

    def close_seen(self) -> tuple[int, str]:
        """The next close the upstream's app received (code, reason), waited for."""
        return self.closes.get(timeout=WAIT)

    async def endpoint(self, websocket: WebSocket) -> None:
        scope = websocket.scope
        self.handshakes.put(
            {
                "path": scope["path"],
                "raw_path": scope.get("raw_path"),
                "query": scope["query_string"],
                "headers": [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                ],
                "subprotocols": list(scope.get("subprotocols") or ()),
            }
        )
        mode = next((s for s in scope["path"].split("/") if s in MODES), "echo")
        if mode == "reject":
            await websocket.close()
            return
        if mode == "deny":
            await websocket.send_denial_response(
                PlainTextResponse("no entry", status_code=401, headers={"www-authenticate": "x"})
            )
            return
        offered = scope.get("subprotocols") or ()
        await websocket.accept(subprotocol="chat.v1" if "chat.v1" in offered else None)
        if mode == "bye":
            await websocket.close(4001, "bye")
            return
        if mode == "hello":
            await websocket.send_text(self.name)
        if mode in ("stream", "flood"):
            await self._stream(websocket, "tick" if mode == "stream" else "f" * 65536)
            return
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                self.closes.put((message.get("code", 1000), message.get("reason") or ""))
                return
            if mode == "bye-after-first":
                await websocket.close(4001, "bye")
                return
            if mode == "crash":
                raise RuntimeError(CRASH)  # uvicorn drops the TCP connection, no close frame
            # The proxy may have closed meanwhile: the close is then the next message.
            with contextlib.suppress(WebSocketDisconnect):
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                else:
                    await websocket.send_bytes(message["bytes"])

    async def _stream(self, websocket: WebSocket, text: str) -> None:
        async def ticks() -> None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                while True:
                    await websocket.send_text(text)
                    await asyncio.sleep(0)  # let the receiving side run

        async with anyio.create_task_group() as group:
            group.start_soon(ticks)
            message = await websocket.receive()
            assert message["type"] == "websocket.disconnect"
            self.closes.put((message.get("code", 1000), message.get("reason") or ""))
            group.cancel_scope.cancel()


@contextmanager
def ws_upstream(name: str) -> Iterator[WsUpstream]:
    upstream = WsUpstream(name)
    with serve(upstream.app, log_config=None) as server:
        upstream.url = server.url
        yield upstream


@pytest.fixture
def a() -> Iterator[WsUpstream]:
    with ws_upstream("a") as upstream:
        yield upstream


@pytest.fixture
def b() -> Iterator[WsUpstream]:
    with ws_upstream("b") as upstream:
        yield upstream


# --------------------------------------------------------------------------- the proxy


async def host_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"host:{websocket.url.path}:{text}")


def host_app() -> Starlette:
    """The wrapped app, with WebSocket routes of its own outside the pools' prefixes."""
    return Starlette(
        routes=[WebSocketRoute("/local-ws", host_echo), WebSocketRoute("/wsx", host_echo)]
    )


@contextmanager
def ws_proxy(
    pools: dict[str, Any], **options: Any
) -> Iterator[tuple[RunningServer, RoundRobinMiddleware]]:
    """The middleware around ``host_app()`` under uvicorn (``proxy_headers=False``: only the
    middleware decides about ``X-Forwarded-*``), as ``running_proxy`` in tests/proxy.py."""
    middleware = RoundRobinMiddleware(host_app(), pools=pools, **options)
    with serve(middleware, proxy_headers=False, log_config=None) as server:
        yield server, middleware


def ws_url(server: RunningServer, target: str) -> str:
    return f"ws://127.0.0.1:{server.port}{target}"


def client(url: str, **options: Any) -> Any:
    """An asyncio client connection (``async with``); never through an environment proxy."""
    settings: dict[str, Any] = {
        "proxy": None,
        "open_timeout": WAIT,
        "close_timeout": WAIT,
        "max_size": 4 * MiB,
    }
    settings.update(options)
    return connect(url, **settings)


def sync_client(url: str, **options: Any) -> Any:
    settings: dict[str, Any] = {"proxy": None, "open_timeout": WAIT, "close_timeout": WAIT}
    settings.update(options)
    return sync_connect(url, **settings)


def open_sockets(runtime: PoolRuntime) -> list[int]:
    return [row["websockets"] for row in runtime.snapshot()]


async def eventually(check: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Poll ``check`` until it holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


async def closed_by_proxy(ws: ClientConnection) -> ConnectionClosed:
    """Read until the connection closes; return how. Any message first is a failure."""
    with anyio.fail_after(WAIT):
        try:
            message = await ws.recv()
        except ConnectionClosed as exc:
            return exc
    raise AssertionError(f"expected the close, got a message {message!r}")


async def echo_until_closed(ws: ClientConnection) -> ConnectionClosed:
    """Send and read back messages until the connection closes; return how."""
    with anyio.fail_after(WAIT):
        try:
            while True:
                await ws.send("busy")
                assert await ws.recv() == "busy"
        except ConnectionClosed as exc:
            return exc


# ------------------------------------------------------------------- nothing left behind


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def leaks() -> Iterator[Records]:
    """After each test (its servers stopped, garbage collected): no task destroyed while
    pending, no exception never retrieved, no error logged by any server (uvicorn logs an
    ASGI app's exception, and tasks it had to cancel at shutdown). Unclosed sockets and
    transports surface as ResourceWarnings, which pytest turns into errors."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("asyncio", "uvicorn.error", "rr_middleware")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
        gc.collect()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    problems = [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in handler.records
        if (r.name == "asyncio" and r.levelno >= logging.ERROR)
        or (
            r.name.startswith("uvicorn")
            and r.levelno >= logging.ERROR
            and SPURIOUS not in r.msg
            and not (r.exc_info and CRASH in str(r.exc_info[1]))
        )
        or "never retrieved" in r.getMessage()
        or "was destroyed" in r.getMessage()
    ]
    assert not problems, problems


# ----------------------------------------------------------------------------- messages


async def test_echo_text_and_binary_both_ways(a: WsUpstream) -> None:
    pool = Pool([a.url])
    one_mib = b"\x00" * 64 + os.urandom(MiB - 128) + b"\x00\xff" * 32
    assert len(one_mib) == MiB
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        async with client(ws_url(server, "/ws/echo")) as ws:
            with anyio.fail_after(WAIT):
                assert open_sockets(runtime) == [1]
                for text in ["hello", "héllo ✓ \x00 nul", "", "x" * 70_000]:
                    await ws.send(text)
                    assert await ws.recv() == text
                for data in [b"\x00", b"\x00\x01\x00\xff\xfe\x00", b"", bytes(range(256)), one_mib]:
                    await ws.send(data)
                    echoed = await ws.recv()
                    assert isinstance(echoed, bytes)
                    assert echoed == data
        assert a.close_seen() == (1000, "")
        await eventually(lambda: open_sockets(runtime) == [0], "the socket is no longer counted")


async def test_subprotocol_is_the_upstreams_choice(a: WsUpstream) -> None:
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        async with client(ws_url(server, "/ws/echo"), subprotocols=["chat.v2", "chat.v1"]) as ws:
            assert ws.subprotocol == "chat.v1"
            assert a.handshake()["subprotocols"] == ["chat.v2", "chat.v1"]
        async with client(ws_url(server, "/ws/echo"), subprotocols=["chat.v2"]) as ws:
            assert ws.subprotocol is None
            assert a.handshake()["subprotocols"] == ["chat.v2"]
        async with client(ws_url(server, "/ws/echo")) as ws:
            assert ws.subprotocol is None
            record = a.handshake()
            assert record["subprotocols"] == []
            assert values(record, "sec-websocket-protocol") == []


# ------------------------------------------------------------------------ the handshake


async def test_path_and_raw_query_reach_the_upstream_exactly(a: WsUpstream) -> None:
    pools = {
        "/ws": Pool([a.url + "/base"]),  # prefix stripped, base path prepended
        "/keep": Pool([a.url], strip_prefix=False),
    }
    query = "x=1&x=2&y=%2F&z=&q=a+b&e=%E2%9C%93"
    cases = [
        (f"/ws/echo/a%2Fb/c?{query}", b"/base/echo/a%2Fb/c", query, "/ws"),
        ("/ws/echo/", b"/base/echo/", "", "/ws"),
        ("/ws?x=1", b"/base", "x=1", "/ws"),
        (f"/keep/echo/a%2Fb?{query}", b"/keep/echo/a%2Fb", query, None),
    ]
    with ws_proxy(pools) as (server, _):
        for target, raw_path, raw_query, prefix in cases:
            async with client(ws_url(server, target)) as ws:
                await ws.send("ping")
                assert await ws.recv() == "ping"
            record = a.handshake()
            assert record["raw_path"] == raw_path, target
            assert record["query"] == raw_query.encode(), target
            assert values(record, "x-forwarded-prefix") == ([prefix] if prefix else []), target


async def test_handshake_headers_pass_and_forwarding_headers_are_set(a: WsUpstream) -> None:
    sent = [
        ("Cookie", "session=abc"),
        ("Cookie", "theme=dark"),
        ("Authorization", "Bearer t0k3n"),
        ("X-Custom", "kept"),
        # A client is not a trusted proxy: none of these may reach the upstream.
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Prefix", "/evil"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
    ]
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        async with client(
            ws_url(server, "/ws/echo"),
            additional_headers=sent,
            origin="https://app.example",
            user_agent_header="rr-test/1.0",
        ):
            record = a.handshake()
    assert values(record, "cookie") == ["session=abc", "theme=dark"]
    assert values(record, "authorization") == ["Bearer t0k3n"]
    assert values(record, "origin") == ["https://app.example"]
    assert values(record, "user-agent") == ["rr-test/1.0"]
    assert values(record, "x-custom") == ["kept"]
    assert values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert values(record, "x-forwarded-proto") == ["http"]
    assert values(record, "x-forwarded-host") == [f"127.0.0.1:{server.port}"]
    assert values(record, "x-forwarded-prefix") == ["/ws"]
    assert values(record, "x-real-ip") == []
    assert values(record, "forwarded") == []
    # The upstream leg's handshake is its own, each header once.
    assert values(record, "host") == [a.url.removeprefix("http://")]
    for name in ("upgrade", "connection", "sec-websocket-key", "sec-websocket-version"):
        assert len(values(record, name)) == 1, (name, record["headers"])
    assert values(record, "sec-websocket-extensions") == []  # no compression upstream


async def test_preserve_host_keeps_the_clients_host(a: WsUpstream) -> None:
    """``Pool(preserve_host=True)`` sends the client's Host upstream, for a WebSocket as
    for a request (README: "send the client's Host instead of the upstream's")."""
    with ws_proxy({"/ws": Pool([a.url], preserve_host=True)}) as (server, _):
        async with client(ws_url(server, "/ws/echo")):
            record = a.handshake()
    assert values(record, "host") == [f"127.0.0.1:{server.port}"]


def test_a_fragment_in_the_request_target_is_not_a_server_error(a: WsUpstream) -> None:
    """A raw client may put "#" in the request target. The proxy may refuse it (4xx) or
    forward the path without it; it must not crash into a 500 (the ``leaks`` fixture also
    fails the test on the "Exception in ASGI application" uvicorn would log)."""
    handshake = (
        "GET {} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        for target in ("/ws/echo#frag", "/ws/echo?x=1#frag"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(handshake.format(target).encode())
                status_line = sock.recv(4096).split(b"\r\n", 1)[0]
            status = int(status_line.split()[1])
            assert status == 101 or 400 <= status < 500, (target, status_line)


def test_upstream_refusal_is_the_clients_status(a: WsUpstream, b: WsUpstream) -> None:
    with ws_proxy({"/ws": [a.url, b.url], "/nowhere": [dead_url()]}) as (server, _):
        for path, status in [("/ws/reject", 403), ("/ws/deny", 401), ("/ws/reject", 403)]:
            with pytest.raises(InvalidStatus) as caught, sync_client(ws_url(server, path)):
                pass
            assert caught.value.response.status_code == status, path
        # A refusal is the upstream's answer, not a failure: no other upstream is tried.
        assert a.handshakes.qsize() + b.handshakes.qsize() == 3
        assert (a.handshakes.qsize(), b.handshakes.qsize()) in [(2, 1), (1, 2)]
        with pytest.raises(InvalidStatus) as caught, sync_client(ws_url(server, "/nowhere/x")):
            pass
        assert caught.value.response.status_code == 502


def test_a_handshake_is_a_get_for_refuse_methods(a: WsUpstream) -> None:
    """The default ``refuse_methods`` (CONNECT, TRACE) leave WebSockets alone; a pool
    refusing GET refuses the handshake too (closed before accepting: uvicorn says 403)."""
    pools = {"/ws": [a.url], "/noget": Pool([a.url], refuse_methods={"GET"})}
    with ws_proxy(pools) as (server, _):
        with sync_client(ws_url(server, "/ws/echo")) as ws:
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
        a.handshake()
        with pytest.raises(InvalidStatus) as caught, sync_client(ws_url(server, "/noget/echo")):
            pass
        assert caught.value.response.status_code == 403
    assert a.handshakes.empty()


def test_a_pools_guard_decides_the_handshake(a: WsUpstream) -> None:
    """The guard sees the handshake (an HTTPConnection: headers, cookies); a refusal
    closes it before the upstream hears of it."""

    def guard(connection: Any) -> bool:
        return connection.headers.get("authorization") == "Bearer ok"

    with ws_proxy({"/ws": Pool([a.url], guard=guard)}) as (server, _):
        with pytest.raises(InvalidStatus) as caught, sync_client(ws_url(server, "/ws/echo")):
            pass
        assert caught.value.response.status_code == 403
        assert a.handshakes.empty()
        headers = {"Authorization": "Bearer ok"}
        with sync_client(ws_url(server, "/ws/echo"), additional_headers=headers) as ws:
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
        assert a.handshake()["path"] == "/echo"


def test_the_access_log_has_a_line_for_every_websocket(
    a: WsUpstream, leaks: Records, caplog: pytest.LogCaptureFixture
) -> None:
    """``access_log=True``: a session relayed (101, its upstream, once it ended), one a
    pool refuses by method (403, none asked), one its upstream refuses (403, that
    upstream), one no upstream takes (502, the upstream asked)."""
    caplog.set_level(logging.INFO, logger="rr_middleware")
    dead = dead_url()
    pools = {"/ws": [a.url], "/noget": Pool([a.url], refuse_methods={"GET"}), "/down": [dead]}
    with ws_proxy(pools, access_log=True) as (server, _):
        with sync_client(ws_url(server, "/ws/echo")) as ws:
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
        for path in ("/noget/echo", "/ws/reject", "/down/x"):
            with pytest.raises(InvalidStatus), sync_client(ws_url(server, path)):
                pass

        def lines() -> list[str]:
            return [r.getMessage() for r in leaks.records if " -> " in r.getMessage()]

        # The relayed session's line comes once its relay has ended.
        wait_for(lambda: len(lines()) == 4, "a line for each WebSocket", WAIT)
    by_path = {line.split()[3]: line.split(" -> ")[1] for line in lines()}
    assert by_path.keys() == {"/ws/echo", "/noget/echo", "/ws/reject", "/down/x"}, lines()
    assert by_path["/ws/echo"].startswith(f"{a.url} 101 in "), by_path
    assert by_path["/noget/echo"].startswith("- 403 in "), by_path
    assert by_path["/ws/reject"].startswith(f"{a.url} 403 in "), by_path
    assert by_path["/down/x"].startswith(f"{dead} 502 in "), by_path
    assert all(line.split()[2] == "GET" for line in lines())


# ------------------------------------------------------------------------------- closing


def test_close_codes_and_reasons_pass_both_ways(a: WsUpstream) -> None:
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        with (
            sync_client(ws_url(server, "/ws/bye")) as ws,
            pytest.raises(ConnectionClosed) as caught,
        ):
            ws.recv(timeout=WAIT)
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4001, "bye")

        with sync_client(ws_url(server, "/ws/echo")) as ws:
            ws.send("hi")
            assert ws.recv(timeout=WAIT) == "hi"
            ws.close(4002, "done")
        assert a.close_seen() == (4002, "done")
        assert (ws.close_code, ws.close_reason) == (4002, "done")  # the echo of our close


async def test_client_dropping_the_tcp_connection_closes_the_upstream(a: WsUpstream) -> None:
    pool = Pool([a.url])
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        ws = await connect(ws_url(server, "/ws/hello"), proxy=None, open_timeout=WAIT)
        with anyio.fail_after(WAIT):
            assert await ws.recv() == "a"
        assert open_sockets(runtime) == [1]
        ws.transport.abort()  # no close frame: the TCP connection just goes
        with anyio.fail_after(WAIT):
            await ws.wait_closed()
        code, _ = await asyncio.to_thread(a.close_seen)
        assert code in (1000, 1001)
        await eventually(lambda: open_sockets(runtime) == [0], "the dropped socket is released")


async def test_close_code_from_upstream_survives_client_traffic(a: WsUpstream) -> None:
    """The upstream closes with 4001 while the client is still sending: the client must
    still get 4001 "bye", not an abnormal closure."""
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        for _ in range(10):
            async with client(ws_url(server, "/ws/bye-after-first")) as ws:
                for i in range(200):
                    await ws.send(f"m{i}")
                closed = await closed_by_proxy(ws)
            assert closed.rcvd is not None, closed
            assert (closed.rcvd.code, closed.rcvd.reason) == (4001, "bye")


async def test_an_upstream_close_during_client_traffic_is_not_a_relay_failure(
    a: WsUpstream, leaks: Records
) -> None:
    """The same race, on the log: the upstream closing normally is not a relay failure."""
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        for _ in range(20):  # a race: the warning shows in some runs, not all
            async with client(ws_url(server, "/ws/bye-after-first")) as ws:
                for i in range(200):
                    await ws.send(f"m{i}")
                await closed_by_proxy(ws)
    failures = [r.getMessage() for r in leaks.records if "relay" in r.getMessage()]
    assert not failures, failures


async def test_client_close_during_upstream_traffic(a: WsUpstream) -> None:
    """The client closes with 4002 while the upstream is still sending: the upstream gets
    4002 "done", and the proxy lets go of both legs at once."""
    pool = Pool([a.url])
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        for _ in range(5):
            # max_queue=None: the test client itself must keep reading to see the close.
            async with client(ws_url(server, "/ws/stream"), max_queue=None) as ws:
                with anyio.fail_after(WAIT):
                    assert await ws.recv() == "tick"
                    await ws.close(4002, "done")
            assert await asyncio.to_thread(a.close_seen) == (4002, "done")
            try:
                await eventually(lambda: open_sockets(runtime) == [0], "the proxy let go", within=2)
            finally:
                # Should it hang on: let it end before the server stops, or its cancelled
                # task's sockets would be reported in whichever test comes next.
                with contextlib.suppress(AssertionError):
                    await eventually(lambda: open_sockets(runtime) == [0], "released", within=15)


async def test_an_upstream_that_dies_closes_the_client_with_1011(a: WsUpstream) -> None:
    pool = Pool([a.url])
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        async with client(ws_url(server, "/ws/crash")) as ws:
            await ws.send("go")
            closed = await closed_by_proxy(ws)
        assert closed.rcvd is not None
        assert closed.rcvd.code == 1011
        await eventually(lambda: open_sockets(runtime) == [0], "the socket is released")


# ------------------------------------------------------------------------------ balancing


async def test_200_concurrent_sockets_round_robin_over_two_upstreams(
    a: WsUpstream, b: WsUpstream
) -> None:
    pool = Pool([a.url, b.url])
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        async with contextlib.AsyncExitStack() as stack:

            async def open_one() -> str:
                ws = await stack.enter_async_context(client(ws_url(server, "/ws/hello")))
                return str(await ws.recv())

            with anyio.fail_after(10):
                names = await asyncio.gather(*(open_one() for _ in range(200)))
            assert abs(names.count("a") - 100) <= 1, names.count("a")
            assert names.count("a") + names.count("b") == 200
            counts = open_sockets(runtime)
            assert counts == [names.count("a"), names.count("b")]
        # All closed by the exit stack (a close handshake each).
        await eventually(lambda: open_sockets(runtime) == [0, 0], "all 200 sockets released")
        assert a.closes.qsize() + b.closes.qsize() == 200


async def test_a_dead_upstream_is_skipped_before_the_client_is_accepted(a: WsUpstream) -> None:
    pool = Pool([dead_url(), a.url])
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        for _ in range(6):
            async with client(ws_url(server, "/ws/hello")) as ws:
                with anyio.fail_after(WAIT):
                    assert await ws.recv() == "a"
        dead, live = runtime.snapshot()
        assert dead["failures"] >= 1
        assert live["failures"] == 0


async def test_an_upstream_that_never_answers_the_handshake_is_skipped(a: WsUpstream) -> None:
    """A listening socket nobody accepts on: the TCP connect works, the handshake never
    comes; after connect_timeout the next upstream takes the socket."""
    blackhole = bind_socket()
    try:
        url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        pool = Pool([url, a.url], connect_timeout=0.3)
        with ws_proxy({"/ws": pool}) as (server, mw):
            runtime = mw.balancer["/ws"]
            started = time.monotonic()
            async with client(ws_url(server, "/ws/hello")) as ws:
                with anyio.fail_after(WAIT):
                    assert await ws.recv() == "a"
            assert 0.25 <= time.monotonic() - started < WAIT
            assert runtime.snapshot()[0]["failures"] == 1
    finally:
        blackhole.close()


# ------------------------------------------------------------------------------- timeouts


async def test_idle_timeout_closes_an_idle_socket_with_1001(a: WsUpstream) -> None:
    pool = Pool([a.url], websocket_idle_timeout=0.3)
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        async with client(ws_url(server, "/ws/echo")) as ws:
            started = time.monotonic()
            closed = await closed_by_proxy(ws)
            elapsed = time.monotonic() - started
        assert closed.rcvd is not None
        assert closed.rcvd.code == 1001
        assert 0.2 <= elapsed < 1.0, elapsed
        await asyncio.to_thread(a.close_seen)  # and the upstream leg is closed too
        await eventually(lambda: open_sockets(runtime) == [0], "the idle socket is released")


async def test_idle_timeout_is_reset_by_messages(a: WsUpstream) -> None:
    pool = Pool([a.url], websocket_idle_timeout=0.5)
    with ws_proxy({"/ws": pool}) as (server, _):
        async with client(ws_url(server, "/ws/echo")) as ws:
            started = time.monotonic()
            for i in range(8):  # about 0.8 s of traffic: longer than the idle timeout
                await asyncio.sleep(0.1)  # pacing, not synchronisation
                await ws.send(f"m{i}")
                with anyio.fail_after(WAIT):
                    assert await ws.recv() == f"m{i}"
            assert time.monotonic() - started > 0.5
            closed = await closed_by_proxy(ws)
        assert closed.rcvd is not None
        assert closed.rcvd.code == 1001


async def test_overall_timeout_closes_an_active_socket_with_1001(a: WsUpstream) -> None:
    pool = Pool([a.url], websocket_timeout=0.5)
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        async with client(ws_url(server, "/ws/echo")) as ws:
            started = time.monotonic()
            closed = await echo_until_closed(ws)  # busy all along: only the timeout ends it
            elapsed = time.monotonic() - started
        assert closed.rcvd is not None
        assert closed.rcvd.code == 1001
        assert 0.4 <= elapsed < 1.5, elapsed
        await asyncio.to_thread(a.close_seen)
        await eventually(lambda: open_sockets(runtime) == [0], "the socket is released")


# ------------------------------------------------------------------ outside the pools


async def test_a_client_that_takes_no_message_is_cut_off(a: WsUpstream) -> None:
    """The upstream streams 64 KiB messages; the client (a raw socket: no library reading
    behind its back) completes the handshake and reads nothing more. Once a send to it
    has waited ``client_send_timeout`` (1 s), its connection is cut and the upstream's
    closed: a client that stops reading cannot hold the proxy or the upstream."""
    pool = Pool([a.url], client_send_timeout=1.0)
    with ws_proxy({"/ws": pool}) as (server, mw):
        runtime = mw.balancer["/ws"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws/flood HTTP/1.1\r\nhost: front\r\nupgrade: websocket\r\n"
            b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"sec-websocket-version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.transport.pause_reading()  # and never read again
        started = time.monotonic()
        await eventually(lambda: open_sockets(runtime) == [0], "the socket released", 15)
        elapsed = time.monotonic() - started
        await asyncio.to_thread(a.close_seen)
        writer.transport.abort()
    assert elapsed < 1.0 + 5.0 + 2.0, elapsed  # the timeout, the upstream's close, slack


async def test_the_host_apps_own_websockets_still_work(a: WsUpstream) -> None:
    with ws_proxy({"/ws": [a.url]}) as (server, _):
        for path in ("/local-ws", "/wsx"):  # "/wsx" is not under "/ws"
            async with client(ws_url(server, path)) as ws:
                await ws.send("hi")
                with anyio.fail_after(WAIT):
                    assert await ws.recv() == f"host:{path}:hi"
    assert a.handshakes.empty()


def test_in_process_upstream_with_testclient() -> None:
    upstream = WsUpstream("inner")
    pool = Pool([Upstream("http://ws.internal/base", app=upstream.app)])
    middleware = RoundRobinMiddleware(host_app(), pools={"/ws": pool})
    with TestClient(middleware) as test_client:
        with test_client.websocket_connect("/ws/echo?x=1&x=2", subprotocols=["chat.v1"]) as ws:
            assert ws.accepted_subprotocol == "chat.v1"
            assert open_sockets(middleware.balancer["/ws"]) == [1]
            ws.send_text("hello")
            assert ws.receive_text() == "hello"
            ws.send_bytes(b"\x00\x01\x00")
            assert ws.receive_bytes() == b"\x00\x01\x00"
            ws.close(4002, "done")
        assert upstream.close_seen() == (4002, "done")
        record = upstream.handshake()
        assert record["raw_path"] == b"/base/echo"
        assert record["query"] == b"x=1&x=2"
        assert values(record, "host") == ["ws.internal"]
        assert values(record, "x-forwarded-prefix") == ["/ws"]
        assert open_sockets(middleware.balancer["/ws"]) == [0]

        with (
            test_client.websocket_connect("/ws/bye") as ws,
            pytest.raises(WebSocketDisconnect) as caught,
        ):
            ws.receive_text()
        assert (caught.value.code, caught.value.reason) == (4001, "bye")

        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            test_client.websocket_connect("/ws/deny"),
        ):
            pass
        assert denied.value.status_code == 401

        with test_client.websocket_connect("/local-ws") as ws:  # the host's own, in process
            ws.send_text("x")
            assert ws.receive_text() == "host:/local-ws:x"


# ------------------------------------------------------------------------ health / state


async def test_a_websocket_that_connects_ends_a_half_open_probe() -> None:
    """An upstream ejected for failures turns half-open when fail_timeout has passed; the
    one WebSocket sent to probe it connects, which must count as a success (as an HTTP
    response does): it is no longer half-open and takes its share again."""
    now = [1000.0]
    placeholder = bind_socket()
    port = placeholder.getsockname()[1]
    placeholder.close()  # nothing listens on port (yet)
    revived = WsUpstream("revived")
    with ws_upstream("b") as b:
        pool = Pool(
            [f"http://127.0.0.1:{port}", b.url], max_fails=1, fail_timeout=10, clock=lambda: now[0]
        )
        with ws_proxy({"/ws": pool}) as (server, mw):
            runtime = mw.balancer["/ws"]
            async with client(ws_url(server, "/ws/hello")) as ws:
                with anyio.fail_after(WAIT):
                    assert await ws.recv() == "b"
            assert runtime.snapshot()[0]["ejected"]
            with serve(revived.app, port=port, log_config=None):
                now[0] += 11  # the ejection has run out: one request may probe
                assert runtime.snapshot()[0]["half_open"]
                names = []
                for _ in range(4):
                    async with client(ws_url(server, "/ws/hello")) as ws:
                        with anyio.fail_after(WAIT):
                            names.append(await ws.recv())
                row = runtime.snapshot()[0]
                assert not row["half_open"], (row, names)
                assert names.count("revived") == 2, names


def test_a_websocket_is_never_hedged(a: WsUpstream, b: WsUpstream) -> None:
    """A pool hedging after a millisecond: the handshake takes longer, and still goes to
    one upstream only (hedging is for HTTP requests that may be sent twice)."""
    with ws_proxy({"/ws": Pool([a.url, b.url], hedge_after=0.001)}) as (proxy, middleware):
        with sync_client(ws_url(proxy, "/ws/echo")) as ws:
            ws.send("once")
            assert ws.recv(timeout=WAIT) == "once"
        runtime = middleware.balancer["/ws"]
        assert runtime.hedging is not None
        assert runtime.hedging.sent == 0
    assert a.handshakes.qsize() + b.handshakes.qsize() == 1
