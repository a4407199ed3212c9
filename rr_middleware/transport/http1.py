"""The default upstream transport: a lean HTTP/1.1 client made for proxying.

Built on asyncio protocols and httptools (llhttp, the parser uvicorn and Node.js use), it
speaks bytes end to end: the request head is assembled from the raw header pairs forwarding
hands it, with no text round trip, no header objects and no URL objects, and the response
headers come back as the raw pairs the upstream sent. It keeps idle keep-alive connections
per upstream, streams bodies both ways with backpressure (reading from the upstream pauses
while the client is slow), and never adds a header of its own.

What it deliberately does not do: cookies, redirects, proxies from the environment,
decompression, pipelining. A connection is reused only when its previous exchange ended
cleanly (whole response read, whole request written, keep-alive); anything else discards it.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from .base import (
    ConnectFailed,
    ConnectTimeout,
    RequestNotForwardable,
    UpstreamAddress,
    UpstreamBroken,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTransport,
)
from .http1_connection import Connection, Deadlines, Exchange

__all__ = ["Http1Transport"]

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class _Response:
    """An upstream response on a connection; releasing it returns or discards the
    connection."""

    __slots__ = (
        "_conn",
        "_exchange",
        "_owner",
        "_read_timeout",
        "_released",
        "_writer",
        "headers",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        exchange: Exchange,
        owner: Connections,
        read_timeout: float,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._conn = conn
        self._exchange = exchange
        self._owner = owner
        self._read_timeout = read_timeout
        self._writer = writer
        self._released = False
        self.status = exchange.status
        self.headers = exchange.headers

    def body_complete(self) -> bool:
        return self._exchange.complete

    async def read(self) -> bytes:
        exchange = self._exchange
        while True:
            if exchange.body:
                return exchange.take_body()
            if exchange.complete:
                return b""
            if exchange.error is not None:
                raise exchange.error
            await exchange.wait(self._read_timeout)

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        # If the upstream answered before taking the whole body, the rest is not sent.
        await _settle(self._writer, conn)
        if self._exchange.reusable():
            self._owner.release(conn)
        else:
            conn.abort()
            self._owner.forget(conn)


class Connections:
    """Every connection of one event loop: idle ones per upstream, and all of them.
    Each connection tells it when it is lost (``forget``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed = False
        self.retired = False
        self.idle: dict[str, list[Connection]] = {}
        self.all: set[Connection] = set()
        self.keys: dict[Connection, str] = {}
        self.deadlines = Deadlines(loop)

    def take_idle(self, key: str, keepalive: float) -> Connection | None:
        idle = self.idle.get(key)
        now = self.loop.time()
        while idle:
            conn = idle.pop()  # the most recently used: the warmest, the least stale
            if conn.usable(now, keepalive):
                return conn
            conn.abort()
            self.forget(conn)
        return None

    def add(self, conn: Connection, key: str) -> None:
        self.all.add(conn)
        self.keys[conn] = key

    def release(self, conn: Connection) -> None:
        if self.retired:  # keeps nothing idle any more: see ``retire``
            conn.abort()
            self.forget(conn)
            return
        conn.idle()
        self.idle.setdefault(self.keys[conn], []).append(conn)

    def retire(self) -> None:
        """Keep no connection idle from now on: the idle ones close now, the busy ones
        when their exchange ends (requests may still come, each on a connection of its
        own)."""
        self.retired = True
        for idle in self.idle.values():
            for conn in idle:
                conn.abort()
                self.all.discard(conn)
                self.keys.pop(conn, None)
        self.idle.clear()

    def forget(self, conn: Connection) -> None:
        self.all.discard(conn)
        key = self.keys.pop(conn, None)
        idle = self.idle.get(key) if key is not None else None
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        self.closed = True
        for conn in list(self.all):
            conn.abort()
        self.all.clear()
        self.idle.clear()
        self.keys.clear()
        self.deadlines.close()


async def _close_at_loop_end(connections: Connections) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        connections.close()


def _head(request: UpstreamRequest, extra: bytes) -> bytes:
    """The request line and headers, as bytes. Raises RequestNotForwardable if any part
    would break the framing (CR, LF or NUL inside the target, a name or a value): the
    ASGI server normally refuses such bytes, but a laxer one or a middleware rewriting
    the scope must not be able to inject a header or a second request upstream."""
    headers = request.headers
    # One join over the pairs (each joined by C, not by a bytecode loop).
    head = b"".join(
        (
            request.method.encode("ascii"),
            b" ",
            request.target,
            b" HTTP/1.1\r\n",
            b"\r\n".join(map(b": ".join, headers)),
            b"\r\n" if headers else b"",
            extra,
            b"\r\n",
        )
    )
    if sum(map(len, headers)) != 2 * len(headers):  # the join would take any tuple
        raise RequestNotForwardable("a request header that is not a (name, value) pair")
    breaks = len(headers) + 2 + extra.count(b"\n")
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        raise RequestNotForwardable("CR, LF or NUL inside the request line or a header")
    return head


def _has_content_length(request: UpstreamRequest) -> bool:
    return any(name == b"content-length" for name, _ in request.headers)


class Http1Transport(UpstreamTransport):
    """HTTP/1.1 (and HTTPS) to upstreams over pooled keep-alive connections.

    ``keepalive_timeout`` (default 4 s): idle connections older than this are not reused,
    so they are dropped before common upstream servers close them (uvicorn and Node.js
    after 5 s). ``ssl``: True verifies certificates with the system's CAs (default), or
    pass an ``ssl.SSLContext``. ``server_name``: the name to verify and send as SNI
    (``None``: each upstream URL's host).
    """

    def __init__(
        self, *, keepalive_timeout: float = 4.0, ssl: Any = True, server_name: str | None = None
    ) -> None:
        self._keepalive = keepalive_timeout
        self._ssl_option = ssl
        self._server_name = server_name
        self._ssl_context: ssl_module.SSLContext | None = None
        self._connections: Connections | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        self._retired = False

    # -- life -------------------------------------------------------------------------

    async def aopen(self) -> None:
        loop = asyncio.get_running_loop()
        if self._connections is None or self._connections.loop is not loop:
            self._connections = Connections(loop)

    async def aclose(self) -> None:
        connections, self._connections = self._connections, None
        if connections is not None:
            connections.close()

    async def _open_lazily(self, loop: asyncio.AbstractEventLoop) -> Connections:
        """Outside a lifespan (a TestClient without ``with``) no shutdown will come, so
        the event loop's own end closes the connections: an async generator started here
        is adopted by the loop, whose shutdown (``asyncio.run`` and anyio's runner end with
        ``shutdown_asyncgens``) resumes it into its ``finally``."""
        connections = Connections(loop)
        connections.retired = self._retired
        closer = _close_at_loop_end(connections)
        await closer.asend(None)
        self._closer = closer
        self._connections = connections
        return connections

    def retire(self) -> None:
        """No pool uses this transport any more: its idle connections close now, those
        carrying a request as their exchange ends, and any request still sent gets a
        connection of its own, closed after it."""
        self._retired = True
        if self._connections is not None:
            self._connections.retire()

    @property
    def open_connections(self) -> int:
        """Connections currently held, idle or busy (for leak checks)."""
        return len(self._connections.all) if self._connections is not None else 0

    # -- requests ---------------------------------------------------------------------

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        connections = self._connections
        if connections is None or connections.loop is not loop:
            connections = await self._open_lazily(loop)
        upstream = request.upstream
        key = upstream.origin
        head_only = request.method == "HEAD"
        conn = connections.take_idle(key, self._keepalive)
        if conn is not None:
            exchange = conn.start(head_only)
            try:
                return await self._exchange(conn, exchange, connections, request)
            except UpstreamBroken:
                # A kept-alive connection the upstream closed as we reused it: nothing of
                # the response came back. Safe to send again on a fresh connection only if
                # the upstream could not have acted on it twice.
                if exchange.received_any or not _replayable(request):
                    raise
        conn = await self._connect(loop, upstream, request.connect_timeout, connections)
        connections.add(conn, key)
        return await self._exchange(conn, conn.start(head_only), connections, request)

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        upstream: UpstreamAddress,
        timeout: float,
        connections: Connections,
    ) -> Connection:
        ssl_context = self._ssl(upstream)
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(loop, connections.forget, connections.deadlines),
                    upstream.host,
                    upstream.port,
                    ssl=ssl_context,
                    server_hostname=(self._server_name or upstream.host)
                    if ssl_context is not None
                    else None,
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"connect timed out after {timeout}s") from None
        except ssl_module.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed: {exc}") from exc
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc) or type(exc).__name__) from exc
        return protocol

    def _ssl(self, upstream: UpstreamAddress) -> ssl_module.SSLContext | None:
        if upstream.scheme != "https":
            return None
        if isinstance(self._ssl_option, ssl_module.SSLContext):
            return self._ssl_option
        if self._ssl_context is None:
            context = ssl_module.create_default_context()
            if self._ssl_option is False:
                context.check_hostname = False
                context.verify_mode = ssl_module.CERT_NONE
            self._ssl_context = context
        return self._ssl_context

    async def _exchange(
        self,
        conn: Connection,
        exchange: Exchange,
        connections: Connections,
        request: UpstreamRequest,
    ) -> UpstreamResponse:
        transport = conn.transport
        assert transport is not None
        body = request.body
        writer: asyncio.Task[None] | None = None
        try:
            if body is None:
                transport.write(_head(request, b""))
            elif isinstance(body, bytes):
                extra = (
                    b"" if _has_content_length(request) else b"content-length: %d\r\n" % len(body)
                )
                transport.write(_head(request, extra) + body)
            else:
                chunked = not _has_content_length(request)
                transport.write(
                    _head(request, b"transfer-encoding: chunked\r\n" if chunked else b"")
                )
                writer = asyncio.ensure_future(
                    _write_body(conn, body, chunked, request.read_timeout)
                )
            while not exchange.headers_done:
                if exchange.error is not None:
                    raise exchange.error
                if writer is None or writer.done():
                    await exchange.wait(request.read_timeout)
                else:
                    # While the body goes up, the read timeout is not running: an upload
                    # goes at the client's pace. Its waits have deadlines of their own:
                    # the upstream taking the body (``drain``) and the client sending it
                    # (the body iterable's).
                    await exchange.wait_or(writer)
        except BaseException:
            await _settle(writer, conn)
            connections.forget(conn)
            raise
        return _Response(conn, exchange, connections, request.read_timeout, writer)


