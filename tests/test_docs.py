"""The README's examples run as shown: its Python against real upstreams on loopback (the
example's 10.0.0.x addresses swapped for theirs), its TOML through the gateway's loader."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.testclient import TestClient

from rr_middleware.gateway_config import load_config

from .servers import serve
from .upstream_app import UpstreamApp

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ADDRESSES = [f"http://10.0.0.{n}:8000" for n in (1, 2, 3, 4)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def run(code: str, urls: list[str], **namespace: Any) -> dict[str, Any]:
    for address, url in zip(ADDRESSES, urls, strict=True):
        code = code.replace(address, url)
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_examples_forward_and_drain() -> None:
    first, with_balancer = blocks("python")
    with ExitStack() as stack:
        upstreams = [stack.enter_context(serve(UpstreamApp(f"u{n}"))) for n in (1, 2, 3, 4)]
        urls = [upstream.url for upstream in upstreams]

        app = run(first, urls)["app"]
        with TestClient(app) as client:
            assert client.get("/hello").json() == {"hello": "world"}
            replies = [client.get("/api/orders?page=2").json() for _ in range(3)]
        assert [r["server"] for r in replies] == ["u1", "u2", "u1"]
        assert {(r["raw_path"], r["query"]) for r in replies} == {("/orders", "page=2")}

        namespace = run(with_balancer, urls, app=FastAPI())
        with TestClient(namespace["app"]) as client:
            replies = [client.get("/users/42").json() for _ in range(3)]
        assert {(r["server"], r["raw_path"]) for r in replies} == {("u3", "/v1/42")}
        drained = {row["url"]: row["drained"] for row in namespace["balancer"]["/users"].snapshot()}
        assert drained == {f"{urls[2]}/v1": False, f"{urls[3]}/v1": True}


def test_readme_gateway_file_loads(tmp_path: Path) -> None:
    (toml,) = blocks("toml")
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    config = load_config(path)
    assert config.server.port == 8080
    assert [u.weight for u in config.pools["/api"].members] == [1, 3]


def test_security_policy_states_the_defaults_the_code_has() -> None:
    """SECURITY.md is read outside the docs site, so its defaults are written by hand
    (``client_body_timeout`` (30 s)): each one named there is the code's."""
    import dataclasses
    import inspect

    from rr_middleware import Pool, RoundRobinMiddleware

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Pool)}
    for name, parameter in inspect.signature(RoundRobinMiddleware).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            defaults[name] = parameter.default
    units = {"": 1, "s": 1, "B/s": 1, "KiB": 1024, "MiB": 1024 * 1024}
    stated = re.findall(
        r"`(\w+)`(?: bytes| s)? \((\d+(?:\.\d+)?) ?(s|B/s|KiB|MiB)?\)",
        (ROOT / "SECURITY.md").read_text(),
    )
    assert len(stated) == 6, stated  # a new one: make sure this pattern reads it
    for name, number, unit in stated:
        assert name in defaults, f"SECURITY.md names {name!r}, which has no default"
        assert float(number) * units[unit] == defaults[name], (name, defaults[name])
