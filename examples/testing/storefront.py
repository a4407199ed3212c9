"""A user's app: a storefront with routes of its own and two pools of backend services.

``/catalog`` goes round robin to the catalog servers, checked every few seconds; `/orders`
to the order servers a registry lists (Consul in production). The factory takes the
upstreams, the discovery source and the pools' clock, so tests give it fakes
(``test_storefront.py``); production passes URLs and ``ConsulDiscovery(...)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fastapi import FastAPI

from rr_middleware import Discovery, HealthCheck, Pool, RoundRobinMiddleware, Upstream


def create_app(
    catalog: Sequence[Upstream | str],
    orders: Discovery,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(
        RoundRobinMiddleware,
        pools={
            "/catalog": Pool(
                catalog,
                timeout=1.0,  # the catalog answers in milliseconds, or not at all
                health_check=HealthCheck(path="/health", interval=5.0, rise=2, fall=2),
                retry_on_statuses={503},  # a GET answered 503 is tried on the next server
                max_fails=2,
                fail_timeout=30.0,
                clock=clock,
            ),
            "/orders": Pool(discovery=orders, timeout=5.0, clock=clock),
        },
    )
    return app
