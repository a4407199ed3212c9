"""A pool's own code on its requests: the ``guard``, ``on_request`` and ``on_response``.

Each is a plain function (sync or async) of the Starlette ``Request`` (an
``HTTPConnection`` for a WebSocket handshake), called by forwarding at a fixed point:

- ``guard(request)``, before anything else (no upstream picked, no body read): ``True``
  lets the request through, ``False`` answers 403, a ``Response`` is sent instead (a 401
  with ``WWW-Authenticate``, a redirect to a login page). A Starlette ``HTTPException``
  raised there is answered with its status, detail and headers, as FastAPI does. Anything
  else returned (``None`` included: a guard that forgot to decide) refuses, with 500:
  a guard fails closed.
- ``on_request(request, headers)``, once per request, before the first attempt:
  ``headers`` is a ``MutableHeaders`` over exactly what goes upstream (set, replace or
  delete entries); returning a ``Response`` sends it instead.
- ``on_response(request, response)``, once, on the answer that goes to the client, before
  it is sent: ``response`` is a ``ResponseHead`` whose ``status`` and ``headers`` may be
  changed.

The request body is never theirs: ``request.body()`` and ``request.stream()`` raise
(reading it would take it from the upstream). Framing and hop-by-hop headers set by
``on_request`` are ignored; the proxy frames the body itself. An exception in any of them
is logged once, with its traceback, and the client gets a bare 500 (nothing of the
exception). A pool without them costs one ``is None`` test per request.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response

from .headers import HOP_BY_HOP

if TYPE_CHECKING:
    from starlette.types import Message, Scope

__all__ = ["Guard", "OnRequest", "OnResponse", "PoolHooks", "ResponseHead"]

logger = logging.getLogger("rr_middleware")

GuardResult = Union[bool, Response]
Guard = Callable[[Request], Union[GuardResult, Awaitable[GuardResult]]]
OnRequest = Callable[
    [Request, MutableHeaders], Union[Response, Awaitable[Union[Response, None]], None]
]
OnResponse = Callable[[Request, "ResponseHead"], Union[Awaitable[None], None]]

_FRAMING = HOP_BY_HOP | {b"content-length"}


@dataclass
class ResponseHead:
    """The upstream's answer as ``on_response`` may change it, before it is sent."""

    #: The status the client gets.
    status: int
    #: The response headers the client gets (lower-case names, repeats kept).
    headers: MutableHeaders
    #: The URL of the upstream that answered.
    upstream: str


class HookFailed(Exception):
    """A pool's hook raised (logged already); the client gets 500."""


async def _no_body() -> Message:
    raise RuntimeError(
        "a pool's guard and hooks may not read the request body: it goes to the upstream"
    )


def _request(scope: Scope) -> Request:
    if scope["type"] == "http":
        return Request(scope, _no_body)
    return HTTPConnection(scope)  # type: ignore[return-value]  # a WebSocket handshake


async def _call(function: Callable[..., Any], *arguments: Any) -> Any:
    result = function(*arguments)
    if inspect.isawaitable(result):
        result = await result
    return result


def _failed(pool: str, hook: str) -> Response:
    logger.exception("pool %s: its %s raised; answering 500", pool, hook)
    return PlainTextResponse("500 Internal Server Error\n", 500)


class PoolHooks:
    """One pool's guard and hooks, as forwarding calls them (None when it has none)."""

    __slots__ = ("guard", "name", "on_request", "on_response")

    def __init__(self, name: str, guard: Any, on_request: Any, on_response: Any) -> None:
        self.name = name
        self.guard: Guard | None = guard
        self.on_request: OnRequest | None = on_request
        self.on_response: OnResponse | None = on_response

    @classmethod
    def of(cls, name: str, pool: Any) -> PoolHooks | None:
        if pool.guard is None and pool.on_request is None and pool.on_response is None:
            return None
        return cls(name, pool.guard, pool.on_request, pool.on_response)

    async def check_guard(self, scope: Scope) -> Response | None:
        """None: the guard lets the request through; else the answer to send."""
        assert self.guard is not None
        try:
            allowed = await _call(self.guard, _request(scope))
        except HTTPException as exc:
            return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
        except Exception:
            return _failed(self.name, "guard")
        if allowed is True:
            return None
        if allowed is False:
            return PlainTextResponse("403 Forbidden\n", 403)
        if isinstance(allowed, Response):
            return allowed
        logger.error(
            "pool %s: its guard returned %r, not True, False or a Response; refusing with 500",
            self.name,
            allowed,
        )
        return PlainTextResponse("500 Internal Server Error\n", 500)

    async def edit_request(
        self, scope: Scope, headers: list[tuple[bytes, bytes]]
    ) -> Response | None:
        """Run ``on_request`` on the upstream ``headers`` (edited in place); None: go on,
        else the answer to send."""
        assert self.on_request is not None
        framing = [(n, v) for n, v in headers if n == b"content-length"]
        mutable = MutableHeaders(raw=headers)
        try:
            answer = await _call(self.on_request, _request(scope), mutable)
        except Exception:
            return _failed(self.name, "on_request")
        # Only what the hook may change: the framing is the proxy's.
        headers[:] = [(n, v) for n, v in mutable.raw if n not in _FRAMING] + framing
        if answer is None:
            return None
        if isinstance(answer, Response):
            return answer
        logger.error("pool %s: its on_request returned %r; answering 500", self.name, answer)
        return PlainTextResponse("500 Internal Server Error\n", 500)

    async def edit_response(
        self, scope: Scope, status: int, headers: list[tuple[bytes, bytes]], upstream: str
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Run ``on_response``; the status and headers to send. Raises HookFailed."""
        assert self.on_response is not None
        head = ResponseHead(status, MutableHeaders(raw=headers), upstream)
        try:
            await _call(self.on_response, _request(scope), head)
            status = head.status
            if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
                raise ValueError(f"on_response set the status to {status!r}")
        except Exception:
            _failed(self.name, "on_response")
            raise HookFailed from None
        return status, head.headers.raw
