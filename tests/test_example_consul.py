"""examples/consul/: the app follows Consul as its README says, with the real agent."""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from examples.demo_backend import make_app

from .consul_agent import ConsulAgent
from .polling import wait_for
from .proxy import client
from .servers import serve

REPO = Path(__file__).resolve().parent.parent


def register(consul: ConsulAgent, service: str, *args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.consul.register_demo",
            "--consul",
            consul.address,
            "--service",
            service,
            "--interval",
            "1s",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_consul_example_follows_the_registry(
    consul: ConsulAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = f"users-{uuid.uuid4().hex[:8]}"
    with serve(make_app("one")) as one, serve(make_app("two")) as two:
        out = register(consul, service, one.url, two.url)
        assert out.splitlines() == [
            f"registered {service}-127.0.0.1-{one.port}",
            f"registered {service}-127.0.0.1-{two.port}",
        ]
        consul.wait_for(service, lambda entries: len(entries) == 2, passing=True)

        monkeypatch.setenv("CONSUL_HTTP_ADDR", consul.address)
        monkeypatch.setenv("CONSUL_SERVICE", service)
        example = importlib.reload(importlib.import_module("examples.consul.app"))
        with serve(example.app) as proxy, client(base_url=proxy.url) as http:
            answers = [http.get(f"/users/{n}").json() for n in range(4)]
            assert sorted(a["backend"] for a in answers) == ["one", "one", "two", "two"]
            assert answers[0]["path"] == "/0"  # prefix stripped
            assert http.get("/").json()["app"] == "consul example"

            register(consul, service, "--deregister", one.url)
            wait_for(
                lambda: len(http.get("/status.json").json()["pools"][0]["upstreams"]) == 1,
                "the pool to drop the instance",
            )
            assert {http.get("/users/x").json()["backend"] for _ in range(3)} == {"two"}
            found = http.get("/status.json").json()["pools"][0]["discovery"]
            assert found["source"] == f"consul service {service!r} at {consul.address}"
        register(consul, service, "--deregister", two.url)


def test_register_script_says_when_consul_is_unreachable() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.consul.register_demo",
            "--consul",
            "http://127.0.0.1:9",
            "http://127.0.0.1:9001",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "consul at http://127.0.0.1:9 unreachable" in done.stderr
    assert "Traceback" not in done.stderr
