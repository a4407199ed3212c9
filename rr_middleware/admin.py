"""The admin API: change the pools of a running app over HTTP (off unless ``admin_path``).

Under ``admin_path`` (say ``/_rr/admin``)::

    GET  /_rr/admin/state                           every pool and upstream (the status JSON)
    POST /_rr/admin/drain    {"pool": "/api", "url": "http://10.0.0.2:8000"}
    POST /_rr/admin/undrain  {"pool": "/api", "url": "http://10.0.0.2:8000"}
    POST /_rr/admin/weight   {"pool": "/api", "url": "...", "weight": 3}   (null: the configured)
    POST /_rr/admin/add      {"pool": "/api", "url": "http://10.0.0.9:8000", "weight": 1}
    POST /_rr/admin/remove   {"pool": "/api", "url": "http://10.0.0.9:8000"}
    POST /_rr/admin/reload   (rr-gateway: read the file again, as SIGHUP does)

Every request needs ``Authorization: Bearer <token>`` (the token: ``admin_token``, else the
``RR_ADMIN_TOKEN`` environment variable) or, instead, an ``admin_guard`` that allows it:
without either, no answer but 401. A bad request is 400 with a message, an unknown pool or
upstream 404; every change is logged with who asked and what. Drains and weights reach
every worker through a zone; added and removed upstreams reach every worker of
``rr-gateway`` (the gateway's operator reloads them all), and in an app of your own the
process that took the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import FieldError
from .tasks import cancel_and_wait
from .upstream import Upstream

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from .pool_runtime import PoolRuntime
    from .runtime import Balancer

__all__ = ["ADMIN_TOKEN_ENV", "AdminAPI", "AdminError", "Applying", "Operator"]

logger = logging.getLogger("rr_middleware")

ADMIN_TOKEN_ENV = "RR_ADMIN_TOKEN"
ACTIONS = ("state", "drain", "undrain", "weight", "add", "remove", "reload")
_MAX_BODY = 64 * 1024
#: Seconds for a request's whole body (a few hundred bytes): a client that stalls in it,
#: or whose connection died unseen, does not hold the request for good.
BODY_TIMEOUT = 10.0
Guard = Callable[[Request], "bool | Awaitable[bool]"]


class AdminError(Exception):
    """A request the API refuses: ``status`` (400, 404, ...) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Applying:
    """A change made whose application is still under way (``rr-gateway``'s workers
    reloading it): ``result()`` (``wait()``) waits for it, and the API stops waiting when
    its client leaves (the change stays made)."""

    def __init__(self, done: str, wait: Callable[[], Awaitable[str]]) -> None:
        self.done = done  # what was changed, for the answer and the log
        self._wait = wait

    async def result(self) -> str:
        return await self._wait()


