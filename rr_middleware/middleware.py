"""RoundRobinMiddleware: prefix dispatch, the requests a pool refuses, and the lifespan.

The pools themselves run in a ``Balancer`` (``runtime.py``); the middleware routes to them
and drives the balancer's life from the lifespan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Union

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access_log import AccessLog
from .admin import AdminAPI
from .config import PoolsArg
from .endpoints import Endpoints
from .errors import FieldError
from .forwarding import ProxySettings, answer_early, forward, logger
from .headers import TrustedProxies
from .matching import Route, RouteTable, build_tables
from .pool_runtime import PoolRuntime
from .routing import (
    PrefixRouter,
    has_dot_segment,
    is_ambiguous_path,
    is_plain_path,
    is_unsafe_path,
)
from .runtime import Balancer, TransportArg
from .sticky import check_cookies_apart
from .transport.base import UpstreamTransport
from .websocket import forward_websocket

__all__ = ["RoundRobinMiddleware"]


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


_GUARDED = Refusal(403, "the pool's guard refused it")


def _raw_path(scope: Scope) -> bytes:
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if b"?" in raw_path:  # some servers leave the query in raw_path
        raw_path = raw_path.partition(b"?")[0]
    return raw_path


def _unreached(key: str) -> FieldError:
    return FieldError(
        "pools",
        f"{key!r} is a name, but no route or mirror names it (a prefix starts with '/': '/{key}')",
    )


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

    Args:
        app: The app to wrap (``add_middleware`` passes it).
        pools: ``{prefix: Pool}`` or ``{prefix: [url, ...]}``; or give ``balancer``. A
            key may also be a name (``"canary"``): that pool is reached only by routes.
        routes: ``Route`` values, matched before the prefix's own pool: requests under
            a prefix that match conditions (host, method, headers, cookies, query) go
            to another pool, or are split between pools by weight.
        balancer: A ``Balancer`` you built from the pools and keep, to drain upstreams or
            read their state while the app serves (``self.balancer`` either way).
        transport: With ``pools``: the upstream client for every pool that names none
            (``None``: the built-in ``Http1Transport``; any ``httpx.AsyncBaseTransport``
            or ``UpstreamTransport``).
        zone: With ``pools``: a name the worker processes of one deployment share to act
            as one balancer (see ``Balancer``).
        trusted_proxies: Addresses and CIDR ranges whose ``X-Forwarded-*`` headers are
            believed (``"*"`` for all).
        max_url_length: The longest pooled path + query, in bytes; longer is 414.
        hide_response_headers: Upstream response headers not passed on, as nginx's
            ``proxy_hide_header`` (the ASGI server sets its own ``Date`` and ``Server``).
        max_header_bytes: Request header names and values adding up to more are 431.
        metrics_path: Serve Prometheus metrics there (needs the ``metrics`` extra).
        status_path: Serve the status page there, and its JSON at ``status_path +
            ".json"``.
        status_guard: A callable taking the Request and returning, or awaiting, True to
            allow the status page, its JSON and the metrics.
        access_log: Log a line per proxied request.
        request_id: Pass on the client's ``X-Request-ID`` (when well-formed) or make one,
            send it upstream and back to the client, and log it.
        admin_path: Serve the admin API under this path (drain, weight, add and remove
            upstreams; see ``admin.py``).
        admin_token: The bearer token the admin API requires (``None``: the
            ``RR_ADMIN_TOKEN`` environment variable).
        admin_guard: A callable taking the Request and returning, or awaiting, True to
            allow an admin request without the token.
    """

    def __init__(
        self,
        app: ASGIApp,
        pools: PoolsArg | None = None,
        *,
        routes: Sequence[Route] = (),
        balancer: Balancer | None = None,
        transport: TransportArg = None,
        zone: str | None = None,
        trusted_proxies: Union[str, Sequence[str]] = (),
        max_url_length: int = 8192,
        hide_response_headers: Sequence[str] = ("date", "server"),
        max_header_bytes: int = 64 * 1024,
        metrics_path: str | None = None,
        status_path: str | None = None,
        status_guard: Callable[[Request], bool | Awaitable[bool]] | None = None,
        access_log: bool = False,
        request_id: bool = False,
        admin_path: str | None = None,
        admin_token: str | None = None,
        admin_guard: Callable[[Request], bool | Awaitable[bool]] | None = None,
    ) -> None:
        self.app = app
        if balancer is None:
            if pools is None:
                raise FieldError(
                    "pools", "are required (or balancer=)", "pools= or balancer= is required"
                )
            balancer = Balancer(pools, transport=transport, zone=zone)
        elif pools is not None or transport is not None or zone is not None:
            raise FieldError(
                "balancer",
                "comes with its pools, transport and zone: give them to the Balancer, not "
                "to the middleware too",
            )
        if not isinstance(balancer, Balancer):
            raise FieldError("balancer", f"must be a Balancer, got {balancer!r}")
        balancer.attach(self, self._build_routes)
        self.balancer = balancer
        self.trusted_proxies = TrustedProxies(trusted_proxies)
        if not isinstance(request_id, bool):
            raise FieldError("request_id", f"must be True or False, got {request_id!r}")
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
        self._settings = ProxySettings(
            trusted=self.trusted_proxies,
            hidden_response_headers=frozenset(
                h.lower().encode("latin-1") for h in hide_response_headers
            ),
            max_header_bytes=max_header_bytes,
            access_log=access_log,
            request_id=request_id,
        )
        self._routes = routes
        pools_of = ((key, runtime.pool.sticky) for key, runtime in balancer.pools.items())
        check_cookies_apart(pools_of, routes)
        self._build_routes()
        admin = None
        if admin_path is not None:
            admin = AdminAPI(balancer, admin_path, admin_token, admin_guard)
        self.endpoints = Endpoints(balancer, metrics_path, status_path, status_guard, admin)

    def _build_routes(self) -> None:
        """Route to the balancer's pools (again, when a reload changed them)."""
        balancer = self.balancer
        self._method_refusals = {
            key: _method_refusal(runtime.pool.refuse_methods)
            for key, runtime in balancer.pools.items()
        }
        self._router: PrefixRouter[PoolRuntime]
        #: With routes: the route table of each prefix (None without routes: the common
        #: case, which costs nothing more than prefix matching).
        self._tables: PrefixRouter[RouteTable] | None
        self._router, self._tables = self._routers(self._routes, balancer)
        router = self._tables if self._tables is not None else self._router
        #: First segments of every prefix, or None with a "/" pool (which takes everything).
        self._first_segments = router.first_segments

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
        if path in self.endpoints.paths:
            await self.endpoints.serve(path, scope, receive, send)
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
        if refusal is None and not self._settings.access_log:  # the common case, direct
            await forward(state, scope, receive, send, rest, self._settings)
        else:
            await self._answer(state, scope, receive, send, rest, refusal, None)

    @classmethod
    def _routers(
        cls, routes: Sequence[Route], balancer: Balancer
    ) -> tuple[PrefixRouter[PoolRuntime], PrefixRouter[RouteTable] | None]:
        """The prefix router and, with routes, the route tables. An internal pool is
        reached only from a route handler (Balancer.forward), never by its prefix."""
        prefixed = {
            key: runtime
            for key, runtime in balancer.pools.items()
            if key[0] == "/" and not runtime.pool.internal
        }
        if routes:
            return PrefixRouter(prefixed), cls._route_tables(routes, balancer)
        mirrors = {r.mirror.target.name for r in balancer.pools.values() if r.mirror}
        for key, runtime in balancer.pools.items():
            if key not in prefixed and key not in mirrors and not runtime.pool.internal:
                raise _unreached(key)
        return PrefixRouter(prefixed), None

    @staticmethod
    def _route_tables(routes: Sequence[Route], balancer: Balancer) -> PrefixRouter[RouteTable]:
        # Internal pools are reached only from route handlers (Balancer.forward).
        pools = {
            key: runtime for key, runtime in balancer.pools.items() if not runtime.pool.internal
        }
        tables, states = build_tables(routes, pools)
        reached = {key for state in states for key in state.route.targets}
        reached |= {r.mirror.target.name for r in balancer.pools.values() if r.mirror}
        for key, runtime in pools.items():
            if key[0] != "/" and key not in reached:
                raise _unreached(key)
            if key[0] != "/" and not runtime.prefix:
                # X-Forwarded-Prefix of a named pool: its first route's prefix (a pool only
                # a mirror reaches gets the headers of the requests it copies).
                first = next((s.route.prefix for s in states if key in s.route.targets), "/")
                runtime.prefix = first.encode("ascii") if first != "/" else b""
        balancer.routes = states
        return PrefixRouter(tables)

    def _route(self, raw_path: bytes, scope: Scope) -> tuple[int, PoolRuntime] | None:
        """With routes: the first pool a route table gives, longest prefix first."""
        assert self._tables is not None
        for end, table in self._tables.match_all(raw_path):
            runtime = table.resolve(scope)
            if runtime is not None:
                return end, runtime
        return None

    def _match(self, scope: Scope) -> tuple[PoolRuntime, bytes, Refusal | None] | None:
        """The pool for this request, the raw path to forward, and the Refusal to answer
        instead (None: forward it); None if no pool matches. (A tuple, not an object: it
        is built for every pooled request.)"""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        # Some servers leave the query in raw_path (as _raw_path). 63 is "?": an int is
        # looked for with a memchr, a bytes needle through the buffer protocol.
        if 63 in raw_path:
            raw_path = raw_path.partition(b"?")[0]
        if self._tables is None:
            found = self._router.match(raw_path)
        else:
            found = self._route(raw_path, scope)
        if found is None:
            return None
        end, state = found
        refusal = self._refusal(state, scope, raw_path)
        return state, raw_path[end:] if state.pool.strip_prefix else raw_path, refusal

    def _refusal(self, state: PoolRuntime, scope: Scope, raw_path: bytes) -> Refusal | None:
        """The Refusal the pool answers this request with, or None (forward it)."""
        pool = state.pool
        # A WebSocket scope has no method: its handshake is a GET.
        method: str = scope.get("method", "GET")
        refused = pool.refuse_methods
        refusal: Refusal | None = None
        if method in refused or (not method.isupper() and method.upper() in refused):
            refusal = self._method_refusals[state.name]
        elif len(raw_path) + len(scope.get("query_string", b"")) > self.max_url_length:
            refusal = _URL_TOO_LONG
        elif is_plain_path(raw_path):
            return None  # nearly every request: no refusal looks at such a path
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
        return refusal

    async def forward_route(
        self, scope: Scope, receive: Receive, send: Send, prefix: str, path: str | None
    ) -> None:
        """Forward a request a route handler took to the pool at ``prefix`` (see
        ``Balancer.forward``): the refusals, guard and hooks as for a request matched by
        prefix. ``path``: the raw path to send (None: the request's, less the pool's
        prefix when it starts with it and the pool strips it)."""
        state = self.balancer[prefix]
        raw_path = _raw_path(scope)
        refusal = self._refusal(state, scope, raw_path)
        if path is None:
            rest = raw_path
            own = state.prefix
            if (
                state.pool.strip_prefix
                and own
                and rest.startswith(own)
                and rest[len(own) : len(own) + 1] in (b"", b"/")
            ):
                rest = rest[len(own) :]
        else:
            rest = path.encode("latin-1")
            if refusal is None and (is_unsafe_path(rest) or has_dot_segment(rest)):
                logger.info("pool %s: refused the route's path %r", state.name, rest[:200])
                refusal = _UNSAFE_PATH
        stripped = raw_path[: len(raw_path) - len(rest)] if raw_path.endswith(rest) else b""
        await self._answer(state, scope, receive, send, rest, refusal, stripped)

    async def _answer(
        self,
        state: PoolRuntime,
        scope: Scope,
        receive: Receive,
        send: Send,
        rest: bytes,
        refusal: Refusal | None,
        stripped: bytes | None,
    ) -> None:
        """A request under a pool: its refusal, or forwarded; with ``access_log`` on, then
        its line."""
        access = AccessLog(state.name, scope, send) if self._settings.access_log else None
        if access is not None:
            send = access.send
        try:
            if refusal is not None:
                await answer_early(scope, receive, send, refusal.status, refusal.headers)
            else:
                await forward(state, scope, receive, send, rest, self._settings, stripped, access)
        finally:
            if access is not None:
                access.write()

    def status(self) -> dict[str, Any]:
        """Every pool and upstream with its counters (what ``status_path`` serves)."""
        return self.balancer.status()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        state, path, refusal = found
        access = AccessLog(state.name, scope, send) if self._settings.access_log else None
        if access is not None:
            send = access.send
        try:
            hooks = state.hooks
            if (
                refusal is None
                and hooks is not None
                and hooks.guard is not None
                and await hooks.check_guard(scope) is not None
            ):
                refusal = _GUARDED
            if refusal is not None:
                await send({"type": "websocket.close", "code": 1008})
                return
            await forward_websocket(state, scope, receive, send, path, self._settings, access)
        finally:
            if access is not None:
                access.write()

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
        """Start the balancer (see ``Balancer.start``); the lifespan calls it."""
        await self.balancer.start()

    async def shutdown(self) -> None:
        """Stop the balancer (see ``Balancer.stop``); the lifespan calls it."""
        await self.balancer.stop()

    @property
    def transport(self) -> UpstreamTransport:
        """The balancer's default upstream transport (for introspection and tests)."""
        return self.balancer.transport
