"""Peers that stall: an upstream that stops reading an upload, a client that leaves while
the proxy waits for the upstream, a client that stalls its upload, an upstream whose
trailer never ends, an upstream whose answer is not HTTP/1.x. Nothing may hang, pile up or
leak, and every answer the client gets is valid HTTP.

The proxy runs under real uvicorn (``tests/proxy.py``), the upstreams are real uvicorn
apps or raw upstreams (``tests/raw_upstream.py``, for what uvicorn will not do), the
clients raw sockets. What the proxy holds is read from outside: its upstream sockets from
``/proc`` (see ``held_sockets``), its in-flight slots from ``middleware.status()``, its
tasks from its own event loop. Nothing sleeps to synchronise: upstreams set events, and a
state that has to settle is polled against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.testclient import TestClient

from rr_middleware import Pool, RoundRobinMiddleware, Upstream
from rr_middleware import client as rr_client
from rr_middleware.client import LINGER_IDLE

from .leaks import LeakLog, held_sockets, leaks, proxy_sockets_to, rss_bytes
from .proxy import aclient, aproxy_state, fault_proxy
from .raw_upstream import RawConnection, RawUpstream, answer_once
from .servers import serve
from .upstream_app import UpstreamApp

Scope = dict[str, Any]
TIMEOUT = 2.0  # the pools' upstream timeout in these tests
BODY_TIMEOUT = 2.0  # the pools' client_body_timeout in these tests
SLACK = 1.0  # scheduling on a loaded 2-core machine, every server in this one process
RELEASE = 1.0  # what the issue allows for freeing everything once the exchange is over


async def within(seconds: float, check: Callable[[], bool | Awaitable[bool]], what: str) -> float:
    """Poll ``check`` until it holds; fail naming ``what`` after ``seconds``. Returns how
    long it took. The pause between polls paces the poll; it synchronises nothing."""
    started = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.01)


def in_flight(middleware: RoundRobinMiddleware) -> int:
    return sum(
        row["in_flight"] for pool in middleware.status()["pools"] for row in pool["upstreams"]
    )


def failures(middleware: RoundRobinMiddleware) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for pool in middleware.status()["pools"]:
        for row in pool["upstreams"]:
            kinds.update(row["failures_by_kind"])
    return kinds


async def leave(writer: asyncio.StreamWriter, abort: bool) -> None:
    """Hang up: a RST (``abort``) or a FIN."""
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# --------------------------------------------------------------------------- upstreams


async def read_head_then_hold(connection: RawConnection) -> None:
    """Reads a request head, then neither reads the body nor answers: the upload fills the
    socket buffers and stops."""
    if await connection.read_head() is not None:
        await connection.hold()


class SleepBeforeReading:
    """A plain ASGI upstream that waits (up to 20 s, or until ``release`` is set) before it
    reads the request body, then answers 200."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 20)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})


class SlowHeaders:
    """Answers after ``delay`` seconds unless the connection closes first. ``started``
    counts requests begun (``all_started`` is set at ``expected``), ``left`` those whose
    connection the proxy closed before the answer."""

    def __init__(self, delay: float, expected: int = 0) -> None:
        self.delay = delay
        self.expected = expected
        self.lock = threading.Lock()
        self.started = 0
        self.left = 0
        self.all_started = threading.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.started += 1
            if self.started == self.expected:
                self.all_started.set()
        while (await receive()).get("more_body", False):
            pass
        try:
            # Once the body is read, receive() returns only when the connection closes.
            message = await asyncio.wait_for(receive(), self.delay)
        except asyncio.TimeoutError:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"late"})
            return
        assert message["type"] == "http.disconnect"
        with self.lock:
            self.left += 1


class BodyReader:
    """Reads request bodies to their end and answers 200 with the size; ``open`` counts
    exchanges begun and not yet ended (ended by the body's end or a disconnect),
    ``disconnected`` those the proxy closed mid-body."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.ended = 0
        self.disconnected = 0

    @property
    def open(self) -> int:
        with self.lock:
            return self.opened - self.ended

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.opened += 1
        try:
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    with self.lock:
                        self.disconnected += 1
                    return
                size += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"%d" % size})
        finally:
            with self.lock:
                self.ended += 1


TRAILER_CAP = 200 * 1024 * 1024


class EndlessTrailer(RawUpstream):
    """Answers each request with a chunked 200 whose body is ``hello`` and whose trailer
    does not end: one field whose value grows 64 KiB at a time (``lines=False``), or
    ever more complete 64-byte fields (``lines=True``), up to 200 MiB. ``cut`` is set
    when the connection breaks under it; ``written`` is how much trailer it had sent."""

    def __init__(self, lines: bool) -> None:
        super().__init__()
        self.lines = lines
        self.written = 0
        self.cut = threading.Event()
        self.cut_after = 0.0

    async def handle(self, connection: RawConnection) -> None:
        if await connection.read_head() is None:
            return
        start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        if self.lines:
            piece = (b"x-t: " + b"a" * 57 + b"\r\n") * 1024
        else:
            start += b"x-big: "
            piece = b"a" * 65536
        connection.writer.write(start)
        started = time.monotonic()
        while self.written < TRAILER_CAP:
            sent = await connection.send(piece)
            self.written += len(piece)
            if not sent:
                self.cut_after = time.monotonic() - started
                self.cut.set()
                return


# --------------------------------------------------------------------------- clients


async def upload(
    port: int, method: bytes, path: bytes, size: int, send_at_most: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[int]]:
    """Open a connection and start a ``method`` with a ``size``-byte Content-Length body,
    written as fast as the proxy takes it (``send_at_most`` bytes of it, then stall).
    Returns the reader, the writer and the task writing the body (its result: bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"%s %s HTTP/1.1\r\nhost: front\r\ncontent-length: %d\r\n\r\n" % (method, path, size)
    )
    limit = size if send_at_most is None else send_at_most

    async def pump() -> int:
        sent = 0
        piece = b"u" * 65536
        with contextlib.suppress(ConnectionError):
            while sent < limit:
                part = piece[: limit - sent]
                writer.write(part)
                sent += len(part)
                await writer.drain()
        return sent

    return reader, writer, asyncio.ensure_future(pump())


