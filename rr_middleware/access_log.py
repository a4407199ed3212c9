"""The access log (``access_log=True``): one line per HTTP request or WebSocket under a
pool's prefix, whatever answered it: the upstream, a refusal, a guard or hook, the
proxy's own error."""

from __future__ import annotations

import logging
import re
import time

from starlette.types import Message, Scope, Send

logger = logging.getLogger("rr_middleware")

_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")
# A response's head and body (a WebSocket's denial has them too), and the other answers
# a WebSocket's handshake can get, with the status the client sees.
_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})
_BODIES = frozenset({"http.response.body", "websocket.http.response.body"})
_WEBSOCKET_ANSWERS = {"websocket.accept": 101, "websocket.close": 403}


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
        kind = message["type"]
        if kind in _STARTS:
            self.status = message["status"]
            await self._send(message)
            return
        await self._send(message)
        if kind in _BODIES:
            self.complete = not message.get("more_body", False)
        elif not self.status and kind in _WEBSOCKET_ANSWERS:
            # A WebSocket's handshake answered: accepted (101), or closed first (the
            # server answers that 403).
            self.status = _WEBSOCKET_ANSWERS[kind]
            self.complete = True

    def write(self) -> None:
        """The line, once the request has ended (its status ``-`` if none was sent: the
        server cancelled it)."""
        logger.info(
            "pool %s: %s %s -> %s %s%s in %.1f ms%s",
            self.pool,
            # The server's parser allows no odd byte here; a WebSocket's handshake is a GET.
            self.scope.get("method", "GET"),
            printable_path(self.scope),
            self.upstream,
            self.status or "-",
            "" if self.complete or not self.status else " incomplete",
            (time.monotonic() - self.started) * 1000,
            "" if self.request_id is None else " id=" + self.request_id.decode("ascii"),
        )
