"""The examples run as documented."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from examples import run_demo, weighted_health

from .servers import serve
from .upstream_app import UpstreamApp


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_make_demo_shows_the_rotation_and_the_local_route(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert asyncio.run(run_demo.main()) == 0
    out = capsys.readouterr().out
    answered = re.findall(r"#\d+\s+-> (backend-\d)", out)
    assert answered == ["backend-1", "backend-2", "backend-3"] * 4
    assert "saw /v1/42 (X-Forwarded-Prefix: /users)" in out
    assert "GET /hello         -> 200 {'hello': 'from the host app'}" in out
    assert "all servers stopped." in out


def test_weighted_health_example_balances_by_weight_and_shows_health() -> None:
    with ExitStack() as stack:
        a = stack.enter_context(serve(UpstreamApp("a")))
        b = stack.enter_context(serve(UpstreamApp("b")))
        c_stack = stack.enter_context(ExitStack())
        c = c_stack.enter_context(serve(UpstreamApp("c")))
        app = weighted_health.make_app([a.url, b.url, c.url], [3, 1, 1], health_interval=0.1)
        proxy = stack.enter_context(serve(app))
        client = stack.enter_context(httpx.Client(base_url=proxy.url, timeout=10))

        def states() -> dict[str, str]:
            status = client.get(weighted_health.STATUS_PATH + ".json").json()
            rows = status["pools"][0]["upstreams"]
            return {row["url"]: row["state"] if row["last_check"] else "unchecked" for row in rows}

        wait_for(lambda: set(states().values()) == {"up"}, "every upstream checked and up")
        served = [client.get(f"/api/items/{n}").headers["x-upstream"] for n in range(10)]
        assert served[:5] == ["a", "b", "a", "c", "a"]  # smooth: weights 3, 1, 1
        assert Counter(served) == {"a": 6, "b": 2, "c": 2}

        c_stack.close()  # c stops: its checks fail and it leaves the rotation
        wait_for(lambda: states()[c.url] == "down", "c to be seen down")
        assert states() == {a.url: "up", b.url: "up", c.url: "down"}
        replies = [client.get(f"/api/items/{n}") for n in range(8)]
        assert [r.status_code for r in replies] == [200] * 8
        assert Counter(r.headers["x-upstream"] for r in replies) == {"a": 6, "b": 2}

        page = client.get(weighted_health.STATUS_PATH)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        metrics = client.get(weighted_health.METRICS_PATH).text
        assert f'rr_upstream_up{{pool="/api",upstream="{c.url}"}} 0.0' in metrics
        assert f'rr_upstream_up{{pool="/api",upstream="{a.url}"}} 1.0' in metrics
