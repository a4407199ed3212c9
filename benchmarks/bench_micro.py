"""In-process cost of the middleware's fall-through path, in microseconds per request.

The same apps as the servers (``bench_apps``), called directly with a fixed scope and a
no-op ``send``: no sockets and no server, so the number is the middleware's own CPU cost
and barely moves with machine noise (each figure is the best of many short repeats, the
apps alternating within each repeat). Run on its own with
``.venv/bin/python benchmarks/bench_micro.py``; ``bench_proxy.py`` runs it too.
"""

from __future__ import annotations

import os
import time
from typing import Any

import bench_apps
import uvloop
from starlette.types import ASGIApp, Message

#: Paths that match no prefix: the route itself, and a dotted one (a 404 in both apps),
#: since a "." sends the middleware's dot-segment check down its slow path.
PATHS = ("/local", "/static/js/app.min.js")


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


async def _per_call_us(app: ASGIApp, path: str, calls: int) -> float:
    template = _scope(path)
    start = time.perf_counter()
    for _ in range(calls):
        await app(dict(template), _receive, _send)
    return (time.perf_counter() - start) / calls * 1e6


def _build_apps(upstreams: str) -> dict[str, ASGIApp]:
    saved = {k: os.environ.get(k) for k in ("BENCH_UPSTREAMS", "BENCH_PREFIXES")}
    try:
        os.environ["BENCH_UPSTREAMS"] = upstreams  # never contacted: nothing is proxied
        apps: dict[str, ASGIApp] = {"bare": bench_apps.bare_app()}
        for count in (1, 50):
            os.environ["BENCH_PREFIXES"] = str(count)
            apps[f"middleware-{count}"] = bench_apps.middleware_app()
        return apps
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def _measure(calls: int, repeats: int) -> dict[str, dict[str, float]]:
    apps = _build_apps("http://127.0.0.1:9,http://127.0.0.1:10")
    best: dict[str, dict[str, float]] = {path: {} for path in PATHS}
    for path in PATHS:
        for app in apps.values():
            await _per_call_us(app, path, 1000)  # warm-up; Starlette builds its stack lazily
        for _ in range(repeats):
            for name, app in apps.items():
                us = await _per_call_us(app, path, calls)
                best[path][name] = min(us, best[path].get(name, us))
    return best


def fallthrough_cost(calls: int = 3_000, repeats: int = 40) -> dict[str, dict[str, float]]:
    """``{path: {"bare": us, "middleware-1": us, "middleware-50": us, "overhead-1": us,
    "overhead-50": us}}``: best-of-``repeats`` microseconds per call."""
    best = uvloop.run(_measure(calls, repeats))
    for row in best.values():
        for count in (1, 50):
            row[f"overhead-{count}"] = row[f"middleware-{count}"] - row["bare"]
    return best


def render(cost: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'in-process fall-through, us/request':<38} {'bare':>6} {'mw 1':>6} {'mw 50':>6}"
        f" {'+1':>6} {'+50':>6}"
    ]
    for path, row in cost.items():
        lines.append(
            f"{path:<38} {row['bare']:>6.2f} {row['middleware-1']:>6.2f} "
            f"{row['middleware-50']:>6.2f} {row['overhead-1']:>+6.2f} {row['overhead-50']:>+6.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(fallthrough_cost()))
