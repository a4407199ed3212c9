"""The default upstream client (``Http1Transport``) as a user of the middleware sees it.

Every test runs the middleware under real uvicorn and talks to it over TCP. The upstreams
are either real uvicorn servers or a ``RawUpstream`` (tests/raw_upstream.py) whose
per-connection script sends exact bytes, so that misbehaving upstreams (wrong framing,
interim responses, stale keep-alive connections, stalls) can be played deterministically.
Synchronisation is by events and by the request/response order itself; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from starlette.applications import Starlette

from rr_middleware import Pool, RoundRobinMiddleware
from rr_middleware.transport import Http1Transport

from .proxy import running_proxy
from .raw_client import RawClient, raw_request
from .raw_upstream import (
    Handler,
    RawConnection,
    RawRequest,
    RawUpstream,
    answer_each,
    first_then,
)
from .servers import serve
from .upstream_app import UpstreamApp

Headers = list[tuple[bytes, bytes]]

WAIT = 5.0  # the longest any test waits for an event that should come at once
GENERIC_502 = b"502 Bad Gateway\n"

pytestmark = pytest.mark.usefixtures("no_asyncio_errors")


# --------------------------------------------------------------------------- raw upstreams


def response(body: bytes, status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, headers, len(body), body)


FRESH = answer_each(lambda request: response(b"fresh"))


def http_client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=WAIT)


def open_connections(middleware: RoundRobinMiddleware) -> int:
    return middleware.transport.open_connections  # type: ignore[attr-defined, no-any-return]


# --------------------------------------------------------------------------- 1. keep-alive


def test_sequential_requests_reuse_one_upstream_connection() -> None:
    def answer(request: RawRequest) -> bytes:
        return response(b"%s %s %d" % (request.method, request.target, len(request.body)))

    with (
        RawUpstream(answer_each(answer)) as upstream,
        running_proxy({"/k": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
    ):
        for i in range(50):
            url = f"{proxy.url}/k/{i}"
            if i % 3 == 0:
                reply, expected = http.get(url), b"GET /%d 0" % i
            elif i % 3 == 1:
                reply, expected = http.post(url, content=b"x" * i), b"POST /%d %d" % (i, i)
            else:  # a streamed upload: the proxy sends it chunked
                parts = [b"a" * i, b"b" * 1000]
                reply, expected = http.put(url, content=iter(parts)), b"PUT /%d %d" % (i, i + 1000)
            assert (reply.status_code, reply.content) == (200, expected), i
            assert open_connections(middleware) == 1, i
    assert upstream.accepted == 1
    assert len(upstream.requests) == 50


def test_sequential_requests_reuse_one_connection_to_uvicorn() -> None:
    app = UpstreamApp("u")
    with (
        serve(app) as upstream,
        running_proxy({"/k": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
    ):
        for i in range(50):
            reply = http.get(f"{proxy.url}/k/{i}?action=echo")
            assert reply.status_code == 200
            assert reply.json()["raw_path"] == f"/{i}"
            assert open_connections(middleware) == 1, i
    assert len(app.requests) == 50


def test_concurrent_requests_get_their_own_connections_and_answers() -> None:
    """Ten requests in flight at once: the upstream answers none until it holds all ten
    (so ten connections are needed), then each its own; a second wave reuses them."""
    count = 10
    held: list[tuple[RawConnection, RawRequest]] = []

    async def script(connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            held.append((connection, request))
            if len(held) == count:  # all ten are in: each gets its own answer
                wave = held[:]
                held.clear()
                for waiting, asked in wave:
                    await waiting.send(response(b"answer to " + asked.target))

    with (
        RawUpstream(script) as upstream,
        running_proxy({"/p": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
        ThreadPoolExecutor(count) as pool,
    ):
        for wave in range(2):
            targets = [f"/{wave}-{i}" for i in range(count)]
            replies = list(pool.map(lambda t: http.get(f"{proxy.url}/p{t}"), targets))
            assert [r.content for r in replies] == [f"answer to {t}".encode() for t in targets]
            assert open_connections(middleware) == count, wave
    assert upstream.accepted == count


@pytest.mark.parametrize(
    "answer",
    [
        response(b"bye", headers=b"Connection: close\r\n"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
    ],
    ids=["connection-close", "http-1.0"],
)
def test_connection_the_upstream_will_close_is_not_reused(answer: bytes) -> None:
    async def once(connection: RawConnection) -> None:
        if await connection.read_request() is not None:
            await connection.send(answer)
            await connection.wait_eof()

    with (
        RawUpstream(once) as upstream,
        running_proxy({"/c": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        for i in range(3):
            reply = http.get(f"{proxy.url}/c/{i}")
            assert (reply.status_code, reply.content) == (200, b"bye"), i
        assert upstream.connections[0].eof.wait(WAIT)
    assert upstream.accepted == 3
    assert [r.connection for r in upstream.requests] == [0, 1, 2]


# --------------------------------------------------------------------------- 2. stale keep-alive


def stale_after_one(reset: bool) -> Handler:
    """The first connection answers one request; the next request reaches an upstream that
    has already given up on the connection: it is read, never answered, and the
    connection closes (FIN, or RST)."""

    async def script(connection: RawConnection) -> None:
        request = await connection.read_request()
        assert request is not None
        await connection.send(response(b"first"))
        if await connection.read_request() is not None:
            await connection.close(reset=reset)

    return first_then(script, FRESH)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_stale_keep_alive_get_is_retried_on_a_fresh_connection(reset: bool) -> None:
    with (
        RawUpstream(stale_after_one(reset)) as upstream,
        running_proxy({"/s": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
    ):
        reply = http.get(f"{proxy.url}/s/one")
        assert (reply.status_code, reply.content) == (200, b"first")
        reply = http.get(f"{proxy.url}/s/two")
        assert (reply.status_code, reply.content) == (200, b"fresh")
        reply = http.get(f"{proxy.url}/s/three")
        assert (reply.status_code, reply.content) == (200, b"fresh")
        assert open_connections(middleware) == 1
    seen = [(r.connection, r.target) for r in upstream.requests]
    assert seen == [(0, b"/one"), (0, b"/two"), (1, b"/two"), (1, b"/three")]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_stale_keep_alive_post_is_not_sent_twice(reset: bool) -> None:
    with (
        RawUpstream(stale_after_one(reset)) as upstream,
        running_proxy({"/s": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        reply = http.get(f"{proxy.url}/s/warm")
        assert (reply.status_code, reply.content) == (200, b"first")
        reply = http.post(f"{proxy.url}/s/order", content=b"buy one")
        assert (reply.status_code, reply.content) == (502, GENERIC_502)
        reply = http.get(f"{proxy.url}/s/after")
        assert (reply.status_code, reply.content) == (200, b"fresh")
    posts = [(r.connection, r.target, r.body) for r in upstream.requests if r.method == b"POST"]
    assert posts == [(0, b"/order", b"buy one")]


def test_idle_connection_closed_by_the_upstream_is_not_a_failure() -> None:
    close_now = threading.Event()
    closed = threading.Event()

    async def idle_closer(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(response(b"first"))
        if await asyncio.to_thread(close_now.wait, WAIT):
            await connection.close()  # the upstream's keep-alive timeout: FIN on an idle connection
            closed.set()

    with (
        RawUpstream(first_then(idle_closer, FRESH)) as upstream,
        running_proxy({"/s": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        assert http.get(f"{proxy.url}/s/one").content == b"first"
        close_now.set()
        assert closed.wait(WAIT)
        for method in ("GET", "POST"):
            reply = http.request(method, f"{proxy.url}/s/two", content=b"x")
            assert (reply.status_code, reply.content) == (200, b"fresh"), method
    assert upstream.accepted == 2


# --------------------------------------------------------------------------- 3. close-delimited


@pytest.mark.parametrize("size", [11, 1024 * 1024 + 7])
def test_close_delimited_response_is_relayed_whole(size: int) -> None:
    body = os.urandom(size)

    async def close_delimited(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body
        )
        await connection.close()

    with (
        RawUpstream(first_then(close_delimited, FRESH)) as upstream,
        running_proxy({"/d": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
    ):
        reply = http.get(f"{proxy.url}/d/body")
        assert reply.status_code == 200
        assert len(reply.content) == size
        assert reply.content == body
        reply = http.get(f"{proxy.url}/d/next")
        assert (reply.status_code, reply.content) == (200, b"fresh")
        assert open_connections(middleware) == 1
    assert upstream.accepted == 2


def test_close_delimited_response_ended_by_reset_is_not_complete() -> None:
    """A reset, unlike a clean close, does not end a close-delimited body: the client must
    not take what it got as the whole response."""

    async def reset_mid_body(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\n\r\n" + b"r" * 5000)
        await connection.close(reset=True)

    with (
        RawUpstream(first_then(reset_mid_body, FRESH)) as upstream,
        running_proxy({"/d": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(f"{proxy.url}/d/body")
        reply = http.get(f"{proxy.url}/d/next")
        assert (reply.status_code, reply.content) == (200, b"fresh")


# --------------------------------------------------------------------------- 4. interim


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize(
    "interim",
    [CONTINUE, EARLY_HINTS, CONTINUE + EARLY_HINTS + EARLY_HINTS],
    ids=["100", "103", "100-103-103"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
def test_interim_responses_are_skipped(interim: bytes, split: bool) -> None:
    final = response(b"final body", headers=b"X-Final: yes\r\n")

    async def script(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            if split:
                await connection.send(interim)
                await connection.send(final)
            else:
                await connection.send(interim + final)

    with (
        RawUpstream(script) as upstream,
        running_proxy({"/i": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        for method in ("GET", "POST", "GET"):
            reply = http.request(method, f"{proxy.url}/i/x", content=b"data")
            assert (reply.status_code, reply.content) == (200, b"final body"), method
            assert reply.headers["x-final"] == "yes"
            assert "link" not in reply.headers  # the 103's headers are not the response's
    assert upstream.accepted == 1  # the connection survives interim responses


def test_unasked_switching_protocols_is_a_bad_gateway() -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )

    async def script(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(switch + b"\x81\x05hello")
        await connection.wait_eof()

    with (
        RawUpstream(first_then(script, FRESH)) as upstream,
        running_proxy({"/w": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
    ):
        reply = http.get(f"{proxy.url}/w/x")
        assert (reply.status_code, reply.content) == (502, GENERIC_502)
        assert upstream.connections[0].eof.wait(WAIT)
        assert open_connections(middleware) == 0
        reply = http.get(f"{proxy.url}/w/x")
        assert (reply.status_code, reply.content) == (200, b"fresh")


# --------------------------------------------------------------------------- 5. malformed heads


MALFORMED = {
    "non-numeric status": b"HTTP/1.1 abc\r\n\r\n",
    "not http": b"hello\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 2\r\n\r\nok",
    "too many headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    + b"Content-Length: 2\r\n\r\nok",
    "257 headers": response(b"ok", headers=b"".join(b"X-H%d: v\r\n" % i for i in range(256))),
    "one header over 64 KiB": response(b"ok", headers=b"X-Big: " + b"a" * 70_000 + b"\r\n"),
    "headers over 64 KiB": response(
        b"ok", headers=b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))
    ),
    "two content lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "content length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "non-numeric content length": b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok",
    "reason phrase over 64 KiB": b"HTTP/1.1 200 "
    + b"A" * 100_000
    + b"\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("answer", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_response_head_is_a_bad_gateway(answer: bytes) -> None:
    async def script(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(answer)
        await connection.wait_eof()

    with (
        RawUpstream(first_then(script, FRESH)) as upstream,
        running_proxy({"/m": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        reply = http.get(f"{proxy.url}/m/x")
        assert (reply.status_code, reply.content) == (502, GENERIC_502)
        assert upstream.connections[0].eof.wait(WAIT)  # the broken connection is closed
        reply = http.get(f"{proxy.url}/m/x")
        assert (reply.status_code, reply.content) == (200, b"fresh")


def test_endless_response_head_is_cut_off_at_the_limit() -> None:
    """An upstream that never finishes its head (one endless header value) must not be
    buffered until the read timeout: past 64 KiB the answer is 502, at once."""

    async def endless(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(64):  # 4 MiB, unless the proxy closes the connection first
            if not await connection.send(b"v" * 65536):
                return
        await connection.wait_eof()

    with RawUpstream(endless) as upstream:
        pool = Pool([upstream.url], timeout=2.0)
        with running_proxy({"/m": pool}) as (proxy, _), http_client() as http:
            started = time.monotonic()
            reply = http.get(f"{proxy.url}/m/x")
            elapsed = time.monotonic() - started
            assert upstream.connections[0].eof.wait(WAIT)
    assert (reply.status_code, reply.content) == (502, GENERIC_502)
    assert elapsed < 1.5


@pytest.mark.parametrize("count", [1, 255])
def test_many_headers_within_the_limit_are_relayed(count: int) -> None:
    names = [b"x-h%d" % i for i in range(count)]
    answer = response(b"ok", headers=b"".join(b"%s: %d\r\n" % (n, i) for i, n in enumerate(names)))
    with (
        RawUpstream(answer_each(lambda request: answer)) as upstream,
        running_proxy({"/m": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        status, headers, body = raw.request(raw_request("GET", "/m/x", [("Host", "front")]))
    assert (status, body) == (200, b"ok")
    assert [n for n, _ in headers if n.startswith(b"x-h")] == names


# --------------------------------------------------------------------------- 6. wrong length


BROKEN_BODIES = {
    "short content-length, fin": (b"Content-Length: 10\r\n\r\n12345", False),
    "short content-length, rst": (b"Content-Length: 10\r\n\r\n12345", True),
    "chunked without last chunk": (b"Transfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n", False),
    "bad chunk size": (b"Transfer-Encoding: chunked\r\n\r\n5\r\n12345\r\nzz\r\n", None),
    "chunk longer than its size": (b"Transfer-Encoding: chunked\r\n\r\n2\r\n12345\r\n", None),
}


@pytest.mark.parametrize(("answer", "reset"), list(BROKEN_BODIES.values()), ids=list(BROKEN_BODIES))
def test_broken_body_aborts_the_client_response(answer: bytes, reset: bool | None) -> None:
    """``reset`` None: the upstream keeps the connection open after the broken framing
    (the proxy must notice the framing error itself, not wait for a timeout)."""

    async def short(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\n" + answer)
        if reset is None:
            await connection.wait_eof()
        else:
            await connection.close(reset=reset)

    with (
        RawUpstream(first_then(short, FRESH)) as upstream,
        running_proxy({"/w": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        got = b""
        with (  # noqa: PT012
            pytest.raises(httpx.RemoteProtocolError),
            http.stream("GET", f"{proxy.url}/w/x") as reply,
        ):
            assert reply.status_code == 200
            for chunk in reply.iter_raw():
                got += chunk
        assert got in (b"", b"12", b"12345")
        reply = http.get(f"{proxy.url}/w/next")
        assert (reply.status_code, reply.content) == (200, b"fresh")


EXTRA = {
    "garbage": b"56789",
    "a whole second response": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Smuggled: 1\r\n\r\nevil",
    "the start of a response": b"HTTP/1.1 2",
}


@pytest.mark.parametrize("extra", list(EXTRA.values()), ids=list(EXTRA))
def test_body_longer_than_content_length_is_cut_and_the_connection_dropped(
    extra: bytes,
) -> None:
    """Bytes after the declared body are no response to anything: the client gets exactly
    the declared body, and the connection, whose framing is lost, is not used again."""

    async def long(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n01234" + extra)
        # Whatever else comes on this connection gets an answer that must never be seen.
        await answer_each(lambda request: response(b"stale connection reused"))(connection)

    with (
        RawUpstream(first_then(long, FRESH)) as upstream,
        running_proxy({"/w": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        status, headers, body = raw.request(raw_request("GET", "/w/long", [("Host", "front")]))
        assert (status, body) == (200, b"01234")
        assert dict(headers).get(b"content-length") == b"5"
        assert b"x-smuggled" not in dict(headers)
        status, _, body = raw.request(raw_request("GET", "/w/next", [("Host", "front")]))
        assert (status, body) == (200, b"fresh")
    assert [(r.connection, r.target) for r in upstream.requests] == [(0, b"/long"), (1, b"/next")]


BIG = bytes(range(256)) * 4096  # 1 MiB: on loopback it arrives over many socket reads


def test_large_bodies_arriving_over_many_reads_keep_the_connection_reusable() -> None:
    """A body read past the parser (Content-Length framed, many reads) ends exactly at its
    length, and the connection then carries the next exchange."""

    def answer(request: RawRequest) -> bytes:
        return response(BIG if request.target != b"/small" else b"small")

    with (
        RawUpstream(answer_each(answer)) as upstream,
        running_proxy({"/b": [upstream.url]}) as (proxy, middleware),
        http_client() as http,
    ):
        for path in ("/b/1", "/b/small", "/b/2", "/b/3"):
            reply = http.get(proxy.url + path)
            expected = b"small" if path == "/b/small" else BIG
            assert (reply.status_code, reply.content == expected) == (200, True), path
        assert open_connections(middleware) == 1
    assert upstream.accepted == 1


@pytest.mark.parametrize("extra", list(EXTRA.values()), ids=list(EXTRA))
def test_large_body_longer_than_content_length_is_cut_and_the_connection_dropped(
    extra: bytes,
) -> None:
    async def long(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(response(BIG) + extra)
        await answer_each(lambda request: response(b"stale connection reused"))(connection)

    with (
        RawUpstream(first_then(long, FRESH)) as upstream,
        running_proxy({"/w": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        status, headers, body = raw.request(raw_request("GET", "/w/long", [("Host", "front")]))
        assert (status, len(body), body == BIG) == (200, len(BIG), True)
        assert b"x-smuggled" not in dict(headers)
        status, _, body = raw.request(raw_request("GET", "/w/next", [("Host", "front")]))
        assert (status, body) == (200, b"fresh")
    assert [(r.connection, r.target) for r in upstream.requests] == [(0, b"/long"), (1, b"/next")]


# --------------------------------------------------------------------------- 7. early response


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_early_response_to_a_large_upload_is_relayed_and_nothing_leaks(close: bool) -> None:
    too_large = response(
        b"too large", b"413 Content Too Large", b"Connection: close\r\n" if close else b""
    )
    head_read = threading.Event()

    async def refuse(connection: RawConnection) -> None:
        request = await connection.read_head()  # the body is never read
        assert request is not None
        head_read.set()
        await connection.send(too_large)
        await connection.wait_eof()

    with (
        RawUpstream(first_then(refuse, FRESH)) as upstream,
        running_proxy({"/u": [upstream.url]}) as (proxy, middleware),
        RawClient(proxy.port) as raw,
    ):
        stop = threading.Event()

        def upload() -> None:
            chunk = b"%x\r\n%s\r\n" % (65536, b"u" * 65536)
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    raw.send(chunk)

        raw.send(b"POST /u/upload HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\r\n")
        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        try:
            status, headers = raw.read_head()
            assert status == 413
            assert raw.read_body(headers) == b"too large"
            assert head_read.is_set()
        finally:
            stop.set()
            # Unblocks the uploader (the proxy may have closed the connection already:
            # an early answer leaves the body unread, so it says Connection: close).
            with contextlib.suppress(OSError):
                raw.sock.shutdown(socket.SHUT_RDWR)
            uploader.join(WAIT)
        assert not uploader.is_alive()
        # The half-sent request's connection is closed, not kept.
        assert upstream.connections[0].eof.wait(WAIT)
        with http_client() as http:
            for _ in range(3):
                reply = http.get(f"{proxy.url}/u/after")
                assert (reply.status_code, reply.content) == (200, b"fresh")
        assert open_connections(middleware) <= 1
    assert upstream.accepted == 2


# --------------------------------------------------------------------------- 8. HEAD


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 1234\r\n", b"Transfer-Encoding: chunked\r\n"],
    ids=["content-length", "chunked"],
)
def test_head_response_has_no_body_and_the_next_request_works(framing: bytes) -> None:
    def answer(request: RawRequest) -> bytes:
        if request.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nX-Head: yes\r\n%s\r\n" % framing
        return response(b"got " + request.target)

    with (
        RawUpstream(answer_each(answer)) as upstream,
        running_proxy({"/h": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        host = [("Host", "front")]
        status, _, body = raw.request(raw_request("GET", "/h/before", host))
        assert (status, body) == (200, b"got /before")
        for _ in range(2):
            raw.send(raw_request("HEAD", "/h/x", host))
            status, headers = raw.read_head()  # no body may follow: the next read checks
            assert status == 200
            assert dict(headers)[b"x-head"] == b"yes"
            if b"1234" in framing:
                assert dict(headers)[b"content-length"] == b"1234"
            status, _, body = raw.request(raw_request("GET", "/h/after", host))
            assert (status, body) == (200, b"got /after")
        assert raw.buffer == b""


# --------------------------------------------------------------------------- 9. chunked


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Other\r\n"
    b"X-Head: yes\r\n\r\n"
)
CHUNKS = b'5;ext=1\r\nhello\r\n6;name="quoted value";flag\r\n world\r\nA\r\n0123456789\r\n'
TRAILERS = b"0;last=yes\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "trailers-later"])
def test_chunked_response_with_extensions_and_trailers(split: bool) -> None:
    more = threading.Event()

    async def script(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            if split:
                await connection.send(CHUNKED_HEAD + CHUNKS)
                if not await asyncio.to_thread(more.wait, WAIT):
                    return
                more.clear()
                await connection.send(TRAILERS)
            else:
                await connection.send(CHUNKED_HEAD + CHUNKS + TRAILERS)

    with (
        RawUpstream(script) as upstream,
        running_proxy({"/c": [upstream.url]}) as (proxy, _),
        http_client() as http,
    ):
        for i in range(2):
            with http.stream("GET", f"{proxy.url}/c/x") as reply:
                assert reply.status_code == 200
                got = b""
                chunks = reply.iter_raw()
                while len(got) < len(b"hello world0123456789"):
                    got += next(chunks)
                more.set()
                got += b"".join(chunks)
            assert got == b"hello world0123456789", i
            assert reply.headers["x-head"] == "yes"
            leaked = {"x-checksum", "x-other", "trailer"} & set(reply.headers)
            assert not leaked, (i, reply.headers)
    assert upstream.accepted == 1


# --------------------------------------------------------------------------- 10. read timeout


def test_upstream_stalling_mid_body_aborts_the_client_and_closes_the_connection() -> None:
    async def stall(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"p" * 10)
        await connection.wait_eof()

    with RawUpstream(first_then(stall, FRESH)) as upstream:
        pools = {"/t": Pool([upstream.url], timeout=0.3)}
        with running_proxy(pools) as (proxy, middleware), http_client() as http:
            got = b""
            with (  # noqa: PT012
                pytest.raises(httpx.RemoteProtocolError),
                http.stream("GET", f"{proxy.url}/t/x") as reply,
            ):
                assert reply.status_code == 200
                started = time.monotonic()
                for chunk in reply.iter_raw():
                    got += chunk
            elapsed = time.monotonic() - started
            assert got == b"p" * 10
            assert 0.25 < elapsed < 2.0
            assert upstream.connections[0].eof.wait(WAIT)
            reply = http.get(f"{proxy.url}/t/next")
            assert (reply.status_code, reply.content) == (200, b"fresh")
            assert open_connections(middleware) == 1


def test_upstream_silent_before_the_head_gives_504_and_closes_the_connection() -> None:
    async def silent(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.wait_eof()

    with RawUpstream(first_then(silent, FRESH)) as upstream:
        pools = {"/t": Pool([upstream.url], timeout=0.3)}
        with running_proxy(pools) as (proxy, middleware), http_client() as http:
            started = time.monotonic()
            reply = http.get(f"{proxy.url}/t/x")
            assert (reply.status_code, reply.content) == (504, b"504 Gateway Timeout\n")
            assert time.monotonic() - started < 2.0
            assert upstream.connections[0].eof.wait(WAIT)
            reply = http.get(f"{proxy.url}/t/next")
            assert (reply.status_code, reply.content) == (200, b"fresh")
            assert open_connections(middleware) == 1
    assert len(upstream.requests) == 2  # a timed-out GET is not sent again


# --------------------------------------------------------------------------- 11. client leaves


@pytest.mark.parametrize("framing", ["chunked", "close-delimited", "content-length"])
def test_client_leaving_mid_stream_closes_the_upstream_connection(framing: str) -> None:
    heads = {
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "close-delimited": b"HTTP/1.1 200 OK\r\n\r\n",
        "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n",
    }
    piece = b"s" * 16384
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece
    gone = threading.Event()

    async def endless(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(heads[framing])
        while await connection.send(chunk):  # blocks while the proxy does not read: backpressure
            pass
        gone.set()  # the proxy closed the connection while the response was still going

    with (
        RawUpstream(first_then(endless, FRESH)) as upstream,
        running_proxy({"/l": [upstream.url]}) as (proxy, middleware),
    ):
        with RawClient(proxy.port) as raw:
            raw.send(raw_request("GET", "/l/stream", [("Host", "front")]))
            status, _ = raw.read_head()
            assert status == 200
            raw.read_exact(100_000)
            left = time.monotonic()
        assert gone.wait(WAIT)
        assert time.monotonic() - left < 2.0
        with http_client() as http:
            reply = http.get(f"{proxy.url}/l/next")
            assert (reply.status_code, reply.content) == (200, b"fresh")
        assert open_connections(middleware) == 1


# --------------------------------------------------------------------------- 12. HTTPS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    return ca, key_file, cert_file


def closing_host(transport: Http1Transport) -> Starlette:
    """A host app whose lifespan closes a transport the test passed in (the middleware
    leaves transports it did not make to their owner)."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await transport.aclose()

    return Starlette(lifespan=lifespan)