async def answer_head(reader: asyncio.StreamReader, seconds: float) -> bytes:
    with anyio.fail_after(seconds):
        return await reader.readuntil(b"\r\n\r\n")


# ------------------------------------------------------------------ 1. uploads nobody reads


@pytest.mark.parametrize("method", [b"POST", b"PUT"])
@pytest.mark.parametrize("kind", ["raw", "uvicorn"])
async def test_upload_the_upstream_does_not_read_times_out(
    leak_log: LeakLog, kind: str, method: bytes
) -> None:
    """A 32 MiB upload to an upstream that took the head and reads no more (a raw upstream
    that never reads; a uvicorn app that sleeps 20 s before reading): the client gets 504
    within ``timeout`` (2 s) of the upload stalling, not when the upstream wakes up; then
    the proxy holds no socket to the upstream, no in-flight slot and no extra task within
    a second."""
    sleeper = SleepBeforeReading()
    with contextlib.ExitStack() as stack:
        if kind == "raw":
            upstream: Any = stack.enter_context(RawUpstream(read_head_then_hold))
        else:
            upstream = stack.enter_context(serve(sleeper))
        pool = Pool([upstream.url], timeout=TIMEOUT, max_fails=0)
        proxy, middleware, _ = stack.enter_context(fault_proxy({"/p": pool}, leak_log))
        async with aclient() as http:
            idle = await aproxy_state(http, proxy)
            started = time.monotonic()
            reader, writer, pumping = await upload(proxy.port, method, b"/p/up", 32 * 2**20)
            head = await answer_head(reader, TIMEOUT + 10)
            elapsed = time.monotonic() - started
            pumping.cancel()
            await leave(writer, abort=True)
            assert head.startswith(b"HTTP/1.1 504 "), head
            assert TIMEOUT <= elapsed < TIMEOUT + SLACK, elapsed
            await within(
                RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets closed"
            )
            assert in_flight(middleware) == 0
            await within(
                RELEASE,
                lambda: _tasks_at_most(http, proxy, idle["tasks"]),
                "the proxy's tasks back to idle",
            )
            assert failures(middleware) == {"timeout": 1}
        sleeper.release.set()
    assert not leaks(leak_log), leaks(leak_log)


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_other_transports_time_out_an_upload_the_upstream_does_not_read(
    leak_log: LeakLog, transport: str
) -> None:
    """The same stall through the httpx and aiohttp adapters (their own write and read
    timeouts, set from ``timeout``): a 504 within ``timeout``, nothing held after."""
    if transport == "httpx":
        chosen: Any = httpx.AsyncHTTPTransport()
    else:
        from rr_middleware import AiohttpTransport

        chosen = AiohttpTransport()
    with RawUpstream(read_head_then_hold) as upstream:
        pool = Pool([upstream.url], timeout=TIMEOUT, max_fails=0, transport=chosen)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, middleware, _):
            started = time.monotonic()
            reader, writer, pumping = await upload(proxy.port, b"POST", b"/p/up", 32 * 2**20)
            head = await answer_head(reader, TIMEOUT + 10)
            elapsed = time.monotonic() - started
            pumping.cancel()
            await leave(writer, abort=True)
            assert head.startswith(b"HTTP/1.1 504 "), head
            assert TIMEOUT <= elapsed < TIMEOUT + SLACK, elapsed
            await within(RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets")
            assert in_flight(middleware) == 0
    assert not leaks(leak_log), leaks(leak_log)


async def _tasks_at_most(http: httpx.AsyncClient, proxy: Any, tasks: int) -> bool:
    return (await aproxy_state(http, proxy))["tasks"] <= tasks


async def test_client_leaving_an_upload_the_upstream_does_not_read_frees_everything(
    leak_log: LeakLog,
) -> None:
    """The client of a stalled 32 MiB upload gives up after 2 s of its own (as an httpx
    client with ``timeout=2`` does) and leaves. The upstream socket, the in-flight slot and
    the request's tasks are freed within a second of that. (While the upstream is not
    reading, the ASGI server has stopped reading the client too, so the client's leaving
    cannot be seen; the proxy's own send timeout, ``timeout``, ends the exchange.)"""
    with RawUpstream(read_head_then_hold) as upstream:
        pool = Pool([upstream.url], timeout=TIMEOUT, max_fails=0)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, middleware, _):
            async with aclient() as http:
                idle = await aproxy_state(http, proxy)
                _, writer, pumping = await upload(proxy.port, b"POST", b"/p/up", 32 * 2**20)
                await within(
                    5, lambda: len(upstream.requests) == 1, "the upload reaching the upstream"
                )
                # The client's own write timeout: no progress for TIMEOUT seconds.
                while True:
                    before = pumping.done() or writer.transport.get_write_buffer_size()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(pumping), TIMEOUT)
                    if pumping.done() or writer.transport.get_write_buffer_size() == before:
                        break
                pumping.cancel()
                await leave(writer, abort=False)
                await within(RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets")
                assert in_flight(middleware) == 0
                await within(
                    RELEASE,
                    lambda: _tasks_at_most(http, proxy, idle["tasks"]),
                    "tasks back to idle",
                )
    assert not leaks(leak_log), leaks(leak_log)


# --------------------------------------------------------------------------- 2. endless trailers


@pytest.mark.parametrize("lines", [False, True], ids=["one-growing-field", "many-fields"])
async def test_endless_trailer_is_cut_off(leak_log: LeakLog, lines: bool) -> None:
    """An upstream whose chunked response has a trailer that never ends (one field growing
    without end, or field after field): the proxy counts it against the head's limit
    (64 KiB), closes the upstream connection and aborts the client's response (no
    terminating chunk: the client cannot take it as complete). The upstream's writes fail
    within a second and a few MiB; the proxy's memory does not grow with the trailer; a
    fall-through request meanwhile is answered at once."""
    with EndlessTrailer(lines) as upstream:
        with fault_proxy({"/t": Pool([upstream.url], max_fails=0)}, leak_log) as (proxy, mw, _):
            async with aclient() as http:
                await aproxy_state(http, proxy)
                gc.collect()
                before = rss_bytes()
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"GET /t/x HTTP/1.1\r\nhost: front\r\n\r\n")
                started = time.monotonic()
                await aproxy_state(http, proxy)  # fall-through, during the flood
                fall_through = time.monotonic() - started
                with anyio.fail_after(10):
                    received = await reader.read(-1)  # to EOF
                await leave(writer, abort=False)
                assert await asyncio.to_thread(upstream.cut.wait, 10), "upstream never cut off"
                growth = rss_bytes() - before
        assert received.startswith(b"HTTP/1.1 200 "), received[:100]
        assert b"\r\n\r\n5\r\nhello\r\n" in received
        assert not received.endswith(b"0\r\n\r\n"), "an aborted response looks complete"
        assert upstream.cut_after < 1.0, upstream.cut_after
        assert upstream.written < 16 * 2**20, upstream.written
        assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB"
        assert fall_through < 0.5, fall_through
        assert failures(mw) == {"protocol": 1}
    assert not leaks(leak_log), leaks(leak_log)


