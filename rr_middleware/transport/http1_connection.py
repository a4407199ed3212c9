"""One HTTP/1.1 connection to an upstream, as an asyncio protocol over httptools, and
the exchanges it carries one at a time (the shape of uvicorn's ``httptools_impl``: a
protocol per connection, a ``RequestResponseCycle`` per request).

``Connection`` is the wire side and owns what outlives a request: the socket, the parser,
the read pause and the write side's backpressure, when it went idle, whether it is closed.
It parses the response with llhttp's callbacks, keeps the head and the trailer within
bounds, refuses what is not an HTTP/1.x response with a status in 100..599, skips interim
(1xx) responses, and hands what it parsed to the exchange under way.

``Exchange`` is one request's response: status, headers, the body buffered until
``read()`` takes it (reading pauses past a high-water mark, so a slow client holds the
upstream back), completion, and the ``UpstreamError`` every way of failing turns into.
Each request gets a new one, so nothing of a response (a body left unread, a trailer
count, an error) can leak into the next; bytes that arrive when no exchange asked for
them discard the connection. Pooling and the request side live in ``http1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable
from typing import cast

import httptools

from .base import UpstreamBroken, UpstreamError, UpstreamProtocolError, UpstreamTimeout

__all__ = ["Connection", "Deadlines", "Exchange"]

_MAX_HEADER_BYTES = 64 * 1024  # the upstream's whole response head, and its trailer
_MAX_HEADERS = 256
#: Body bytes buffered before reading from the upstream pauses, and the most that small
#: pieces are joined into for one read. nginx buffers 64 KiB by default (proxy_buffers
#: 8 8k); past that the socket buffers hold the rest, and the upstream waits.
_READ_HIGH_WATER = 64 * 1024
_JOIN_LIMIT = 64 * 1024


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one exchange at a time.

    ``on_lost(connection)`` is called once the connection is closed, from either end, so
    that its owner stops counting it (and never hands out an idle one the upstream shut).
    ``deadlines`` keeps the read deadlines; an owner of many connections shares one.
    """

    __slots__ = (
        "_drain",
        "_idle_since",
        "_on_lost",
        "_write_paused",
        "closed",
        "deadlines",
        "exchange",
        "loop",
        "parser",
        "reading_paused",
        "transport",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[Connection], object],
        deadlines: Deadlines | None = None,
    ) -> None:
        self.loop = loop
        #: The read deadlines of this loop's exchanges (one per connection if not shared).
        self.deadlines = deadlines if deadlines is not None else Deadlines(loop)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: The exchange under way (or the last one, until the pool takes the connection
        #: back): None while idle.
        self.exchange: Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reading_paused = False
        self._on_lost = on_lost
        self._idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False

    def start(self, head_only: bool) -> Exchange:
        """Begin an exchange, before its request is written (``head_only``: it is HEAD)."""
        exchange = self.exchange = Exchange(self, head_only)
        return exchange

    def idle(self) -> None:
        """The exchange ended cleanly; the connection waits for the next one."""
        self.exchange = None
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
        exchange = self.exchange
        if exchange is None or exchange.complete:
            # Bytes nobody asked for (an upstream writing past its response): the
            # connection's framing can no longer be trusted.
            self.abort()
            return
        exchange.received_any = True
        if not exchange.headers_done:
            exchange.head_received += len(data)
        elif exchange.body_due is not None or (
            not exchange.bypass_checked and exchange.may_bypass_parser()
        ):
            self._body_bytes(exchange, data)
            return
        seen = exchange.body_seen
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, UpstreamError) else None
            exchange.expire(
                cause or UpstreamProtocolError(f"invalid response from upstream: {exc}")
            )
            return
        # The parser holds a partial header line without calling back (and grows it by
        # concatenation): an endless head, or trailer, is cut off by the bytes received,
        # not by the fields seen.
        if not exchange.headers_done:
            if exchange.head_received > _MAX_HEADER_BYTES:
                exchange.expire(UpstreamProtocolError("upstream response head is too large"))
        elif exchange.body_seen != seen:
            exchange.framing_run = 0
        elif not exchange.complete:
            exchange.framing_run += len(data)
            if exchange.framing_run > _MAX_HEADER_BYTES:
                exchange.expire(UpstreamProtocolError("upstream response trailer is too large"))

    def _body_bytes(self, exchange: Exchange, data: bytes) -> None:
        """Body bytes past the parser (see ``Exchange.may_bypass_parser``)."""
        due = exchange.body_due
        assert due is not None
        if len(data) > due:
            # Bytes past the announced length answer nothing: the body ends where it
            # said, and the connection, its framing lost, is not used again.
            self._body_bytes(exchange, data[:due])
            self.abort()
            return
        exchange.body_due = due - len(data)
        self.on_body(data)
        if exchange.body_due == 0:
            # The parser, left mid-message, cannot read the next response.
            self.parser = httptools.HttpResponseParser(self)
            self.on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None and not exchange.complete:
            if exchange.headers_done and exc is None and exchange.delimited_by_close():
                self.on_message_complete()
            else:
                what = "before the response" if not exchange.headers_done else "mid-body"
                exchange.fail(UpstreamBroken(f"upstream closed the connection {what}"))
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

    # -- httptools callbacks: the response of the exchange under way ------------------

    def on_message_begin(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.complete:
            # A second response to one request: a desynchronised or malicious upstream.
            raise UpstreamProtocolError("upstream sent more than one response")

    def on_status(self, status: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.header_bytes += len(status)  # the reason phrase counts toward the head
        if exchange.header_bytes > _MAX_HEADER_BYTES:
            raise UpstreamProtocolError("upstream response head is too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.header_bytes += len(name) + len(value) + 4
        if exchange.headers_done:
            # A trailer field: not relayed (ASGI has no trailers for a proxied response),
            # but counted with the head against the same limit.
            if exchange.header_bytes > _MAX_HEADER_BYTES:
                raise UpstreamProtocolError("upstream response trailer is too large")
            return
        headers = exchange.headers
        if exchange.header_bytes > _MAX_HEADER_BYTES or len(headers) >= _MAX_HEADERS:
            raise UpstreamProtocolError("upstream response headers are too large")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
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
            exchange.interim = True  # 100 Continue, 103 Early Hints: not the response
            exchange.headers = []
            exchange.header_bytes = 0
            return
        exchange.status = status
        exchange.headers_done = True
        exchange.keep_alive = self.parser.should_keep_alive()
        if exchange.head_only:
            # The parser cannot be told the request was HEAD, so it would wait for the
            # Content-Length it announces: the response ends here, the connection too.
            exchange.keep_alive = False
            exchange.complete = True
        exchange.wake()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.body_seen += len(body)
        exchange.body.append(body)
        exchange.body_size += len(body)
        if exchange.body_size > _READ_HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.interim:
            exchange.interim = False
            return
        exchange.complete = True
        exchange.wake()

    # -- flow control -----------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    async def drain(self, timeout: float) -> None:
        """Wait until the upstream takes what was written, at most ``timeout`` seconds
        (nginx's ``proxy_send_timeout``: between two successful writes); past it the
        exchange fails with ``UpstreamTimeout`` and the connection is closed."""
        if self.closed:
            raise UpstreamBroken("upstream closed the connection")
        if self._write_paused:
            drain = self._drain = self.loop.create_future()
            error = UpstreamTimeout(f"upstream took no request body for {timeout}s")
            timer = self.loop.call_later(timeout, self._expire, error)
            try:
                await drain
            finally:
                timer.cancel()
                self._drain = None

    def _expire(self, error: UpstreamError) -> None:
        if self.exchange is not None:
            self.exchange.fail(error)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


class Deadlines:
    """The read deadlines of the exchanges waiting on one event loop, under one timer set
    to the earliest of them.

    A timer per wait (``call_later``, then ``cancel`` when the upstream answers in time,
    as nearly every one does) cost more than the rest of an exchange's bookkeeping. Here
    a wait only joins and leaves a set; the timer is moved only when a wait ends earlier
    than every other, and when it fires it fails the waits that are due and is set again
    to the earliest left. The deadlines are as exact as with a timer each: the timer may
    fire for a wait that already ended (then it only looks again), never late.
    """

    __slots__ = ("_at", "_timer", "loop", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: set[Exchange] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf

    def add(self, exchange: Exchange) -> None:
        self.waiting.add(exchange)
        if exchange.deadline < self._at:
            self._arm(exchange.deadline)

    def discard(self, exchange: Exchange) -> None:
        self.waiting.discard(exchange)

    def close(self) -> None:
        """The owner closes: the timer goes, unless a wait is still under way (its
        deadline stands until its connection's end wakes it)."""
        if self._timer is not None and not self.waiting:
            self._timer.cancel()
            self._timer = None
            self._at = math.inf

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self.loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._at = math.inf
        now = self.loop.time()
        for exchange in [e for e in self.waiting if e.deadline <= now]:
            self.waiting.discard(exchange)
            exchange.expire(UpstreamTimeout("read timed out"))
        if self.waiting:
            self._arm(min(exchange.deadline for exchange in self.waiting))


class Exchange:
    """One request's response on a ``Connection``, which fills it in as it parses; the
    response ``http1`` hands out reads its status, headers and body from here."""

    __slots__ = (
        "_conn",
        "body",
        "body_due",
        "body_seen",
        "body_size",
        "bypass_checked",
        "complete",
        "deadline",
        "error",
        "framing_run",
        "head_only",
        "head_received",
        "header_bytes",
        "headers",
        "headers_done",
        "interim",
        "keep_alive",
        "received_any",
        "status",
        "waiter",
    )

    def __init__(self, conn: Connection, head_only: bool) -> None:
        self._conn = conn
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        #: The head's size as parsed, and as received (a partial line is not parsed yet).
        self.header_bytes = 0
        self.head_received = 0
        #: Bytes received in a row that carried no body byte (chunk framing, a trailer):
        #: past the head limit, an upstream is sending an endless trailer or extension.
        self.framing_run = 0
        self.headers_done = False
        self.interim = False
        self.complete = False
        self.keep_alive = True
        #: Whether any byte of the response came back (a kept-alive connection the
        #: upstream closed as it was reused did not: the request may go again).
        self.received_any = False
        self.error: UpstreamError | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        #: Body bytes the parser has passed on, and how many of a Content-Length body are
        #: still due once they go past the parser (None: not doing so).
        self.body_seen = 0
        self.body_due: int | None = None
        self.bypass_checked = False
        self.waiter: asyncio.Future[None] | None = None
        #: When the wait under way times out (``wait``; loop time).
        self.deadline = math.inf

    def may_bypass_parser(self) -> bool:
        """Whether the rest of this response's body may skip the parser: only a body
        framed by one Content-Length (no Transfer-Encoding), whose head the parser has
        already checked. A large body then goes from the socket to ``read()`` without
        being copied again by the parser; the connection replaces the parser, left
        mid-message, before it carries another exchange."""
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

    def delimited_by_close(self) -> bool:
        """Whether the body ends where the connection does (no length, not chunked)."""
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def reusable(self) -> bool:
        """Whether the connection may carry another exchange after this one: the whole
        response read, kept alive by the upstream, and still open."""
        return self.complete and self.keep_alive and not self.body and not self._conn.closed

    # -- waiting for the upstream -----------------------------------------------------

    def wake(self) -> None:
        """Parser progress (or failure): the reader waiting, if any, goes on."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: UpstreamError) -> None:
        """Report ``error`` to the reader (the first one stands); no reuse after it."""
        if self.error is None:
            self.error = error
        self.keep_alive = False
        self.wake()

    def expire(self, error: UpstreamError) -> None:
        """Fail with ``error`` and close the connection."""
        self.fail(error)
        self._conn.abort()

    async def wait(self, timeout: float) -> None:
        """Wait for parser progress (or failure), at most ``timeout`` seconds."""
        conn = self._conn
        loop = conn.loop
        waiter = self.waiter = loop.create_future()
        self.deadline = loop.time() + timeout
        deadlines = conn.deadlines
        deadlines.add(self)
        try:
            await waiter
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            deadlines.discard(self)
            self.waiter = None

    async def wait_or(self, task: asyncio.Task[None]) -> None:
        """Wait for parser progress or for ``task`` to end, with no time limit."""
        waiter = self.waiter = self._conn.loop.create_future()
        try:
            await asyncio.wait((waiter, task), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._conn.abort()
            raise
        finally:
            self.waiter = None

    def take_body(self) -> bytes:
        """The next body bytes buffered: the first piece received, joined with the pieces
        after it while all of them fit in ``_JOIN_LIMIT`` (a chunked body's small chunks go
        out in one send; a large piece is never copied). Reading resumes once what is left
        is within the high-water mark."""
        body = self.body
        data = body[0]
        if len(body) == 1:
            body.clear()
        else:
            size, count = len(data), 1
            while count < len(body) and size + len(body[count]) <= _JOIN_LIMIT:
                size += len(body[count])
                count += 1
            if count > 1:
                data = b"".join(body[:count])
            del body[:count]
        self.body_size -= len(data)
        if self._conn.reading_paused and self.body_size <= _READ_HIGH_WATER:
            self._conn.resume_reading()
        return data
