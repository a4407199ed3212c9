"""One request upstream and back: target, headers, body streaming, retries, error mapping.

Read top to bottom, ``forward`` is the data path: build the target and headers once, read
the first body message, pick an upstream (retrying the next one when that is safe), then
relay the response as it arrives. Nothing is buffered whole; errors become short generic
responses, with the cause logged.

Failure → status: connect refused/reset before a response, every attempt used → 502;
upstream read timeout → 504; no free connection within ``pool_timeout`` → 503; the
upstream failing after the response started → the client connection is aborted (the ASGI
app raises ``ResponseAborted``), never a silently truncated response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from .headers import BadRequestHeaders, TrustedProxies, request_headers, response_headers
from .transport.base import (
    PoolTimeout,
    RequestNotForwardable,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTransport,
)

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from .metrics import UpstreamStats
    from .state import PoolRuntime, UpstreamState

__all__ = ["ProxySettings", "ResponseAborted", "forward", "send_error"]

logger = logging.getLogger("rr_middleware")

# RFC 9110 §9.2.2. Only these may be sent twice once a request may have reached an upstream.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_REASONS = {
    400: b"Bad Request",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass(frozen=True)
class ProxySettings:
    """What every pool of one middleware shares."""

    transport: UpstreamTransport
    trusted: TrustedProxies
    hidden_response_headers: frozenset[bytes]
    max_header_bytes: int = 64 * 1024
    access_log: bool = False


class ResponseAborted(Exception):
    """The upstream failed after the response had started; the client connection must be
    aborted so the client sees an incomplete response, not a complete wrong one."""


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


async def send_error(
    send: Send,
    status: int,
    headers: Sequence[tuple[bytes, bytes]] = (),
    message: str = "http.response",
) -> None:
    """A short, generic plain-text error response. Causes go to the log, never here.
    ``message="websocket.http.response"`` answers a WebSocket handshake instead."""
    reason = _REASONS.get(status) or HTTPStatus(status).phrase.encode()
    body = b"%d %s\n" % (status, reason)
    await send(
        {
            "type": message + ".start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": message + ".body", "body": body})


class BodyTooLarge(Exception):
    """The client's body passed the pool's ``max_body_size``."""


class _RequestBody:
    """The rest of the client's body, pulled from ``receive`` as the upstream takes it;
    ``limit`` bytes at most in all (None: no limit)."""

    __slots__ = (
        "_first",
        "_receive",
        "complete",
        "disconnected",
        "limit",
        "size",
        "started",
        "too_large",
    )

    def __init__(self, receive: Receive, first: bytes, limit: int | None) -> None:
        self._receive = receive
        self._first = first
        self.limit = limit
        self.started = False
        self.complete = False
        self.disconnected = False
        self.too_large = False
        self.size = 0  # bytes read so far

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        self.size = len(self._first)
        if self._first:
            yield self._first
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise ClientDisconnected
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.limit is not None and self.size > self.limit:
                self.too_large = True
                raise BodyTooLarge
            if not message.get("more_body", False):
                self.complete = True
                if chunk:
                    yield chunk
                return
            if chunk:
                yield chunk


async def forward(
    state: PoolRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    path: bytes,
    settings: ProxySettings,
) -> None:
    """Forward one HTTP request to the pool and relay the answer. ``path`` is the raw path
    to send (prefix already stripped when the pool strips it)."""
    if not state.members:  # a discovered pool with no upstreams (yet, or any more)
        logger.info("pool %s: no upstreams; answering 503", state.name)
        await send_error(send, 503, [(b"retry-after", b"%d" % state.retry_after())])
        return
    pool = state.pool
    method: str = scope["method"]
    client = scope.get("client")
    try:
        headers, has_host = request_headers(
            scope["headers"],
            client_host=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            trusted=settings.trusted,
            keep_host=pool.preserve_host,
            prefix=state.prefix if pool.strip_prefix else b"",
            max_bytes=settings.max_header_bytes,
        )
    except BadRequestHeaders as exc:
        logger.info("pool %s: refused request: %s", state.name, exc)
        await send_error(send, exc.status)
        return
    query: bytes = scope.get("query_string", b"")
    suffix = path + b"?" + query if query else path

    retryable = method in IDEMPOTENT_METHODS or pool.retry_non_idempotent
    size_limit = pool.max_body_size
    if size_limit is not None and (_declared_length(scope["headers"]) or 0) > size_limit:
        await send_error(send, 413)  # said up front: not a byte of the body is read
        return
    try:
        body, stream = await _read_body(
            receive, pool.retry_body_limit if retryable else 0, size_limit
        )
    except ClientDisconnected:
        return
    except BodyTooLarge:
        logger.info("pool %s: request body over max_body_size (%d)", state.name, size_limit)
        await send_error(send, 413)
        return

    tried: list[UpstreamState] = []
    member: UpstreamState | None = None
    response: UpstreamResponse | None = None
    error: UpstreamError | None = None
    budget = pool.retries + 1  # distinct upstreams one request may try
    for attempt in range(budget):
        member = state.pick(tried)
        if member is None:
            break
        tried.append(member)
        upstream = member.upstream
        if not await member.limiter.acquire(pool.pool_timeout):
            error = PoolTimeout(f"no free connection within {pool.pool_timeout}s")
            logger.warning("pool %s: %s: %s", state.name, upstream.url, error)
            continue
        target = upstream.base_path + suffix
        if not target.startswith(b"/"):
            target = b"/" + target
        request = UpstreamRequest(
            method=method,
            upstream=upstream,
            target=target,
            headers=headers if has_host else [*headers, (b"host", upstream.host_header)],
            body=stream.chunks() if stream is not None else body,
            connect_timeout=pool.connect_timeout,
            read_timeout=pool.timeout,
        )
        started = time.monotonic()
        try:
            response = await (member.transport or settings.transport).send(request)
        except (UpstreamError, ClientDisconnected, BodyTooLarge) as exc:
            member.limiter.release()
            if stream is not None and (stream.disconnected or stream.too_large):
                # The client's side of the body ended the exchange, however the transport
                # reported it (its own exception, or the broken upstream connection).
                await _client_body_ended(state, stream, send)
                return
            if not isinstance(exc, UpstreamError):
                raise  # the other two only come from the stream, which flags them
            error = exc
            if not isinstance(exc, RequestNotForwardable):
                state.report_failure(member, exc.kind)
            retry = (
                _may_retry(exc, retryable, stream)
                and attempt + 1 < budget
                and state.more_to_try(tried)
            )
            logger.warning(
                "pool %s: %s %s failed (%s): %s%s",
                state.name,
                method,
                upstream.url,
                exc.kind,
                exc,
                "; trying the next upstream" if retry else "",
            )
            if not retry:
                break
            member.stats.retries += 1
            continue
        except BaseException:
            member.limiter.release()
            raise
        status = response.status
        stats = member.stats
        stats.headers_latency.record(time.monotonic() - started)
        stats.codes[status] = stats.codes.get(status, 0) + 1
        if status in pool.unhealthy_statuses:
            state.report_failure(member, f"status {status}")
        if (
            status in pool.retry_on_statuses
            and attempt + 1 < budget
            and state.more_to_try(tried)
            and retryable
            and stream is None
        ):
            if status not in pool.unhealthy_statuses:
                state.report_success(member)
            logger.warning(
                "pool %s: %s %s answered %d; trying the next upstream",
                state.name,
                method,
                upstream.url,
                status,
            )
            await response.aclose()
            member.limiter.release()
            stats.retries += 1
            response = None
            continue
        break

    if response is None or member is None:
        if not tried and state.all_down and pool.on_all_down == "fail":
            logger.warning("pool %s: every upstream is down; answering 503", state.name)
            retry_after = b"%d" % state.retry_after()
            await send_error(send, 503, [(b"retry-after", retry_after)])
            return
        if error is None:
            logger.warning("pool %s: no upstream available", state.name)
        status = _status_for(error)
        await send_error(send, status)
        if settings.access_log:
            tried_urls = ", ".join(m.upstream.url for m in tried) or "-"
            _access_log(state, method, scope, tried_urls, status, 0.0)
        return
    stats = member.stats
    if response.status in pool.unhealthy_statuses:
        logger.warning(
            "pool %s: %s %s answered %d (tried: %s)",
            state.name,
            method,
            member.upstream.url,
            response.status,
            ", ".join(m.upstream.url for m in tried),
        )
    try:
        await _relay(response, method, receive, send, stream, state, member, settings)
    finally:
        member.limiter.release()
        elapsed = time.monotonic() - started
        stats.total_latency.record(elapsed)
        stats.bytes_in += stream.size if stream is not None else len(body or b"")
        if settings.access_log:
            _access_log(state, method, scope, member.upstream.url, response.status, elapsed)
    # Judged on the whole exchange, not the headers: a body that breaks is a failure
    # (reported by _relay), and a half-open probe must deliver its body to pass.
    if response.status not in pool.unhealthy_statuses:
        state.report_success(member)


async def _read_body(
    receive: Receive, buffer_limit: int, size_limit: int | None
) -> tuple[bytes | None, _RequestBody | None]:
    """The request body as bytes (complete, so replayable) or as a stream.

    A body that arrives in one message, or in several totalling at most ``buffer_limit``
    bytes (``retry_body_limit`` for requests that may be retried), is held in memory; a
    longer one streams to the upstream, starting with what was already read. Raises
    ClientDisconnected if the client leaves first, BodyTooLarge past ``size_limit``.
    """
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    chunks = [message.get("body", b"")]
    size = len(chunks[0])
    while True:
        if size_limit is not None and size > size_limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            break
        if size > buffer_limit:
            return None, _RequestBody(receive, b"".join(chunks), size_limit)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body or None, None


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _client_body_ended(state: PoolRuntime, stream: _RequestBody, send: Send) -> None:
    if stream.too_large:
        logger.info("pool %s: request body over max_body_size", state.name)
        await send_error(send, 413)
    else:
        logger.info("pool %s: client left during the request body", state.name)


def _access_log(
    state: PoolRuntime, method: str, scope: Scope, upstream: str, status: int, elapsed: float
) -> None:
    logger.info(
        "pool %s: %s %s -> %s %d in %.1f ms",
        state.name,
        method,
        scope.get("path", ""),
        upstream,
        status,
        elapsed * 1000,
    )


def _may_retry(exc: UpstreamError, retryable: bool, stream: _RequestBody | None) -> bool:
    if isinstance(exc, (UpstreamTimeout, RequestNotForwardable)):
        return False  # a silent upstream costs the client one timeout, not one per retry
    if stream is not None and stream.started:
        return False  # the body was consumed: it cannot be sent again
    return not exc.sent or retryable


def _status_for(error: UpstreamError | None) -> int:
    if isinstance(error, RequestNotForwardable):
        return 400
    if isinstance(error, UpstreamTimeout) or (
        error is not None and error.kind == "connect_timeout"
    ):
        return 504
    if error is None or isinstance(error, PoolTimeout):
        return 503
    return 502


async def _relay(
    response: UpstreamResponse,
    method: str,
    receive: Receive,
    send: Send,
    stream: _RequestBody | None,
    state: PoolRuntime,
    member: UpstreamState,
    settings: ProxySettings,
) -> None:
    """Relay the response, counting the body bytes into the upstream's stats as they go."""
    status = response.status
    stats = member.stats
    headers = response_headers(response.headers, settings.hidden_response_headers)
    try:
        if status in (204, 304) or status < 200:
            # No body, by definition. A 304's Content-Length (the size of the cached
            # representation, RFC 9110 §8.6) would make the ASGI server expect one.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        if response.body_complete():
            body = b""
            while chunk := await response.read():
                body += chunk
            await send({"type": "http.response.body", "body": body})
            stats.bytes_out += len(body)
            return
        # A streamed body: relay it while listening for the client leaving, which must
        # end the upstream exchange at once (an SSE stream never ends by itself). Only
        # once the client's own body is fully read can we listen without stealing it.
        if stream is None or stream.complete:
            client_gone = asyncio.ensure_future(receive())
            try:
                await _pump_watching(response, send, client_gone, stats)
            finally:
                client_gone.cancel()
        else:
            await _pump(response, send, stats)
    except UpstreamError as exc:
        if stream is not None and stream.disconnected:
            # The client left mid-upload, which broke the upstream exchange: not the
            # upstream's failure, and no one is left to tell.
            logger.info("pool %s: client left during the request body", state.name)
            return
        state.report_failure(member, exc.kind)
        logger.warning(
            "pool %s: %s failed mid-response (%s): %s; aborting the client connection",
            state.name,
            member.upstream.url,
            exc.kind,
            exc,
        )
        # The cause is logged above; keep the server's own traceback short.
        raise ResponseAborted(f"upstream {member.upstream.url} failed mid-response") from None
    finally:
        await response.aclose()


async def _pump(response: UpstreamResponse, send: Send, stats: UpstreamStats) -> None:
    while chunk := await response.read():
        stats.bytes_out += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _pump_watching(
    response: UpstreamResponse,
    send: Send,
    client_gone: asyncio.Future[Message],
    stats: UpstreamStats,
) -> None:
    """``_pump``, but stop as soon as ``client_gone`` resolves (the disconnect message).

    The client leaving cancels this task wherever it waits (reading the upstream or
    sending to the client), rather than each read racing the disconnect in a task of its
    own: a per-chunk task and ``asyncio.wait`` cost more than relaying the chunk.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = finished = False

    def on_gone(_: asyncio.Future[Message]) -> None:
        nonlocal gone
        # A callback already scheduled runs even once removed: after the pump, no-op.
        if not gone and not finished:
            gone = True
            task.cancel()

    client_gone.add_done_callback(on_gone)
    try:
        await _pump(response, send, stats)
    except asyncio.CancelledError:
        # Ours (the client left): swallowed, and the caller's aclose() discards the
        # half-read upstream connection. Anyone else's (shutdown): passed on.
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if not gone or (uncancel is not None and uncancel() > 0):
            raise
    finally:
        finished = True
        client_gone.remove_done_callback(on_gone)
