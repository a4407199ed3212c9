"""A FastAPI app with its own routes plus two pools of upstreams.

    API_UPSTREAMS=http://127.0.0.1:9001,http://127.0.0.1:9002 \
    USERS_UPSTREAMS=http://127.0.0.1:9003/v1 \
    uvicorn examples.basic_app:app --port 8000

``/api/...`` goes round robin to API_UPSTREAMS with the prefix stripped; ``/users/...``
goes to USERS_UPSTREAMS under their ``/v1`` base path; ``/`` and ``/hello`` are this
app's own routes and never leave it.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from rr_middleware import Pool, RoundRobinMiddleware, Upstream


def _urls(name: str, default: str) -> list[str]:
    return [u.strip() for u in os.environ.get(name, default).split(",") if u.strip()]


app = FastAPI(title="rr-middleware basic example")


@app.get("/")
async def index() -> dict[str, str]:
    return {"app": "basic example", "pools": "/api, /users"}


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "from the host app"}


app.add_middleware(
    RoundRobinMiddleware,
    pools={
        "/api": _urls("API_UPSTREAMS", "http://127.0.0.1:9001,http://127.0.0.1:9002"),
        "/users": Pool(
            [Upstream(url) for url in _urls("USERS_UPSTREAMS", "http://127.0.0.1:9003/v1")],
            strip_prefix=True,
            timeout=30.0,
        ),
    },
)
