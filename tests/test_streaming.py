"""Streaming and flow control through real servers: uploads reach the upstream as they
arrive, a slow client holds the upstream back, and a saturated upstream answers 503."""

from __future__ import annotations

import queue
import socket
import threading
from typing import Any

import httpx

from rr_middleware import Pool

from .proxy import client, running_proxy
from .servers import RunningServer, serve


class RecordingUpload:
    """Puts every body chunk it receives on a queue the test reads, as it arrives."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes] = queue.Queue()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message.get("body"):
                total += len(message["body"])
                self.chunks.put(message["body"])
            if not message.get("more_body", False):
                break
        body = b"%d" % total
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


def test_upload_chunks_reach_the_upstream_as_the_client_sends_them() -> None:
    upload = RecordingUpload()
    # request_buffer_size=0: the body streams from its first byte (by default the first
    # 64 KiB of a body are read before an upstream is picked).
    with (
        serve(upload) as upstream,
        running_proxy({"/up": Pool([upstream.url], request_buffer_size=0)}) as (proxy, _),
    ):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        try:
            sock.sendall(
                b"POST /up/x HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(3):
                piece = b"piece-%d;" % i
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                # The next piece is only sent once the upstream holds this one: a proxy
                # that buffered the body would leave this waiting (and the test failing).
                assert upload.chunks.get(timeout=5) == piece
            sock.sendall(b"0\r\n\r\n")
            reply = b""
            while not reply.endswith(b"\r\n\r\n24"):
                data = sock.recv(65536)
                assert data, reply
                reply += data
            assert reply.startswith(b"HTTP/1.1 200 ")
        finally:
            sock.close()


class BigStream:
    """Streams ``total`` bytes as fast as the connection takes them; says when done."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.finished = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"z" * 65536
        while self.sent < self.total:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.sent += len(chunk)
        await send({"type": "http.response.body", "body": b""})
        self.finished.set()


def test_a_client_that_stops_reading_holds_the_upstream_back() -> None:
    big = BigStream(total=256 * 1024 * 1024)
    with serve(big) as upstream, running_proxy({"/big": [upstream.url]}) as (proxy, _):
        with client() as http, http.stream("GET", f"{proxy.url}/big/") as response:
            assert response.status_code == 200
            pieces = response.iter_raw(65536)
            first = next(pieces)
            assert first
            # The client reads nothing more. Were the body buffered instead of relayed
            # with backpressure, the upstream would get all 256 MiB out within this wait.
            assert not big.finished.wait(timeout=3)
            # In flight: socket buffers on both legs plus 64 KiB and a socket read ahead
            # (about 8 MiB here, 3 MiB when the client reads the upstream directly).
            assert big.sent < 32 * 1024 * 1024, f"upstream ran ahead: {big.sent} bytes sent"
            received = len(first) + sum(len(c) for c in pieces)
        assert received == big.total
        assert big.finished.wait(timeout=10)


def test_no_free_connection_within_pool_timeout_is_503(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    pools = {"/one": Pool([a.url], max_connections=1, pool_timeout=0.3)}
    with running_proxy(pools) as (proxy, _), client() as http:
        # The one connection slot is held by a stream the upstream sends piece by piece.
        with http.stream("GET", f"{proxy.url}/one/?action=stream&n=2&wait=1") as held:
            assert held.status_code == 200
            crowded = http.get(f"{proxy.url}/one/?action=echo")
            assert crowded.status_code == 503
            assert crowded.text == "503 Service Unavailable\n"
            a.app.proceed.release(2)
            assert held.read() == b"AAAAABBBBB"
        # The slot is free again.
        assert http.get(f"{proxy.url}/one/?action=echo").status_code == 200


def test_streamed_response_reaches_the_client_while_the_upstream_still_sends(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    with running_proxy({"/s": [a.url]}) as (proxy, _), client() as http:
        url = f"{proxy.url}/s/?action=stream&n=3&size=4&wait=1"
        with http.stream("GET", url) as response:
            pieces = response.iter_raw()
            for expected in (b"AAAA", b"BBBB", b"CCCC"):
                a.app.proceed.release()
                assert next(pieces) == expected
        assert isinstance(response, httpx.Response)