def test_https_upstream_verified_with_the_given_ca(
    tls_files: tuple[trustme.CA, Path, Path],
) -> None:
    ca, key_file, cert_file = tls_files
    context = ssl.create_default_context()
    ca.configure_trust(context)
    transport = Http1Transport(ssl=context)
    app = UpstreamApp("tls")
    with serve(app, ssl_keyfile=str(key_file), ssl_certfile=str(cert_file)) as upstream:
        url = f"https://127.0.0.1:{upstream.port}"
        middleware = RoundRobinMiddleware(
            closing_host(transport), pools={"/s": Pool([url])}, transport=transport
        )
        with serve(middleware, proxy_headers=False) as proxy, http_client() as http:
            for i in range(3):
                reply = http.post(f"{proxy.url}/s/{i}?action=echo", content=b"secret %d" % i)
                assert reply.status_code == 200
                record = reply.json()
                assert (record["raw_path"], record["body"]) == (f"/{i}", f"secret {i}")
            assert transport.open_connections == 1
            big = http.get(f"{proxy.url}/s/?action=big&size=3000000")
            assert big.content == b"b" * 3_000_000
    assert len(app.requests) == 4


def test_https_upstream_with_an_untrusted_certificate_is_a_bad_gateway(
    tls_files: tuple[trustme.CA, Path, Path],
) -> None:
    """With the default ``ssl=True`` the trustme CA is unknown: the handshake fails, the
    client gets the generic 502 with no detail; ``ssl=False`` reaches the same upstream."""
    _, key_file, cert_file = tls_files
    app = UpstreamApp("tls")
    insecure = Http1Transport(ssl=False)
    with serve(app, ssl_keyfile=str(key_file), ssl_certfile=str(cert_file)) as upstream:
        url = f"https://127.0.0.1:{upstream.port}"
        with (
            running_proxy({"/s": Pool([url])}) as (proxy, middleware),
            http_client() as http,
        ):
            reply = http.get(f"{proxy.url}/s/?action=echo")
            assert (reply.status_code, reply.content) == (502, GENERIC_502)
            assert open_connections(middleware) == 0
        assert app.requests == []

        unverified = RoundRobinMiddleware(
            closing_host(insecure), pools={"/s": Pool([url])}, transport=insecure
        )
        with serve(unverified, proxy_headers=False) as proxy, http_client() as http:
            reply = http.get(f"{proxy.url}/s/?action=echo")
            assert reply.status_code == 200
            assert reply.json()["raw_path"] == "/"
    assert len(app.requests) == 1


