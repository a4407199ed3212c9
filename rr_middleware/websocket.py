"""WebSockets through the pools: the handshake to an upstream, then frames both ways.

The upstream is picked like an HTTP request's (policy, health, ejection), and a failure to
connect moves on to the next upstream before the client is accepted. The path, the raw
query string, the subprotocols and the end-to-end handshake headers (cookies,
authorization, origin, forwarded headers) go upstream; the upstream's chosen subprotocol
comes back in the accept, and its refusal comes back as its HTTP status (through the ASGI
``websocket.http.response`` extension where the server has it, else a close before
accepting, which servers answer 403).

Then two relays run until either side ends: text and binary messages both ways, each
``send`` awaited, so a slow reader holds the other side back; a close code and reason from
one side are passed to the other. The upstream leg is the ``websockets`` library (ping and
pong kept alive by it), without its proxy, User-Agent or compression defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .config import Upstream
from .forwarding import send_error
from .headers import BadRequestHeaders, request_headers

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from .forwarding import ProxySettings
    from .state import PoolRuntime, UpstreamState

__all__ = ["forward_websocket"]

logger = logging.getLogger("rr_middleware")

# The handshake's own headers are made anew for the upstream leg.
_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
# Codes that may not be sent in a close frame (RFC 6455 §7.4.1): they only describe one.
_UNSENDABLE = {1005: 1000, 1006: 1001, 1015: 1001}
_MAX_MESSAGE = 16 * 1024 * 1024  # as uvicorn's default ws_max_size
_CLOSE_TIMEOUT = 5.0  # for the upstream's answer to a close frame


async def forward_websocket(
    state: PoolRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    path: bytes,
    settings: ProxySettings,
) -> None:
    """Connect the client's WebSocket to an upstream of the pool and relay it."""
    try:
        import websockets
        from websockets.asyncio.client import connect
    except ImportError:
        logger.error(
            "pool %s: a WebSocket arrived but the websockets package is not installed "
            "(pip install 'rr-middleware[websockets]')",
            state.name,
        )
        await _refuse(scope, send, 500)
        return

    message = await receive()
    if message["type"] != "websocket.connect":
        return
    pool = state.pool
    client = scope.get("client")
    try:
        headers, _ = request_headers(
            scope["headers"],
            client_host=client[0] if client else None,
            scheme="https" if scope.get("scheme") == "wss" else "http",
            trusted=settings.trusted,
            keep_host=False,  # the Host goes in the URI below, not as a header
            prefix=state.prefix if pool.strip_prefix else b"",
            max_bytes=settings.max_header_bytes,
        )
    except BadRequestHeaders as exc:
        logger.info("pool %s: refused WebSocket: %s", state.name, exc)
        await _refuse(scope, send, exc.status)
        return
    handshake_headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name not in _HANDSHAKE
    ]
    client_host = next((v for n, v in scope["headers"] if n == b"host"), None)
    query: bytes = scope.get("query_string", b"")
    suffix = (path + b"?" + query if query else path).decode("latin-1")
    subprotocols = list(scope.get("subprotocols") or ())

    tried: list[UpstreamState] = []
    for _ in range(pool.retries + 1):  # pick() ends it once every upstream was tried
        member = state.pick(tried)
        if member is None:
            break
        tried.append(member)
        upstream = member.upstream
        if upstream.app is not None:
            member.websockets += 1
            try:
                await _in_process(upstream, scope, message, receive, send, headers, path, query)
            finally:
                member.websockets -= 1
            return
        if member.transport is not None:
            logger.warning(
                "pool %s: %s has a custom transport, which cannot carry a WebSocket",
                state.name,
                upstream.url,
            )
            continue
        scheme = "wss" if upstream.scheme == "https" else "ws"
        target = upstream.base_path.decode("ascii") + suffix
        # The URI names the Host header (the client's with preserve_host); the TCP and TLS
        # peer is always the configured upstream (host=, port=, server_hostname=).
        host = client_host if pool.preserve_host and client_host else upstream.host_header
        uri = f"{scheme}://{host.decode('latin-1')}{target or '/'}"
        try:
            upstream_ws = await connect(
                uri,
                host=upstream.host,
                port=upstream.port,
                server_hostname=upstream.host if scheme == "wss" else None,
                close_timeout=_CLOSE_TIMEOUT,
                additional_headers=handshake_headers,
                subprotocols=subprotocols or None,
                compression=None,
                user_agent_header=None,
                proxy=None,
                open_timeout=pool.connect_timeout,
                ping_interval=pool.websocket_ping_interval,
                ping_timeout=pool.websocket_ping_interval,
                max_size=_MAX_MESSAGE,
            )
        except websockets.InvalidStatus as exc:
            # The upstream answered the handshake, and said no: that is its answer.
            status = exc.response.status_code
            logger.info("pool %s: %s refused the WebSocket (%d)", state.name, upstream.url, status)
            if status in pool.unhealthy_statuses:
                state.report_failure(member, f"status {status}")
            else:
                state.report_success(member)
            await _refuse(scope, send, status)
            return
        except websockets.InvalidURI:
            logger.info("pool %s: refused WebSocket with an unusable Host or path", state.name)
            await _refuse(scope, send, 400)
            return
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
            state.report_failure(member, "connect")
            logger.warning(
                "pool %s: WebSocket to %s failed (%s: %s); trying the next upstream",
                state.name,
                upstream.url,
                type(exc).__name__,
                exc,
            )
            continue
        state.report_success(member)
        member.websockets += 1
        try:
            await _relay(upstream_ws, scope, receive, send, state, member)
        finally:
            member.websockets -= 1
        return

    if not tried:  # a discovered pool with no upstreams (yet, or any more)
        logger.info("pool %s: no upstreams for the WebSocket; answering 503", state.name)
        await _refuse(scope, send, 503)
        return
    logger.warning("pool %s: no upstream took the WebSocket", state.name)
    await _refuse(scope, send, 502)


