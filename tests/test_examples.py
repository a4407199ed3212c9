"""The examples run as documented."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from examples import weighted_health

from .polling import wait_for
from .servers import serve
from .upstream_app import UpstreamApp

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_demo_kills_a_backend_without_failed_requests_and_brings_it_back() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "examples.run_demo", "--duration", "8"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGINT)  # the demo stops its own processes on Ctrl-C
        out, err = demo.communicate(timeout=30)
        raise AssertionError(f"the demo did not finish:\n{out}\n{err}") from None
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, out + err
    # The story, in order (on a loaded machine a slow health check may add lines before).
    killed = out.find("kill -9 backend-2")
    left = out.find("backend-2 left the rotation", killed)
    restarted = out.find("restarted backend-2", left)
    back = out.find("backend-2 is back in the rotation", restarted)
    assert min(killed, left, restarted, back) > -1, out
    assert re.search(r"done: [1-9]\d* requests, 0 failed", out), out
    final_states = re.findall(r"^  backend-2 \S+ +1 +\d+ +\d+% +\S+  (\w+)$", out, re.MULTILINE)
    assert final_states[-1] == "up", out
    assert "status page: http://127.0.0.1:" in out
    assert "metrics:     http://127.0.0.1:" in out
    assert "gateway and backends stopped." in out
    assert [line for line in out.splitlines() if len(line) > 80] == []


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
