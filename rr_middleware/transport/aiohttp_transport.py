"""The default upstream transport: aiohttp's C-accelerated HTTP/1.1 client.

Configured as a proxy's client, not a browser's: no cookie jar, no redirects, no proxy
environment variables, no automatic headers (User-Agent, Accept, Accept-Encoding,
Content-Type) and no decompression: the body bytes the upstream sends are the bytes the
client gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from yarl import URL

from .base import (
    ConnectFailed,
    ConnectTimeout,
    RequestNotForwardable,
    UpstreamBroken,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTransport,
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
        error = UpstreamBroken(f"invalid response: {exc.message}")
        error.kind = "protocol"
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
        # release() keeps the connection only if the body was read to the end.
        self._response.release()


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
        connector = aiohttp.TCPConnector(
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
        try:
            response = await session.request(
                request.method,
                url,
                headers=headers,
                data=request.body,
                allow_redirects=False,
                timeout=self._timeout(request.connect_timeout, request.read_timeout),
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise _translate(exc) from exc
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
