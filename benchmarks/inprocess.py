"""What the in-process benchmarks share: a request's scope, a client side that behaves as
uvicorn's ``receive``/``send`` do, and an upstream answer given at once.

``bench_forward.py``, ``count_instructions.py`` and ``stage_apps.py`` drive the middleware
with these, so their figures differ only in what each measures. Importing this module
imports ``rr_middleware``: the in-process scripts import it in the process that measures
(where ``--baseline`` has set ``PYTHONPATH``), never in the one that starts them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench_apps import UPSTREAM_BODY

from rr_middleware.transport.base import UpstreamRequest, UpstreamTransport

#: The upstream's answer's headers (``bench_apps.upstream_app``'s, less its name).
ANSWER_HEADERS = ((b"content-type", b"text/plain"), (b"content-length", b"13"))

#: A proxied GET of ``/api/hello`` as uvicorn describes it (copy it per request: the
#: middleware may add to a scope).
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/api/hello",
    "raw_path": b"/api/hello",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 8000),
}


class Client:
    """uvicorn's receive/send for one bodiless request: after the body, ``receive()``
    waits until the response is complete; ``status`` is the status sent."""

    def __init__(self) -> None:
        self.complete = asyncio.Event()
        self.body_sent = False
        self.status = 0

    async def receive(self) -> Any:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body"):
            self.complete.set()


class Answer:
    """The upstream's answer (``bench_apps.upstream_app``'s 13 bytes), whole, as a
    transport's response."""

    status = 200

    def __init__(self) -> None:
        self.headers = list(ANSWER_HEADERS)
        self._body = UPSTREAM_BODY

    def body_complete(self) -> bool:
        return True

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body

    async def aclose(self) -> None:
        return None


class AtOnce(UpstreamTransport):
    """A transport whose upstream answers at once, in process: no socket, no wait."""

    async def send(self, request: UpstreamRequest) -> Any:
        return Answer()
