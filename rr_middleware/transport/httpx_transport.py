"""Adapter: any ``httpx.AsyncBaseTransport`` as an upstream transport.

This is how in-process upstreams (``Upstream(url, app=...)`` through
``httpx.ASGITransport``), ``httpx.MockTransport`` and HTTP/2 (``httpx.AsyncHTTPTransport(
http2=True)``) plug in. The request is built from raw parts (``raw_path``), so nothing is
re-quoted or normalised on the way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .base import (
    ConnectFailed,
    ConnectTimeout,
    PoolTimeout,
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

__all__ = ["HttpxTransport", "in_process"]

logger = logging.getLogger("rr_middleware")


def _translate(exc: httpx.HTTPError) -> UpstreamError:
    error: UpstreamError
    if isinstance(exc, httpx.ConnectTimeout):
        error = ConnectTimeout("connect timed out")
    elif isinstance(exc, httpx.PoolTimeout):
        error = PoolTimeout("no free connection")
    elif isinstance(exc, httpx.TimeoutException):
        error = UpstreamTimeout("read timed out")
    elif isinstance(exc, httpx.ConnectError):
        error = ConnectFailed(str(exc) or "connection failed")
    elif isinstance(exc, httpx.RemoteProtocolError):
        error = UpstreamProtocolError(f"invalid response: {exc}")
    else:
        error = UpstreamBroken(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class _Response:
    __slots__ = ("_chunks", "_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = list(response.headers.raw)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        self._chunks: AsyncIterator[bytes] = stream.__aiter__()

    async def read(self) -> bytes:
        try:
            while True:
                chunk = await self._chunks.__anext__()
                if chunk:
                    return chunk
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    def body_complete(self) -> bool:
        return False

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport(UpstreamTransport):
    """Wraps an httpx transport. ``owned=True`` closes it with this adapter."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, owned: bool = False) -> None:
        self.transport = transport
        self._owned = owned

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        upstream = request.upstream
        try:
            # httpx re-quotes characters outside RFC 3986 (", <, >, {, }, ...) in the path
            # and query; the default transport sends them as they came.
            url = httpx.URL(
                scheme=upstream.scheme,
                host=upstream.host,
                port=upstream.port,
                raw_path=request.target,
            )
        except (UnicodeDecodeError, httpx.InvalidURL) as exc:
            raise RequestNotForwardable(f"httpx cannot express the target: {exc}") from None
        body = request.body
        timeout = {
            "connect": request.connect_timeout,
            "read": request.read_timeout,
            "write": request.read_timeout,
            "pool": request.connect_timeout,
        }
        outgoing = httpx.Request(
            request.method,
            url,
            headers=request.headers,
            content=body if body is not None else None,
            extensions={"timeout": timeout},
        )
        sending = self.transport.handle_async_request(outgoing)
        try:
            if isinstance(body, AsyncIterable):  # at the client's pace: no overall limit
                response = await sending
            else:
                response = await headers_within(request.read_timeout, sending)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        except _InProcessAppFailed as exc:
            raise UpstreamBroken(str(exc)) from exc
        return _Response(response)

    async def aclose(self) -> None:
        if self._owned:
            await self.transport.aclose()


class _InProcessAppFailed(Exception):
    """An in-process upstream app raised after its response had started."""


def in_process(app: ASGIApp) -> HttpxTransport:
    """The transport for ``Upstream(url, app=...)``: the app through ``httpx.ASGITransport``.

    It behaves like the app under a server: an exception before the response starts is
    a 500 (and the traceback is logged); one after it started fails the exchange, as a
    dropped connection would, instead of passing on a truncated body as complete.
    ``ASGITransport`` collects the whole response before returning it, so such a failure
    surfaces before any byte reaches the client: it is answered 502 (or retried).
    """

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, tracking_send)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise _InProcessAppFailed(f"in-process app raised mid-response: {exc!r}") from exc
            logger.exception("in-process upstream app raised before responding")
            body = b"Internal Server Error"
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

    return HttpxTransport(httpx.ASGITransport(app=guarded, raise_app_exceptions=True))
