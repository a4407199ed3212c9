"""The admin API of rr-gateway with 4 workers: every change reaches every worker, as the
upstreams see it (requests on fresh connections, which any worker may take)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from rr_middleware.gateway_admin import process_started
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


def gateway_toml(
    server: str, workers: int, api: list[str], extra: str = "", server_extra: str = ""
) -> str:
    """A gateway of ``workers`` under ``server`` with the admin API, the status page and
    a pool ``/api`` of ``api``; ``extra`` after it."""
    listed = ", ".join(f'"{url}"' for url in api)
    return f"""
[server]
port = 0
workers = {workers}
server = "{server}"
{server_extra}
[middleware]
admin_path = "/_rr/admin"
status_path = "/_rr/status"

[pools."/api"]
upstreams = [{listed}]
{extra}"""


def wait_for_workers(gateway: Gateway, server: str, count: int) -> None:
    wait_for(lambda: len(re.findall(STARTED[server], gateway.output())) == count, "workers")


def test_every_change_reaches_all_four_workers(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    a, b, c = (upstreams[n].url for n in "abc")
    config = gateway_toml(server, 4, [a, b])
    with run_gateway(tmp_path, config, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
        wait_for_workers(gateway, server, 4)
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


def test_a_change_every_worker_refuses_is_a_409_naming_them_all(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    """A file that loads but that no running worker can take (it drops a pool a route
    sends to): an added upstream is recorded, every worker refuses the reload, and the
    answer, once all have, is a 409 counting them, with the request logged."""
    a, b, c = (upstreams[n].url for n in "abc")
    head = gateway_toml(server, 2, [a])
    routed = f"""
[pools.canary]
upstreams = ["{b}"]

