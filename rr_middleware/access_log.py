"""The access log (``access_log=True``): one line per HTTP request under a pool's
prefix, whatever answered it: the upstream, a refusal, a guard or hook, the proxy's own
error."""

from __future__ import annotations

import logging
import re
import time

from starlette.types import Message, Scope, Send

logger = logging.getLogger("rr_middleware")

_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")


def printable_path(scope: Scope) -> str:
    """The request's path for a log line, as the client sent it (raw, percent-encoded)
    with any byte outside visible ASCII as ``\\xNN``: a client cannot break the line
    or fake one (the decoded path may hold CR, LF and spaces)."""
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
    return _UNPRINTABLE.sub(lambda found: b"\\x%02x" % found[0][0], raw).decode("ascii")


class AccessLog:
    """One request's line: the status the client was sent (with ``incomplete`` if its
    response did not go out to the end: cut off mid-body, the client gone), the
    upstream(s) that answered or were tried (``-``: none), the time from its arrival to
    its end. ``send`` is the request's own with the status noted; the connection's
    transport stays reachable through it, as ``client.abort_client`` needs."""

    __slots__ = (
        "_send",
        "complete",
        "pool",
        "request_id",
        "scope",
        "started",
        "status",
        "transport",
        "upstream",
    )

    def __init__(self, pool: str, scope: Scope, send: Send) -> None:
        self.pool = pool
        self.scope = scope
        self._send = send
        self.status = 0
        self.complete = False  # the response's last message went out
        self.upstream = "-"
        self.request_id: bytes | None = None
        self.started = time.monotonic()
        self.transport = getattr(getattr(send, "__self__", None), "transport", None)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            await self._send(message)
            return
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True

    def write(self) -> None:
        """The line, once the request has ended (its status ``-`` if none was sent: the
        server cancelled it)."""
        logger.info(
            "pool %s: %s %s -> %s %s%s in %.1f ms%s",
            self.pool,
            self.scope.get("method", ""),  # the server's parser allows no odd byte here
            printable_path(self.scope),
            self.upstream,
            self.status or "-",
            "" if self.complete or not self.status else " incomplete",
            (time.monotonic() - self.started) * 1000,
            "" if self.request_id is None else " id=" + self.request_id.decode("ascii"),
        )
