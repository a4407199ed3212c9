"""Weights, health checks and the status page, in a FastAPI app.

    API_UPSTREAMS=http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003 \
    API_WEIGHTS=3,1,1 \
    python -m examples.weighted_health          # or: uvicorn examples.weighted_health:app

``/api/...`` goes to API_UPSTREAMS by smooth weighted round robin (API_WEIGHTS, one per
upstream; 3,1,1 sends 3 of every 5 requests to the first). Every upstream's ``/health`` is
checked every HEALTH_INTERVAL seconds (default 2): two failed checks take it out of the
rotation, one passing check brings it back. ``/_rr/status`` shows the pool live (its JSON
at ``/_rr/status.json``) and ``/metrics`` serves Prometheus metrics. PORT (default 8000)
sets where ``python -m`` listens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from fastapi import FastAPI

from rr_middleware import HealthCheck, Pool, RoundRobinMiddleware, Upstream

STATUS_PATH = "/_rr/status"
METRICS_PATH = "/metrics"


def make_app(urls: Sequence[str], weights: Sequence[int], health_interval: float = 2.0) -> FastAPI:
    """The app: its own ``/`` route, and ``/api`` balanced over ``urls`` by ``weights``."""
    if len(weights) != len(urls):
        raise ValueError(f"{len(urls)} upstreams but {len(weights)} weights")
    app = FastAPI(title="rr-middleware: weights, health checks, status page")

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"api": "/api/...", "status": STATUS_PATH, "metrics": METRICS_PATH}

    api = Pool(
        [Upstream(url, weight=weight) for url, weight in zip(urls, weights, strict=True)],
        health_check=HealthCheck(
            path="/health", interval=health_interval, timeout=1.0, rise=1, fall=2
        ),
        retries=2,  # a request to an upstream that just died moves on to the next one
    )
    app.add_middleware(
        RoundRobinMiddleware,
        pools={"/api": api},
        status_path=STATUS_PATH,
        metrics_path=METRICS_PATH,
    )
    return app


def _list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


app = make_app(
    _list("API_UPSTREAMS", "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003"),
    [int(w) for w in _list("API_WEIGHTS", "3,1,1")],
    float(os.environ.get("HEALTH_INTERVAL", "2.0")),
)

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
