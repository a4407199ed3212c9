"""Fault injection under bounded load: real uvicorn upstreams (and raw upstreams,
``tests/raw_upstream.py``, for what uvicorn will not do), the proxy itself under real
uvicorn, loopback only.

Every load is bounded in count and in time. Nothing sleeps to synchronise: upstreams
signal events (threading events, or futures of the test's loop resolved across threads),
and where a state has to settle (connections closing, tasks ending) a poll loop runs
against a deadline, each poll being one request to the proxy's ``/debug/state`` route,
which reports from the proxy's own event loop its task count and the default transport's
open upstream connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest

from rr_middleware import HealthCheck, Pool

from .leaks import LeakLog, leaks, rss_bytes
from .proxy import aclient, aproxy_state, asettle, client, fault_proxy, proxy_state, settle
from .raw_upstream import RawConnection, RawUpstream
from .servers import serve
from .upstream_app import UpstreamApp

Scope = dict[str, Any]
HEALTH_PATH = "/?action=status&code=200"  # UpstreamApp has no /health; this serves as one


# --------------------------------------------------------------------------- raw upstreams


async def read_and_never_answer(connection: RawConnection) -> None:
    """Reads every request sent, and never writes a byte: the connection ends when the
    proxy closes it."""
    while await connection.read_request() is not None:
        pass


def pattern(ident: int, size: int) -> bytes:
    """The body the half-broken upstreams owe request ``ident``: its number, repeated."""
    unit = b"<%010d>" % ident
    return (unit * (size // len(unit) + 1))[:size]


class ResettingUpstream(RawUpstream):
    """A keep-alive HTTP/1.1 upstream that alternates, request by request, between a whole
    response (``GET /<ident>/<size>`` gets ``pattern(ident, size)`` with its Content-Length)
    and one that stops mid-body with a TCP reset (SO_LINGER 0), framed by Content-Length
    or chunked in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = itertools.count()
        self.outcomes: Counter[str] = Counter()

    async def handle(self, connection: RawConnection) -> None:
        while (request := await connection.read_head()) is not None:
            _, ident, size = request.target.decode().split("?")[0].rsplit("/", 2)
            body = pattern(int(ident), int(size))
            turn = next(self.counter)
            if turn % 2 == 0:
                self.outcomes["whole"] += 1
                await connection.send(
                    b"HTTP/1.1 200 OK\r\nx-upstream: raw\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                continue
            if turn % 4 == 1:
                self.outcomes["reset-length"] += 1
                await connection.send(
                    b"HTTP/1.1 200 OK\r\nx-upstream: raw\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body[: len(body) // 2])
                )
            else:
                self.outcomes["reset-chunked"] += 1
                half = body[: len(body) // 2]
                await connection.send(
                    b"HTTP/1.1 200 OK\r\nx-upstream: raw\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n" % (len(half), half)
                )
            await connection.close(reset=True)
            return


# --------------------------------------------------------------------------- uvicorn upstreams


class AbortableUpstream:
    """An ASGI upstream for clients that leave mid-exchange.

    ``/dl/...``: a stream that never ends by itself (headers, one 1 KiB chunk, then
    nothing until the connection is closed); ``/dl/big/...`` the same after 512 KiB in
    64 KiB chunks sent as fast as the proxy takes them. ``/up/<ident>``: reads the request body;
    once the first part has arrived it resolves the future the test registered in
    ``arrivals`` under ``ident`` (on the test's loop), then reads until the connection is
    closed. ``opened``/``closed`` count the exchanges begun and ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.closed = 0
        self.arrivals: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}

    @property
    def open(self) -> int:
        with self.lock:
            return self.opened - self.closed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.opened += 1
        try:
            path: str = scope["path"]
            if path.startswith("/dl"):
                await self._download(receive, send, 8 if path.startswith("/dl/big") else 0)
            elif path.startswith("/up"):
                await self._upload(path.rsplit("/", 1)[1], receive)
            else:
                while (await receive()).get("more_body", False):
                    pass
                headers = [(b"content-length", b"2")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": b"ok"})
        finally:
            with self.lock:
                self.closed += 1

    async def _download(self, receive: Any, send: Any, big_chunks: int) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(big_chunks):
            await send({"type": "http.response.body", "body": b"d" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b"d" * 1024, "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _upload(self, ident: str, receive: Any) -> None:
        notified = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message.get("body") and not notified:
                notified = True
                waiter = self.arrivals.pop(ident, None)
                if waiter is not None:
                    loop, future = waiter
                    loop.call_soon_threadsafe(_resolve, future)
            if not message.get("more_body", False):
                raise AssertionError("an upload in this test never ends")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --------------------------------------------------------------------------- client aborts

ABORT_CONCURRENCY = 50
ABORT_WARMUP = 500
ABORT_COUNT = 10_000
ABORT_TIME_LIMIT = 25.0
RSS_GROWTH_LIMIT = 30 * 1024 * 1024


async def run_clients(count: int, first: int, one: Callable[[int], Awaitable[None]]) -> float:
    """``count`` clients numbered from ``first``, ``ABORT_CONCURRENCY`` at a time; the
    seconds it took."""
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for number in numbers:
            await one(number)

    started = time.monotonic()
    with anyio.fail_after(ABORT_TIME_LIMIT + 5):
        async with anyio.create_task_group() as group:
            for _ in range(ABORT_CONCURRENCY):
                group.start_soon(worker)
    return time.monotonic() - started


async def hang_up(writer: asyncio.StreamWriter, number: int) -> None:
    """Leave: by ``close()`` (a FIN, or a RST if response bytes lie unread) for even
    ``number``, by ``abort()`` (a RST) for odd."""
    if number % 2:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def abort_download(port: int, number: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        kind = b"big/" if number % 10 == 0 else b""
        writer.write(b"GET /p/dl/%s%d HTTP/1.1\r\nHost: front\r\n\r\n" % (kind, number))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        # The first chunk the proxy relays: 1 KiB, or up to all it has read of a big stream.
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        assert 0 < size <= 9 * 65536, size
        assert await reader.readexactly(size) == b"d" * size
    finally:
        await hang_up(writer, number)


def abort_pool(url: str) -> Pool:
    # request_buffer_size=0: an upload reaches the upstream with its first bytes.
    return Pool(
        [url],
        max_connections=2 * ABORT_CONCURRENCY,
        pool_timeout=5,
        max_fails=0,
        request_buffer_size=0,
    )


@pytest.mark.slow
async def test_client_aborts_mid_download_leak_nothing(leak_log: LeakLog) -> None:
    """Clients read the head and first chunk of an endless stream (one in ten a stream with
    512 KiB behind its first chunk, so the proxy is mid-relay), then leave (close or abort).
    After a warm-up, ABORT_COUNT more: the proxy ends every upstream exchange, holds no
    upstream connection, runs no more tasks than before, still serves, and the process's
    RSS grew by less than RSS_GROWTH_LIMIT."""
    upstream_app = AbortableUpstream()
    with (
        serve(upstream_app) as upstream,
        fault_proxy({"/p": abort_pool(upstream.url)}, leak_log) as (proxy, _, _),
    ):
        async with aclient() as http:
            idle = await aproxy_state(http, proxy)
            await run_clients(ABORT_WARMUP, 0, lambda n: abort_download(proxy.port, n))
            await asettle(http, proxy, lambda s: s["connections"] == 0 and upstream_app.open == 0)
            gc.collect()
            baseline = rss_bytes()

            elapsed = await run_clients(
                ABORT_COUNT, ABORT_WARMUP, lambda n: abort_download(proxy.port, n)
            )
            state = await asettle(
                http,
                proxy,
                lambda s: (
                    s["tasks"] <= idle["tasks"] and s["connections"] == 0 and upstream_app.open == 0
                ),
            )
            print(f"{ABORT_COUNT} aborted downloads in {elapsed:.1f}s; settled: {state}")
            assert upstream_app.open == 0, "upstream exchanges the proxy never ended"
            assert state["connections"] == 0, state
            assert state["tasks"] <= idle["tasks"], (state, idle)
            assert upstream_app.opened == ABORT_WARMUP + ABORT_COUNT

            response = await http.get(f"{proxy.url}/p/quick")
            assert (response.status_code, response.content) == (200, b"ok")
            gc.collect()
            growth = rss_bytes() - baseline
            print(f"RSS growth: {growth / 2**20:.1f} MiB")
            assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB"
            assert elapsed < ABORT_TIME_LIMIT
    assert not leaks(leak_log), leaks(leak_log)
    assert not [m for m in leak_log.messages() if " ERROR: " in m], leak_log.messages()[:5]


async def abort_upload(port: int, upstream: AbortableUpstream, number: int) -> None:
    """POST with a 10 MB Content-Length (even numbers) or chunked (odd), send 16 KiB, wait
    until the upstream holds the start of the body, then leave."""
    part = b"u" * 16384
    if number % 2:
        framing, body = b"transfer-encoding: chunked", b"%x\r\n%s\r\n" % (len(part), part)
    else:
        framing, body = b"content-length: 10000000", part
    head = b"POST /p/up/%d HTTP/1.1\r\nHost: front\r\n%s\r\n\r\n" % (number, framing)
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[None] = loop.create_future()
    upstream.arrivals[str(number)] = (loop, arrived)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        # Whatever the proxy answers first (nothing, normally) must not be a response.
        early = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait((arrived, early), timeout=5, return_when="FIRST_COMPLETED")
        early.cancel()
        answer = early.result() + await reader.read(200) if early in done else b""
        assert arrived in done, f"upload {number} never reached the upstream; proxy: {answer!r}"
    finally:
        upstream.arrivals.pop(str(number), None)
        await hang_up(writer, number // 2)


@pytest.mark.slow
async def test_client_aborts_mid_upload_leak_nothing(leak_log: LeakLog) -> None:
    """Clients send the head and the first 16 KiB of a long upload (Content-Length or
    chunked); once the upstream is reading that body, they leave (close or abort). After a
    warm-up, ABORT_COUNT more: as for downloads."""
    upstream_app = AbortableUpstream()
    with (
        serve(upstream_app) as upstream,
        fault_proxy({"/p": abort_pool(upstream.url)}, leak_log) as (proxy, _, _),
    ):
        async with aclient() as http:
            idle = await aproxy_state(http, proxy)
            await run_clients(ABORT_WARMUP, 0, lambda n: abort_upload(proxy.port, upstream_app, n))
            await asettle(http, proxy, lambda s: s["connections"] == 0 and upstream_app.open == 0)
            gc.collect()
            baseline = rss_bytes()

            elapsed = await run_clients(
                ABORT_COUNT, ABORT_WARMUP, lambda n: abort_upload(proxy.port, upstream_app, n)
            )
            state = await asettle(
                http,
                proxy,
                lambda s: (
                    s["tasks"] <= idle["tasks"] and s["connections"] == 0 and upstream_app.open == 0
                ),
            )
            print(f"{ABORT_COUNT} aborted uploads in {elapsed:.1f}s; settled: {state}")
            assert upstream_app.open == 0, "upstream exchanges the proxy never ended"
            assert state["connections"] == 0, state
            assert state["tasks"] <= idle["tasks"], (state, idle)
            assert upstream_app.opened == ABORT_WARMUP + ABORT_COUNT
            assert not upstream_app.arrivals

            response = await http.get(f"{proxy.url}/p/quick")
            assert (response.status_code, response.content) == (200, b"ok")
            gc.collect()
            growth = rss_bytes() - baseline
            print(f"RSS growth: {growth / 2**20:.1f} MiB")
            assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB"
            assert elapsed < ABORT_TIME_LIMIT
    assert not leaks(leak_log), leaks(leak_log)
    assert not [m for m in leak_log.messages() if " ERROR: " in m], leak_log.messages()[:5]


# --------------------------------------------------------------------------- a silent upstream

SILENT_TIMEOUT = 0.3
SILENT_SLACK = 0.5  # scheduling on a loaded 2-core machine, all servers in one process


def test_silent_upstream_costs_its_requests_one_timeout_and_the_others_nothing(
    leak_log: LeakLog,
) -> None:
    """A pool of a healthy upstream and one that accepts and reads but never answers,
    ``timeout=0.3``, passive ejection off (so the silent one keeps its share). Four
    workers send 25 GETs each: every request routed to the silent one ends 504 within the
    timeout plus slack (not retried: a timeout costs one timeout), every other request is
    a fast 200. Afterwards the silent upstream's connections are all closed, the proxy
    holds at most one idle connection per worker, and runs no more tasks than before."""
    workers, per_worker = 4, 25
    healthy_app = UpstreamApp("healthy")
    results: list[tuple[int, float, str]] = []  # status, seconds, upstream name
    errors: list[BaseException] = []
    with (
        RawUpstream(read_and_never_answer) as silent,
        serve(healthy_app) as healthy,
        fault_proxy(
            {"/s": Pool([healthy.url, silent.url], timeout=SILENT_TIMEOUT, retries=1, max_fails=0)},
            leak_log,
        ) as (proxy, _, _),
        client() as http,
    ):
        idle = proxy_state(http, proxy)
        numbers = itertools.count()

        def work() -> None:
            try:
                with client() as own:
                    for _ in range(per_worker):
                        number = next(numbers)
                        started = time.monotonic()
                        response = own.get(f"{proxy.url}/s/{number}?action=echo")
                        elapsed = time.monotonic() - started
                        name = response.headers.get("x-upstream", "")
                        results.append((response.status_code, elapsed, name))
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        assert len(results) == workers * per_worker

        state = settle(http, proxy, lambda s: s["tasks"] <= idle["tasks"] and silent.open == 0)
        assert silent.open == 0, f"{silent.open} connections to the silent upstream left open"
        assert state["connections"] <= workers, state
        assert state["tasks"] <= idle["tasks"], (state, idle)

    timeouts = [elapsed for status, elapsed, _ in results if status == 504]
    served = [elapsed for status, elapsed, name in results if status == 200 and name == "healthy"]
    assert len(timeouts) + len(served) == len(results), Counter(s for s, _, _ in results)
    # Round robin: half of the load went to each; each silent request was one 504.
    assert len(timeouts) == len(silent.requests) == len(results) // 2
    assert len(served) == len(healthy_app.requests) == len(results) // 2
    assert min(timeouts) >= SILENT_TIMEOUT - 0.01
    assert max(timeouts) < SILENT_TIMEOUT + SILENT_SLACK, sorted(timeouts)[-5:]
    # A healthy request never waits on the silent upstream: well under one timeout.
    assert max(served) < SILENT_TIMEOUT * 0.8, sorted(served)[-5:]
    print(
        f"504 in {min(timeouts):.3f}..{max(timeouts):.3f}s; "
        f"200 in {min(served) * 1000:.1f}..{max(served) * 1000:.1f}ms"
    )
    assert not leaks(leak_log), leaks(leak_log)


# --------------------------------------------------------------------------- shutdown


class CountingUpstream:
    """UpstreamApp behind a counter: ``sleepers`` is set once ``expected`` sleep requests
    have arrived, ``checked`` once ``checks_wanted`` health checks have; ``late`` is set by
    any health check arriving after ``closed`` was set."""

    def __init__(self, expected: int, checks_wanted: int) -> None:
        self.app = UpstreamApp("u")
        self.lock = threading.Lock()
        self.expected = expected
        self.checks_wanted = checks_wanted
        self.sleeping = 0
        self.checks = 0
        self.sleepers = threading.Event()
        self.checked = threading.Event()
        self.closed = threading.Event()
        self.late = threading.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            query = scope["query_string"].decode()
            with self.lock:
                if query == HEALTH_PATH.partition("?")[2]:
                    self.checks += 1
                    if self.checks >= self.checks_wanted:
                        self.checked.set()
                    if self.closed.is_set():
                        self.late.set()
                elif "action=sleep" in query:
                    self.sleeping += 1
                    if self.sleeping >= self.expected:
                        self.sleepers.set()
        await self.app(scope, receive, send)


def test_shutdown_during_traffic_completes_in_flight_requests_and_stops_checks(
    leak_log: LeakLog,
) -> None:
    """The proxy serves a health-checked pool (checks every 50 ms). Ten requests that take
    0.5 s upstream are in flight when the proxy's uvicorn is told to exit: all ten complete
    with 200 well within the 5 s grace period; by the time the host app's own lifespan
    shutdown runs (after the middleware's) no health-check task is left on the loop, no
    check reaches the upstream after the server has stopped, and nothing was logged about
    destroyed tasks, unretrieved exceptions or unclosed resources."""
    in_flight = 10
    grace = 5
    counting = CountingUpstream(expected=in_flight, checks_wanted=3)
    checks = HealthCheck(path=HEALTH_PATH, interval=0.05, timeout=0.5, rise=1, fall=2)
    results: list[tuple[int, bytes, float]] = []
    errors: list[BaseException] = []
    with (
        serve(counting) as upstream,
        fault_proxy(
            {"/p": Pool([upstream.url], health_check=checks)},
            leak_log,
            timeout_graceful_shutdown=grace,
        ) as (proxy, _, probe),
    ):
        assert counting.checked.wait(timeout=5), "the health checks never ran"

        def request() -> None:
            try:
                with client() as http:
                    response = http.get(f"{proxy.url}/p/?action=sleep&s=0.5")
                    results.append((response.status_code, response.content, time.monotonic()))
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=request) for _ in range(in_flight)]
        for thread in threads:
            thread.start()
        try:
            assert counting.sleepers.wait(timeout=5), "the requests never reached the upstream"
            stopping = time.monotonic()
            proxy.stop()  # should_exit, then uvicorn's graceful shutdown and the lifespan
            stopped = time.monotonic()
        finally:
            for thread in threads:
                thread.join(timeout=10)
        counting.closed.set()
        checks_at_stop = counting.checks

        assert not errors, errors
        assert [(status, body) for status, body, _ in results] == [(200, b"slept")] * in_flight
        assert max(at for _, _, at in results) - stopping < grace
        assert stopped - stopping < grace
        assert probe.tasks_at_shutdown is not None, "the host app's lifespan shutdown never ran"
        assert not [t for t in probe.tasks_at_shutdown if "check" in t], probe.tasks_at_shutdown
        # Absence can only be shown over a window of ten check intervals. One check already
        # on the wire when the checker was cancelled may still land (on a loaded machine,
        # after the server's thread has ended); a running checker would send ten.
        counting.late.wait(timeout=10 * checks.interval)
        assert counting.checks - checks_at_stop <= 1, "checks went on"

    logged = leaks(leak_log)
    errors_logged = [m for m in leak_log.messages() if " ERROR: " in m]
    assert not logged, logged
    assert not errors_logged, errors_logged


# --------------------------------------------------------------------------- broken upstreams


class HalfBrokenUpstream:
    """A uvicorn upstream that alternates, request by request: ``GET /<ident>/<size>`` gets
    the whole ``pattern(ident, size)`` (Content-Length, four chunks), or the response
    breaks mid-body: UpstreamApp's ``action=broken`` (Content-Length 100, 10 bytes, then
    the handler raises and uvicorn drops the connection) and a chunked body that dies
    after its first chunk, in turn."""

    def __init__(self) -> None:
        self.app = UpstreamApp("half-broken")
        self.counter = itertools.count()
        self.outcomes: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        turn = next(self.counter)
        if turn % 4 == 1:
            self.outcomes["broken-length"] += 1
            await self.app(dict(scope, query_string=b"action=broken"), receive, send)
            return
        while (await receive()).get("more_body", False):
            pass
        _, ident, size = scope["path"].rsplit("/", 2)
        body = pattern(int(ident), int(size))
        if turn % 4 == 3:
            self.outcomes["broken-chunked"] += 1
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body[:1000], "more_body": True})
            raise RuntimeError("upstream dies mid-body (test)")
        self.outcomes["whole"] += 1
        headers = [(b"x-upstream", b"half-broken"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        quarter = -(-len(body) // 4)
        for start in range(0, len(body), quarter):
            chunk = body[start : start + quarter]
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def test_upstreams_breaking_mid_body_under_load_never_yield_a_wrong_200(
    leak_log: LeakLog,
) -> None:
    """A pool of two upstreams that each break every other response mid-body: one under
    uvicorn (its handler raises), one raw upstream that resets the connection (RST). Four
    workers send 40 GETs each, for bodies of 1 KiB to 300 KiB: every response is either
    a 200 whose body is exactly the one owed to that request, or a connection the proxy
    aborted (httpx raises). Never a truncated or foreign body, never another status; each
    broken upstream response is one aborted client response. The proxy still serves, and
    settles to no more tasks than before and a few idle connections."""
    workers, per_worker = 4, 40
    half_broken_app = HalfBrokenUpstream()
    outcomes: list[str] = []
    errors: list[BaseException] = []
    with (
        serve(half_broken_app) as half_broken,
        ResettingUpstream() as resetting,
        serve(UpstreamApp("ok")) as healthy,
        fault_proxy(
            {
                "/f": Pool([half_broken.url, resetting.url], retries=1, max_fails=0),
                "/ok": Pool([healthy.url]),
            },
            leak_log,
        ) as (proxy, _, _),
        client() as http,
    ):
        idle = proxy_state(http, proxy)
        numbers = itertools.count()

        def work() -> None:
            try:
                with client() as own:
                    for _ in range(per_worker):
                        ident = next(numbers)
                        size = 1024 + (ident * 7919) % (300 * 1024)
                        try:
                            response = own.get(f"{proxy.url}/f/{ident}/{size}")
                        except (httpx.RemoteProtocolError, httpx.ReadError):
                            outcomes.append("aborted")
                            continue
                        if response.status_code != 200:
                            outcomes.append(f"status {response.status_code}")
                        elif response.content != pattern(ident, size):
                            got = response.content
                            outcomes.append(f"wrong body {len(got)}/{size}: {got[:24]!r}")
                        elif response.headers.get("content-length") != str(size):
                            outcomes.append(f"length {response.headers.get('content-length')}")
                        else:
                            outcomes.append("whole")
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors

        response = http.get(f"{proxy.url}/ok/?action=echo")
        assert response.status_code == 200
        assert response.json()["server"] == "ok"
        state = settle(http, proxy, lambda s: s["tasks"] <= idle["tasks"])
        assert state["tasks"] <= idle["tasks"], (state, idle)
        assert state["connections"] <= 2 * workers + 1, state

    seen = Counter(outcomes)
    upstreams = half_broken_app.outcomes + resetting.outcomes
    print(f"clients: {dict(seen)}; upstreams: {dict(upstreams)}")
    assert set(seen) <= {"whole", "aborted"}, seen
    assert sum(seen.values()) == workers * per_worker
    assert seen["whole"] == upstreams["whole"]
    assert seen["aborted"] == upstreams.total() - upstreams["whole"]
    for kind in ("broken-length", "broken-chunked", "reset-length", "reset-chunked"):
        assert upstreams[kind] >= 10, upstreams
    assert not leaks(leak_log), leaks(leak_log)


# ------------------------------------------------------------------- regressions found here


def test_stream_outliving_the_grace_period_is_cut_without_orphaned_tasks(
    leak_log: LeakLog,
) -> None:
    """An endless stream is in flight when the proxy (grace period 0.5 s) is told to exit:
    uvicorn cancels the request after the grace period and the client sees an aborted
    response. Nothing may be left behind: no task with an unretrieved exception."""
    upstream_app = AbortableUpstream()
    with (
        serve(upstream_app) as upstream,
        fault_proxy({"/p": abort_pool(upstream.url)}, leak_log, timeout_graceful_shutdown=0.5) as (
            proxy,
            _,
            _,
        ),
        client() as http,
        http.stream("GET", f"{proxy.url}/p/dl/1") as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_raw()
        assert next(chunks) == b"d" * 1024
        proxy.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            b"".join(chunks)
    assert not leaks(leak_log), leaks(leak_log)


class DuplexUpstream:
    """Answers a POST at once (headers and a first chunk), then reads the request body
    and ends the response once the body is complete (or the connection goes)."""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started", "more_body": True})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b""})


def test_client_leaving_a_full_duplex_upload_is_not_an_upstream_failure(
    leak_log: LeakLog,
) -> None:
    """Two healthy upstreams that answer before reading the body. Six clients each start a
    long upload, see the response begin, and leave. That is the clients' doing: neither
    upstream may be charged a failure or ejected, and nothing is logged as an error."""
    with serve(DuplexUpstream()) as first, serve(DuplexUpstream()) as second:
        pool = Pool([first.url, second.url])  # default max_fails=3 within fail_timeout=10
        with fault_proxy({"/p": pool}, leak_log) as (proxy, mw, _), client() as http:
            idle = proxy_state(http, proxy)
            for _ in range(6):
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                    sock.sendall(
                        b"POST /p/up HTTP/1.1\r\nHost: front\r\ncontent-length: 1000000\r\n\r\n"
                        + b"u" * 100_000
                    )
                    received = b""
                    while b"started" not in received:
                        data = sock.recv(65536)
                        assert data, received
                        received += data
            settle(http, proxy, lambda s: s["tasks"] <= idle["tasks"])
            rows = mw.balancer["/p"].snapshot()
    assert [(r["failures"], r["ejected"]) for r in rows] == [(0, False), (0, False)], rows
    assert not [m for m in leak_log.messages() if " ERROR: " in m or "failed" in m]
