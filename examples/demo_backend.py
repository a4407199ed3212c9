"""A tiny backend for the demo: it says who it is and what it was asked.

BACKEND_NAME=b1 uvicorn examples.demo_backend:app --port 9001
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request


def make_app(name: str) -> FastAPI:
    app = FastAPI(title=f"demo backend {name}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "backend": name}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def echo(path: str, request: Request) -> dict[str, object]:
        body = await request.body()
        return {
            "backend": name,
            "method": request.method,
            "path": "/" + path,
            "query": request.url.query,
            "forwarded_prefix": request.headers.get("x-forwarded-prefix"),
            "forwarded_for": request.headers.get("x-forwarded-for"),
            "body_bytes": len(body),
        }

    return app


app = make_app(os.environ.get("BACKEND_NAME", "backend"))