async def _settle(writer: asyncio.Task[None] | None, conn: Connection) -> None:
    """End a request-body writer: cancel it if still running (the connection goes with
    it), and collect its outcome so no task is left with an unretrieved exception."""
    if writer is None:
        return
    if not writer.done():
        writer.cancel()
        conn.abort()
        await asyncio.wait((writer,))
    if not writer.cancelled() and writer.exception() is not None:
        conn.abort()


def _replayable(request: UpstreamRequest) -> bool:
    return request.method in _IDEMPOTENT and not isinstance(request.body, AsyncIterable)


async def _write_body(
    conn: Connection, body: AsyncIterable[bytes], chunked: bool, timeout: float
) -> None:
    transport = conn.transport
    assert transport is not None
    try:
        async for chunk in body:
            if not chunk:
                continue
            if conn.closed:
                return
            if chunked:
                # Framing around the chunk, not a copy of it: uvloop writes the three
                # pieces in one writev.
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await conn.drain(timeout)
        if chunked and not conn.closed:
            transport.write(b"0\r\n\r\n")
    except UpstreamError:
        return  # the connection is gone; the exchange reports it
    except Exception:
        # The client's body failed (it disconnected): the upstream must not take a
        # truncated body as complete, so the connection goes.
        conn.abort()
        raise