async def test_a_short_trailer_still_passes(leak_log: LeakLog) -> None:
    """The limit spares what is normal: a chunked response with a trailer of a few fields
    arrives whole (the trailer itself is not relayed)."""
    response = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-sum: 1234\r\nx-other: 5\r\n\r\n"
    )
    with (
        RawUpstream(answer_once(response)) as upstream,
        fault_proxy({"/t": Pool([upstream.url])}, leak_log) as (proxy, _, _),
    ):
        async with aclient() as http:
            answer = await http.get(f"{proxy.url}/t/x")
    assert (answer.status_code, answer.content) == (200, b"hello")


# --------------------------------------------------------------------------- 3. not HTTP/1.x


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/1.1 000 Zero",
        b"HTTP/1.1 099 Low",
        b"HTTP/1.1 600 High",
        b"HTTP/1.1 999 Nine",
        b"HTTP/2.0 200 OK",
    ],
)
async def test_an_answer_that_is_not_http1_is_a_502(leak_log: LeakLog, status_line: bytes) -> None:
    """A status outside 100..599, or a version other than HTTP/1.x on an HTTP/1.1
    connection: the client gets a whole 502, and the upstream a ``protocol`` failure."""
    response = status_line + b"\r\ncontent-length: 2\r\n\r\nok"
    with (
        RawUpstream(answer_once(response)) as upstream,
        fault_proxy({"/b": Pool([upstream.url])}, leak_log) as (proxy, middleware, _),
    ):
        async with aclient() as http:
            answer = await http.get(f"{proxy.url}/b/x")
        assert answer.status_code == 502
        assert answer.text == "502 Bad Gateway\n"
        assert failures(middleware) == {"protocol": 1}
    assert not leaks(leak_log), leaks(leak_log)


def test_an_in_process_upstream_answering_status_999_is_a_502() -> None:
    """Any transport, not only the built-in one: an in-process app (through httpx)
    answering 999 gives the client a 502, counted as a protocol failure."""

    async def odd(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 999, "headers": []})
        await send({"type": "http.response.body", "body": b"?"})

    middleware = RoundRobinMiddleware(
        Starlette(), pools={"/o": Pool([Upstream("http://odd", app=odd)])}
    )
    with TestClient(middleware) as http:
        answer = http.get("/o/x")
    assert answer.status_code == 502
    assert failures(middleware) == {"protocol": 1}


# ------------------------------------------------------------------ 5. clients leaving early


async def test_clients_leaving_while_waiting_for_headers_end_the_upstream_exchange(
    leak_log: LeakLog,
) -> None:
    """50 clients send a GET to an upstream that answers after 15 s, and leave (half with a
    FIN, half with a RST) once the upstream holds all 50. Within a second the proxy holds
    no socket to the upstream and no in-flight slot, and the upstream has seen every one
    of its 50 connections close (nginx aborts the upstream request the same way)."""
    clients = 50
    slow = SlowHeaders(delay=15.0, expected=clients)
    with serve(slow) as upstream:
        pool = Pool([upstream.url], max_connections=clients, max_fails=0)
        with fault_proxy({"/s": pool}, leak_log) as (proxy, middleware, _):
            async with aclient() as http:
                idle = await aproxy_state(http, proxy)
                writers = []
                for number in range(clients):
                    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                    writer.write(b"GET /s/%d HTTP/1.1\r\nhost: front\r\n\r\n" % number)
                    writers.append(writer)
                assert await asyncio.to_thread(slow.all_started.wait, 10)
                assert held_sockets(upstream.port) == clients
                assert in_flight(middleware) == clients
                for number, writer in enumerate(writers):
                    await leave(writer, abort=bool(number % 2))
                took = await within(
                    RELEASE,
                    lambda: held_sockets(upstream.port) == 0 and in_flight(middleware) == 0,
                    "upstream sockets and in-flight slots freed",
                )
                await within(RELEASE, lambda: slow.left == clients, "the upstream seeing them go")
                await within(
                    RELEASE,
                    lambda: _tasks_at_most(http, proxy, idle["tasks"]),
                    "tasks back to idle",
                )
                print(f"freed {clients} upstream exchanges in {took * 1000:.0f} ms")
                assert failures(middleware) == {}, "a client leaving is not the upstream's failure"
    assert not leaks(leak_log), leaks(leak_log)


# --------------------------------------------------------------------------- 6. stalled uploads


