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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware.zone import zone_directory

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


def test_workers_stop_when_the_gateways_parent_is_killed(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    """Killing the gateway's parent with SIGKILL (the OOM killer does) must not leave its
    workers holding the port with no one to replace or reload them: each stops as on
    SIGTERM, finishing the request it serves, and the state the parent shared (the admin
    API's directory, the zone) goes with the last of them."""
    a = upstreams["a"]
    config = f"""
[server]
port = 0
workers = 2
server = "{server}"
graceful_timeout = 20

[middleware]
admin_path = "/_rr/admin"

[pools."/api"]
upstreams = ["{a.url}"]
"""
    with run_gateway(tmp_path, config, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
        wait_for(lambda: len(re.findall(STARTED[server], gateway.output())) == 2, "workers")
        children = children_of(gateway.process.pid)  # the workers, uvicorn's resource tracker
        leftovers = wait_for(lambda: shared_state(children), "the workers' shared state")
        assert all(path.exists() for path in leftovers)
        try:
            with ThreadPoolExecutor(1) as pool:
                busy = a.app.active
                slow = pool.submit(httpx.get, f"{gateway.url}/api/x?action=sleep&s=2", timeout=30)
                wait_for(lambda: a.app.active > busy, "the request to reach the upstream")
                gateway.process.kill()
                gateway.process.wait(timeout=30)
                response = slow.result()
            assert response.status_code == 200, response.text
            assert response.content == b"slept"
            for pid in children:
                wait_for(lambda pid=pid: not _running(pid), f"process {pid} to stop", timeout=30)
            assert [path for path in leftovers if path.exists()] == []
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{gateway.url}/api/x", timeout=5)
            assert "parent process (PID" in gateway.output()
        finally:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)


def shared_state(processes: list[int]) -> list[Path]:
    """The gateway's state directory and zone, as its workers among ``processes`` use
    them (each notes its reloads in the first, and maps the second), once both are seen."""
    base = zone_directory("any").parent
    states = {
        path.parent for pid in processes for path in base.glob(f"rr-gateway-*/worker-{pid}.json")
    }
    zones = set()
    for pid in processes:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if f"{base}/rr-middleware-" in line:
                    zones.add(Path(line.split(None, 5)[5]).parent)
    return [*states, *zones] if states and zones else []


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an orphan is reaped by PID 1 or a subreaper, not by us: a
    zombie has stopped)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"
