"""RoundRobinMiddleware: prefix dispatch, the lifespan, and the upstream client's life."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Union

import httpx
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import FieldError, Pool, PoolsArg, Upstream, normalize_pools
from .discovery import Watcher
from .forwarding import ProxySettings, forward, logger, send_error
from .headers import TrustedProxies
from .metrics import PrometheusCollector, status_json
from .routing import PrefixRouter, has_dot_segment, is_ambiguous_path, is_unsafe_path
from .state import PoolRuntime, UpstreamState
from .status_page import render_html, render_json
from .transport.base import UpstreamTransport
from .transport.http1 import Http1Transport
from .transport.httpx_transport import HttpxTransport, in_process
from .websocket import forward_websocket

__all__ = ["RoundRobinMiddleware"]

TransportArg = Union[UpstreamTransport, httpx.AsyncBaseTransport, None]


@dataclass(frozen=True)
class Refusal:
    """A request under a pool that the proxy answers itself, before any upstream is
    picked: the status, the headers that go with it, and why (for the log)."""

    status: int
    why: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


_URL_TOO_LONG = Refusal(414, "path and query longer than max_url_length")
_UNSAFE_PATH = Refusal(400, "a dot segment or unsafe bytes in the path")
_AMBIGUOUS_PATH = Refusal(400, "a path some upstreams read as having a dot segment")
# The methods a 405's Allow lists (RFC 9110 §9.3, and PATCH, RFC 5789): those of these a
# pool does not refuse. The upstreams may take others; the proxy cannot know which.
_STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def _method_refusal(refused: Collection[str]) -> Refusal:
    """The 405 of a pool refusing ``refused``, with the Allow header RFC 9110 §15.5.6
    requires."""
    allowed = ", ".join(m for m in _STANDARD_METHODS if m not in refused)
    return Refusal(405, "method refused", ((b"allow", allowed.encode("ascii")),))


class RoundRobinMiddleware:
    """Forward requests under configured path prefixes to pools of upstream servers.

    ```python
    app = FastAPI()
    app.add_middleware(
        RoundRobinMiddleware,
        pools={"/api": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]},
    )
    ```

    Everything that matches no prefix, and the lifespan, reaches ``app`` unchanged.
    Options (defaults): ``transport=None`` (the built-in ``Http1Transport``; or any
    ``httpx.AsyncBaseTransport`` or ``UpstreamTransport`` for every pool),
    ``trusted_proxies=()`` (addresses whose ``X-Forwarded-*`` headers are believed; ``"*"``
    for all), ``max_url_length=8192`` (longer path + query → 414),
    ``hide_response_headers=("date", "server")`` (upstream response headers not passed on,
    as nginx's ``proxy_hide_header``: the ASGI server sets its own),
    ``max_header_bytes=65536`` (request header names and values adding up to more → 431),
    ``metrics_path=None`` (serve Prometheus metrics there; needs the ``metrics`` extra),
    ``status_path=None`` (serve the status page there, and its JSON at ``status_path +
    ".json"``), ``status_guard=None`` (a callable taking the Request and returning, or
    awaiting to, True to allow the two), ``access_log=False`` (log a line per proxied
    request).
    """

    def __init__(
        self,
        app: ASGIApp,
        pools: PoolsArg,
        *,
        transport: TransportArg = None,
        trusted_proxies: Union[str, Sequence[str]] = (),
        max_url_length: int = 8192,
        hide_response_headers: Sequence[str] = ("date", "server"),
        max_header_bytes: int = 64 * 1024,
        metrics_path: str | None = None,
        status_path: str | None = None,
        status_guard: Callable[[Request], bool | Awaitable[bool]] | None = None,
        access_log: bool = False,
    ) -> None:
        self.app = app
        self.pools: dict[str, Pool] = normalize_pools(pools)
        self.trusted_proxies = TrustedProxies(trusted_proxies)
        if max_url_length < 1:
            raise FieldError("max_url_length", f"must be >= 1, got {max_url_length!r}")
        self.max_url_length = max_url_length
        if (
            isinstance(max_header_bytes, bool)
            or not isinstance(max_header_bytes, int)
            or max_header_bytes < 1
        ):
            raise FieldError(
                "max_header_bytes", f"must be an integer >= 1, got {max_header_bytes!r}"
            )
        self._own_transport = transport is None
        self._transport: UpstreamTransport = _adapt(transport) or Http1Transport()
        self._settings = ProxySettings(
            transport=self._transport,
            trusted=self.trusted_proxies,
            hidden_response_headers=frozenset(
                h.lower().encode("latin-1") for h in hide_response_headers
            ),
            max_header_bytes=max_header_bytes,
            access_log=access_log,
        )
        self._states = {
            prefix: PoolRuntime(prefix, pool, self._member_factory(pool))
            for prefix, pool in self.pools.items()
        }
        self._method_refusals = {
            prefix: _method_refusal(pool.refuse_methods) for prefix, pool in self.pools.items()
        }
        self._router: PrefixRouter[PoolRuntime] = PrefixRouter(self._states)
        #: First segments of every prefix, or None with a "/" pool (which takes everything).
        self._first_segments = self._router.first_segments
        self.prometheus_collector = PrometheusCollector(self._states)
        self.status_guard = status_guard
        self._admin: dict[str, str] = {}
        self._registry: Any = None
        if metrics_path is not None:
            try:
                from prometheus_client import CollectorRegistry
            except ImportError:
                raise FieldError(
                    "metrics_path",
                    "needs prometheus_client: pip install 'rr-middleware[metrics]'",
                ) from None
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self.prometheus_collector)
            self._admin[_admin_path("metrics_path", metrics_path)] = "metrics"
        if status_path is not None:
            status_path = _admin_path("status_path", status_path)
            for path in (status_path, status_path + ".json"):
                if path in self._admin:
                    raise FieldError("status_path", f"{status_path!r} collides with metrics_path")
            self._admin[status_path] = "html"
            self._admin[status_path + ".json"] = "json"
            self._status_json_url = status_path + ".json"

    @staticmethod
    def _member_factory(pool: Pool) -> Callable[[Upstream], UpstreamState]:
        pool_transport = _adapt(pool.transport)

        def make_member(upstream: Upstream) -> UpstreamState:
            if upstream.app is not None:
                transport: UpstreamTransport | None = in_process(upstream.app)
            else:
                transport = _adapt(upstream.transport) or pool_transport
            return UpstreamState(upstream, transport, pool.max_connections)

        return make_member

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            elif scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        path: str = scope["path"]
        if self._admin and path in self._admin:
            await self._serve_admin(self._admin[path], scope, receive, send)
            return
        first_segments = self._first_segments
        if first_segments is not None:
            # The fast "not mine": a path whose first segment starts no prefix. The server's
            # decoded path has the same first segment as the router's decoded raw path
            # whenever that could match (a prefix never holds "/" or "%").
            end = path.find("/", 1)
            if (path[1:end] if end != -1 else path[1:]) not in first_segments:
                await self.app(scope, receive, send)
                return
        found = self._match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        state, rest, refusal = found
        if refusal is not None:
            await send_error(send, refusal.status, refusal.headers)
            return
        await forward(state, scope, receive, send, rest, self._settings)

    def _match(self, scope: Scope) -> tuple[PoolRuntime, bytes, Refusal | None] | None:
        """The pool for this request, the raw path to forward, and the Refusal to answer
        instead (None: forward it); None if no pool matches. (A tuple, not an object: it
        is built for every pooled request.)"""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if b"?" in raw_path:  # some servers leave the query in raw_path
            raw_path = raw_path.partition(b"?")[0]
        found = self._router.match(raw_path)
        if found is None:
            return None
        end, state = found
        pool = state.pool
        # A WebSocket scope has no method: its handshake is a GET.
        method: str = scope.get("method", "GET")
        refused = pool.refuse_methods
        refusal: Refusal | None = None
        if method in refused or (not method.isupper() and method.upper() in refused):
            refusal = self._method_refusals[state.name]
        elif len(raw_path) + len(scope.get("query_string", b"")) > self.max_url_length:
            refusal = _URL_TOO_LONG
        # The whole path is checked, not just the part after the prefix: "/api/../admin"
        # must neither reach the /api pool nor be re-read as "/admin" by an upstream.
        elif is_unsafe_path(raw_path) or has_dot_segment(raw_path):
            refusal = _UNSAFE_PATH
        elif pool.refuse_ambiguous_paths and is_ambiguous_path(raw_path):
            refusal = _AMBIGUOUS_PATH
        if refusal is not None:
            logger.info(
                "pool %s: refused %s %r (%d: %s)",
                state.name,
                method,
                raw_path[:200],
                refusal.status,
                refusal.why,
            )
        return state, raw_path[end:] if pool.strip_prefix else raw_path, refusal

    def status(self) -> dict[str, Any]:
        """Every pool and upstream with its counters (what ``status_path`` serves)."""
        return status_json(self._states)

    async def _serve_admin(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.status_guard is not None:
            allowed = self.status_guard(Request(scope, receive))
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                await PlainTextResponse("403 Forbidden\n", 403)(scope, receive, send)
                return
        headers = {"cache-control": "no-store"}
        response: Response
        if kind == "metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = generate_latest(self._registry)
            response = Response(body, headers={**headers, "content-type": CONTENT_TYPE_LATEST})
        elif kind == "json":
            response = Response(
                render_json(self.status()), media_type="application/json", headers=headers
            )
        else:
            page = render_html(self.status(), self._status_json_url)
            response = HTMLResponse(page, headers=headers)
        await response(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        state, path, refusal = found
        if refusal is not None:
            await send({"type": "websocket.close", "code": 1008})
            return
        await forward_websocket(state, scope, receive, send, path, self._settings)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the upstream client on startup and close it on shutdown, around the host
        app's own lifespan (which sees every message unchanged)."""

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                await self.shutdown()
            await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        except BaseException:
            await self.shutdown()  # the host app's lifespan crashed: nothing will follow
            raise

    async def startup(self) -> None:
        """Open the upstream client, start discovery (waiting, at most each source's
        ``startup_timeout``, for the first members) and the health checks. Called by the
        lifespan; without one, the client opens on the first request (and closes when its
        event loop ends), and discovered pools stay empty. A transport you passed in is
        left to open itself, and to you to close."""
        if self._own_transport:
            await self._transport.aopen()
        watchers = []
        for state in self._states.values():
            source = state.pool.discovery
            if source is not None:
                if state.watcher is None:
                    state.watcher = Watcher(state.name, source, state.set_members)
                state.watcher.start()
                watchers.append(state.watcher)
        arrived = await asyncio.gather(*(w.wait_first(w.source.startup_timeout) for w in watchers))
        for watcher, came in zip(watchers, arrived, strict=True):
            if not came:
                logger.error(
                    "pool %s: no upstreams from %s within %ss (%s); starting anyway, the pool "
                    "answers 503 until they arrive",
                    watcher.pool_name,
                    watcher.source.describe(),
                    watcher.source.startup_timeout,
                    watcher.error or "no answer yet",
                )
        for state in self._states.values():
            state.start_checks(self._transport)

    async def shutdown(self) -> None:
        """Stop discovery and health checks, and close the connections this middleware
        opened. Transports you passed in are yours to close."""
        for state in self._states.values():
            if state.watcher is not None:
                await state.watcher.stop()
            await state.stop_checks()
        if self._own_transport:
            await self._transport.aclose()

    @property
    def transport(self) -> UpstreamTransport:
        """The default upstream transport (for introspection and tests)."""
        return self._transport


def _adapt(transport: Any) -> UpstreamTransport | None:
    if transport is None or isinstance(transport, UpstreamTransport):
        return transport
    if isinstance(transport, httpx.AsyncBaseTransport):
        return HttpxTransport(transport)
    raise ValueError(
        f"transport must be an httpx.AsyncBaseTransport or an UpstreamTransport, got {transport!r}"
    )


def _admin_path(option: str, path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "?" in path:
        raise FieldError(option, f"must be a path starting with '/', got {path!r}")
    return path
