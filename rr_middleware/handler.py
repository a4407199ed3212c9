"""Forwarding from a route handler: ``await balancer.forward(request, "/admin")``.

The middleware runs before routing, so a FastAPI dependency (``Depends(current_user)``)
never sees a request it forwards by prefix. A route that forwards runs its dependencies
first and hands the request over only if they pass::

    @app.api_route("/admin/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def admin(request: Request, user: User = Depends(current_user)) -> Response:
        return await balancer.forward(request, "/admin")

``forward`` returns a ``Response`` whose sending is the forwarding: the pool's refusals,
guard, hooks, retries, health, balancing and counters all apply, and the bodies stream
both ways as for a request the middleware matched. ``Pool(internal=True)`` keeps a pool
out of the middleware's prefix routing, so only such routes reach it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from starlette.responses import Response

if TYPE_CHECKING:
    from starlette.background import BackgroundTask
    from starlette.types import Message, Receive, Scope, Send

__all__ = ["ForwardedResponse", "RouteForwarder"]


class RouteForwarder(Protocol):
    """What forwarding from a route needs of the middleware serving the balancer."""

    async def forward_route(
        self, scope: Scope, receive: Receive, send: Send, prefix: str, path: str | None
    ) -> None: ...


class ForwardedResponse(Response):
    """The answer of the pool at ``prefix`` to the request, sent as it arrives (nothing
    is buffered). ``status_code`` and ``headers`` are the upstream's, so they are not
    known here; the ``background`` task (FastAPI's) runs once the answer is sent."""

    def __init__(
        self,
        forwarder: RouteForwarder,
        prefix: str,
        path: str | None,
        body: bytes | None,
        background: BackgroundTask | None = None,
    ) -> None:
        # No super().__init__(): there is no content to render.
        self.status_code = 0
        self.raw_headers = []
        self.body = b""
        self.background = background
        self._forwarder = forwarder
        self._prefix = prefix
        self._path = path
        self._read_body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._read_body is not None:
            receive = _replay(self._read_body, receive)
        await self._forwarder.forward_route(scope, receive, send, self._prefix, self._path)
        if self.background is not None:
            await self.background()


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body a route already read (a FastAPI body parameter), sent again; then the
    server's own messages (the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
