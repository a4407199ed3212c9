"""A pure-ASGI upstream for the tests: it echoes what it received and misbehaves on demand.

Controlled by the query string (which the proxy forwards byte for byte):
``action=echo`` (default) JSON of method, raw path, query, headers (repeats kept), body;
``action=stream&n=N&size=S&wait=1`` N chunks of S bytes, each sent when the test sets the
server's ``proceed`` event (or at once without ``wait``); ``action=sse&n=N`` server-sent
events gated the same way; ``action=gzip`` a gzip body; ``action=cookies&n=N`` N Set-Cookie
headers; ``action=sleep&s=F``; ``action=status&code=N``; ``action=broken`` a
Content-Length of 100 and 10 bytes, then the connection drops; ``action=big&size=N`` N
bytes with a Content-Length; ``action=slowbody&size=N`` streams N bytes with no length.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]


def values(record: dict[str, Any], name: str) -> list[str]:
    """All values of header ``name`` in a request record (``UpstreamApp.requests``, or any
    record whose ``headers`` are name-value pairs), in order."""
    return [v for k, v in record["headers"] if k == name]


class UpstreamApp:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        # Gates for streaming actions: the test sets one per chunk it wants sent.
        self.proceed = threading.Semaphore(0)
        self.active = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.active += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            self.active -= 1

    async def _handle(self, scope: Scope, receive: Any, send: Any) -> None:
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}
        action = query.get("action", "echo")
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        record = {
            "server": self.name,
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body": body.decode("latin-1"),
            "http_version": scope["http_version"],
        }
        self.requests.append(record)
        name = self.name.encode()
        base = [(b"x-upstream", name)]
        if action == "echo":
            payload = json.dumps(record).encode()
            await _respond(send, 200, [*base, (b"content-type", b"application/json")], payload)
        elif action == "status":
            code = int(query["code"])
            await _respond(send, code, base, b"" if code in (204, 304) else b"status body")
        elif action == "gzip":
            payload = gzip.compress(b"hello gzip " * 100)
            headers = [*base, (b"content-encoding", b"gzip"), (b"content-type", b"text/plain")]
            await _respond(send, 200, headers, payload)
        elif action == "cookies":
            cookies = [(b"set-cookie", b"c%d=v%d; Path=/" % (i, i)) for i in range(int(query["n"]))]
            await _respond(send, 200, [*base, *cookies], b"cookies")
        elif action == "sleep":
            await asyncio.sleep(float(query["s"]))
            await _respond(send, 200, base, b"slept")
        elif action == "broken":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*base, (b"content-length", b"100")],
                }
            )
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
            raise RuntimeError("upstream dies mid-body (test action)")
        elif action == "big":
            size = int(query["size"])
            await _respond(send, 200, base, b"b" * size)
        elif action in ("stream", "sse", "slowbody"):
            await self._stream(send, action, query, base)
        else:
            await _respond(send, 404, base, b"unknown action")

    async def _stream(self, send: Any, action: str, query: dict[str, str], base: Any) -> None:
        headers = list(base)
        if action == "sse":
            headers.append((b"content-type", b"text/event-stream"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if action == "slowbody":
            total, size = int(query["size"]), int(query.get("chunk", "65536"))
            sent = 0
            while sent < total:
                part = min(size, total - sent)
                await send({"type": "http.response.body", "body": b"s" * part, "more_body": True})
                sent += part
                await asyncio.sleep(0)
        else:
            count = int(query.get("n", "3"))
            size = int(query.get("size", "5"))
            for i in range(count):
                if "wait" in query or action == "sse":
                    await asyncio.get_running_loop().run_in_executor(None, self._wait_proceed)
                chunk = (
                    (b"data: event %d\n\n" % i) if action == "sse" else bytes([65 + i % 26]) * size
                )
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def _wait_proceed(self) -> None:
        if not self.proceed.acquire(timeout=30):
            raise TimeoutError("test never released the stream")


async def _respond(send: Any, status: int, headers: Any, body: bytes) -> None:
    headers = list(headers)
    if status not in (204, 304):
        headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
