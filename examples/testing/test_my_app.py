"""How to unit-test an app that uses RoundRobinMiddleware: in-process upstreams, no sockets.

Run with ``pytest examples/testing``. Each fake upstream is a tiny ASGI app; the
middleware reaches it through ``httpx.ASGITransport`` when given as ``Upstream(app=...)``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from rr_middleware import Pool, RoundRobinMiddleware, Upstream


def fake_backend(name: str) -> FastAPI:
    backend = FastAPI()

    @backend.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, object]:
        return {"id": item_id, "served_by": name, "prefix": request.headers["x-forwarded-prefix"]}

    return backend


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/status")
    async def status() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(
        RoundRobinMiddleware,
        pools={
            "/api": Pool(
                [
                    Upstream("http://backend-a.internal", app=fake_backend("a")),
                    Upstream("http://backend-b.internal", app=fake_backend("b")),
                ]
            )
        },
    )
    return app


def test_api_requests_alternate_between_backends() -> None:
    with TestClient(make_app()) as client:
        served_by = [client.get(f"/api/items/{i}").json()["served_by"] for i in range(4)]
    assert served_by == ["a", "b", "a", "b"]


def test_prefix_is_stripped_and_announced() -> None:
    with TestClient(make_app()) as client:
        reply = client.get("/api/items/7").json()
    assert reply["id"] == 7
    assert reply["prefix"] == "/api"


def test_own_routes_are_untouched() -> None:
    with TestClient(make_app()) as client:
        assert client.get("/status").json() == {"status": "ok"}


def test_unknown_upstream_path_is_the_upstreams_404() -> None:
    with TestClient(make_app()) as client:
        assert client.get("/api/nothing-here").status_code == 404
