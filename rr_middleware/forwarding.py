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
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from .client import ClientBodyError, ClientSide, Sweeper
from .headers import BadRequestHeaders, TrustedProxies, request_headers, response_headers
from .transport.base import (
    PoolTimeout,
    RequestNotForwardable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTransport,
)

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from .state import PoolRuntime, UpstreamState

__all__ = ["ProxySettings", "ResponseAborted", "forward", "send_error"]

logger = logging.getLogger("rr_middleware")

# RFC 9110 §9.2.2. Only these may be sent twice once a request may have reached an upstream.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
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
    #: Keeps the deadlines of every exchange in flight (see ``client``).
    sweeper: Sweeper = field(default_factory=Sweeper)


class ResponseAborted(Exception):
    """The upstream failed after the response had started; the client connection must be
    aborted so the client sees an incomplete response, not a complete wrong one."""


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
    peer = scope.get("client")
    try:
        headers, has_host = request_headers(
            scope["headers"],
            client_host=peer[0] if peer else None,
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

    size_limit = pool.max_body_size
    if size_limit is not None and (_declared_length(scope["headers"]) or 0) > size_limit:
        await send_error(send, 413)  # said up front: not a byte of the body is read
        return
    # The start of a body is read before an upstream is picked, so a client that stalls
    # early holds no upstream connection, and a short body, read whole, can be sent again
    # by a retry; a longer one streams from there at the client's pace.
    retryable = method in IDEMPOTENT_METHODS or pool.retry_non_idempotent
    buffer = max(pool.request_buffer_size, pool.retry_body_limit if retryable else 0)
    client = ClientSide(
        receive,
        limit=size_limit,
        body_timeout=pool.client_body_timeout,
        send_timeout=pool.client_send_timeout,
        sweeper=settings.sweeper,
    )
    try:
        try:
            body = await client.start(buffer)
        except ClientBodyError as exc:
            await _client_body_ended(state, exc, send)
            return
        stream = None if client.complete else client
        await _exchange(
            state, scope, send, method, suffix, headers, has_host, body, stream, settings, client
        )
    except asyncio.CancelledError:
        if not client.swallows():
            raise
        if client.stalled:
            logger.info(
                "pool %s: the client took no response for %ss; aborting its connection",
                state.name,
                pool.client_send_timeout,
            )
            raise ResponseAborted("the client stopped reading its response") from None
        logger.info(
            "pool %s: client left during %s %s; upstream exchange closed",
            state.name,
            method,
            scope.get("path", ""),
        )
    finally:
        client.close()


async def _exchange(
    state: PoolRuntime,
    scope: Scope,
    send: Send,
    method: str,
    suffix: bytes,
    headers: list[tuple[bytes, bytes]],
    has_host: bool,
    body: bytes | None,
    stream: ClientSide | None,
    settings: ProxySettings,
    client: ClientSide,
) -> None:
    pool = state.pool
    retryable = method in IDEMPOTENT_METHODS or pool.retry_non_idempotent
    # Only a body held whole, within retry_body_limit, is sent again.
    replayable = stream is None and (body is None or len(body) <= pool.retry_body_limit)
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
            if not 200 <= response.status <= 599:
                await response.aclose()
                raise UpstreamProtocolError(f"upstream answered status {response.status:03d}")
        except (UpstreamError, ClientBodyError) as exc:
            member.limiter.release()
            response = None
            if stream is not None and stream.failure is not None:
                # The client's side of the body ended the exchange, however the transport
                # reported it (its own exception, or the broken upstream connection).
                await _client_body_ended(state, stream.failure, send)
                return
            if not isinstance(exc, UpstreamError):
                raise  # a ClientBodyError only comes from the stream, which keeps it
            error = exc
            if not isinstance(exc, RequestNotForwardable):
                state.report_failure(member, exc.kind)
            retry = (
                _may_retry(exc, retryable, replayable)
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
            and replayable
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
            try:
                await response.aclose()
            finally:
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
        client.close()
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
        await _relay(response, method, send, stream, state, member, settings, client)
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


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _client_body_ended(state: PoolRuntime, failure: ClientBodyError, send: Send) -> None:
    logger.info("pool %s: %s", state.name, failure)
    if failure.status:
        await send_error(send, failure.status, [(b"connection", b"close")])


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


def _may_retry(exc: UpstreamError, retryable: bool, replayable: bool) -> bool:
    if isinstance(exc, (UpstreamTimeout, RequestNotForwardable)):
        return False  # a silent upstream costs the client one timeout, not one per retry
    if not exc.sent:
        return True  # nothing reached the upstream (a streamed body was not read yet)
    return retryable and replayable


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
    send: Send,
    stream: ClientSide | None,
    state: PoolRuntime,
    member: UpstreamState,
    settings: ProxySettings,
    client: ClientSide,
) -> None:
    """Relay the response, counting the body bytes into the upstream's stats as they go.
    The client leaving, or not reading, cancels this wherever it waits."""
    status = response.status
    stats = member.stats
    headers = response_headers(response.headers, settings.hidden_response_headers)
    time = client.loop.time
    try:
        # Each send marks when it began (client.sending_since): a client that takes
        # nothing for client_send_timeout is cut off (see ClientSide).
        client.sending_since = time()
        if status in (204, 304) or status < 200:
            # No body, by definition. A 304's Content-Length (the size of the cached
            # representation, RFC 9110 §8.6) would make the ASGI server expect one.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            client.close()
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            client.close()
            return
        if response.body_complete():
            body = b""
            while chunk := await response.read():
                body += chunk
            await send({"type": "http.response.body", "body": body})
            client.close()
            stats.bytes_out += len(body)
            return
        # A streamed body (an SSE stream never ends by itself): ended when the client
        # leaves (see ClientSide).
        client.sending_since = None
        while chunk := await response.read():
            stats.bytes_out += len(chunk)
            client.sending_since = time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            client.sending_since = None
        client.sending_since = time()
        await send({"type": "http.response.body", "body": b""})
        client.close()
    except UpstreamError as exc:
        if stream is not None and stream.failure is not None:
            # The client's side of the body broke the upstream exchange: not the
            # upstream's failure, and no one is left to tell.
            logger.info("pool %s: %s", state.name, stream.failure)
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
