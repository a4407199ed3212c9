"""The middleware's own endpoints: the Prometheus metrics and the status page (with its
JSON), each at a path the user names and behind ``status_guard``, and the admin API
(``admin.py``, with its own authorization). Off unless asked for: they reveal topology.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from .errors import FieldError
from .status_page import render_html, render_json

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from .admin import AdminAPI
    from .runtime import Balancer

__all__ = ["Endpoints"]

Guard = Callable[[Request], "bool | Awaitable[bool]"]


class Endpoints:
    """``metrics_path`` (Prometheus text format; needs ``prometheus_client``),
    ``status_path`` (HTML) and ``status_path + ".json"``, for one balancer. ``path in
    endpoints.paths`` (a dict lookup, no call) is the middleware's one test per request.
    """

    def __init__(
        self,
        balancer: Balancer,
        metrics_path: str | None,
        status_path: str | None,
        guard: Guard | None,
        admin: AdminAPI | None = None,
    ) -> None:
        self._balancer = balancer
        self._guard = guard
        self.admin = admin
        self.paths: dict[str, str] = {}
        self._registry: Any = None
        self._status_json_url = ""
        if metrics_path is not None:
            try:
                from prometheus_client import CollectorRegistry
            except ImportError:
                raise FieldError(
                    "metrics_path",
                    "needs prometheus_client: pip install 'rr-middleware[metrics]'",
                ) from None
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(balancer.prometheus_collector())
            self.paths[_path("metrics_path", metrics_path)] = "metrics"
        if status_path is not None:
            status_path = _path("status_path", status_path)
            for path in (status_path, status_path + ".json"):
                if path in self.paths:
                    raise FieldError("status_path", f"{status_path!r} collides with metrics_path")
            self.paths[status_path] = "html"
            self.paths[status_path + ".json"] = "json"
            self._status_json_url = status_path + ".json"
        if admin is not None:
            for path in admin.paths:
                if path in self.paths:
                    raise FieldError("admin_path", f"{path!r} collides with another endpoint")
                self.paths[path] = "admin"

    async def serve(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self.paths[path]
        if kind == "admin":
            assert self.admin is not None
            await self.admin.serve(path, scope, receive, send)  # its own authorization
            return
        if self._guard is not None:
            allowed = self._guard(Request(scope, receive))
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
            status = self._balancer.status()
            response = Response(render_json(status), media_type="application/json", headers=headers)
        else:
            page = render_html(self._balancer.status(), self._status_json_url)
            response = HTMLResponse(page, headers=headers)
        await response(scope, receive, send)


def _path(option: str, path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "?" in path:
        raise FieldError(option, f"must be a path starting with '/', got {path!r}")
    return path