async def test_stalled_uploads_get_408_and_hold_no_upstream_connection(leak_log: LeakLog) -> None:
    """200 clients each send 1 KiB of a declared 1 MiB POST and stall, against a pool of 2
    upstreams x ``max_connections=100``. None of them takes an upstream connection (a body
    is read up to ``retry_body_limit`` before an upstream is picked), so meanwhile a steady
    client's GETs and POSTs all get 200 at once; after ``client_body_timeout`` each staller
    gets a 408 (with ``Connection: close``)."""
    stallers = 200
    a, b = UpstreamApp("a"), UpstreamApp("b")
    with serve(a) as ua, serve(b) as ub:
        pool = Pool([ua.url, ub.url], max_connections=100, client_body_timeout=BODY_TIMEOUT)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, middleware, _):
            async with aclient() as http:
                await aproxy_state(http, proxy)
                started = time.monotonic()
                opened = [
                    await upload(proxy.port, b"POST", b"/p/stall", 2**20, send_at_most=1024)
                    for _ in range(stallers)
                ]
                answers = [
                    asyncio.ensure_future(answer_head(r, BODY_TIMEOUT + 10)) for r, _, _ in opened
                ]
                steady: list[tuple[int, float]] = []
                while not all(answer.done() for answer in answers):
                    sent = time.monotonic()
                    if len(steady) % 2:
                        response = await http.post(f"{proxy.url}/p/steady", content=b"x" * 1000)
                    else:
                        response = await http.get(f"{proxy.url}/p/steady")
                    steady.append((response.status_code, time.monotonic() - sent))
                    assert time.monotonic() - started < BODY_TIMEOUT + 10
                heads = [answer.result() for answer in answers]
                elapsed = time.monotonic() - started
                for _, writer, pumping in opened:
                    pumping.cancel()
                    await leave(writer, abort=True)
                assert in_flight(middleware) == 0
    assert all(head.startswith(b"HTTP/1.1 408 ") for head in heads), Counter(h[:12] for h in heads)
    assert all(b"connection: close" in head.lower() for head in heads)
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + SLACK + 1, elapsed
    assert len(steady) > 10
    assert all(status == 200 for status, _ in steady), steady
    assert max(seconds for _, seconds in steady) < 0.5, max(steady, key=lambda s: s[1])
    assert all(r["raw_path"] == "/steady" for r in [*a.requests, *b.requests])
    assert not leaks(leak_log), leaks(leak_log)


