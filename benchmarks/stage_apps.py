"""Apps that take the proxy apart, for ``profile_proxy.py``: the same request served by
less and less of the proxy, so the CPU each part costs is a difference of two measured
figures rather than a profiler's estimate.

``asgi_app``     the server's floor: a bare ASGI app answering what the upstream answers;
``instant_app``  the benchmark's proxy (Starlette + RoundRobinMiddleware, pool ``/api``)
                 whose transport answers at once in-process: everything but the upstream leg.

With ``bench_apps.bare_app`` (a Starlette route) and ``bench_apps.middleware_app`` (the
whole proxy) they make four steps; served by ``serve.py`` as ``stage_apps:NAME``.
"""

from __future__ import annotations

from bench_apps import (
    PROXY_PREFIX,
    UPSTREAM_BODY,
    _lifespan,
    _log_to_stderr,
    _upstreams,
    bare_app,
)
from inprocess import ANSWER_HEADERS, AtOnce
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from rr_middleware import Pool, RoundRobinMiddleware

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": list(ANSWER_HEADERS),
}
_BODY = {"type": "http.response.body", "body": UPSTREAM_BODY}


def asgi_app() -> ASGIApp:
    """A pure ASGI app answering 13 bytes: what the server costs with no app to speak of."""
    _log_to_stderr()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await send(_START)
        await send(_BODY)

    return app


def instant_app() -> Starlette:
    """The benchmark's proxy, its upstream leg replaced by an answer given at once."""
    _log_to_stderr()
    app = bare_app()
    pools = {PROXY_PREFIX: Pool(_upstreams())}
    app.add_middleware(RoundRobinMiddleware, pools=pools, transport=AtOnce())
    return app
