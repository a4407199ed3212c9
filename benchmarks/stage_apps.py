"""Apps that take the proxy apart, for ``profile_proxy.py``: the same request served by
less and less of the proxy, so the CPU each part costs is a difference of two measured
figures rather than a profiler's estimate.

``asgi_app``     the server's floor: a bare ASGI app answering what the upstream answers;
``instant_app``  the benchmark's proxy (Starlette + RoundRobinMiddleware, pool ``/api``)
                 whose transport answers at once in-process: everything but the upstream leg;
``least_app``    the least any ASGI proxy must do for a GET: a bare ASGI app that forwards
                 it on a kept-alive connection and relays the answer; no features at all.

With ``bench_apps.bare_app`` (a Starlette route) and ``bench_apps.middleware_app`` (the
whole proxy) they make five steps; served by ``serve.py`` as ``stage_apps:NAME``.
"""

from __future__ import annotations

import asyncio

from bench_apps import (
    PROXY_PREFIX,
    UPSTREAM_BODY,
    _Leg,
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


def least_app() -> ASGIApp:
    """The least any ASGI proxy must do for a GET, as a floor for the proxy's own cost:
    the request line and the client's headers written on a kept-alive connection to the
    first upstream (``bench_apps._Leg``), the answer's head split into its status and
    header lines by hand, its Content-Length body read whole and sent in one message.
    No routing, no header rules, no balancing, no deadlines, no error handling, no
    counters: a failure ends the request with an exception (only an idle connection the
    upstream closed between runs is skipped). Written to be cheap, not correct (it trusts
    the upstream's framing), so that the proxy's figure over this one is what its features
    and safety cost."""
    _log_to_stderr()
    host, _, port = _upstreams()[0].removeprefix("http://").partition(":")
    idle: list[_Leg] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _lifespan(receive, send)
            return
        while idle and idle[-1].closed:  # closed by the upstream while idle between runs
            idle.pop()
        if idle:
            leg = idle.pop()
        else:
            _, leg = await asyncio.get_running_loop().create_connection(_Leg, host, int(port))
        target = scope["raw_path"]
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        fields = b"".join(b"%s: %s\r\n" % pair for pair in scope["headers"])
        leg.transport.write(b"GET %s HTTP/1.1\r\n%s\r\n" % (target, fields))
        head = b""
        while b"\r\n\r\n" not in head:
            piece = await leg.read()
            if not piece:
                raise ConnectionError("the upstream closed the connection")
            head += piece
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
        length = next(int(v) for n, v in headers if n.lower() == b"content-length")
        while len(body) < length:
            piece = await leg.read()
            if not piece:
                raise ConnectionError("the upstream closed the connection")
            body += piece
        status = int(lines[0][9:12])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        idle.append(leg)

    return app
