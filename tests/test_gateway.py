"""rr-gateway as users run it: a real process (``python -m rr_middleware``) in front of real
uvicorn upstreams, configured by a TOML file, stopped by signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

from .consul_agent import ConsulAgent
from .gateway_process import DEADLINE, SERVER_LOG, STARTED, gateway_command, run_gateway
from .polling import wait_for
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp


def pool_toml(urls: Sequence[str], extra: str = "", *, server: str = "") -> str:
    upstreams = ", ".join(f'"{u}"' for u in urls)
    return (
        f'[server]\nport = 0\nlog_level = "info"\n{server}\n'
        f'[pools."/api"]\nupstreams = [{upstreams}]\n{extra}\n'
    )


def test_serves_and_balances_by_weight(
    upstreams: list[RunningServer], tmp_path: Path, server: str
) -> None:
    a, b, c = upstreams
    config = f"""
[server]
port = 0
server = "{server}"

[middleware]
status_path = "/_rr/status"

[pools."/api"]
upstreams = ["{a.url}", {{ url = "{b.url}", weight = 2 }}]

[pools."/users"]
upstreams = ["{c.url}/v1"]
"""
    with run_gateway(tmp_path, config) as gateway, httpx.Client(base_url=gateway.url) as client:
        served = [client.get(f"/api/orders/{n}").headers["x-upstream"] for n in range(6)]
        assert sorted(served) == ["a", "a", "b", "b", "b", "b"]
        assert served[:3] == ["b", "a", "b"]  # smooth: never every "b" in a row

        reply = client.get("/users/42?x=1")
        assert reply.json()["raw_path"] == "/v1/42"
        assert reply.json()["query"] == "x=1"
        # The upstream's own Date and Server reach the client, once each.
        assert len(reply.headers.get_list("date")) == 1
        assert reply.headers.get_list("server") == ["uvicorn"]

        elsewhere = client.get("/elsewhere")
        assert elsewhere.status_code == 404
        # The gateway's own answers: granian names itself and dates them, uvicorn does not.
        added = {"uvicorn": [], "granian": ["granian"]}[server]
        assert elsewhere.headers.get_list("server") == added
        assert len(elsewhere.headers.get_list("date")) == len(added)
        status = client.get("/_rr/status.json").json()
        api = next(p for p in status["pools"] if p["prefix"] == "/api")
        assert {u["url"]: u["requests"] for u in api["upstreams"]} == {a.url: 2, b.url: 4}


BAD_CONFIGS = [
    ('upstreams = ["http://127.0.0.1:1"]\nretires = 3', 'pools."/api".retires', "'retries'"),
    ('upstreams = ["ftp://127.0.0.1:1"]', 'pools."/api".upstreams[0].url', "http://"),
    (
        'upstreams = ["http://127.0.0.1:1", { url = "http://127.0.0.1:2", weight = -1 }]',
        'pools."/api".upstreams[1].weight',
        ": must be an integer >= 0, got -1",
    ),
    ('upstreams = ["http://127.0.0.1:1"]\ntimeout = "30"', 'pools."/api".timeout', "a number"),
    ('upstreams = ["http://127.0.0.1:1"]\nretries = -1', 'pools."/api".retries', ">= 0"),
    ('upstreams = ["http://127.0.0.1:1"]\npolicy = "fastest"', 'pools."/api".policy', "fastest"),
    ('upstreams = ["http://127.0.0.1:1"]\nclock = 1', 'pools."/api".clock', "Python API"),
    ('upstreams = "http://127.0.0.1:1"', 'pools."/api".upstreams', "expected an array"),
    (
        "timeout = 1.0",
        'pools."/api"',
        """: a pool needs upstreams = [...] or a [pools."/api".discovery] table""",
    ),
    (
        'upstreams = ["http://127.0.0.1:1"]\n[pools."/api".health_check]\nexpect = [200, "ok"]',
        'pools."/api".health_check.expect[1]',
        "expected an integer",
    ),
    (
        'upstreams = ["http://127.0.0.1:1"]\n[pools."/api".health_check]\nrise = 0',
        'pools."/api".health_check.rise',
        ": must be an integer >= 1, got 0",
    ),
    (
        'upstreams = ["http://127.0.0.1:1"]\n[pools."/api".discovery]\ntype = "zookeeper"',
        'pools."/api".discovery.type',
        "unknown type 'zookeeper'",
    ),
    (
        'upstreams = ["http://127.0.0.1:1"]\n[middleware]\nstatus_path = "x"',
        "middleware.status_path",
        "'/'",
    ),
    ('upstreams = ["http://127.0.0.1:1"]\n[server]\nport = 70000', "server.port", "0..65535"),
    ('upstreams = ["http://127.0.0.1:1"]\n[pool."/x"]', "pool", "did you mean 'pools'?"),
    ('upstreams = ["http://127.0.0.1:1"]\nretries = = 3', "invalid TOML", "line 3, column 11"),
    (
        'upstreams = ["http://127.0.0.1:1"]\n[server]\nssl_certfile = "/nonexistent.pem"\n'
        'ssl_keyfile = "/nonexistent.key"',
        "server.ssl_certfile",
        "cannot be loaded: No such file or directory",
    ),
]


@pytest.mark.parametrize(("body", "key", "message"), BAD_CONFIGS)
def test_bad_configuration_names_file_and_key_and_exits_2(
    tmp_path: Path, body: str, key: str, message: str
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[pools."/api"]\n{body}\n')
    result = subprocess.run(
        gateway_command("--config", str(path)), capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 2
    assert f"{path}: {key}" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one line


@pytest.mark.parametrize("flag", ["--config", "--check"])
@pytest.mark.parametrize("problem", ["missing", "not a certificate"])
def test_tls_files_that_cannot_be_loaded_are_configuration_exit_2(
    tmp_path: Path, flag: str, problem: str
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if problem == "not a certificate":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        key.write_text("not a key\n")
    path = tmp_path / "gateway.toml"
    path.write_text(
        pool_toml(["http://127.0.0.1:1"], server=f'ssl_certfile = "{cert}"\nssl_keyfile = "{key}"')
    )
    result = subprocess.run(
        gateway_command(flag, str(path)), capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 2
    assert (
        f"{path}: server.ssl_certfile: {str(cert)!r} with its key cannot be loaded" in result.stderr
    )
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""  # --check prints no configuration it cannot serve


def test_an_address_in_use_is_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gateway.toml"
        path.write_text(pool_toml(["http://127.0.0.1:1"]))
        result = subprocess.run(
            gateway_command("--config", str(path), "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    assert result.returncode == 1
    assert f"rr-gateway: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--config", "missing.toml"], {}, "missing.toml: no such file"),
        ([], {}, "no configuration: pass --config FILE or set RR_GATEWAY_CONFIG"),
        (["--config", "g.toml"], {"RR_GATEWAY_PORT": "http"}, "RR_GATEWAY_PORT: must be a port"),
        (["--config", "g.toml"], {"RR_GATEWAY_CONFIG": "other.toml"}, "g.toml: pools: no pool"),
    ],
)
def test_start_up_mistakes_outside_the_file_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "g.toml").write_text("[server]\nport = 0\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RR_GATEWAY_")}
    result = subprocess.run(
        gateway_command(*args),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=tmp_path,
        env={**environment, **env},
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("server", "flags", "extra"),
    [
        ("uvicorn", [], "gateway"),
        ("granian", ["--server", "granian"], "granian"),  # the flag picks it
    ],
)
def test_without_its_server_it_says_which_extra_to_install(
    tmp_path: Path, server: str, flags: list[str], extra: str
) -> None:
    path = tmp_path / "g.toml"
    path.write_text(pool_toml(["http://127.0.0.1:1"]))
    code = (
        f"import sys; sys.modules[{server!r}] = None\n"
        "from rr_middleware.gateway import main\n"
        f"sys.exit(main(['--config', {str(path)!r}, *{flags!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 2
    assert f"rr-gateway: needs {server}: pip install 'rr-middleware[{extra}]'" in result.stderr


def test_check_prints_every_pool_with_weights_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[pools."/api"]
upstreams = ["http://10.0.0.1:8000", { url = "http://10.0.0.2:8000", weight = 3 }]
retries = 1
unhealthy_statuses = [502, 503]
[pools."/api".health_check]
interval = 2.5
expect = [200, 204]

[pools."/users"]
upstreams = ["http://10.0.0.3:8000/v1"]
"""
    )
    result = subprocess.run(
        gateway_command("--check", str(path)), capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"# {path}: OK, 2 pool(s)" in out
    assert '{ url = "http://10.0.0.1:8000", weight = 1 },' in out
    assert '{ url = "http://10.0.0.2:8000", weight = 3 },' in out
    assert '{ url = "http://10.0.0.3:8000/v1", weight = 1 },' in out
    lines = [line.rstrip() for line in out.splitlines()]
    assert "retries = 1" in lines
    assert "unhealthy_statuses = [502, 503]" in lines
    assert re.search(r"^timeout = 60\.0 +# default$", out, re.MULTILINE)
    assert re.search(r'^policy = "round_robin" +# default$', out, re.MULTILINE)
    assert out.index('[pools."/api".health_check]') < out.index('[pools."/users"]')
    assert "interval = 2.5" in lines
    assert "expect = [200, 204]" in lines
    assert re.search(r"^graceful_timeout = 30\.0 +# default$", out, re.MULTILINE)


def test_flags_beat_environment_beats_file(upstreams: list[RunningServer], tmp_path: Path) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    env_port, flag_port = ports
    config = pool_toml([upstreams[0].url], server='host = "127.0.0.2"')
    env = {"RR_GATEWAY_HOST": "127.0.0.1", "RR_GATEWAY_PORT": str(env_port)}
    with run_gateway(tmp_path, config, env=env) as gateway:
        assert gateway.url == f"http://127.0.0.1:{env_port}"
        assert httpx.get(gateway.url + "/api/x").headers["x-upstream"] == "a"
    with run_gateway(tmp_path, config, "--port", str(flag_port), env=env) as gateway:
        assert gateway.url == f"http://127.0.0.1:{flag_port}"
    # RR_GATEWAY_CONFIG names the file when no flag does.
    with run_gateway(tmp_path, pool_toml([upstreams[1].url]), config_flag=False) as gateway:
        assert httpx.get(gateway.url + "/api/x").headers["x-upstream"] == "b"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(
    tmp_path: Path, workers: int, server: str
) -> None:
    app = UpstreamApp("slow")
    spawned, draining = SERVER_LOG[server]
    with serve(app) as upstream:
        config = pool_toml([upstream.url], server=f'workers = {workers}\nserver = "{server}"')
        with run_gateway(tmp_path, config) as gateway:
            wait_for(
                lambda: len(re.findall(STARTED[server], gateway.output())) == workers,
                "every worker",
            )
            started = re.findall(spawned, gateway.output())
            assert len(set(started)) == workers
            for n in range(10):  # fresh connections: each worker may take them
                assert httpx.get(f"{gateway.url}/api/{n}").status_code == 200

            received: dict[str, Any] = {}

            def client() -> None:
                url = f"{gateway.url}/api/slow?action=stream&wait=1&n=3&size=4"
                with httpx.stream("GET", url, timeout=DEADLINE) as response:
                    received["status"] = response.status_code
                    received["body"] = response.read()

            thread = threading.Thread(target=client)
            thread.start()
            wait_for(lambda: len(app.requests) == 11, "the upstream to receive the request")
            gateway.process.send_signal(signal.SIGTERM)
            wait_for(
                lambda: draining in gateway.output(),
                "the gateway to drain",
            )
            assert gateway.process.poll() is None  # still waiting for our request
            for _ in range(3):
                app.proceed.release()
            thread.join(timeout=DEADLINE)
            assert received == {"status": 200, "body": b"AAAABBBBCCCC"}
            assert gateway.process.wait(timeout=DEADLINE) == 0
            for pid in map(int, started):  # the workers are gone too
                assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_gateway_stops_on_signal_with_exit_0(
    upstreams: list[RunningServer], tmp_path: Path, sig: int
) -> None:
    with run_gateway(tmp_path, pool_toml([upstreams[0].url])) as gateway:
        assert gateway.stop(sig) == 0
        assert "Traceback" not in gateway.output()


def test_check_shows_discovery_and_hides_its_token(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[pools."/users".discovery]
type = "consul"
service = "users"
tag = "v2"
token = "s3cr3t-token"

[pools."/dns"]
websocket_ping_interval = false
[pools."/dns".discovery]
type = "dns"
name = "api.internal"
port = false
"""
    )
    result = subprocess.run(
        gateway_command("--check", str(path)), capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 0, result.stderr
    users = result.stdout.split('[pools."/users".discovery]')[1].split("[pools")[0]
    assert 'type = "consul"' in users
    assert 'service = "users"' in users
    assert 'tag = "v2"' in users
    assert "token = (set, not shown)" in users
    assert "s3cr3t" not in result.stdout
    dns = result.stdout.split('[pools."/dns".discovery]')[1]
    assert 'type = "dns"' in dns
    assert "port = unset" in dns  # false: SRV records
    assert "websocket_ping_interval = unset" in result.stdout


def test_pool_from_consul_follows_the_registry(consul: ConsulAgent, tmp_path: Path) -> None:
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b:
        consul.register("gw-a", "gw-users", "127.0.0.1", a.port)
        registration = consul.register("gw-b", "gw-users", "127.0.0.1", b.port)
        config = f"""
[server]
port = 0

[pools."/users".discovery]
type = "consul"
service = "gw-users"
address = "{consul.address}"
wait = 1.0
"""
        with run_gateway(tmp_path, config) as gateway, httpx.Client(base_url=gateway.url) as client:

            def serving() -> set[str]:
                return {client.get(f"/users/{n}").headers.get("x-upstream") for n in range(4)}

            wait_for(lambda: serving() == {"a", "b"}, "both registered instances to serve")
            consul.deregister(registration.service_id)
            wait_for(lambda: serving() == {"a"}, "the deregistered instance to leave")
            assert gateway.stop() == 0


async def echo(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol=websocket.scope["subprotocols"][0])
    with suppress(WebSocketDisconnect):
        while True:
            await websocket.send_text(await websocket.receive_text())


def test_serves_tls_websockets_streams_and_metrics(tmp_path: Path, server: str) -> None:
    """What the gateway documents, under each server: its listener's certificate, a
    WebSocket with its subprotocol, a streamed response, the metrics and the status page."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    slow = UpstreamApp("slow")
    ws_app = Starlette(routes=[WebSocketRoute("/{path:path}", echo)])
    with serve(slow) as upstream, serve(ws_app, log_config=None) as ws_upstream:
        config = f"""
[server]
port = 0
server = "{server}"
ssl_certfile = "{cert_file}"
ssl_keyfile = "{key_file}"

[middleware]
status_path = "/_rr/status"
metrics_path = "/_rr/metrics"
access_log = true

[pools."/api"]
upstreams = ["{upstream.url}"]

[pools."/ws"]
upstreams = ["{ws_upstream.url}"]
"""
        context = ssl.create_default_context(cafile=str(ca_file))
        with run_gateway(tmp_path, config, verify=context) as gateway:
            client = httpx.Client(base_url=gateway.url, verify=context, timeout=DEADLINE)
            assert gateway.url.startswith("https://")
            slow.proceed.release()
            with client.stream("GET", "/api/x?action=stream&n=3&size=4&wait=1") as response:
                chunks = response.iter_bytes()
                for expected in (b"AAAA", b"BBBB", b"CCCC"):
                    assert next(chunks) == expected  # each alone: the next one is not sent yet
                    slow.proceed.release()
                assert b"".join(chunks) == b""
            ws_url = gateway.url.replace("https://", "wss://") + "/ws/chat"
            with ws_connect(ws_url, ssl=context, subprotocols=[Subprotocol("chat")]) as ws:
                assert ws.subprotocol == "chat"
                ws.send("hello")
                assert ws.recv(timeout=DEADLINE) == "hello"
            status = client.get("/_rr/status.json").json()
            api = next(p for p in status["pools"] if p["prefix"] == "/api")
            assert api["upstreams"][0]["requests"] == 1
            metrics = client.get("/_rr/metrics").text
            served = re.search(
                r'rr_upstream_requests_total\{code="200",pool="/api",[^}]*\} (\S+)', metrics
            )
            assert served is not None, metrics
            assert float(served.group(1)) == 1.0
            # Closed first: uvicorn's SIGTERM waits for an idle TLS keep-alive connection.
            client.close()
            assert gateway.stop() == 0
        log = gateway.output()
    assert "pool /api: GET /api/x" in log  # the access log
    assert "Traceback" not in log


@pytest.mark.slow
def test_granian_limit_concurrency_makes_the_next_request_wait(tmp_path: Path) -> None:
    """Under granian ``limit_concurrency`` is its backpressure: a request beyond it waits
    for one in flight to finish (uvicorn answers 503 instead), as docs/gateway.md says."""
    pytest.importorskip("granian")
    app = UpstreamApp("slow")
    with serve(app) as upstream:
        config = pool_toml([upstream.url], server='server = "granian"\nlimit_concurrency = 1')
        with run_gateway(tmp_path, config) as gateway:
            first: dict[str, Any] = {}

            def held() -> None:
                url = f"{gateway.url}/api/held?action=stream&wait=1&n=1&size=4"
                first["status"] = httpx.get(url, timeout=DEADLINE).status_code

            thread = threading.Thread(target=held)
            thread.start()
            wait_for(lambda: len(app.requests) == 1, "the first request upstream")
            second: dict[str, Any] = {}
            waiting = threading.Thread(
                target=lambda: second.update(
                    status=httpx.get(f"{gateway.url}/api/next", timeout=DEADLINE).status_code
                )
            )
            waiting.start()
            waiting.join(timeout=1.0)
            assert waiting.is_alive()  # waiting, not refused
            assert len(app.requests) == 1
            app.proceed.release()
            thread.join(timeout=DEADLINE)
            waiting.join(timeout=DEADLINE)
            assert first == {"status": 200}
            assert second == {"status": 200}
