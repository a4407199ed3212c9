"""A FastAPI app whose ``/users`` pool comes from Consul and follows it live.

    consul agent -dev                                   # or any agent you have
    python -m examples.consul.register_demo http://127.0.0.1:9001 http://127.0.0.1:9002
    CONSUL_HTTP_ADDR=http://127.0.0.1:8500 uvicorn examples.consul.app:app --port 8000

``/users/...`` goes round robin to the passing instances of the Consul service ``users``
(``CONSUL_SERVICE`` to change it); register, deregister or fail an instance and the pool
follows within a second. ``/status`` shows the pool, its source and its last error.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from rr_middleware import ConsulDiscovery, HealthCheck, Pool, RoundRobinMiddleware

app = FastAPI(title="rr-middleware Consul example")


@app.get("/")
async def index() -> dict[str, str]:
    return {"app": "consul example", "pools": "/users", "status": "/status"}


app.add_middleware(
    RoundRobinMiddleware,
    pools={
        "/users": Pool(
            discovery=ConsulDiscovery(
                os.environ.get("CONSUL_SERVICE", "users"),
                address=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"),
                token=os.environ.get("CONSUL_HTTP_TOKEN") or None,
            ),
            # Consul checks every few seconds; our own checks and passive ejection react
            # in between (a crashed instance fails requests before Consul notices).
            health_check=HealthCheck(path="/health", interval=2.0, fall=2, rise=1),
        ),
    },
    status_path="/status",
)
