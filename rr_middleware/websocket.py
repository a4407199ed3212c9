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

from .access_log import AccessLog
from .client import abort_client
from .errors import ConnectFailed, NoUpstream
from .forwarding import send_error
from .headers import BadRequestHeaders
from .upstream import Upstream

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from .attempt import Attempt
    from .forwarding import ProxySettings
    from .members import Member
    from .pool_runtime import PoolRuntime

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
    runtime: PoolRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    path: bytes,
    settings: ProxySettings,
    access: AccessLog | None = None,
) -> None:
    """Connect the client's WebSocket to an upstream of the pool and relay it; ``access``,
    its access log line, is told the upstream (the one relayed, or those asked)."""
    try:
        import websockets  # noqa: F401 - the optional dependency, checked here once
    except ImportError:
        logger.error(
            "pool %s: a WebSocket arrived but the websockets package is not installed "
            "(pip install 'rr-middleware[websockets]')",
            runtime.name,
        )
        await _refuse(scope, send, 500)
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    try:
        headers, has_host = settings.upstream_headers(runtime, scope, scheme)
    except BadRequestHeaders as exc:
        logger.info("pool %s: refused WebSocket: %s", runtime.name, exc)
        await _refuse(scope, send, exc.status)
        return
    handshake = _Handshake(runtime, scope, receive, send, path, headers, has_host, message)
    tried: list[Member] = []
    try:
        await _attempts(runtime, handshake, tried, settings)
    finally:
        if access is not None and tried:
            accepted = access.status == 101
            access.upstream = ", ".join(m.upstream.url for m in (tried[-1:] if accepted else tried))


async def _attempts(
    runtime: PoolRuntime, handshake: _Handshake, tried: list[Member], settings: ProxySettings
) -> None:
    """The handshake on each upstream in turn, until one is relayed or answers."""
    scope, send = handshake.scope, handshake.send
    # A cookie or a key pins it; no cookie is set.
    affinity = runtime.affinity(scope, settings.trusted) if runtime.affine else None
    for _ in range(runtime.pool.retries + 1):
        try:
            async with runtime.attempt(tried, slot=False, affinity=affinity) as attempt:
                await handshake.attempt(attempt)
                return
        except NoUpstream:
            break
        except ConnectFailed as exc:
            logger.warning(
                "pool %s: WebSocket to %s failed (%s); trying the next upstream",
                runtime.name,
                tried[-1].upstream.url,
                exc,
            )
    if not tried:  # a discovered pool with no upstreams (yet, or any more)
        logger.info("pool %s: no upstreams for the WebSocket; answering 503", runtime.name)
        await _refuse(scope, send, 503)
        return
    logger.warning("pool %s: no upstream took the WebSocket", runtime.name)
    await _refuse(scope, send, 502)


class _Handshake:
    """One client WebSocket's way to an upstream: the handshake on each attempt, then the
    relay (an in-process upstream is handed the socket itself)."""

    def __init__(
        self,
        runtime: PoolRuntime,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        has_host: bool,
        connect_message: Message,
    ) -> None:
        self.runtime = runtime
        self.scope = scope
        self.receive = receive
        self.send = send
        self.path = path
        self.query: bytes = scope.get("query_string", b"")
        self.headers = headers
        self.has_host = has_host
        self.connect_message = connect_message
        self.client_host = next((v for n, v in headers if n == b"host"), None)
        # The handshake's own headers (and the Host, which is in the URI) are made anew.
        self.handshake_headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in headers
            if name not in _HANDSHAKE and name != b"host"
        ]

    async def attempt(self, attempt: Attempt) -> None:
        member = attempt.member
        upstream = member.upstream
        pool = self.runtime.pool
        if upstream.app is not None:
            attempt.abandon()  # the app itself takes the socket: no exchange to judge
            member.websockets += 1
            try:
                await self._in_process(upstream)
            finally:
                member.websockets -= 1
            return
        if upstream.transport is not None or pool.transport is not None:
            attempt.abandon()
            raise ConnectFailed(f"{upstream.url} has a custom transport: it cannot carry one")
        upstream_ws = await self._connect(attempt)
        if upstream_ws is None:
            return
        attempt.succeeded()
        member.websockets += 1
        try:
            await _relay(upstream_ws, self.scope, self.receive, self.send, self.runtime, member)
        finally:
            member.websockets -= 1

    async def _connect(self, attempt: Attempt) -> Any:
        """The upstream's socket, or None once the client was answered (the upstream
        refused, or the URI cannot be made). Raises ConnectFailed to try another."""
        import websockets
        from websockets.asyncio.client import connect

        upstream = attempt.upstream
        pool = self.runtime.pool
        scheme = "wss" if upstream.scheme == "https" else "ws"
        query = self.query
        suffix = (self.path + b"?" + query if query else self.path).decode("latin-1")
        target = upstream.base_path.decode("ascii") + suffix
        # The URI names the Host header (the client's with preserve_host); the TCP and TLS
        # peer is always the configured upstream (host=, port=, server_hostname=).
        host = self.client_host if self.has_host and self.client_host else upstream.host_header
        uri = f"{scheme}://{host.decode('latin-1')}{target or '/'}"
        try:
            return await connect(
                uri,
                host=upstream.host,
                port=upstream.port,
                server_hostname=upstream.host if scheme == "wss" else None,
                close_timeout=_CLOSE_TIMEOUT,
                additional_headers=self.handshake_headers,
                subprotocols=list(self.scope.get("subprotocols") or ()) or None,
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
            logger.info(
                "pool %s: %s refused the WebSocket (%d)", self.runtime.name, upstream.url, status
            )
            attempt.answered(status)
            await _refuse(self.scope, self.send, status)
            return None
        except websockets.InvalidURI:
            attempt.abandon()
            logger.info(
                "pool %s: refused WebSocket with an unusable Host or path", self.runtime.name
            )
            await _refuse(self.scope, self.send, 400)
            return None
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _in_process(self, upstream: Upstream) -> None:
        """An in-process upstream (``Upstream(app=...)``) is handed the WebSocket itself:
        its scope describes the forwarded request, and the client's messages reach it
        directly."""
        assert upstream.app is not None
        raw_path = upstream.base_path + self.path or b"/"
        headers = self.headers
        inner = {
            **self.scope,
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": self.query,
            "root_path": "",
            "headers": headers if self.has_host else [*headers, (b"host", upstream.host_header)],
        }
        replayed = False
        receive = self.receive

        async def receive_from_client() -> Message:
            nonlocal replayed
            if not replayed:  # the connect message was read before the upstream was picked
                replayed = True
                return self.connect_message
            return await receive()

        await upstream.app(inner, receive_from_client, self.send)


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
    runtime: PoolRuntime,
    member: Member,
) -> None:
    await send({"type": "websocket.accept", "subprotocol": upstream_ws.subprotocol})
    await _SocketRelay(upstream_ws, receive, send, runtime, member).run()