async def test_a_stalled_streaming_upload_frees_its_upstream_connection(leak_log: LeakLog) -> None:
    """A client sends 100 KiB of a declared 1 MiB (past ``retry_body_limit``, so the body
    streams to the upstream) and stalls: after ``client_body_timeout`` it gets 408, and the
    upstream connection it held is closed (the upstream sees the body cut off) and its
    in-flight slot freed."""
    reader_app = BodyReader()
    with serve(reader_app) as upstream:
        pool = Pool([upstream.url], client_body_timeout=BODY_TIMEOUT, max_fails=0)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, middleware, _):
            async with aclient() as http:
                idle = await aproxy_state(http, proxy)
                started = time.monotonic()
                reader, writer, pumping = await upload(
                    proxy.port, b"POST", b"/p/stall", 2**20, send_at_most=100 * 1024
                )
                await within(5, lambda: reader_app.open == 1, "the body streaming upstream")
                assert held_sockets(upstream.port) == 1
                head = await answer_head(reader, BODY_TIMEOUT + 10)
                elapsed = time.monotonic() - started
                pumping.cancel()
                await leave(writer, abort=True)
                await within(RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets")
                assert in_flight(middleware) == 0
                await within(RELEASE, lambda: reader_app.disconnected == 1, "the upstream told")
                await within(
                    RELEASE,
                    lambda: _tasks_at_most(http, proxy, idle["tasks"]),
                    "tasks back to idle",
                )
                assert failures(middleware) == {}, "a stalled client is not the upstream's failure"
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + SLACK, elapsed
    assert not leaks(leak_log), leaks(leak_log)


async def test_a_slow_but_steady_upload_is_not_cut_off(leak_log: LeakLog) -> None:
    """The body timeout is an idle timeout: an upload that keeps sending, more slowly than
    one part per ``client_body_timeout`` overall but never pausing that long, goes through
    whole."""
    reader_app = BodyReader()
    with serve(reader_app) as upstream:
        pool = Pool([upstream.url], client_body_timeout=0.5)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            parts = 8

            async def slowly() -> Any:
                for _ in range(parts):
                    yield b"s" * 20_000
                    await asyncio.sleep(0.2)  # the client's pace, not a synchronisation

            async with aclient() as http:
                response = await http.post(f"{proxy.url}/p/slow", content=slowly())
    assert (response.status_code, response.text) == (200, str(parts * 20_000))


# ------------------------------------------------------------------ a client that stops reading


class EndlessBody(RawUpstream):
    """Answers each request with a chunked 200 whose body never ends (64 KiB chunks, as
    fast as they are taken); ``cut`` is set when the connection breaks under it."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = threading.Event()

    async def handle(self, connection: RawConnection) -> None:
        if await connection.read_head() is None:
            return
        connection.writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"d" * 65536)
        while await connection.send(chunk):
            pass
        self.cut.set()


async def test_a_client_that_stops_reading_is_cut_off(leak_log: LeakLog) -> None:
    """A client asks for an endless download and reads none of it. Once one send to it has
    waited ``client_send_timeout`` (1 s here), the proxy aborts its connection, closes the
    upstream connection and frees the slot: a client that stops reading cannot hold an
    upstream (nginx's ``send_timeout``)."""
    send_timeout = 1.0
    with EndlessBody() as upstream:
        pool = Pool([upstream.url], client_send_timeout=send_timeout, max_fails=0)
        with fault_proxy({"/d": pool}, leak_log) as (proxy, middleware, _):
            async with aclient() as http:
                idle = await aproxy_state(http, proxy)
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.transport.pause_reading()  # and never read
                writer.write(b"GET /d/x HTTP/1.1\r\nhost: front\r\n\r\n")
                started = time.monotonic()
                assert await asyncio.to_thread(upstream.cut.wait, send_timeout + 10)
                elapsed = time.monotonic() - started
                await within(RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets")
                assert in_flight(middleware) == 0
                # Its connection is cut (a reset), not closed: a close would wait, buffers
                # full, for a client that reads nothing.
                client_port = writer.get_extra_info("sockname")[1]
                await within(
                    RELEASE,
                    lambda: proxy_sockets_to(proxy.port, client_port) == 0,
                    "the proxy's socket to the client closed",
                )
                writer.transport.resume_reading()
                with anyio.fail_after(10):
                    received = b""
                    with contextlib.suppress(ConnectionError):
                        while part := await reader.read(2**20):
                            received += part
                await leave(writer, abort=True)
                await within(
                    RELEASE,
                    lambda: _tasks_at_most(http, proxy, idle["tasks"]),
                    "tasks back to idle",
                )
                assert failures(middleware) == {}, "a slow client is not the upstream's failure"
    assert not received.endswith(b"0\r\n\r\n"), "an aborted response looks complete"
    assert send_timeout <= elapsed < send_timeout + SLACK + 1, elapsed
    assert not leaks(leak_log), leaks(leak_log)


# ------------------------------------------------------------------ review findings


async def test_a_dripping_upload_is_cut_off_by_the_minimum_rate(leak_log: LeakLog) -> None:
    """A client sends 64 KiB + 1 byte (so the body streams to an upstream, which it
    holds), then a byte every 0.2 s: never a pause of ``client_body_timeout`` (1 s), so
    only ``client_body_min_rate`` (500 bytes/s here) can end it: within about the timeout
    it gets 408, and the upstream connection is closed."""
    reader_app = BodyReader()
    with serve(reader_app) as upstream:
        pool = Pool([upstream.url], client_body_timeout=1.0, client_body_min_rate=500)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, middleware, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /p/drip HTTP/1.1\r\nhost: front\r\ncontent-length: 1000000\r\n\r\n")
            writer.write(b"d" * (64 * 1024 + 1))
            started = time.monotonic()
            answer = asyncio.ensure_future(answer_head(reader, 15))
            while not answer.done() and time.monotonic() - started < 15:
                writer.write(b"d")
                await writer.drain()
                await asyncio.sleep(0.2)  # the client's drip, not a synchronisation
            head = await answer
            elapsed = time.monotonic() - started
            await leave(writer, abort=True)
            await within(RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets")
            assert in_flight(middleware) == 0
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert elapsed < 1.0 + 1.0 + SLACK, elapsed  # the timeout, a few drips' credit, a tick
    assert reader_app.disconnected == 1


async def upload_rest_then_read_end(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parts: int, pace: float = 0.0
) -> bytes:
    """Send ``parts`` more 1000-byte parts of the body, ``pace`` seconds apart (the
    client's pace, not a synchronisation), then read to the connection's end, which must
    come within a linger's idle time of the last part; hang up. What came before the end."""
    for _ in range(parts):
        if pace:
            await asyncio.sleep(pace)
        writer.write(b"u" * 1000)
        await writer.drain()
    with anyio.fail_after(LINGER_IDLE + SLACK):
        rest = await reader.read(-1)
    await leave(writer, abort=True)
    return rest


def early_upstream(case: str) -> Callable[[RawConnection], Awaitable[None]]:
    """An upstream that answers 413 as soon as it has the head, before reading the body
    (``upstream-broke``: that resets the connection instead)."""

    async def handle(connection: RawConnection) -> None:
        if await connection.read_head() is None:
            return
        if case == "upstream-broke":
            connection.writer.transport.abort()
            return
        await connection.send(b"HTTP/1.1 413 Too Big\r\ncontent-length: 3\r\n\r\nbig")
        await connection.hold()

    return handle


def early_answer_pool(url: str, case: str) -> Pool:
    """A pool that answers a POST before reading its body, in the way ``case`` names."""
    return Pool(
        [url],
        max_body_size=1000 if case == "413-up-front" else None,
        refuse_methods={"POST"} if case == "405-refused" else {"CONNECT", "TRACE"},
        guard=(lambda request: False) if case == "guard" else None,
        request_buffer_size=0,
        retries=0,
    )


@pytest.mark.parametrize("case", ["413-up-front", "405-refused", "upstream-answers-early"])
async def test_an_answer_given_before_the_body_was_read_closes_the_connection(
    leak_log: LeakLog, case: str
) -> None:
    """An answer that leaves the request body unread (a 413 said up front, a refused
    method, an upstream answering before it read the upload) says ``Connection: close``,
    and the connection closes: it cannot carry another request, and left open it would
    wait for that body with no timer running."""

    with RawUpstream(early_upstream(case)) as upstream:
        pool = early_answer_pool(upstream.url, case)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            # The head and 1000 bytes in one write, read by the server together: bytes that
            # arrived after its last read would make its close a reset (the servers close
            # without lingering), which could cut the answer short.
            writer.write(
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 100000\r\n\r\n" + b"u" * 1000
            )
            head = await answer_head(reader, 10)
            with anyio.fail_after(RELEASE + 1):
                rest = await reader.read(-1)  # to the end: the proxy closes
            await leave(writer, abort=True)
    expected = {"413-up-front": b"413", "405-refused": b"405", "upstream-answers-early": b"413"}
    assert head.startswith(b"HTTP/1.1 " + expected[case]), head
    assert b"connection: close" in head.lower(), head
    assert len(rest) < 100, rest


@pytest.mark.parametrize(
    "case", ["413-up-front", "405-refused", "guard", "upstream-broke", "upstream-answers-early"]
)
async def test_an_early_answer_lingers_for_the_body_the_client_is_still_sending(
    leak_log: LeakLog, case: str
) -> None:
    """nginx's lingering close: an answer given before the request body was read (the
    proxy's own 413, 405 or 502, a guard's 403, an upstream's 413 given before it read the
    body, whose writer to the upstream then stops) goes out whole at once, but its end waits
    while the client goes on sending the body, which is read and dropped. The close that
    follows finds nothing unread: the client sends all of it after reading the answer, then
    reads the connection's end, never a reset. (Closed at once, the bytes sent after the
    close are answered with a reset, which clients report instead of the answer.)"""

    with RawUpstream(early_upstream(case)) as upstream:
        pool = early_answer_pool(upstream.url, case)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 200000\r\n\r\n"
                + b"u" * 1000  # the start of the body: the upstream's exchange begins with it
            )
            head = await answer_head(reader, 10)
            length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r")[0])
            with anyio.fail_after(10):
                answer = await reader.readexactly(length)  # whole, before the body is sent
            # The body is in: the answer ends, then the close.
            rest = await upload_rest_then_read_end(reader, writer, 199)
    expected = {
        "413-up-front": 413,
        "405-refused": 405,
        "guard": 403,
        "upstream-broke": 502,
        "upstream-answers-early": 413,
    }
    assert head.startswith(b"HTTP/1.1 %d " % expected[case]), head
    assert b"connection: close" in head.lower(), head
    assert answer, head
    assert rest == b""


async def test_an_early_answer_over_aiohttp_lingers_once_its_body_writer_stopped(
    leak_log: LeakLog,
) -> None:
    """The same early answer over ``AiohttpTransport``: the body's writer to the upstream
    (aiohttp's task, reading the client's body) has stopped by the time the response is
    closed, so the answer lingers for the rest of the body as the only reader of it, and
    the client reads the answer, then the connection's end, never a reset."""
    from rr_middleware import AiohttpTransport

    with RawUpstream(early_upstream("upstream-answers-early")) as upstream:
        pool = Pool([upstream.url], request_buffer_size=0, retries=0, transport=AiohttpTransport())
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 200000\r\n\r\n" + b"u" * 1000
            )
            head = await answer_head(reader, 10)
            length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r")[0])
            with anyio.fail_after(10):
                answer = await reader.readexactly(length)
            rest = await upload_rest_then_read_end(reader, writer, 199)
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"connection: close" in head.lower(), head
    assert answer, head
    assert rest == b""


async def test_an_upstreams_early_chunked_answer_is_framed_by_length_and_lingers_past_send_timeout(
    leak_log: LeakLog,
) -> None:
    """An upstream answers at once with a chunked body, before it read the upload: the
    client gets it with a Content-Length, so it sees the answer's end before the proxy
    lingers (chunked, the end would come only after the lingering), and lingering longer
    than ``client_send_timeout`` (0.5 s) is not taken for a client that stopped reading:
    the upload goes on at the client's pace and the connection ends with a close."""

    async def upstream_side(connection: RawConnection) -> None:
        if await connection.read_head() is not None:
            await connection.send(
                b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n"
                b"7\r\nwho are\r\n5\r\n you?\r\n0\r\n\r\n"
            )
            await connection.hold()

    with RawUpstream(upstream_side) as upstream:
        pool = Pool([upstream.url], request_buffer_size=0, client_send_timeout=0.5)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 5000\r\n\r\n" + b"u" * 1000
            )
            head = await answer_head(reader, 10)
            with anyio.fail_after(10):
                answer = await reader.readexactly(12)
            # The rest, over longer than client_send_timeout.
            rest = await upload_rest_then_read_end(reader, writer, 4, pace=0.25)
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert b"content-length: 12\r\n" in head.lower(), head
    assert b"transfer-encoding" not in head.lower(), head
    assert answer == b"who are you?"
    assert rest == b""


async def test_an_early_answer_to_a_client_waiting_for_100_continue_does_not_linger(
    leak_log: LeakLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sent ``Expect: 100-continue`` and got a final answer instead sends
    no body: the proxy closes as soon as the answer is out, without lingering."""
    # A proxy that lingered would hold the connection for a minute.
    monkeypatch.setattr(rr_client, "LINGER_IDLE", 60.0)
    monkeypatch.setattr(rr_client, "LINGER_TIME", 60.0)
    with RawUpstream(answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")) as upstream:
        pool = Pool([upstream.url], max_body_size=1000)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 200000\r\n"
                b"expect: 100-continue\r\n\r\n"
            )
            head = await answer_head(reader, 10)
            with anyio.fail_after(RELEASE + SLACK):
                rest = await reader.read(-1)
            await leave(writer, abort=True)
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert rest == b"413 Content Too Large\n"


async def test_a_response_hook_failing_on_an_early_answer_lingers_as_the_only_reader(
    leak_log: LeakLog,
) -> None:
    """The upstream answers before it read the upload and ``on_response`` fails: the 500
    lingers for the rest of the body only once the body's writer to the upstream has
    stopped. Two readers of ``receive`` would split the body's messages (each seeing its
    end), and the upstream connection could go back to the pool with its body cut short,
    the next request written into it."""
    readers = {"now": 0, "most": 0}

    def failing(request: Any, response: Any) -> None:
        raise RuntimeError("a bug in the hook")

    async def answer_then_read(connection: RawConnection) -> None:
        if await connection.read_head() is not None:
            await connection.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            await connection.wait_eof()

    with RawUpstream(answer_then_read) as upstream:
        pool = Pool([upstream.url], on_response=failing, request_buffer_size=0, retries=0)
        middleware = RoundRobinMiddleware(Starlette(), pools={"/p": pool})

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            async def counting_receive() -> Any:
                readers["now"] += 1
                readers["most"] = max(readers["most"], readers["now"])
                try:
                    return await receive()
                finally:
                    readers["now"] -= 1

            await middleware(scope, counting_receive if scope["type"] == "http" else receive, send)

        with serve(counted, proxy_headers=False) as proxy:
            leak_log.watch()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 200000\r\n\r\n" + b"u" * 1000
            )
            head = await answer_head(reader, 10)
            rest = await upload_rest_then_read_end(reader, writer, 199)
    assert head.startswith(b"HTTP/1.1 500 "), head
    assert b"connection: close" in head.lower(), head
    assert rest == b"500 Internal Server Error\n"
    assert readers["most"] == 1


@pytest.mark.parametrize("case", ["guard-file", "413-on-the-last-part"])
async def test_an_early_answer_to_a_whole_body_closes_without_waiting(
    leak_log: LeakLog, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, case: str
) -> None:
    """Nothing is left to linger for: a guard's ``FileResponse`` (which reads ``receive``
    itself, for the disconnect) to a body sent whole, and a 413 raised by the body's last
    part: the connection closes as soon as the answer is out."""
    monkeypatch.setattr(rr_client, "LINGER_IDLE", 60.0)  # a lingering proxy would hold on
    monkeypatch.setattr(rr_client, "LINGER_TIME", 60.0)
    page = tmp_path / "refused.txt"
    page.write_bytes(b"go away\n")

    def refuse(request: Any) -> Any:
        return FileResponse(page, status_code=403)

    with RawUpstream(answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")) as upstream:
        if case == "guard-file":
            pool = Pool([upstream.url], guard=refuse)
            request = b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 5\r\n\r\nhello"
        else:
            pool = Pool([upstream.url], max_body_size=1000)
            request = (
                b"POST /p/x HTTP/1.1\r\nhost: front\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"bb8\r\n"
                + b"u" * 3000
                + b"\r\n0\r\n\r\n"
            )
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(request)
            head = await answer_head(reader, 10)
            with anyio.fail_after(RELEASE + SLACK):
                rest = await reader.read(-1)
            await leave(writer, abort=True)
    expected = {"guard-file": (403, b"go away\n"), "413-on-the-last-part": (413, None)}
    status, body = expected[case]
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert body is None or rest == body, rest


@pytest.mark.parametrize("transport", ["default", "httpx", "aiohttp"])
async def test_an_upstream_dripping_its_head_is_cut_off_by_timeout(
    leak_log: LeakLog, transport: str
) -> None:
    """An upstream that sends its response head a byte every 0.2 s: ``timeout`` (1 s)
    bounds the head as a whole, in every transport (the libraries' own read timeouts
    start again at each byte)."""

    async def drip(connection: RawConnection) -> None:
        if await connection.read_head() is None:
            return
        for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"z" * 100:
            if not await connection.send(bytes([byte])):
                return
            await asyncio.sleep(0.2)  # the upstream's drip

    chosen: Any = None
    if transport == "httpx":
        chosen = httpx.AsyncHTTPTransport()
    elif transport == "aiohttp":
        from rr_middleware import AiohttpTransport

        chosen = AiohttpTransport()
    with RawUpstream(drip) as upstream:
        pool = Pool([upstream.url], timeout=1.0, max_fails=0, transport=chosen)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            async with aclient() as http:
                started = time.monotonic()
                response = await http.get(f"{proxy.url}/p/x")
                elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert 1.0 <= elapsed < 1.0 + SLACK, elapsed


async def test_a_client_stalling_its_upload_after_an_early_answer_is_cut_off(
    leak_log: LeakLog,
) -> None:
    """The upstream answers (and streams) while the client still uploads; the client then
    stalls its upload past ``client_body_timeout``: its connection is cut (the response
    started: no 408 can be said), the upstream's closed, and the server reports no app
    that returned without completing its response."""

    async def early_stream(connection: RawConnection) -> None:
        if await connection.read_head() is None:
            return
        await connection.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while await connection.send(b"5\r\nhello\r\n"):
            await asyncio.wait_for(connection.reader.read(65536), 5)  # take the upload

    with RawUpstream(early_stream) as upstream:
        pool = Pool([upstream.url], client_body_timeout=1.0, request_buffer_size=0)
        with fault_proxy({"/p": pool}, leak_log) as (proxy, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /p/x HTTP/1.1\r\nhost: front\r\ncontent-length: 100000\r\n\r\n")
            writer.write(b"u" * 2000)
            head = await answer_head(reader, 10)
            with anyio.fail_after(1.0 + SLACK + 2):
                received = b""
                with contextlib.suppress(ConnectionError):
                    while part := await reader.read(65536):
                        received += part
            await leave(writer, abort=True)
            await within(RELEASE, lambda: held_sockets(upstream.port) == 0, "upstream sockets")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert not received.endswith(b"0\r\n\r\n")
    messages = leak_log.messages()
    assert not [m for m in messages if "without completing response" in m], messages


async def test_a_client_leaving_is_answered_for_an_app_wrapping_the_middleware(
    leak_log: LeakLog,
) -> None:
    """Under a ``BaseHTTPMiddleware`` (``@app.middleware("http")``), a client leaving
    while the upstream prepares its answer must not make the wrapper fail ("No response
    returned"): the middleware answers 499 (nginx's code for it), which no one reads."""
    from starlette.middleware.base import BaseHTTPMiddleware

    slow = SlowHeaders(delay=15.0, expected=1)
    with serve(slow) as upstream:

        async def passthrough(request: Any, call_next: Any) -> Any:
            return await call_next(request)

        host = Starlette()
        middleware = RoundRobinMiddleware(host, pools={"/s": Pool([upstream.url])})
        wrapped = BaseHTTPMiddleware(middleware, dispatch=passthrough)
        with serve(wrapped) as proxy:
            leak_log.watch()
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /s/x HTTP/1.1\r\nhost: front\r\n\r\n")
            assert await asyncio.to_thread(slow.all_started.wait, 10)
            await leave(writer, abort=False)
            await within(RELEASE, lambda: slow.left == 1, "the upstream exchange ended")
            await within(RELEASE, lambda: in_flight(middleware) == 0, "the slot freed")
    errors = [m for m in leak_log.messages() if " ERROR: " in m]
    assert not errors, errors


def test_one_middleware_served_from_two_event_loops_keeps_both_deadlines() -> None:
    """Two threads, each with its event loop, send a body that stalls through the same
    middleware: each gets its 408 within ``client_body_timeout`` and a tick."""
    middleware = RoundRobinMiddleware(
        Starlette(),
        pools={"/p": Pool(["http://127.0.0.1:9"], client_body_timeout=0.3)},
    )
    results: list[tuple[int, float]] = []

    async def stalled() -> None:
        sent: list[dict[str, Any]] = []
        first = [True]

        async def receive() -> dict[str, Any]:
            if first[0]:
                first[0] = False
                return {"type": "http.request", "body": b"x", "more_body": True}
            await asyncio.Event().wait()  # the rest never comes
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/p/x",
            "raw_path": b"/p/x",
            "query_string": b"",
            "headers": [(b"content-length", b"100")],
            "client": ("127.0.0.1", 1),
        }
        started = time.monotonic()
        await middleware(scope, receive, send)
        results.append((sent[0]["status"], time.monotonic() - started))

    threads = [threading.Thread(target=asyncio.run, args=(stalled(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert [status for status, _ in results] == [408, 408]
    assert all(seconds < 0.3 + 0.5 for _, seconds in results), results


# --------------------------------------------------------------------------- all at once

LOAD_SECONDS = 10.0


@pytest.mark.slow
async def test_every_stall_at_once_leaves_the_rest_served(leak_log: LeakLog) -> None:
    """For 10 s, all of the above at once against one proxy: uploads to an upstream that
    does not read them, endless trailers, clients reading none of an endless download,
    answers with status 999, clients leaving while an upstream takes 15 s, and uploads
    stalled after 1 KiB. Meanwhile a steady client alternates a fall-through request and
    a request to a healthy pool: every one succeeds, none waits more than a second. Then
    the proxy settles: no socket left to any misbehaving upstream, no in-flight slot, no
    leaked task, nothing in the logs."""
    ok_a, ok_b = UpstreamApp("a"), UpstreamApp("b")
    slow = SlowHeaders(delay=15.0)
    with contextlib.ExitStack() as stack:
        head_only = stack.enter_context(RawUpstream(read_head_then_hold))
        trailer = stack.enter_context(EndlessTrailer(lines=False))
        endless = stack.enter_context(EndlessBody())
        bad = stack.enter_context(
            RawUpstream(answer_once(b"HTTP/1.1 999 Nine\r\ncontent-length: 2\r\n\r\nok"))
        )
        slow_server = stack.enter_context(serve(slow))
        a = stack.enter_context(serve(ok_a))
        b = stack.enter_context(serve(ok_b))
        pools = {
            "/stop": Pool([head_only.url], timeout=1.0, max_fails=0),
            "/trailer": Pool([trailer.url], max_fails=0),
            "/endless": Pool([endless.url], client_send_timeout=1.0, max_fails=0),
            "/bad": Pool([bad.url], max_fails=0),
            "/slow": Pool([slow_server.url], max_fails=0),
            "/ok": Pool([a.url, b.url], client_body_timeout=1.0),
        }
        proxy, middleware, _ = stack.enter_context(fault_proxy(pools, leak_log))
        port = proxy.port
        deadline = time.monotonic() + LOAD_SECONDS
        outcomes: Counter[str] = Counter()

        async def unread_uploads() -> None:
            while time.monotonic() < deadline:
                reader, writer, pumping = await upload(port, b"POST", b"/stop/x", 8 * 2**20)
                head = await answer_head(reader, 10)
                pumping.cancel()
                await leave(writer, abort=True)
                outcomes["unread upload " + head[9:12].decode()] += 1

        async def endless_trailers() -> None:
            while time.monotonic() < deadline:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /trailer/x HTTP/1.1\r\nhost: front\r\n\r\n")
                with anyio.fail_after(10):
                    received = await reader.read(-1)
                await leave(writer, abort=False)
                complete = received.endswith(b"0\r\n\r\n")
                outcomes["trailer " + ("complete" if complete else "aborted")] += 1

        async def non_reading_clients() -> None:
            while time.monotonic() < deadline:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.transport.pause_reading()  # and never read
                writer.write(b"GET /endless/x HTTP/1.1\r\nhost: front\r\n\r\n")
                await within(10, lambda: held_sockets(endless.port) == 1, "download going")
                await within(10, lambda: held_sockets(endless.port) == 0, "download cut off")
                await leave(writer, abort=True)
                outcomes["non-reading client cut off"] += 1

        async def bad_statuses(http: httpx.AsyncClient) -> None:
            while time.monotonic() < deadline:
                outcomes[f"bad status {(await http.get(f'{proxy.url}/bad/x')).status_code}"] += 1

        async def leaving_clients() -> None:
            while time.monotonic() < deadline:
                before = slow.started
                writers = []
                for number in range(10):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /slow/%d HTTP/1.1\r\nhost: front\r\n\r\n" % number)
                    writers.append(writer)
                await within(
                    10, lambda target=before + 10: slow.started >= target, "slow requests upstream"
                )
                for number, writer in enumerate(writers):
                    await leave(writer, abort=bool(number % 2))
                outcomes["left early"] += 10

        async def stalled_uploads() -> None:
            while time.monotonic() < deadline:
                opened = [
                    await upload(port, b"POST", b"/ok/stall", 2**20, send_at_most=1024)
                    for _ in range(25)
                ]
                for reader, writer, pumping in opened:
                    head = await answer_head(reader, 10)
                    pumping.cancel()
                    await leave(writer, abort=True)
                    outcomes["stalled upload " + head[9:12].decode()] += 1

        steady: list[tuple[str, int, float]] = []

        async def steady_client(http: httpx.AsyncClient) -> None:
            while time.monotonic() < deadline:
                for kind, url in (("fall-through", "/debug/state"), ("healthy pool", "/ok/x")):
                    sent = time.monotonic()
                    response = await http.get(f"{proxy.url}{url}")
                    steady.append((kind, response.status_code, time.monotonic() - sent))

        async with aclient() as http, aclient() as steady_http:
            idle = await aproxy_state(http, proxy)
            with anyio.fail_after(LOAD_SECONDS + 30):
                async with anyio.create_task_group() as group:
                    group.start_soon(unread_uploads)
                    group.start_soon(unread_uploads)
                    group.start_soon(endless_trailers)
                    group.start_soon(non_reading_clients)
                    group.start_soon(bad_statuses, http)
                    group.start_soon(leaving_clients)
                    group.start_soon(stalled_uploads)
                    group.start_soon(steady_client, steady_http)
            misbehaving = (head_only.port, trailer.port, endless.port, bad.port, slow_server.port)
            await within(
                5,
                lambda: (
                    sum(held_sockets(p) for p in misbehaving) == 0 and in_flight(middleware) == 0
                ),
                "no socket left to a misbehaving upstream, no slot in flight",
            )
            await within(
                5, lambda: _tasks_at_most(http, proxy, idle["tasks"]), "tasks back to idle"
            )
    print(dict(outcomes))
    by_kind: dict[str, list[float]] = {}
    for kind, status, seconds in steady:
        assert status == 200, (kind, status)
        by_kind.setdefault(kind, []).append(seconds)
    for kind, times in by_kind.items():
        times.sort()
        print(
            f"{kind}: {len(times)} requests, p50 {times[len(times) // 2] * 1000:.1f} ms, "
            f"max {times[-1] * 1000:.0f} ms"
        )
        assert times[-1] < 1.0, (kind, times[-5:])
    assert set(by_kind) == {"fall-through", "healthy pool"}
    expected = {
        "unread upload 504",
        "non-reading client cut off",
        "trailer aborted",
        "bad status 502",
        "left early",
        "stalled upload 408",
    }
    assert set(outcomes) == expected, outcomes
    assert not leaks(leak_log), leaks(leak_log)
    # An aborted response is the ASGI app raising ResponseAborted, which the server logs.
    errors = [m for m in leak_log.messages() if " ERROR: " in m and "ResponseAborted" not in m]
    assert not errors, errors[:5]
