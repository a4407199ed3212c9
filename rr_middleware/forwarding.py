"""One HTTP request upstream and back, in three layers (httpx's ``send`` →
``_send_handling_redirects`` → ``_send_single_request`` is the model):

1. ``forward``: what every request needs once: the upstream headers, the refusals that
   need no upstream, the client's side (``ClientSide``: the body, and a deadline on every
   wait on the client), and what happens when the client leaves.
2. ``_Forwarding.run``: the retry policy, written once: which failures and
   statuses move the request to the next upstream (within the pool's retry budget,
   ``budget.py``), and what the client gets when none answered.
3. ``Attempt`` (``attempt.py``): one try on one upstream, from the pick to the end of
   the response; it holds the connection slot and records the outcome exactly once. A
   pool with ``hedge_after`` races a request that may be sent twice against hedges
   (``HedgedAttempt``, ``hedging.py``), used in its place.

Nothing is buffered whole; errors become short generic responses (``send_error``), with
the cause logged. Each failure's status is its class's (``errors.py``): connect refused
or reset before a response, every attempt used → 502; a silent upstream → 504; no free
connection → 503; the upstream failing after the response started → the client
connection is aborted (``ResponseAborted``), never a silently truncated response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from starlette.responses import FileResponse, StreamingResponse

from .access_log import AccessLog, printable_path
from .client import ClientSide, Sweeper, abort_client, linger
from .errors import (
    BodyTooLarge,
    ClientBodyError,
    NoUpstream,
    PoolTimeout,
    ResponseAborted,
    UpstreamError,
)
from .headers import BadRequestHeaders, TrustedProxies, request_headers, response_headers
from .hooks import HookFailed
from .tracing import REQUEST_ID, AttemptTracer, request_id
from .transport.base import UpstreamRequest, UpstreamResponse

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import Message, Receive, Scope, Send

    from .attempt import Attempt
    from .hedging import HedgedAttempt
    from .members import Member
    from .mirroring import Mirror
    from .pool_runtime import PoolRuntime
    from .upstream import Upstream

__all__ = ["ProxySettings", "ResponseAborted", "forward", "send_error"]

logger = logging.getLogger("rr_middleware")

# RFC 9110 §9.2.2. Only these may be sent twice once a request may have reached an upstream.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_REASONS = {
    400: b"Bad Request",
    499: b"Client Closed Request",
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

    trusted: TrustedProxies
    hidden_response_headers: frozenset[bytes]
    max_header_bytes: int = 64 * 1024
    access_log: bool = False
    #: Pass on the client's X-Request-ID or make one (``tracing.request_id``).
    request_id: bool = False
    #: Keeps the deadlines of every exchange in flight (see ``client``).
    sweeper: Sweeper = field(default_factory=Sweeper)

    def upstream_headers(
        self, runtime: PoolRuntime, scope: Scope, scheme: str, stripped: bytes | None = None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The headers to send upstream, and whether they hold the Host (the client's,
        with ``preserve_host``); raises BadRequestHeaders. ``stripped``: the prefix taken
        off the path, when not the pool's (forwarding from a route handler)."""
        pool = runtime.pool
        if stripped is None:
            stripped = runtime.prefix if pool.strip_prefix else b""
        peer = scope.get("client")
        return request_headers(
            scope["headers"],
            client_host=peer[0] if peer else None,
            scheme=scheme,
            trusted=self.trusted,
            keep_host=pool.preserve_host,
            prefix=stripped,
            max_bytes=self.max_header_bytes,
        )


async def send_error(
    send: Send,
    status: int,
    headers: Sequence[tuple[bytes, bytes]] = (),
    message: str = "http.response",
    lingering: Receive | None = None,
) -> None:
    """A short, generic plain-text error response. Causes go to the log, never here.
    ``message="websocket.http.response"`` answers a WebSocket handshake instead.
    ``lingering``: the request's ``receive``, when the answer leaves a body the client is
    still sending (its last message waits for ``linger``)."""
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
    await _last_body(send, message + ".body", body, lingering)


