"""``RrTestClient``: a ``TestClient`` for an app with the middleware, inside its lifespan,
that also reaches the pools (their state, a health round now) from the test's thread."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import ASGIApp

from ..config import PoolsArg
from ..middleware import RoundRobinMiddleware
from ..pool_runtime import PoolRuntime
from ..runtime import Balancer
from .waiting import wait_until

__all__ = ["RrTestClient", "rr_test_client"]

T = TypeVar("T")


class RrTestClient(TestClient):
    """Starlette's ``TestClient`` (requests run the app, ``with`` runs its lifespan) with
    the ``Balancer`` serving the app's pools at hand."""

    def __init__(self, app: ASGIApp, balancer: Balancer | None = None, **options: Any) -> None:
        super().__init__(app, **options)
        self._balancer = balancer

    @property
    def balancer(self) -> Balancer:
        """The balancer serving the app's pools: the one given, or else the one of the
        ``RoundRobinMiddleware`` in the app's middleware stack (built by the lifespan)."""
        if self._balancer is None:
            self._balancer = _find_balancer(self.app)
        return self._balancer

    def pool(self, prefix: str) -> PoolRuntime:
        """The pool serving ``prefix`` (``snapshot()``, ``drain()``, ...)."""
        return self.balancer[prefix]

    def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``function(*args)`` on the app's event loop (inside ``with``)."""
        portal = getattr(self, "portal", None)
        if portal is None:
            raise RuntimeError("use the client in a with block: the app's loop runs there")
        result: T = portal.call(function, *args)
        return result

    def check_health(self, prefix: str, rounds: int = 1) -> None:
        """Run ``rounds`` rounds of the pool's active health checks now, and apply them
        (instead of waiting ``HealthCheck.interval``)."""
        checker = self.pool(prefix).checker
        if checker is None:
            raise ValueError(f"pool {prefix!r} has no health_check")
        for _ in range(rounds):
            self.run(checker.check_now)

    def wait_members(self, prefix: str, count: int, timeout: float = 5.0) -> None:
        """Wait until the pool has ``count`` members (discovery's list is applied by a
        task of the app's loop, a moment after the source reports it)."""
        pool = self.pool(prefix)
        wait_until(lambda: len(pool.members) == count, timeout, what=f"{count} members")

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no request is in flight to any upstream: the counters are lowered
        just after the response is sent, so a test that reads them right after a
        response may be a moment early."""

        def idle() -> bool:
            return all(
                row["in_flight"] == 0
                for prefix in self.balancer
                for row in self.balancer[prefix].snapshot()
            )

        wait_until(idle, timeout, what="no request in flight")


@contextmanager
def rr_test_client(
    pools: PoolsArg | None = None,
    *,
    app: ASGIApp | None = None,
    balancer: Balancer | None = None,
    **middleware_options: Any,
) -> Iterator[RrTestClient]:
    """``app`` (or, by default, an empty FastAPI app, or Starlette's without FastAPI)
    with ``RoundRobinMiddleware`` serving ``pools`` (or ``balancer``), as an
    ``RrTestClient`` inside the app's lifespan for the block. Without ``pools`` and
    ``balancer``, ``app`` is your app as it is, the middleware already added (by your
    app factory, say).

    >>> from rr_middleware.testing import FakeUpstream
    >>> a = FakeUpstream("a")
    >>> with rr_test_client({"/api": [a.upstream()]}) as client:
    ...     client.get("/api/items").json()["path"]
    '/items'

    ``middleware_options`` are the middleware's other options (``status_path``, ...).
    """
    if pools is not None and balancer is not None:
        raise ValueError("give rr_test_client pools or balancer=, not both")
    if pools is None and balancer is None:
        if app is None:
            raise ValueError("rr_test_client needs pools, balancer= or an app with the middleware")
        with RrTestClient(app) as client:
            yield client
        return
    if balancer is None:
        assert pools is not None  # checked above
        balancer = Balancer(pools)
    target = app if app is not None else _empty_app()
    add_middleware = getattr(target, "add_middleware", None)
    wrapped: ASGIApp
    if add_middleware is not None:
        add_middleware(RoundRobinMiddleware, balancer=balancer, **middleware_options)
        wrapped = target
    else:  # a plain ASGI app: wrap it
        wrapped = RoundRobinMiddleware(target, balancer=balancer, **middleware_options)
    with RrTestClient(wrapped, balancer) as client:
        yield client


def _empty_app() -> ASGIApp:
    try:
        from fastapi import FastAPI
    except ImportError:
        return Starlette()
    return FastAPI()


def _find_balancer(app: Any) -> Balancer:
    """The balancer of the first ``RoundRobinMiddleware`` found going down the app's
    middleware (each layer's ``app``)."""
    layer = getattr(app, "middleware_stack", None) or app
    seen = 0
    while layer is not None and seen < 100:  # a stack, not a cycle
        if isinstance(layer, RoundRobinMiddleware):
            return layer.balancer
        layer = getattr(layer, "middleware_stack", None) or getattr(layer, "app", None)
        seen += 1
    raise LookupError(
        "no RoundRobinMiddleware in the app's middleware stack (it is built by the "
        "lifespan: use the client in a with block)"
    )