class Operator:
    """Carries out the admin API's changes in this process. ``rr-gateway`` replaces it
    with one that makes added and removed upstreams reach every worker."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def runtime(self, pool: str) -> PoolRuntime:
        try:
            return self.balancer[pool]
        except KeyError:
            known = ", ".join(self.balancer)
            raise AdminError(404, f"no pool {pool!r} (pools: {known})") from None

    def member_url(self, runtime: PoolRuntime, url: str) -> str:
        """``url`` as the pool lists it (``http://a:80/`` finds ``http://a``)."""
        identity = upstream_of(url).identity
        for member in runtime.members:
            if member.upstream.identity == identity:
                return member.upstream.url
        raise AdminError(404, f"pool {runtime.name} has no upstream {url!r}")

    async def drain(self, pool: str, url: str, drained: bool) -> str:
        runtime = self.runtime(pool)
        url = self.member_url(runtime, url)
        (runtime.drain if drained else runtime.undrain)(url)
        return f"pool {pool}: {url} {'drained' if drained else 'back in rotation'}"

    async def weight(self, pool: str, url: str, weight: int | None) -> str:
        runtime = self.runtime(pool)
        url = self.member_url(runtime, url)
        runtime.set_weight(url, weight)
        return f"pool {pool}: {url} weight {'configured' if weight is None else weight}"

    def check_membership(self, pool: str, url: str, adding: bool) -> Upstream:
        """The upstream to add or remove, if the pool may take the change."""
        runtime = self.runtime(pool)
        upstream = upstream_of(url)
        if runtime.pool.discovery is not None:
            raise AdminError(400, f"pool {pool} follows discovery: its upstreams are the source's")
        present = any(m.upstream.identity == upstream.identity for m in runtime.members)
        if adding and present:
            raise AdminError(400, f"pool {pool} already has {url!r}")
        if not adding and not present:
            raise AdminError(404, f"pool {pool} has no upstream {url!r}")
        if not adding and len(runtime.members) == 1:
            raise AdminError(400, f"{url!r} is the last upstream of pool {pool}")
        return upstream

    async def add(self, pool: str, url: str, weight: int) -> str | Applying:
        upstream = dataclasses.replace(self.check_membership(pool, url, True), weight=weight)
        runtime = self.runtime(pool)
        await self._reconfigure(runtime.name, [*runtime.pool.members, upstream])
        return f"pool {pool}: {upstream.url} added (weight {weight})"

    async def remove(self, pool: str, url: str) -> str | Applying:
        gone = self.check_membership(pool, url, False).identity
        runtime = self.runtime(pool)
        members = [u for u in runtime.pool.members if u.identity != gone]
        await self._reconfigure(runtime.name, members)
        return f"pool {pool}: {url} removed"

    async def reload(self) -> str | Applying:
        raise AdminError(400, "this app has no configuration file to reload (rr-gateway has)")

    async def _reconfigure(self, prefix: str, members: list[Upstream]) -> None:
        pools = {p: r.pool for p, r in self.balancer.pools.items()}
        pools[prefix] = dataclasses.replace(pools[prefix], upstreams=members)
        await self.balancer.reconfigure(pools)


def upstream_of(url: object, weight: object = 1) -> Upstream:
    if not isinstance(url, str):
        raise AdminError(400, f"url must be a string, got {url!r}")
    try:
        return Upstream(url, weight=weight)  # type: ignore[arg-type]
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None


class AdminAPI:
    """The admin endpoints of one middleware (see the module docstring)."""

    def __init__(
        self, balancer: Balancer, path: str, token: str | None, guard: Guard | None
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/") or "?" in path:
            raise FieldError("admin_path", f"must be a path starting with '/', got {path!r}")
        token = token if token is not None else os.environ.get(ADMIN_TOKEN_ENV) or None
        if token is None and guard is None:
            raise FieldError(
                "admin_path",
                f"needs a bearer token ({ADMIN_TOKEN_ENV} in the environment, or admin_token=) "
                "or admin_guard=: the admin API is never open to anyone",
            )
        self._token = token.encode("utf-8") if token is not None else None
        self._guard = guard
        self.operator = Operator(balancer)
        self.paths = {f"{path.rstrip('/')}/{action}": action for action in ACTIONS}

    async def serve(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        action = self.paths[path]
        request = Request(scope, receive)
        response: Response
        who: str | None = None
        body_read = False
        try:
            who = await self._authorize(request)
            expected = "GET" if action == "state" else "POST"
            if request.method != expected:
                raise AdminError(405, f"{path} takes {expected}")
            if action == "state":
                response = JSONResponse(self.operator.balancer.status())
            else:
                params = await _parameters(request)
                body_read = True
                done = await self._act(action, params)
                if isinstance(done, Applying):
                    done = await _unless_gone(done, receive)
                logger.warning("admin: %s asked to %s: %s", who, action, done)
                response = JSONResponse({"ok": True, "done": done})
        except AdminError as exc:
            if exc.status in (409, 499, 504) and who is not None:
                # The change is recorded all the same: say who asked for it.
                logger.warning(
                    "admin: %s asked to %s: %s (%d)", who, action, exc.message, exc.status
                )
            unread = not body_read and _has_body(request)
            response = _refusal(exc, action, unread)
        response.headers["cache-control"] = "no-store"
        with contextlib.suppress(OSError):  # the client is gone (a server may say so)
            await response(scope, receive, send)

    async def _authorize(self, request: Request) -> str:
        """Who asks (for the log), or AdminError 401."""
        client = request.client.host if request.client is not None else "?"
        if self._token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8"), self._token
            ):
                return f"{client} (bearer token)"
        if self._guard is not None:
            allowed = self._guard(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if allowed:
                return f"{client} (admin_guard)"
        raise AdminError(401, "a valid bearer token is required")

    async def _act(self, action: str, params: dict[str, Any]) -> str | Applying:
        operator = self.operator
        if action == "reload":
            return await operator.reload()
        pool, url = _text(params, "pool"), _text(params, "url")
        if action in ("drain", "undrain"):
            return await operator.drain(pool, url, action == "drain")
        if action == "remove":
            return await operator.remove(pool, url)
        weight = params.get("weight", 1 if action == "add" else None)
        if "weight" not in params and action == "weight":
            raise AdminError(400, "weight is required (an integer >= 0, or null)")
        if weight is None and action == "weight":
            return await operator.weight(pool, url, None)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise AdminError(400, f"weight must be an integer >= 0, got {weight!r}")
        if action == "add":
            return await operator.add(pool, url, weight)
        return await operator.weight(pool, url, weight)


def _refusal(exc: AdminError, action: str, unread: bool) -> Response:
    """The answer to a refused request; ``unread``: its body was not read (or not all of
    it), so the connection closes after the answer (the rest of the body cannot be taken
    for the next request, and a client dripping it holds nothing)."""
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.status == 405:
        headers["allow"] = "GET" if action == "state" else "POST"
    if unread or exc.status in (408, 413):
        headers["connection"] = "close"
    return JSONResponse({"error": exc.message}, exc.status, headers)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return (length is not None and length.strip() != "0") or "transfer-encoding" in request.headers


async def _unless_gone(applying: Applying, receive: Receive) -> str:
    """``applying``'s result, unless the client leaves first: then AdminError 499 (no
    one waits for the workers any more; the change is made all the same)."""
    waiting = asyncio.ensure_future(applying.result())
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait((waiting, gone))
        for task in (waiting, gone):  # read, so that none is reported as never retrieved
            if not task.cancelled():
                task.exception()
    if not waiting.cancelled():
        return waiting.result()
    failure = gone.exception() if not gone.cancelled() else None
    if failure is not None:  # receive() failed: not a client that left
        raise failure
    raise AdminError(
        499,
        f"{applying.done}; the client left before every worker had applied it (the "
        "workers go on with the reload and log how it ends)",
    )


async def _disconnected(receive: Receive) -> None:
    """Return once the client has left (its body was read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _parameters(request: Request) -> dict[str, Any]:
    try:
        body = await asyncio.wait_for(_body(request), BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise AdminError(408, f"the body did not arrive within {BODY_TIMEOUT:g}s") from None
    if not body.strip():
        return {}
    try:
        params = json.loads(body)
    except ValueError as exc:
        raise AdminError(400, f"the body must be a JSON object: {exc}") from None
    if not isinstance(params, dict):
        raise AdminError(400, "the body must be a JSON object")
    return params


async def _body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY:
            raise AdminError(413, f"the body is over {_MAX_BODY} bytes")
    return body


def _text(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise AdminError(400, f"{name} is required (a string)")
    return value
