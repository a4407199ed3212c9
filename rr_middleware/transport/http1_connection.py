"""One HTTP/1.1 connection to an upstream, as an asyncio protocol over httptools.

It parses the response with llhttp's callbacks, keeps the head and the trailer within
bounds, refuses what is not an HTTP/1.x response with a status in 100..599, skips
interim (1xx) responses, buffers body bytes until ``read()`` takes them (pausing the
socket past a high-water mark, so a slow client holds the upstream back), and turns every
way a connection can fail into an ``UpstreamError`` the exchange reports. Pooling and
the request side live in ``http1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import cast

import httptools

from .base import UpstreamBroken, UpstreamError, UpstreamProtocolError, UpstreamTimeout

__all__ = ["Connection"]

_MAX_HEADER_BYTES = 64 * 1024  # the upstream's whole response head, and its trailer
_MAX_HEADERS = 256
_READ_HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the upstream pauses


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one exchange at a time.

    ``on_lost(connection)`` is called once the connection is closed, from either end, so
    that its owner stops counting it (and never hands out an idle one the upstream shut).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[Connection], object]
    ) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._on_lost = on_lost
        self._idle_since = 0.0
        self.parser = httptools.HttpResponseParser(self)
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self.reset()

    def reset(self) -> None:
        self.active = False
        self.head_only = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.head_received = 0
        #: Bytes received in a row that carried no body byte (chunk framing, a trailer):
        #: past the head limit, an upstream is sending an endless trailer or extension.
        self.framing_run = 0
        self.headers_done = False
        self.interim = False
        self.complete = False
        self.keep_alive = True
        self.received_any = False
        self.error: UpstreamError | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        #: Body bytes the parser has passed on, and how many of a Content-Length body are
        #: still due once data_received takes them past the parser (None: not doing so).
        self.body_seen = 0
        self.body_due: int | None = None
        self.bypass_checked = False
        self.read_paused = False
        self.waiter: asyncio.Future[None] | None = None

    def idle(self) -> None:
        """The exchange ended cleanly; the connection waits for the next one."""
        self.reset()
        self._idle_since = self.loop.time()

    def usable(self, now: float, keepalive: float) -> bool:
        """Whether an idle connection may carry another exchange: still open, and idle for
        less than ``keepalive`` seconds (so it is not one the upstream is about to close)."""
        return not self.closed and now - self._idle_since < keepalive

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Small requests must leave at once, not wait for Nagle's algorithm.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Bytes nobody asked for (an upstream writing past its response): the
            # connection's framing can no longer be trusted.
            self.keep_alive = False
            self.abort()
            return
        self.received_any = True
        if not self.headers_done:
            self.head_received += len(data)
        elif self.body_due is not None or (not self.bypass_checked and self._body_bypass()):
            self._body_bytes(data)
            return
        seen = self.body_seen
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, UpstreamError) else None
            self._fail(cause or UpstreamProtocolError(f"invalid response from upstream: {exc}"))
            self.abort()
            return
        # The parser holds a partial header line without calling back (and grows it by
        # concatenation): an endless head, or trailer, is cut off by the bytes received,
        # not by the fields seen.
        if not self.headers_done:
            if self.head_received > _MAX_HEADER_BYTES:
                self._fail(UpstreamProtocolError("upstream response head is too large"))
                self.abort()
        elif self.body_seen != seen:
            self.framing_run = 0
        elif not self.complete:
            self.framing_run += len(data)
            if self.framing_run > _MAX_HEADER_BYTES:
                self._fail(UpstreamProtocolError("upstream response trailer is too large"))
                self.abort()

    def _body_bypass(self) -> bool:
        """Whether the rest of this response's body may skip the parser: only a body
        framed by one Content-Length (no Transfer-Encoding), whose head the parser has
        already checked. A large body then goes from the socket to ``read()`` without
        being copied again by the parser; the parser, left mid-message, is replaced
        before the connection carries another exchange."""
        self.bypass_checked = True
        length: bytes | None = None
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"transfer-encoding" or (lower == b"content-length" and length):
                return False
            if lower == b"content-length":
                length = value
        if length is None or not length.strip().isdigit():
            return False
        self.body_due = int(length) - self.body_seen
        return True

    def _body_bytes(self, data: bytes) -> None:
        due = self.body_due
        assert due is not None
        if len(data) > due:
            # Bytes past the announced length answer nothing: the body ends where it
            # said, and the connection, its framing lost, is not used again.
            self._body_bytes(data[:due])
            self.abort()
            return
        self.body_due = due - len(data)
        self.on_body(data)
        if self.body_due == 0:
            self.parser = httptools.HttpResponseParser(self)
            self.on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active and not self.complete:
            if self.headers_done and exc is None and self._delimited_by_close():
                self.on_message_complete()
            else:
                what = "before the response" if not self.headers_done else "mid-body"
                self._fail(UpstreamBroken(f"upstream closed the connection {what}"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamBroken("upstream closed the connection"))
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request: a desynchronised or malicious upstream.
            raise UpstreamProtocolError("upstream sent more than one response")

    def on_status(self, status: bytes) -> None:
        self.header_bytes += len(status)  # the reason phrase counts toward the head
        if self.header_bytes > _MAX_HEADER_BYTES:
            raise UpstreamProtocolError("upstream response head is too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.headers_done:
            # A trailer field: not relayed (ASGI has no trailers for a proxied response),
            # but counted with the head against the same limit.
            if self.header_bytes > _MAX_HEADER_BYTES:
                raise UpstreamProtocolError("upstream response trailer is too large")
            return
        if self.header_bytes > _MAX_HEADER_BYTES or len(self.headers) >= _MAX_HEADERS:
            raise UpstreamProtocolError("upstream response headers are too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            # An ASGI server cannot send it (it fails after marking the response started,
            # leaving the client with nothing): the upstream broke the protocol.
            raise UpstreamProtocolError(f"upstream answered status {status:03d}")
        if self.parser.get_http_version() not in ("1.1", "1.0"):
            raise UpstreamProtocolError(
                f"upstream answered HTTP/{self.parser.get_http_version()} on an HTTP/1.1 connection"
            )
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamProtocolError("upstream switched protocols unasked")
            self.interim = True  # 100 Continue, 103 Early Hints: not the response
            self.headers = []
            self.header_bytes = 0
            return
        self.status = status
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only:
            # The parser cannot be told the request was HEAD, so it would wait for the
            # Content-Length it announces: the response ends here, the connection too.
            self.keep_alive = False
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body_seen += len(body)
        self.body.append(body)
        self.body_size += len(body)
        if self.body_size > _READ_HIGH_WATER and not self.read_paused and self.transport:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    # -- exchange ---------------------------------------------------------------------

    def _delimited_by_close(self) -> bool:
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.keep_alive = False
        self._wake()

    def _expire(self, error: UpstreamError) -> None:
        self._fail(error)
        self.abort()

    async def wait(self, timeout: float) -> None:
        """Wait for parser progress (or failure), at most ``timeout`` seconds."""
        waiter = self.loop.create_future()
        self.waiter = waiter
        timer = self.loop.call_later(timeout, self._expire, UpstreamTimeout("read timed out"))
        try:
            await waiter
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            timer.cancel()
            self.waiter = None

    async def wait_or(self, task: asyncio.Task[None]) -> None:
        """Wait for parser progress or for ``task`` to end, with no time limit."""
        waiter = self.loop.create_future()
        self.waiter = waiter
        try:
            await asyncio.wait((waiter, task), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            self.waiter = None

    async def drain(self, timeout: float) -> None:
        """Wait until the upstream takes what was written, at most ``timeout`` seconds
        (nginx's ``proxy_send_timeout``: between two successful writes); past it the
        exchange fails with ``UpstreamTimeout`` and the connection is closed."""
        if self.closed:
            raise UpstreamBroken("upstream closed the connection")
        if self._write_paused:
            drain = self._drain = self.loop.create_future()
            timer = self.loop.call_later(
                timeout,
                self._expire,
                UpstreamTimeout(f"upstream took no request body for {timeout}s"),
            )
            try:
                await drain
            finally:
                timer.cancel()
                self._drain = None

    def take_body(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.body_size = 0
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
