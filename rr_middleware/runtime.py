"""The running side of a set of pools: ``Balancer``, the handle an app keeps to its pools.

Configuration (``Pool``, ``Upstream``, ``HealthCheck``) only describes. A ``Balancer`` is
what serves it: one ``PoolRuntime`` per prefix (members, health, counters), the upstream
transport, discovery watches and health checks. The middleware drives its life (opened on
lifespan startup, closed on shutdown); your code holds it to drain an upstream or read
state::

    balancer = Balancer({"/api": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]})
    app.add_middleware(RoundRobinMiddleware, balancer=balancer)
    ...
    balancer["/api"].drain("http://10.0.0.2:8000")

``RoundRobinMiddleware(app, pools=...)`` builds a balancer of its own when you need no
handle. One balancer serves one middleware.

With ``zone="name"`` (or ``RR_MIDDLEWARE_ZONE`` in the environment) the worker processes
of a deployment that name the same zone act as one balancer: shared health, ejection and
drain, one prober, summed counters (see ``zone.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Union

import httpx
from starlette.requests import Request
from starlette.responses import Response

from .config import Pool, PoolsArg, normalize_pool_key, normalize_pools
from .errors import FieldError
from .handler import ForwardedResponse, RouteForwarder
from .mirroring import Mirror
from .pool_runtime import PoolRuntime
from .sticky import SECRET_ENV, check_cookies_apart
from .tls import TLS
from .transport.base import UpstreamTransport
from .transport.http1 import Http1Transport
from .transport.httpx_transport import HttpxTransport, in_process
from .upstream import Upstream
from .zone import FLUSH_INTERVAL, ZONE_ENV, Zone
from .zone_link import join, layouts_of, leave

if TYPE_CHECKING:
    from .reconfigure import Changes

__all__ = ["Balancer", "TransportArg", "as_transport"]

logger = logging.getLogger("rr_middleware")

TransportArg = Union[UpstreamTransport, httpx.AsyncBaseTransport, None]


class Balancer:
    """The pools of one app while it serves: ``balancer["/api"]`` is the ``PoolRuntime``
    of the pool at that prefix (``drain()``, ``undrain()``, ``snapshot()``).

    >>> balancer = Balancer({"/api": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]})
    >>> balancer["/api"].drain("http://10.0.0.2:8000")
    >>> [(row["url"], row["eligible"]) for row in balancer["/api"].snapshot()]
    [('http://10.0.0.1:8000', True), ('http://10.0.0.2:8000', False)]

    Hand it to the middleware (``app.add_middleware(RoundRobinMiddleware,
    balancer=balancer)``), which starts and stops it from the lifespan; one balancer
    serves one middleware.

    Args:
        pools: What ``RoundRobinMiddleware`` takes: ``{prefix: Pool}`` or ``{prefix:
            [url, ...]}``.
        transport: The upstream client of every pool that names none (``None``: the
            built-in ``Http1Transport``, which the balancer opens and closes; one you pass
            is yours to close).
        zone: A name (a directory under ``/dev/shm``), or a directory, that the worker
            processes of one deployment share to act as one balancer: shared health,
            ejection and drain, one prober, summed counters (``None``: the
            ``RR_MIDDLEWARE_ZONE`` environment variable; unset: this process alone).
    """

    def __init__(
        self, pools: PoolsArg, *, transport: TransportArg = None, zone: str | None = None
    ) -> None:
        configs = normalize_pools(pools)
        # Pools reached by routes only are checked by the middleware, which has the routes.
        check_cookies_apart((k, p.sticky) for k, p in configs.items() if k.startswith("/"))
        if zone is None:
            zone = os.environ.get(ZONE_ENV) or None
        if zone is not None and (not isinstance(zone, str) or not zone.strip()):
            raise FieldError("zone", f"must be a name or a directory, got {zone!r}")
        self.zone_name = zone
        self.zone: Zone | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._own_transport = transport is None
        self.transport: UpstreamTransport = as_transport(transport) or Http1Transport()
        #: A built-in transport per distinct ``TLS`` of a pool or upstream, owned here.
        self._tls_transports: dict[TLS, Http1Transport] = {}
        #: Those a reconfiguration let go of, with requests still on them.
        self._retired: list[Http1Transport] = []
        self.pools: dict[str, PoolRuntime] = {
            prefix: self.build_runtime(prefix, pool) for prefix, pool in configs.items()
        }
        #: With a zone: name it after the pools' layout too, so that workers serving
        #: another configuration (during a reload) never share its records.
        self.zone_follows_layout = False
        self.link_mirrors()
        self._owner: RouteForwarder | None = None
        self._on_routes_changed: Callable[[], None] | None = None
        #: The routes of the middleware serving it (set by the middleware), for status.
        self.routes: list[Any] = []

    def build_runtime(self, prefix: str, pool: Pool) -> PoolRuntime:
        """A pool's runtime, whose members reach their upstream through (first that
        applies) their app, their transport, their TLS, the pool's transport, the pool's
        TLS, the balancer's transport."""
        pool_transport = as_transport(pool.transport)

        def resolve(upstream: Upstream) -> UpstreamTransport:
            if upstream.app is not None:
                return in_process(upstream.app)
            own = as_transport(upstream.transport)
            if own is not None:
                return own
            if upstream.tls is not None:
                return self._tls_transport(upstream.tls)
            if pool_transport is not None:
                return pool_transport
            if pool.tls is not None:
                return self._tls_transport(pool.tls)
            return self.transport

        return PoolRuntime(prefix, pool, resolve)

    def _tls_transport(self, tls: TLS) -> Http1Transport:
        transport = self._tls_transports.get(tls)
        if transport is None:
            transport = Http1Transport(ssl=tls.context(), server_name=tls.server_name)
            self._tls_transports[tls] = transport
        return transport

    def link_mirrors(self) -> None:
        """Give each pool with a ``mirror`` the runtime of the pool it mirrors to (again
        after a reconfiguration)."""
        for key, runtime in self.pools.items():
            pool = runtime.pool
            if pool.mirror is None:
                continue
            target = self.pools.get(normalize_pool_key(pool.mirror))
            if target is None or target is runtime:
                known = ", ".join(k for k in self.pools if k != key)
                raise FieldError(
                    "mirror",
                    f"pool {key!r}: mirror {pool.mirror!r} is not another pool (pools: {known})",
                )
            mirror = runtime.mirror
            if mirror is None:
                runtime.mirror = Mirror(
                    target,
                    pool.mirror_fraction,
                    pool.mirror_body_limit,
                    pool.mirror_max_in_flight,
                    runtime.rng,
                )
            else:  # a reconfiguration: its copies in flight and counts carry on
                mirror.retarget(target, pool, runtime.rng)

    # -- the handle -----------------------------------------------------------------------

    def __getitem__(self, prefix: str) -> PoolRuntime:
        try:
            return self.pools[normalize_pool_key(prefix)]
        except (KeyError, ValueError):
            known = ", ".join(self.pools)
            raise KeyError(f"no pool at {prefix!r} (pools: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.pools)

    def __len__(self) -> int:
        return len(self.pools)

    def status(self) -> dict[str, Any]:
        """Every pool and upstream with its counters (what ``status_path`` serves)."""
        from .metrics import status_json

        return status_json(self.pools, self.zone, self.routes)

    def prometheus_collector(self) -> Any:
        """A ``prometheus_client`` collector of every pool's counters, to register in a
        registry of your own (``metrics_path=`` serves one of its own)."""
        from .metrics import PrometheusCollector

        return PrometheusCollector(self.pools, lambda: self.routes)

    async def forward(self, request: Request, prefix: str, *, path: str | None = None) -> Response:
        """Forward ``request`` from inside a route handler to the pool at ``prefix`` (or
        of that name), so the route's dependencies (a login) run first; return the
        Response that relays the upstream's answer as it streams in.

        ```python
        @app.api_route("/admin/{path:path}", methods=["GET", "POST"])
        async def admin(request: Request, user=Depends(current_user)) -> Response:
            return await balancer.forward(request, "/admin")
        ```

        ``path`` is the raw path to send (percent-encoded; the upstream's base path goes
        in front); by default the request's own, less the pool's prefix if it starts
        with it and the pool strips it. The pool may be ``internal`` (not reachable by
        its prefix). Needs the ``RoundRobinMiddleware`` serving this balancer in the
        app. A body the route already read (a body parameter) is sent from memory."""
        owner = self._owner
        if owner is None:
            raise RuntimeError(
                "this Balancer serves no RoundRobinMiddleware yet: add it to the app with "
                "app.add_middleware(RoundRobinMiddleware, balancer=balancer)"
            )
        self[prefix]  # a KeyError naming the pools, now rather than later
        body: bytes | None = getattr(request, "_body", None)  # read by the route already
        if body is None and getattr(request, "_stream_consumed", False):
            raise RuntimeError("the route consumed the request body with stream(): it is gone")
        return ForwardedResponse(owner, prefix, path, body)

    def attach(
        self, owner: RouteForwarder, on_routes_changed: Callable[[], None] | None = None
    ) -> None:
        """Called by the middleware that serves this balancer: one serves one. It is told
        when the set of pools changes (``reconfigure``), to route to the new ones."""
        if self._owner is not None and self._owner is not owner:
            raise ValueError("this Balancer already serves another RoundRobinMiddleware")
        self._owner = owner
        self._on_routes_changed = on_routes_changed

    async def reconfigure(self, pools: PoolsArg) -> Changes:
        """Take the running pools to ``pools`` without dropping a request: pools added and
        removed, upstream lists applied as discovery updates are, pools whose options
        changed rebuilt (see ``reconfigure.py``). Returns what changed."""
        from .reconfigure import reconfigure

        changes = await reconfigure(self, normalize_pools(pools))
        self._retire_unused_tls()
        return changes

    def _retire_unused_tls(self) -> None:
        """Let go of the TLS transports no pool uses any more (a pool removed, its TLS
        changed, its certificate files renewed): their idle connections close now, and
        those still carrying a request as their exchange ends."""
        used = {pool.tls for pool in (r.pool for r in self.pools.values()) if pool.tls}
        for runtime in self.pools.values():
            used.update(m.upstream.tls for m in runtime.members if m.upstream.tls is not None)
        # Still the balancer's until their last connection has closed (``stop``).
        self._retired = [t for t in self._retired if t.open_connections]
        for tls in [tls for tls in self._tls_transports if tls not in used]:
            transport = self._tls_transports.pop(tls)
            transport.retire()
            self._retired.append(transport)

    def routes_changed(self) -> None:
        if self._on_routes_changed is not None:
            self._on_routes_changed()

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the upstream client, start discovery (waiting, at most each source's
        ``startup_timeout``, for the first members) and the health checks. Without a
        lifespan the client opens on the first request (and closes when its event loop
        ends), and discovered pools stay empty."""
        if self._own_transport:
            await self.transport.aopen()
        for transport in self._tls_transports.values():
            await transport.aopen()
        if self.zone_name is not None and self.zone is None:
            self.join_zone()
        runtimes = [runtime for runtime in self.pools.values() if runtime.watcher is not None]
        for runtime in runtimes:
            runtime.start_discovery()
        watchers = [runtime.watcher for runtime in runtimes if runtime.watcher is not None]
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
        for runtime in self.pools.values():
            runtime.start_checks()
            if runtime.sticky is not None and runtime.sticky.random_secret:
                logger.warning(
                    "pool %s: sticky cookie %s has no secret (StickyCookie(secret=...) or %s): "
                    "this process drew a random one, so its cookies mean nothing to other "
                    "workers or replicas, nor after a restart",
                    runtime.name,
                    runtime.sticky.cookie.name,
                    SECRET_ENV,
                )

    async def stop(self) -> None:
        """Stop discovery and health checks, and close the connections the balancer
        opened (a transport you passed in is yours to close)."""
        for runtime in self.pools.values():
            await runtime.stop()
        self.leave_zone()
        if self._own_transport:
            await self.transport.aclose()
        for transport in [*self._tls_transports.values(), *self._retired]:
            await transport.aclose()
        self._retired.clear()

    # -- the zone -------------------------------------------------------------------------

    def layout_changes(self, pools: dict[str, Pool]) -> bool:
        """Whether ``pools`` need other records in the zone than the running pools."""
        zone = self.zone
        new = [layout.describe() for layout in layouts_of(pools)]
        return zone is None or [layout.describe() for layout in zone.layouts] != new

    def join_zone(self, *, seed: bool = False) -> None:
        """Attach to the zone (``zone_name``, after the layout with
        ``zone_follows_layout``); with ``seed``, one this process creates starts from what
        the pools know now (see ``zone_link.py``)."""
        assert self.zone_name is not None
        self.zone = join(
            self.pools, self.zone_name, follows_layout=self.zone_follows_layout, seed=seed
        )
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush)

    def _flush(self) -> None:
        """This worker's counters into its slots, every FLUSH_INTERVAL."""
        if self.zone is None:
            return
        for runtime in self.pools.values():
            if runtime.shared is not None:
                runtime.shared.flush(runtime.members)
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush)

    def leave_zone(self) -> None:
        """Detach from the zone, keeping in this process what the pools knew."""
        zone, self.zone = self.zone, None
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if zone is not None:
            leave(self.pools, zone)


def as_transport(transport: Any) -> UpstreamTransport | None:
    """An ``UpstreamTransport`` as is, an ``httpx.AsyncBaseTransport`` adapted, None as is."""
    if transport is None or isinstance(transport, UpstreamTransport):
        return transport
    if isinstance(transport, httpx.AsyncBaseTransport):
        return HttpxTransport(transport)
    raise ValueError(
        f"transport must be an httpx.AsyncBaseTransport or an UpstreamTransport, got {transport!r}"
    )
