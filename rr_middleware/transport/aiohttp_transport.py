"""The default upstream transport: aiohttp's C-accelerated HTTP/1.1 client.

Configured as a proxy's client, not a browser's: no cookie jar, no redirects, no proxy
environment variables, no automatic headers (User-Agent, Accept, Accept-Encoding,
Content-Type) and no decompression: the body bytes the upstream sends are the bytes the
client gets.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from .base import (
    ConnectFailed,
    ConnectTimeout,
    RequestNotForwardable,
    UpstreamBroken,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTransport,
    headers_within,
)

__all__ = ["AiohttpTransport"]

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _translate(exc: BaseException) -> UpstreamError:
    """Map an aiohttp failure onto the seam's error family."""
    error: UpstreamError
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        error = ConnectTimeout("connect timed out")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = ConnectFailed(str(exc.os_error) or "connection failed")
    elif isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        error = UpstreamTimeout("read timed out")
    elif isinstance(exc, aiohttp.ClientResponseError):
        error = UpstreamProtocolError(f"invalid response: {exc.message}")
    elif isinstance(exc, aiohttp.ClientPayloadError):
        error = UpstreamBroken(f"incomplete body: {exc}")
    else:
        error = UpstreamBroken(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class _Response:
    __slots__ = ("_content", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._content = response.content
        self.status = response.status
        self.headers: list[tuple[bytes, bytes]] = list(response.raw_headers)

    async def read(self) -> bytes:
        try:
            return await self._content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc) from exc

    def body_complete(self) -> bool:
        return self._content.is_eof()

    async def aclose(self) -> None:
        # release() keeps the connection only if the body was read to the end, and
        # cancels the request body's writer if it still runs; it does not wait for that
        # writer, which may be in the client's receive(): waiting here keeps this
        # transport's promise that the body is read no more once aclose() returns (an
        # early answer then lingers for the rest as its only reader).
        response = self._response
        response.release()
        # In a task of its own: wait_for_close() raises the writer's failure (the client's
        # body broke it: reported where it happened) and, on Python 3.10, would swallow a
        # cancellation of this task.
        closing = asyncio.ensure_future(response.wait_for_close())
        closing.add_done_callback(_retrieve)
        await asyncio.wait((closing,))


def _retrieve(task: asyncio.Future[None]) -> None:
    """Read a finished task's outcome, so that no failure is logged as never retrieved."""
    if not task.cancelled():
        task.exception()


class _PacedBody:
    """The request body as aiohttp pulls it, with a deadline on each pull.

    aiohttp's body writer waits for the upstream to take each part with no time limit,
    so an upstream that stops reading an upload would hold the exchange forever. Here a
    part handed to aiohttp must be followed by aiohttp asking for the next one within
    ``timeout`` seconds (nginx's ``proxy_send_timeout``); past it the connection is
    aborted (closing it would wait for the unsent bytes forever), and ``send`` reports
    ``UpstreamTimeout``. Waiting on the body's own source (the client) does not count.
    ``_Connector`` tells it which connection carries the request.
    """

    __slots__ = ("_body", "_timeout", "_timer", "connection", "stalled")

    def __init__(self, body: AsyncIterable[bytes], timeout: float) -> None:
        self._body = body
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self.connection: aiohttp.connector.Connection | None = None
        self.stalled = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self._body:
                self._timer = loop.call_later(self._timeout, self._stall)
                yield chunk
                self.disarm()
        finally:
            self.disarm()

    def _stall(self) -> None:
        self._timer = None
        transport = self.connection.transport if self.connection is not None else None
        if transport is not None:
            self.stalled = True
            transport.abort()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


#: The paced body of the request this task is sending, for the connector to tell it which
#: connection carries it (aiohttp hands the connection to no public hook).
_SENDING: contextvars.ContextVar[_PacedBody | None] = contextvars.ContextVar(
    "rr_middleware_aiohttp_sending", default=None
)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling a paced body which connection it goes up on."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        paced = _SENDING.get()
        if paced is not None:
            paced.connection = connection
        return connection


async def _close_at_loop_end(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await session.close()


class AiohttpTransport(UpstreamTransport):
    """HTTP/1.1 to upstreams over pooled keep-alive connections.

    ``keepalive_timeout`` (default 4 s) closes idle connections before common upstream
    servers do (uvicorn and Node close after 5 s), so a reused connection is rarely stale.
    ``ssl`` is passed to aiohttp: True verifies certificates (default), or an SSLContext.
    """

    def __init__(
        self,
        *,
        keepalive_timeout: float = 4.0,
        ssl: Any = True,
        read_bufsize: int = 2**16,
    ) -> None:
        self._keepalive_timeout = keepalive_timeout
        self._ssl = ssl
        self._read_bufsize = read_bufsize
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        # A session belongs to one event loop. A new loop (a TestClient used without
        # "with" runs each request in its own) gets a new session; the old loop is gone,
        # so its session can only be dropped.
        self._loop = asyncio.get_running_loop()
        connector = _Connector(
            limit=0,  # concurrency is bounded per upstream by the pool (max_connections)
            keepalive_timeout=self._keepalive_timeout,
            ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            read_bufsize=self._read_bufsize,
            requote_redirect_url=False,
        )
        return self._session

    async def _open_lazily(self) -> aiohttp.ClientSession:
        """Open outside a lifespan (a TestClient without ``with``): no shutdown will come
        to close the session, so its event loop's end does. An async generator started
        here is adopted by the loop, whose shutdown (``asyncio.run`` and anyio's runner end
        with ``shutdown_asyncgens``) resumes it into its ``finally``."""
        session = self._open()
        closer = _close_at_loop_end(session)
        await closer.asend(None)
        self._closer = closer  # keep it alive until the loop finalises it
        return session

    def _timeout(self, connect: float, read: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get((connect, read))
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=connect, sock_read=read
            )
            self._timeouts[(connect, read)] = timeout
        return timeout

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        session = self._session
        if session is None or self._loop is not asyncio.get_running_loop():
            session = await self._open_lazily()
        url = URL(request.upstream.origin + request.target.decode("latin-1"), encoded=True)
        try:
            # aiohttp writes header text as UTF-8, so UTF-8 is what round-trips bytes exactly.
            headers = [(n.decode("latin-1"), v.decode("utf-8")) for n, v in request.headers]
        except UnicodeDecodeError:
            raise RequestNotForwardable(
                "a request header value is not UTF-8 and cannot be sent byte for byte"
            ) from None
        body = request.body
        paced = None
        if body is not None and not isinstance(body, bytes):
            paced = _PacedBody(body, request.read_timeout)
        sending = _SENDING.set(paced)
        requesting = session.request(
            request.method,
            url,
            headers=headers,
            data=paced.__aiter__() if paced is not None else body,
            allow_redirects=False,
            timeout=self._timeout(request.connect_timeout, request.read_timeout),
        )
        try:
            if paced is not None:  # at the client's pace: no overall limit
                response = await requesting
            else:
                response = await headers_within(request.read_timeout, requesting)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            if paced is not None and paced.stalled:
                raise UpstreamTimeout(
                    f"upstream took no request body for {request.read_timeout}s"
                ) from exc
            raise _translate(exc) from exc
        finally:
            _SENDING.reset(sending)
        return _Response(response)

    @property
    def open_connections(self) -> int:
        """Connections currently held (idle or busy); for leak checks."""
        connector = self._session.connector if self._session is not None else None
        if connector is None:
            return 0
        idle = sum(len(conns) for conns in connector._conns.values())
        return idle + len(connector._acquired)

    async def aopen(self) -> None:
        if self._session is None or self._loop is not asyncio.get_running_loop():
            self._open()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