class _SocketRelay:
    """Messages both ways until either side ends (or a timeout): two relays, each send
    awaited so a slow reader holds the other side back, and close codes passed on."""

    def __init__(
        self, upstream_ws: Any, receive: Receive, send: Send, runtime: PoolRuntime, member: Member
    ) -> None:
        self.upstream_ws = upstream_ws
        self.receive = receive
        self.send = send
        self.runtime = runtime
        self.member = member
        self.loop = asyncio.get_running_loop()
        self.activity = self.loop.time()  # when a message last went either way
        #: When the send to the client now in progress began (None: not sending): a client
        #: taking no message for ``client_send_timeout`` is cut off.
        self.sending_since: float | None = None

    async def run(self) -> None:
        relays = [
            asyncio.ensure_future(self.client_to_upstream()),
            asyncio.ensure_future(self.upstream_to_client()),
        ]
        pool = self.runtime.pool
        loop = self.loop
        started = loop.time()
        try:
            while True:
                left = _time_left(loop.time(), started, self.activity, pool)
                timeout = (
                    pool.client_send_timeout
                    if left is None
                    else min(left, pool.client_send_timeout)
                )
                done, _ = await asyncio.wait(
                    relays, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                since = self.sending_since
                if since is not None and loop.time() - since >= pool.client_send_timeout:
                    logger.info(
                        "pool %s: a WebSocket client took no message for %ss; cutting it off",
                        self.runtime.name,
                        pool.client_send_timeout,
                    )
                    await abort_client(self.send)
                    break
                if _time_left(loop.time(), started, self.activity, pool) == 0:
                    logger.info(
                        "pool %s: closing a WebSocket to %s: timed out",
                        self.runtime.name,
                        self.member.upstream.url,
                    )
                    await self.send({"type": "websocket.close", "code": 1001, "reason": "timeout"})
                    break
            for relay in done:
                if not relay.cancelled() and relay.exception() is not None:
                    logger.warning(
                        "pool %s: WebSocket relay with %s failed: %r",
                        self.runtime.name,
                        self.member.upstream.url,
                        relay.exception(),
                    )
        finally:
            for relay in relays:
                relay.cancel()
            await asyncio.wait(relays)
            for relay in relays:  # collect outcomes so none is reported as never retrieved
                if not relay.cancelled():
                    relay.exception()
            await self.upstream_ws.close()

    async def client_to_upstream(self) -> None:
        from websockets.exceptions import ConnectionClosed

        upstream_ws = self.upstream_ws
        with contextlib.suppress(ConnectionClosed):  # the upstream closed: its relay says so
            while True:
                message: Message = await self.receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    self.activity = self.loop.time()
                    data = message.get("text")
                    await upstream_ws.send(data if data is not None else message.get("bytes", b""))
                elif kind == "websocket.disconnect":
                    code = message.get("code", 1000) or 1000
                    reason = message.get("reason") or ""
                    await upstream_ws.close(_UNSENDABLE.get(code, code), reason)
                    return

    async def upstream_to_client(self) -> None:
        from websockets.exceptions import ConnectionClosed

        upstream_ws = self.upstream_ws
        try:
            async for data in upstream_ws:
                self.activity = self.sending_since = self.loop.time()
                key = "text" if isinstance(data, str) else "bytes"
                await self.send({"type": "websocket.send", key: data})
                self.sending_since = None
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
            await self.send({"type": "websocket.close", "code": code, "reason": reason})


def _time_left(now: float, started: float, last_activity: float, pool: Any) -> float | None:
    """Seconds until the overall or the idle timeout, whichever is first (None: no limit)."""
    limits = []
    if pool.websocket_timeout is not None:
        limits.append(started + pool.websocket_timeout - now)
    if pool.websocket_idle_timeout is not None:
        limits.append(last_activity + pool.websocket_idle_timeout - now)
    return max(0.0, min(limits)) if limits else None