[[routes]]
prefix = "/api"
pool = "canary"
headers = {{ x-canary = "always" }}
"""
    with run_gateway(tmp_path, head + routed, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
        wait_for_workers(gateway, server, 2)
        (tmp_path / "gateway.toml").write_text(head)  # valid alone; not for the routes
        response = admin(gateway, "add", pool="/api", url=c)
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert "but 2 worker(s) refused the reload" in error, error
        assert "'canary' is the target of a route" in error, error
        assert set(split(gateway, 20)) == {"a"}  # the running configuration stays
        log = gateway.output()
    assert re.search(r"admin: 127\.0\.0\.1 \(bearer token\) asked to add: .*refused", log)


def test_a_dead_workers_file_is_not_waited_for_when_its_pid_is_reused(
    upstreams: dict[str, RunningServer], tmp_path: Path
) -> None:
    """A worker killed with SIGKILL leaves its outcome file; when its PID then names
    another process, the admin API must still see it dead (its lock is free) and answer
    at once, not wait 10 s for a worker that will never reload and answer 504."""
    a, c = upstreams["a"].url, upstreams["c"].url
    config = gateway_toml("uvicorn", 2, [a])
    other = subprocess.Popen(["sleep", "60"])  # the process that now has the dead one's PID
    try:
        with run_gateway(tmp_path, config, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
            wait_for_workers(gateway, "uvicorn", 2)
            state = wait_for(lambda: shared_state(children_of(gateway.process.pid)), "state")[0]
            dead = state / f"worker-{other.pid}.json"
            dead.write_text('{"attempts": 1, "started": 0.0, "operations": 0, "error": null}')
            dead.with_suffix(".lock").touch()  # as its worker left it: no one holds it
            started = time.monotonic()
            response = admin(gateway, "add", pool="/api", url=c)
            assert response.status_code == 200, response.text
            assert response.json()["done"].endswith("applied by all 2 workers"), response.text
            assert time.monotonic() - started < 5
            assert not dead.exists()
    finally:
        other.kill()
        other.wait()


def test_a_gateway_started_with_another_gateways_variables_keeps_to_itself(
    upstreams: dict[str, RunningServer], tmp_path: Path
) -> None:
    """``RR_GATEWAY_STATE`` and ``RR_GATEWAY_PARENT`` inherited from another gateway (a
    process started from one of its workers): a gateway of one worker neither applies
    nor writes that gateway's admin changes, and the app under a server of your own,
    whose named parent runs and is not its parent, does not stop, nor remove them."""
    a, b = upstreams["a"].url, upstreams["b"].url
    other_state = tmp_path / "other-gateway"
    other_state.mkdir()
    (other_state / "admin.json").write_text(
        json.dumps([{"op": "add", "pool": "/api", "url": b, "weight": 1}])
    )
    other_parent = subprocess.Popen(["sleep", "60"])
    started = process_started(other_parent.pid)
    inherited = {
        "RR_ADMIN_TOKEN": TOKEN,
        "RR_GATEWAY_STATE": str(other_state),
        "RR_GATEWAY_PARENT": f"{other_parent.pid}:{started}",
    }
    try:
        with run_gateway(tmp_path, gateway_toml("uvicorn", 1, [a]), env=inherited) as gateway:
            assert set(split(gateway, 10)) == {"a"}
            assert admin(gateway, "drain", pool="/api", url=a).status_code == 200
        (tmp_path / "gateway.toml").write_text(gateway_toml("uvicorn", 1, [a]))
        command = [sys.executable, "-m", "uvicorn", "--factory", "--port", "0"]
        factory = subprocess.Popen(
            [*command, "rr_middleware.gateway:create_app"],
            env={**os.environ, **inherited, "RR_GATEWAY_CONFIG": str(tmp_path / "gateway.toml")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output = b""
            while b"Application startup complete" not in output:
                line = factory.stdout.readline() if factory.stdout else b""
                assert line, f"the app stopped: {output.decode()}"
                output += line
            assert factory.poll() is None
        finally:
            factory.terminate()
            rest = factory.communicate(timeout=30)[0] or b""
        assert b"parent process" not in output + rest
        assert sorted(p.name for p in other_state.iterdir()) == ["admin.json"]
    finally:
        other_parent.kill()
        other_parent.wait()


class SilentConsul:
    """A Consul agent that takes connections and never answers: a pool following it makes
    a reload wait its discovery's ``startup_timeout``. ``taken`` counts the connections."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.taken: list[socket.socket] = []
        threading.Thread(target=self._take, daemon=True).start()

    def _take(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.taken.append(self.socket.accept()[0])

    def pool(self, name: str) -> str:
        return f"""
[pools."/{name}".discovery]
type = "consul"
service = "{name}"
address = "{self.url}"
startup_timeout = 2
"""

    def close(self) -> None:
        self.socket.close()
        for connection in self.taken:
            connection.close()


def test_a_reload_already_under_way_does_not_answer_for_a_later_one(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    """Two admin reloads: the file is edited while the workers are in the first (held by a
    new pool's discovery). The second must answer once the workers have applied the file
    as it is now, not when the first reload, which read it before, ends."""
    a, b = upstreams["a"].url, upstreams["b"].url
    consul = SilentConsul()

    def config(api: list[str], *slow: str) -> str:
        return gateway_toml(server, 2, api, "".join(consul.pool(name) for name in slow))

    path = tmp_path / "gateway.toml"
    try:
        with run_gateway(tmp_path, config([a]), env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
            wait_for_workers(gateway, server, 2)
            path.write_text(config([a], "slow1"))
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(admin, gateway, "reload")
                wait_for(lambda: len(consul.taken) >= 2, "both workers in the first reload")
                path.write_text(config([a, b], "slow1", "slow2"))
                second = admin(gateway, "reload")
                assert first.result().status_code == 200, first.result().text
            assert second.status_code == 200, second.text
            assert set(split(gateway, 20)) == {"a", "b"}  # every worker has the edited file
    finally:
        consul.close()


def test_a_client_that_leaves_is_not_waited_for(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    """An admin reload whose client leaves while the workers are applying it (a new pool's
    discovery holds them): the wait ends with the client (logged with who asked, as a 499),
    not when the workers are done, and the change applies all the same."""
    a, b = upstreams["a"].url, upstreams["b"].url
    consul = SilentConsul()
    path = tmp_path / "gateway.toml"
    try:
        with run_gateway(
            tmp_path, gateway_toml(server, 2, [a]), env={"RR_ADMIN_TOKEN": TOKEN}
        ) as gateway:
            wait_for_workers(gateway, server, 2)
            path.write_text(gateway_toml(server, 2, [a, b], consul.pool("slow")))
            host, port = gateway.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as client:
                client.sendall(
                    b"POST /_rr/admin/reload HTTP/1.1\r\nHost: gw\r\n"
                    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
                wait_for(lambda: len(consul.taken) >= 2, "both workers in the reload")
            left = "the client left before every worker had applied it"
            wait_for(lambda: left in gateway.output(), "the wait to end with its client")
            wait_for(lambda: applied(gateway, "") == 2, "both workers' reloads")
            # The wait ended before either worker had finished the reload (the parent
            # and the workers write one log, in order).
            log = gateway.output()
            assert log.index(left) < log.index("reload (SIGHUP) of"), log
            assert f"asked to reload: {path} reloaded; {left}" in log
            wait_for(lambda: set(split(gateway, 20)) == {"a", "b"}, "the change applied")
            assert "Traceback" not in gateway.output()
    finally:
        consul.close()


def test_workers_stop_when_the_gateways_parent_is_killed(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    """Killing the gateway's parent with SIGKILL (the OOM killer does) must not leave its
    workers holding the port with no one to replace or reload them: each stops as on
    SIGTERM, finishing the request it serves, and the state the parent shared (the admin
    API's directory, the zone) goes with the last of them."""
    a = upstreams["a"]
    config = gateway_toml(server, 2, [a.url], server_extra="graceful_timeout = 20\n")
    with run_gateway(tmp_path, config, env={"RR_ADMIN_TOKEN": TOKEN}) as gateway:
        wait_for_workers(gateway, server, 2)
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
                wait_for(
                    lambda pid=pid: not process_started(pid), f"process {pid} to stop", timeout=30
                )
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