async def _in_process(
    upstream: Upstream,
    scope: Scope,
    connect_message: Message,
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    path: bytes,
    query: bytes,
) -> None:
    """An in-process upstream (``Upstream(app=...)``) is handed the WebSocket itself: its
    scope describes the forwarded request, and the client's messages reach it directly."""
    assert upstream.app is not None
    raw_path = upstream.base_path + path or b"/"
    inner = {
        **scope,
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [*headers, (b"host", upstream.host_header)],
    }
    replayed = False

    async def receive_from_client() -> Message:
        nonlocal replayed
        if not replayed:  # the connect message was read before the upstream was picked
            replayed = True
            return connect_message
        return await receive()

    await upstream.app(inner, receive_from_client, send)


async def _refuse(scope: Scope, send: Send, status: int) -> None:
    """Turn the handshake down with ``status`` where the server can say it, else close."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send_error(send, status, message="websocket.http.response")
    else:
        await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011})


async def _relay(
    upstream_ws: Any,
    scope: Scope,
    receive: Receive,
    send: Send,
    state: PoolRuntime,
    member: UpstreamState,
) -> None:
    from websockets.exceptions import ConnectionClosed

    pool = state.pool
    loop = asyncio.get_running_loop()
    activity = [loop.time()]  # when a message last went either way
    await send({"type": "websocket.accept", "subprotocol": upstream_ws.subprotocol})

    async def client_to_upstream() -> None:
        while True:
            message: Message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                activity[0] = loop.time()
                data = message.get("text")
                await upstream_ws.send(data if data is not None else message.get("bytes", b""))
            elif kind == "websocket.disconnect":
                code = message.get("code", 1000) or 1000
                reason = message.get("reason") or ""
                await upstream_ws.close(_UNSENDABLE.get(code, code), reason)
                return

    async def client_to_upstream_until_closed() -> None:
        with contextlib.suppress(ConnectionClosed):  # the upstream closed: its relay says so
            await client_to_upstream()

    async def upstream_to_client() -> None:
        try:
            async for data in upstream_ws:
                activity[0] = loop.time()
                key = "text" if isinstance(data, str) else "bytes"
                await send({"type": "websocket.send", key: data})
        except ConnectionClosed:
            pass
        except OSError:
            # The client is gone (servers raise an OSError on send). Keep reading what the
            # upstream still sends, so the close handshake started for the client's side
            # completes instead of waiting out its timeout.
            with contextlib.suppress(ConnectionClosed):
                async for _ in upstream_ws:
                    pass
            return
        close = upstream_ws.protocol.close_rcvd  # what the upstream sent (None: it dropped)
        code = _UNSENDABLE.get(close.code, close.code) if close is not None else 1011
        reason = close.reason if close is not None else ""
        with contextlib.suppress(OSError):
            await send({"type": "websocket.close", "code": code, "reason": reason})

    relays = [
        asyncio.ensure_future(client_to_upstream_until_closed()),
        asyncio.ensure_future(upstream_to_client()),
    ]
    started = loop.time()
    try:
        while True:
            timeout = _time_left(loop.time(), started, activity[0], pool)
            done, _ = await asyncio.wait(
                relays, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
            if _time_left(loop.time(), started, activity[0], pool) == 0:
                logger.info(
                    "pool %s: closing a WebSocket to %s: timed out",
                    state.name,
                    member.upstream.url,
                )
                await send({"type": "websocket.close", "code": 1001, "reason": "timeout"})
                break
        for relay in done:
            if not relay.cancelled() and relay.exception() is not None:
                logger.warning(
                    "pool %s: WebSocket relay with %s failed: %r",
                    state.name,
                    member.upstream.url,
                    relay.exception(),
                )
    finally:
        for relay in relays:
            relay.cancel()
        await asyncio.wait(relays)
        for relay in relays:  # collect outcomes so none is reported as never retrieved
            if not relay.cancelled():
                relay.exception()
        await upstream_ws.close()


def _time_left(now: float, started: float, last_activity: float, pool: Any) -> float | None:
    """Seconds until the overall or the idle timeout, whichever is first (None: no limit)."""
    limits = []
    if pool.websocket_timeout is not None:
        limits.append(started + pool.websocket_timeout - now)
    if pool.websocket_idle_timeout is not None:
        limits.append(last_activity + pool.websocket_idle_timeout - now)
    return max(0.0, min(limits)) if limits else None
