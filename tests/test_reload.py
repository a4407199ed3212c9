"""Reloading rr-gateway while it serves: SIGHUP and --watch on real gateway processes in
front of real uvicorn upstreams, under load, with requests and WebSockets in flight."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.sync.client import connect as ws_connect

from .gateway_process import DEADLINE, STARTED, Gateway, gateway_command, run_gateway
from .polling import wait_for
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, RunningServer]]:
    with (
        serve(UpstreamApp("a")) as a,
        serve(UpstreamApp("b")) as b,
        serve(UpstreamApp("c")) as c,
    ):
        yield {"a": a, "b": b, "c": c}


def gateway_file(upstreams: dict[str, RunningServer], pools: dict[str, str], server: str) -> str:
    """``pools``: prefix → "a b:3" (upstream names, each with an optional weight)."""
    text = f"[server]\nport = 0\n{server}\n"
    for prefix, members in pools.items():
        entries = []
        for member in members.split():
            name, _, weight = member.partition(":")
            entries.append(f'{{ url = "{upstreams[name].url}", weight = {weight or 1} }}')
        text += f'\n[pools."{prefix}"]\nupstreams = [{", ".join(entries)}]\n'
    return text


def reloads(gateway: Gateway) -> int:
    return len(re.findall(r"reload \([^)]*\) of ", gateway.output()))


def split(url: str, prefix: str, n: int) -> Counter[str]:
    """Which upstream served each of ``n`` requests, each on a fresh connection (so that
    every worker takes its share)."""
    return Counter(
        httpx.get(f"{url}{prefix}/x", headers={"connection": "close"}).headers["x-upstream"]
        for _ in range(n)
    )


def test_sighup_applies_pools_added_removed_and_reweighted(
    upstreams: dict[str, RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "gateway.toml"
    config = gateway_file(upstreams, {"/api": "a b", "/old": "c"}, "")
    with run_gateway(tmp_path, config) as gateway, httpx.Client(base_url=gateway.url) as client:
        assert client.get("/old/x").headers["x-upstream"] == "c"
        path.write_text(gateway_file(upstreams, {"/api": "a:3 b", "/new": "c"}, ""))
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(gateway) == 1, "the reload")
        assert "pool /new added; pool /old removed; pool /api: upstreams 1 reweighed" in (
            gateway.output()
        )
        assert client.get("/old/x").status_code == 404
        assert client.get("/new/x").headers["x-upstream"] == "c"
        assert Counter(client.get("/api/x").headers["x-upstream"] for _ in range(8)) == {
            "a": 6,
            "b": 2,
        }
        assert gateway.stop() == 0


def test_an_invalid_file_is_refused_once_and_traffic_goes_on(
    upstreams: dict[str, RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "gateway.toml"
    config = gateway_file(upstreams, {"/api": "a b"}, "workers = 2")
    with run_gateway(tmp_path, config) as gateway:
        wait_for(
            lambda: gateway.output().count("Application startup complete") == 2, "both workers"
        )
        path.write_text(config.replace("weight = 1 }, {", "weight = -1 }, {"))
        gateway.process.send_signal(signal.SIGHUP)
        refused = wait_for(
            lambda: re.findall(r".*reload \(SIGHUP\) refused.*", gateway.output()), "the refusal"
        )
        # Both workers still serve both upstreams (each alternates on its own).
        served = split(gateway.url, "/api", 20)
        assert set(served) == {"a", "b"}
        assert abs(served["a"] - 10) <= 2, served
        assert len(re.findall(r"refused", gateway.output())) == 1  # the parent checked it
        assert reloads(gateway) == 0
        check = subprocess.run(
            gateway_command("--check", str(path)), capture_output=True, text=True, timeout=DEADLINE
        )
        assert check.returncode == 2
        message = 'pools."/api".upstreams[0].weight: must be an integer >= 0, got -1'
        assert message in refused[0]
        assert message in check.stderr
        assert gateway.stop() == 0


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


def test_requests_and_websockets_in_flight_outlive_their_pool(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    path = tmp_path / "gateway.toml"
    slow = UpstreamApp("slow")
    ws_app = Starlette(routes=[WebSocketRoute("/{path:path}", echo)])
    with serve(slow) as slow_server, serve(ws_app, log_config=None) as ws_server:
        both = {**upstreams, "slow": slow_server, "ws": ws_server}
        config = gateway_file(
            both, {"/api": "a", "/slow": "slow", "/ws": "ws"}, f'server = "{server}"'
        )
        with run_gateway(tmp_path, config) as gateway:
            received: dict[str, Any] = {}

            def stream() -> None:
                url = f"{gateway.url}/slow/x?action=stream&wait=1&n=3&size=4"
                with httpx.stream("GET", url, timeout=DEADLINE) as response:
                    received["status"] = response.status_code
                    received["body"] = response.read()

            thread = threading.Thread(target=stream)
            thread.start()
            wait_for(lambda: len(slow.requests) == 1, "the streaming request")
            slow.proceed.release()
            ws_url = gateway.url.replace("http://", "ws://") + "/ws/chat"
            with ws_connect(ws_url, open_timeout=DEADLINE) as websocket:
                websocket.send("before")
                assert websocket.recv(timeout=DEADLINE) == "before"
                path.write_text(gateway_file(both, {"/api": "a"}, f'server = "{server}"'))
                gateway.process.send_signal(signal.SIGHUP)
                wait_for(lambda: reloads(gateway) == 1, "the reload")
                assert httpx.get(f"{gateway.url}/slow/x").status_code == 404  # gone for new
                websocket.send("after")
                assert websocket.recv(timeout=DEADLINE) == "after"
            slow.proceed.release()
            slow.proceed.release()
            thread.join(timeout=DEADLINE)
            assert received == {"status": 200, "body": b"AAAABBBBCCCC"}
            assert gateway.stop() == 0


def test_watched_file_reloads_every_worker_under_load_without_a_failure(
    upstreams: dict[str, RunningServer], tmp_path: Path, server: str
) -> None:
    """2 workers, 16 clients sending requests without pause, 10 reloads by --watch that
    add, remove and reweigh upstreams: not one request fails, and the traffic split then
    follows the last file."""
    path = tmp_path / "gateway.toml"
    steps = ["a b c", "a:3 b", "b c", "a c:2", "a b:2 c", "c", "b:5 a", "a b c", "a:4 c", "a:2 b"]
    settings = f'workers = 2\nserver = "{server}"'
    config = gateway_file(upstreams, {"/api": "a b"}, settings)
    with run_gateway(tmp_path, config, "--watch") as gateway:
        wait_for(lambda: len(re.findall(STARTED[server], gateway.output())) == 2, "both workers")
        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()

        def load() -> None:
            deadline = time.monotonic() + 120  # bounded, whatever happens to the test
            with httpx.Client(base_url=gateway.url, timeout=DEADLINE) as client:
                while not stop.is_set() and time.monotonic() < deadline:
                    try:
                        outcome = str(client.get("/api/x").status_code)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    with lock:
                        outcomes[outcome] += 1

        clients = [threading.Thread(target=load) for _ in range(16)]
        for client in clients:
            client.start()
        try:
            for done, members in enumerate(steps, start=1):
                before = sum(outcomes.values())
                path.write_text(gateway_file(upstreams, {"/api": members}, settings))
                wait_for(
                    lambda done=done: reloads(gateway) == 2 * done, f"both workers at step {done}"
                )
                # Traffic goes on between reloads.
                wait_for(
                    lambda before=before: sum(outcomes.values()) > before + 50,
                    "requests meanwhile",
                )
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=DEADLINE)
        assert set(outcomes) == {"200"}, outcomes
        assert outcomes["200"] > 300
        # Each worker follows the 2:1 sequence on its own, so the total is off by at most
        # one request per worker.
        served = split(gateway.url, "/api", 60)
        assert set(served) == {"a", "b"}
        assert abs(served["a"] - 40) <= 2, served
        assert gateway.stop() == 0
        log = gateway.output()
    assert "Traceback" not in log
    # The workers moved zone with each new layout; the last one out of each removed it.
    zones = set(re.findall(r"attached as worker \d+ \((\S+)\)", log))
    assert len(zones) >= 4
    assert not [zone for zone in zones if os.path.exists(zone)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_that_fails_to_start_is_exit_1_with_its_error(
    upstreams: dict[str, RunningServer], tmp_path: Path, workers: int, server: str
) -> None:
    """A zone that cannot be made (its directory under /proc) fails each worker's start:
    the gateway exits 1, the worker's error on stderr, with one worker or several."""
    settings = f'workers = {workers}\nserver = "{server}"'
    config = gateway_file(upstreams, {"/api": "a"}, settings).replace(
        "[pools", '[middleware]\nzone = "/proc/rr-gateway-test-zone"\n\n[pools', 1
    )
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    result = subprocess.run(
        gateway_command("--config", str(path)), capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 1, result.stderr
    assert "ZoneError: zone '/proc/rr-gateway-test-zone-" in result.stderr
