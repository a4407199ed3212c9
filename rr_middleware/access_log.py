"""The access log (``access_log=True``): one line per request under a pool's prefix,
whatever answered it: the upstream, a refusal, a guard or hook, the proxy's own error."""

from __future__ import annotations

import logging
import time

from starlette.types import Message, Scope, Send

logger = logging.getLogger("rr_middleware")


class AccessLog:
    """One request's line: the status the client was sent, the upstream(s) that answered
    or were tried (``-``: none), the time from its arrival to its end. ``send`` is the
    request's own with the status noted; the connection's transport stays reachable
    through it, as ``client.abort_client`` needs."""

    __slots__ = (
        "_send",
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
        self.upstream = "-"
        self.request_id: bytes | None = None
        self.started = time.monotonic()
        self.transport = getattr(getattr(send, "__self__", None), "transport", None)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    def write(self) -> None:
        """The line, once the request has ended (its status ``-`` if none was sent: the
        server cancelled it)."""
        logger.info(
            "pool %s: %s %s -> %s %s in %.1f ms%s",
            self.pool,
            self.scope.get("method", ""),
            self.scope.get("path", ""),
            self.upstream,
            self.status or "-",
            (time.monotonic() - self.started) * 1000,
            "" if self.request_id is None else " id=" + self.request_id.decode("ascii"),
        )
