"""The admin API of rr-gateway with 4 workers: every change reaches every worker, as the
upstreams see it (requests on fresh connections, which any worker may take)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware.gateway_admin import STATE_ENV
from rr_middleware.zone import ZONE_ENV, zone_directory

from .gateway_process import STARTED, Gateway, children_of, run_gateway
from .polling import wait_for
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp

pytestmark = pytest.mark.slow

TOKEN = "gateway-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, RunningServer]]:
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, serve(UpstreamApp("c")) as c:
        yield {"a": a, "b": b, "c": c}


def split(gateway: Gateway, n: int) -> Counter[str]:
    return Counter(
        httpx.get(f"{gateway.url}/api/x", headers={"connection": "close"}).headers["x-upstream"]
        for _ in range(n)
    )


def admin(gateway: Gateway, action: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/_rr/admin/{action}", json=body, headers=AUTH, timeout=30)


def applied(gateway: Gateway, what: str) -> int:
    return len(re.findall(rf"reload \(SIGHUP\) of .*{re.escape(what)}", gateway.output()))


def test_every_change_reaches_all_four_workers(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    a, b, c = (upstreams[n].url for n in "abc")
    config = f"""
[server]
port = 0
workers = 4
server = "{server}"

[middleware]
admin_path = "/_rr/admin"
status_path = "/_rr/status"

[pools."/api"]
upstreams = ["{a}", "{b}"]
"""
    with run_gateway(tmp_path, config, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
        wait_for(lambda: len(re.findall(STARTED[server], gateway.output())) == 4, "workers")
        unauthorized = httpx.post(f"{gateway.url}/_rr/admin/drain", json={"pool": "/api"})
        assert unauthorized.status_code == 401

        assert admin(gateway, "drain", pool="/api", url=b).status_code == 200
        assert split(gateway, 40) == {"a": 40}  # whichever worker takes the request
        assert admin(gateway, "undrain", pool="/api", url=b).status_code == 200
        assert admin(gateway, "weight", pool="/api", url=b, weight=3).status_code == 200
        served = split(gateway, 80)
        assert abs(served["b"] - 60) <= 4, served  # 3:1, each worker off by one at most

        # The answer comes once every worker has applied the change: at once, every
        # worker sends c its share.
        response = admin(gateway, "add", pool="/api", url=c)
        assert response.status_code == 200, response.text
        assert response.json()["done"].endswith("; applied by all 4 workers"), response.text
        served = split(gateway, 100)
        assert set(served) == {"a", "b", "c"}, served
        assert abs(served["b"] - 60) <= 4, served  # b's weight survived the move (1:3:1)
        assert applied(gateway, "upstreams 1 added") == 4

        response = admin(gateway, "remove", pool="/api", url=a)
        assert response.json()["done"].endswith("; applied by all 4 workers"), response.text
        assert set(split(gateway, 40)) == {"b", "c"}

        unknown = admin(gateway, "drain", pool="/api", url="http://127.0.0.1:1")
        assert unknown.status_code == 404
        assert admin(gateway, "weight", pool="/api", url=b, weight=-2).status_code == 400
        response = admin(gateway, "reload")
        assert response.json()["done"].endswith("; applied by all 4 workers"), response.text
        # A reload of the file keeps the admin API's changes on top of it.
        assert set(split(gateway, 40)) == {"b", "c"}

        # While the file has a mistake, no change is recorded: every worker would refuse
        # it (the answer said "every worker applies it").
        path = tmp_path / "gateway.toml"
        good = path.read_text()
        path.write_text(good.replace("workers = 4", "workers = -4"))
        for action in ("add", "reload"):
            response = admin(gateway, action, pool="/api", url=a)
            assert response.status_code == 400, response.text
            assert "workers" in response.json()["error"], response.text
        path.write_text(good)
        assert set(split(gateway, 40)) == {"b", "c"}
        response = admin(gateway, "reload")
        assert response.json()["done"].endswith("; applied by all 4 workers"), response.text
        assert set(split(gateway, 40)) == {"b", "c"}  # the refused "add a" was not kept
        log = gateway.output()
        assert gateway.stop() == 0
    assert (
        len(re.findall(r"admin: 127\.0\.0\.1 \(bearer token\) asked to", log)) == 7
    )  # each change made
    assert TOKEN not in log


def test_an_orphaned_worker_refuses_to_signal_a_parent_it_no_longer_has(
    upstreams: dict[str, RunningServer], tmp_path: Path
) -> None:
    """Killing the gateway's parent with SIGKILL leaves its workers serving; their admin API
    must not hand SIGHUP to whatever process they were re-parented to (PID 1 in a
    container)."""
    a, b = upstreams["a"].url, upstreams["b"].url
    config = f"""
[server]
port = 0
workers = 2

[middleware]
admin_path = "/_rr/admin"

[pools."/api"]
upstreams = ["{a}"]
"""
    with run_gateway(tmp_path, config, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
        wait_for(lambda: len(re.findall(STARTED["uvicorn"], gateway.output())) == 2, "workers")
        workers = children_of(gateway.process.pid)
        assert workers
        # Its parent killed, the gateway cannot remove its state directory and zone: the
        # test does, from what the workers were given.
        environ = dict(
            line.split("=", 1)
            for line in Path(f"/proc/{workers[0]}/environ").read_text().split("\0")
            if "=" in line
        )
        zone = zone_directory(environ[ZONE_ENV])
        leftovers = [Path(environ[STATE_ENV]), *zone.parent.glob(f"{zone.name}*")]
        try:
            gateway.process.kill()
            gateway.process.wait(timeout=30)
            response = admin(gateway, "add", pool="/api", url=b)
            assert response.status_code == 503, response.text
            assert "parent process is gone" in response.json()["error"]
            # What needs no parent still works.
            assert admin(gateway, "drain", pool="/api", url=a).status_code == 200
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in workers:
                wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), f"worker {pid} to end")
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)