async def _last_body(send: Send, kind: str, body: bytes, lingering: Receive | None) -> None:
    """An answer's last body message; with ``lingering``, its bytes go first and the
    empty last message waits for ``linger``."""
    if lingering is not None:
        if body:
            await send({"type": kind, "body": body, "more_body": True})
            body = b""
        await linger(lingering)
    await send({"type": kind, "body": body})


async def answer_early(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """An error answered before a byte of the request body was read: if the request has
    a body, with ``Connection: close`` (the connection cannot carry another request: the
    server would wait for that body first, its keep-alive timer no longer running) and,
    over HTTP/1.x, lingering for the body the client is sending (``linger``)."""
    if not _body_framing(scope["headers"])[1]:
        await send_error(send, status, headers)
        return
    await send_error(send, status, [*headers, *_CLOSE], lingering=_lingering(scope, receive))


def _lingering(scope: Scope, receive: Receive, asked: bool = False) -> Receive | None:
    """``receive`` if a client may be sending a body no one read: HTTP/1.x (a stream of
    HTTP/2 ends on its own), and not waiting for a ``100 Continue`` that never came (the
    server sends it at the first ``receive()``: ``asked``)."""
    if scope.get("http_version") not in ("1.1", "1.0"):
        return None
    if not asked:
        for name, value in scope["headers"]:
            if name == b"expect" and value.lower() == b"100-continue":
                return None
    return receive


async def forward(
    runtime: PoolRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    path: bytes,
    settings: ProxySettings,
    stripped: bytes | None = None,
    access: AccessLog | None = None,
) -> None:
    """Forward one HTTP request to the pool and relay the answer. ``path`` is the raw path
    to send (prefix already stripped when the pool strips it; ``stripped``, if not the
    pool's prefix, is what was). ``access``: its access log line, told the upstream."""
    pool = runtime.pool
    hooks = runtime.hooks
    if hooks is not None and hooks.guard is not None:
        refusal = await hooks.check_guard(scope)
        if refusal is not None:
            await send_response(refusal, scope, receive, send)
            return
    if not runtime.members:  # a discovered pool with no upstreams (yet, or any more)
        logger.info("pool %s: no upstreams; answering 503", runtime.name)
        retry_after = (b"retry-after", b"%d" % runtime.retry_after())
        await answer_early(scope, receive, send, 503, [retry_after])
        return
    try:
        scheme = scope.get("scheme", "http")
        headers, has_host = settings.upstream_headers(runtime, scope, scheme, stripped)
    except BadRequestHeaders as exc:
        logger.info("pool %s: refused request: %s", runtime.name, exc)
        await answer_early(scope, receive, send, exc.status)
        return
    if hooks is not None and hooks.on_request is not None:
        answer = await hooks.edit_request(scope, headers)
        if answer is not None:
            await send_response(answer, scope, receive, send)
            return
        has_host = any(name == b"host" for name, _ in headers)  # the hook may set one
    rid = request_id(headers) if settings.request_id else None
    if access is not None:
        access.request_id = rid
    size_limit = pool.max_body_size
    declared, framed = _body_framing(scope["headers"])
    if size_limit is not None and (declared or 0) > size_limit:
        # Said up front: not a byte of the body is read, so the connection cannot carry
        # another request (the server would wait for that body first).
        await answer_early(scope, receive, send, 413)
        return
    client = ClientSide(
        receive,
        limit=size_limit,
        body_timeout=pool.client_body_timeout,
        send_timeout=pool.client_send_timeout,
        min_rate=pool.client_body_min_rate,
        sweeper=settings.sweeper,
        empty=not framed and scope.get("http_version") in ("1.1", "1.0"),
    )
    forwarding = _Forwarding(runtime, scope, send, path, headers, has_host, client, settings)
    forwarding.request_id = rid
    forwarding.access = access
    tracer = runtime.tracer
    traced = tracer.begin(scope) if tracer is not None else None
    try:
        await forwarding.run()
    except asyncio.CancelledError:
        if not client.swallows():
            raise
        await forwarding.client_left()
    finally:
        client.close()
        if traced is not None:
            AttemptTracer.end(traced)
        if access is not None and access.upstream == "-" and forwarding.tried:
            # Not relayed (every upstream failed, the client left, its upload stalled,
            # the server cancelled it): the upstreams asked.
            access.upstream = ", ".join(m.upstream.url for m in forwarding.tried)


_CLOSE = ((b"connection", b"close"),)


async def send_response(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """A pool's guard or hook answered instead of the upstream: its response, with
    ``Connection: close`` when the request has a body, which was not read, and its last
    message held back while the body lingers (see ``answer_early``); not a streamed
    response's, which may read ``receive`` itself."""
    if _body_framing(scope["headers"])[1]:
        response.headers["connection"] = "close"
        lingering = _lingering(scope, receive)
        # Streamed and file responses listen for the disconnect on ``receive`` themselves
        # (ASGI spec below 2.4): two readers would split the messages.
        if lingering is not None and not isinstance(response, (StreamingResponse, FileResponse)):
            send = _held_back(send, lingering)
    await response(scope, receive, send)


def _held_back(send: Send, lingering: Receive) -> Send:
    async def held_back(message: Message) -> None:
        if message["type"] != "http.response.body" or message.get("more_body", False):
            await send(message)
            return
        await _last_body(send, "http.response.body", message.get("body", b""), lingering)

    return held_back


async def abort(send: Send, why: str) -> None:
    """Cut the client connection: the response started and cannot be completed. Raises
    ``ResponseAborted`` where the server gives no way to do it (it then cuts it)."""
    if not await abort_client(send):
        raise ResponseAborted(why)


class _Forwarding:
    """One request's way through the pool: its body, the attempts, the relay (starlette's
    ``GZipResponder`` is the model: per-request state on an object)."""

    __slots__ = (
        "access",
        "affinity",
        "body",
        "client",
        "has_host",
        "headers",
        "method",
        "path",
        "replayable",
        "request_id",
        "response_started",
        "retryable",
        "retrying",
        "runtime",
        "scope",
        "send",
        "settings",
        "stream",
        "suffix",
        "tried",
    )

    def __init__(
        self,
        runtime: PoolRuntime,
        scope: Scope,
        send: Send,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        has_host: bool,
        client: ClientSide,
        settings: ProxySettings,
    ) -> None:
        self.runtime = runtime
        self.scope = scope
        self.send = send
        self.method: str = scope["method"]
        query: bytes = scope.get("query_string", b"")
        self.path = path
        self.suffix = path + b"?" + query if query else path
        self.headers = headers
        self.has_host = has_host
        self.client = client
        self.settings = settings
        self.retryable = self.method in IDEMPOTENT_METHODS or runtime.pool.retry_non_idempotent
        self.body: bytes | None = None
        self.stream: ClientSide | None = None
        self.replayable = False
        self.response_started = False
        self.request_id: bytes | None = None
        self.access: AccessLog | None = None
        self.tried: list[Member] = []  # the upstreams asked, in order
        self.retrying = False  # holds a place in the pool's retry budget
        self.affinity = runtime.affinity(scope, settings.trusted) if runtime.affine else None

    async def run(self) -> None:
        """The retry policy: the body's start is read, then attempts go to distinct
        upstreams until one answers, the pool's ``retries`` are used, or a failure makes
        another try unsafe."""
        runtime = self.runtime
        pool = runtime.pool
        # The start of a body is read before an upstream is picked, so a client that
        # stalls early holds no upstream connection, and a short body, read whole, can be
        # sent again by a retry; a longer one streams from there at the client's pace.
        buffer = max(pool.request_buffer_size, pool.retry_body_limit if self.retryable else 0)
        mirror = runtime.mirror
        if mirror is not None and not mirror.chosen():
            mirror = None
        if mirror is not None:
            buffer = max(buffer, pool.mirror_body_limit)
        tried = self.tried
        error: UpstreamError | None = None
        # The last answer retried for its status, read whole: the client gets it rather
        # than a 502 of ours if no later try answers at all (see ``_keep``).
        kept: tuple[Attempt | HedgedAttempt, KeptAnswer] | None = None
        budget = runtime.budget
        budget.active += 1
        try:
            client = self.client
            if not client.complete:  # else a request with no body (``ClientSide``'s empty)
                self.body = await client.start(buffer)
                if not client.complete:
                    self.stream = client
            if mirror is not None:
                self._mirror(mirror)
            # Only a body held whole, within retry_body_limit, is sent again.
            self.replayable = self.stream is None and len(self.body or b"") <= pool.retry_body_limit
            for _ in range(pool.retries + 1):
                try:
                    async with self._attempt(tried) as attempt:
                        try:
                            response = await attempt.send(self._request(attempt.upstream))
                        except UpstreamError as exc:
                            self._raise_client_failure(exc)
                            raise
                        if self._retry_on_status(attempt, tried):
                            kept = await _keep(attempt, response) or kept
                            continue
                        await self._relay(attempt, response)
                        return
                except NoUpstream as exc:
                    error = error or exc
                    break
                except PoolTimeout as exc:
                    logger.warning("pool %s: %s", runtime.name, exc)
                    error = exc
                except UpstreamError as exc:
                    error = exc
                    if not self._retry_on_failure(exc, tried):
                        break
        except ClientBodyError as exc:
            await self._client_failed(exc)
            return
        finally:
            budget.active -= 1
            if self.retrying:
                budget.release()
        if kept is not None:
            attempt, answer = kept
            logger.warning(
                "pool %s: %s: no later upstream answered; relaying the %d of %s",
                runtime.name,
                self.method,
                answer.status,
                attempt.upstream.url,
            )
            await self._relay(attempt, answer)
            return
        await self._answer_failure(error, tried)

    def _mirror(self, mirror: Mirror) -> None:
        if self.stream is not None:  # not whole within the limit: not copied
            mirror.skip()
        else:
            mirror.submit(self.method, self.suffix, self.headers, self.has_host, self.body)

    def _attempt(self, tried: list[Member]) -> Attempt | HedgedAttempt:
        """The next try: raced against hedges when the pool hedges and this request may
        be sent twice (its body held whole), else a plain one (``hedging.py``)."""
        runtime = self.runtime
        hedging = runtime.hedging
        if (
            hedging is not None
            and self.retryable
            and self.replayable
            and len(runtime.members) > 1  # else no upstream to hedge to: no race
        ):
            return runtime.hedged_attempt(tried, hedging, self._request, self.affinity)
        return runtime.attempt(tried, affinity=self.affinity)

    async def client_left(self) -> None:
        """The client left, or stopped reading (``ClientSide``): say so, and give an app
        wrapping this one the answer it expects."""
        runtime = self.runtime
        if self.client.stalled:
            logger.info(
                "pool %s: the client took no response for %ss; aborting its connection",
                runtime.name,
                runtime.pool.client_send_timeout,
            )
            await abort(self.send, "the client stopped reading its response")
            return
        logger.info(
            "pool %s: client left during %s %s; upstream exchange closed",
            runtime.name,
            self.method,
            printable_path(self.scope),
        )
        if not self.response_started:
            # No one will read it, but an app wrapping this one (BaseHTTPMiddleware)
            # expects an answer: nginx's code for a client that left, 499.
            with contextlib.suppress(Exception):
                await send_error(self.send, 499, _CLOSE)

    def _request(self, upstream: Upstream) -> UpstreamRequest:
        target = upstream.base_path + self.suffix
        if not target.startswith(b"/"):
            target = b"/" + target
        headers = self.headers
        pool = self.runtime.pool
        return UpstreamRequest(
            method=self.method,
            upstream=upstream,
            target=target,
            headers=headers if self.has_host else [*headers, (b"host", upstream.host_header)],
            body=self.stream.chunks() if self.stream is not None else self.body,
            connect_timeout=pool.connect_timeout,
            read_timeout=pool.timeout,
        )

    def _raise_client_failure(self, error: UpstreamError) -> None:
        """The client's side of the body may have ended the exchange, however the
        transport reported it (its own exception, or the broken upstream connection):
        then that is the failure, and not the upstream's."""
        failure = self.client.failure
        if failure is not None:
            raise failure from error

    def _retry_on_status(self, attempt: Attempt | HedgedAttempt, tried: list[Member]) -> bool:
        status = attempt.status
        runtime = self.runtime
        pool = runtime.pool
        if not (
            status in pool.retry_on_statuses
            and len(tried) <= pool.retries
            and self.retryable
            and self.replayable
            and runtime.more_to_try(tried)
            and self._within_budget(attempt.upstream.url, f"answered {status}")
        ):
            return False
        logger.warning(
            "pool %s: %s %s answered %d; trying the next upstream",
            runtime.name,
            self.method,
            attempt.upstream.url,
            status,
        )
        attempt.member.stats.retries += 1
        return True

    def _retry_on_failure(self, error: UpstreamError, tried: list[Member]) -> bool:
        runtime = self.runtime
        member = tried[-1]
        retry = (
            error.retriable
            and (not error.sent or (self.retryable and self.replayable))
            and len(tried) <= runtime.pool.retries
            and runtime.more_to_try(tried)
            and self._within_budget(member.upstream.url, f"failed ({error.kind})")
        )
        logger.warning(
            "pool %s: %s %s failed (%s): %s%s",
            runtime.name,
            self.method,
            member.upstream.url,
            error.kind,
            error,
            "; trying the next upstream" if retry else "",
        )
        if retry:
            member.stats.retries += 1
        return retry

    def _within_budget(self, url: str, what: str) -> bool:
        """Take a place in the pool's retry budget for the next attempt (giving back the
        one the attempt that just ended held); False when it has none."""
        budget = self.runtime.budget
        if self.retrying:
            budget.release()
            self.retrying = False
        if budget.admit():
            self.retrying = True
            return True
        logger.warning(
            "pool %s: %s %s %s; not retried: the retry budget is spent (%d in flight)",
            self.runtime.name,
            self.method,
            url,
            what,
            budget.retrying,
        )
        return False

    async def _answer_failure(self, error: UpstreamError | None, tried: list[Member]) -> None:
        runtime = self.runtime
        if not tried:  # none to pick: all down with on_all_down="fail", or all drained
            if runtime.all_down and runtime.pool.on_all_down == "fail":
                logger.warning("pool %s: every upstream is down; answering 503", runtime.name)
                retry_after = (b"retry-after", b"%d" % runtime.retry_after())
                await self._send_error(503, [retry_after])
            else:
                logger.warning("pool %s: no upstream available; answering 503", runtime.name)
                await self._send_error(503)
        else:
            await self._send_error(error.status if error is not None else 502)
        self.client.close()

    async def _client_failed(self, failure: ClientBodyError) -> None:
        logger.info("pool %s: %s", self.runtime.name, failure)
        if self.response_started:
            if failure.status:  # it stalled its upload while its response went out
                await abort(self.send, str(failure))
            return  # it left; no one to tell
        # The client that left gets 499 (see forward): an app around this one expects one.
        # A body over the limit lingers (the client is still sending it); one that stalled
        # would only hold the connection longer.
        lingering = None
        if isinstance(failure, BodyTooLarge):
            lingering = self._lingering()
        with contextlib.suppress(Exception):
            await send_error(self.send, failure.status or 499, _CLOSE, lingering=lingering)

    async def _send_error(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """An error answer; while the request body is not all in, with ``Connection:
        close``, lingering for the rest of it (see ``answer_early``)."""
        client = self.client
        if client.complete:
            await send_error(self.send, status, headers)
            return
        await send_error(self.send, status, [*headers, *_CLOSE], lingering=self._lingering())

    def _lingering(self) -> Receive | None:
        """The client's ``receive`` to linger on (see ``answer_early``), unless a read of
        the body is still under way (a transport's writer that did not stop): two readers
        would split the body's messages between them, each taking its end for the end."""
        client = self.client
        if client.reading or client.ended:  # a read under way, or nothing left to read
            return None
        return _lingering(self.scope, client.receive, asked=True)

    async def _last_early(self, response: UpstreamResponse, body: bytes = b"") -> None:
        """The last message of an early answer (the upstream answered before the request
        body was all in): the body's writer stops first, then the answer lingers for what
        the client still sends (see ``answer_early``)."""
        await response.aclose()
        lingering = self._lingering()
        if lingering is not None:
            client = self.client
            if body:
                await self.send({"type": "http.response.body", "body": body, "more_body": True})
                body = b""
            client.sending_since = None  # reading from the client, not waiting on it
            await linger(lingering)
            client.sending_since = client.loop.time()
        await self.send({"type": "http.response.body", "body": body})

    async def _failed_mid_response(
        self, attempt: Attempt | HedgedAttempt, error: UpstreamError
    ) -> None:
        attempt.fail(error)
        url = attempt.member.upstream.url
        logger.warning(
            "pool %s: %s failed mid-response (%s): %s; aborting the client connection",
            self.runtime.name,
            url,
            error.kind,
            error,
        )
        await abort(self.send, f"upstream {url} failed mid-response")

    async def _relay(self, attempt: Attempt | HedgedAttempt, response: UpstreamResponse) -> None:
        """Relay the response: a body with no bytes (1xx, 204, 304, HEAD), a body already
        whole (one send), or a stream; body bytes are counted into the upstream's stats.
        Each send marks when it began (``client.sending_since``): a client that takes
        nothing for ``client_send_timeout`` is cut off, and one that leaves cancels this
        wherever it waits (see ``ClientSide``)."""
        member = attempt.member
        status = response.status
        if status in self.runtime.pool.unhealthy_statuses and not isinstance(response, KeptAnswer):
            logger.warning(
                "pool %s: %s %s answered %d",
                self.runtime.name,
                self.method,
                member.upstream.url,
                status,
            )
        headers = response_headers(response.headers, self.settings.hidden_response_headers)
        rewriter = self.runtime.rewriter
        if rewriter is not None:
            rewriter.rewrite(headers, self.runtime.members, member.upstream, self.scope, self.path)
        if self.runtime.sticky is not None:
            cookie = self.runtime.sticky_header(member, self.affinity)
            if cookie is not None:
                headers.append(cookie)
        client = self.client
        send = self.send
        hooks = self.runtime.hooks
        try:
            if hooks is not None and hooks.on_response is not None:
                status, headers = await hooks.edit_response(
                    self.scope, status, headers, member.upstream.url
                )
            client.sending_since = client.loop.time()
            no_body = status in (204, 304) or status < 200
            bodiless = no_body or self.method == "HEAD"
            if no_body:
                # No body, by definition. A 304's Content-Length (the size of the cached
                # representation, RFC 9110 §8.6) would make the ASGI server expect one.
                headers = [(n, v) for n, v in headers if n != b"content-length"]
            body = b""
            whole = not bodiless and response.body_complete()
            if whole:
                while chunk := await response.read():
                    body += chunk
            if not client.complete:  # an early answer: the rest of the body stays unread
                headers.append((b"connection", b"close"))
                if whole and all(n != b"content-length" for n, _ in headers):
                    # Its end seen by the client before it lingers (chunked, it would not be).
                    headers.append((b"content-length", b"%d" % len(body)))
            if self.request_id is not None and all(n != REQUEST_ID for n, _ in headers):
                headers.append((REQUEST_ID, self.request_id))
            self.response_started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if not (bodiless or whole):
                await self._stream(member, response)
                return
            if client.complete:
                await send({"type": "http.response.body", "body": body})
            else:
                await self._last_early(response, body)
            client.close()
            member.stats.bytes_out += len(body)
        except HookFailed:
            await response.aclose()  # the body's writer stops: lingering reads alone
            await self._send_error(500)
        except UpstreamError as exc:
            self._raise_client_failure(exc)  # the client's body broke the exchange
            await self._failed_mid_response(attempt, exc)
        finally:
            await response.aclose()
            # A kept answer's exchange ended when it was kept, not after the later tries.
            ended = response.ended if isinstance(response, KeptAnswer) else time.monotonic()
            elapsed = ended - attempt.started
            member.stats.total_latency.record(elapsed)
            member.stats.bytes_in += client.size
            if self.access is not None:
                self.access.upstream = member.upstream.url

    async def _stream(self, member: Member, response: UpstreamResponse) -> None:
        # An SSE stream never ends by itself: ended when the client leaves (ClientSide).
        client = self.client
        send = self.send
        stats = member.stats
        now = client.loop.time
        client.sending_since = None
        while chunk := await response.read():
            stats.bytes_out += len(chunk)
            client.sending_since = now()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            client.sending_since = None
        client.sending_since = now()
        if client.complete:
            await send({"type": "http.response.body", "body": b""})
        else:
            await self._last_early(response)
        client.close()


#: The largest body of an answer kept while the request is tried elsewhere (``_keep``):
#: error pages are short, and a request holds this much at most through its later tries.
KEPT_ANSWER_LIMIT = 64 * 1024


class KeptAnswer:
    """An upstream's whole answer, kept while the request is tried elsewhere (see
    ``_keep``); relayed like any response."""

    __slots__ = ("_body", "ended", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.ended = time.monotonic()
        self.status = status
        self.headers = headers
        self._body = body

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body

    def body_complete(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def _keep(
    attempt: Attempt | HedgedAttempt, response: UpstreamResponse
) -> tuple[Attempt | HedgedAttempt, KeptAnswer] | None:
    """An answer retried for its status (``retry_on_statuses``), kept whole if its body has
    already arrived with its head, as a short error page's does: if every later try fails
    without an answer (refused, timed out, broken), the client gets this real answer (its
    ``Retry-After``, its page) instead of a 502 or 504 of ours. A body still on its way, or
    over ``KEPT_ANSWER_LIMIT``, is not kept: the next try goes at once, and the answer is
    dropped, as before."""
    try:
        if not response.body_complete():
            return None
        body = b""
        while chunk := await response.read():
            body += chunk
            if len(body) > KEPT_ANSWER_LIMIT:  # not a short page: not held through the tries
                return None
        return attempt, KeptAnswer(response.status, response.headers, body)
    except UpstreamError:
        return None
    finally:
        await response.aclose()


def _body_framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """The request body's declared length (None: none, or not a number), and whether the
    headers frame a body: a Transfer-Encoding, or a Content-Length other than 0. On
    HTTP/1.x a request without either has no body (RFC 9112 §6.3); other versions may
    send one with neither."""
    declared: int | None = None
    framed = False
    for name, value in headers:
        if name == b"content-length":
            if declared is None and value.isdigit():
                declared = int(value)
            framed = framed or value != b"0"
        elif name == b"transfer-encoding":
            framed = True
    return declared, framed