# ----------------------------------------------------------------- the request head itself


def _request_head(headers: list[Any], target: bytes = b"/x?y=1", extra: bytes = b"") -> bytes:
    from rr_middleware.transport.base import UpstreamRequest
    from rr_middleware.transport.http1 import _head
    from rr_middleware.upstream import Upstream

    request = UpstreamRequest(
        "GET", Upstream("http://127.0.0.1:9"), target, headers, None, 1.0, 1.0
    )
    return _head(request, extra)


def test_the_request_head_is_the_line_and_the_headers_as_given() -> None:
    pairs = [(b"host", b"a"), (b"x-many", b"1"), (b"x-many", b"2")]
    assert _request_head(pairs) == (
        b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\nx-many: 1\r\nx-many: 2\r\n\r\n"
    )
    assert _request_head([]) == b"GET /x?y=1 HTTP/1.1\r\n\r\n"
    extra = b"content-length: 3\r\n"
    assert _request_head([(b"host", b"a")], extra=extra) == (
        b"GET /x?y=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ([(b"x-a", b"1\r\nx-injected: 1")], b"/"),
        ([(b"x-a\r\nx-b", b"1")], b"/"),
        ([(b"x-a", b"1\n")], b"/"),
        ([(b"x-a", b"1\r")], b"/"),
        ([(b"x-a", b"1\x00")], b"/"),
        ([(b"x-a", b"1")], b"/ HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /"),
        ([(b"x-a",)], b"/"),
        ([(b"x-a", b"1", b"2")], b"/"),
    ],
)
def test_a_request_head_that_would_break_the_framing_is_refused(
    headers: list[Any], target: bytes
) -> None:
    """CR, LF or NUL anywhere, or a header that is not a pair, never reaches an upstream:
    the request is refused whole (forwarding answers 400 for it)."""
    from rr_middleware.transport.base import RequestNotForwardable

    with pytest.raises(RequestNotForwardable):
        _request_head(headers, target)
