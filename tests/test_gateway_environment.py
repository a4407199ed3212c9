"""The gateway's file completed from the environment: ``${VAR}`` references, Consul's own
variables (against a real agent that enforces ACLs), and ``--check`` keeping secrets."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rr_middleware.config_mapping import ConfigError
from rr_middleware.gateway_config import GatewayConfig, load_config

from .consul_agent import ConsulAgent, find_consul, start_agent
from .gateway_process import DEADLINE, gateway_command, run_gateway
from .polling import wait_for
from .servers import serve
from .upstream_app import UpstreamApp


def load(tmp_path: Path, text: str, **environ: str) -> GatewayConfig:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path, environ)


def test_references_take_the_variable_or_the_default(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[server]
host = "${HOST:-127.0.0.1}"
port = "${PORT:-9000}"            # a reference may stand for a number
workers = "${WORKERS:-2}"

[pools."/api"]
upstreams = ["http://${API_HOST}:8000", { url = "http://b:${B_PORT}/v$$1", weight = "${W:-3}" }]
timeout = "${API_TIMEOUT:-2.5}"
preserve_host = "${PRESERVE:-true}"
max_body_size = "${MAX_BODY:-false}"   # false: unset, as written in TOML
""",
        API_HOST="10.0.0.7",
        B_PORT="8001",
        WORKERS="",  # set but empty: the default, as ${X:-y} in the shell
        PORT="9100",
    )
    assert (config.server.host, config.server.port, config.server.workers) == (
        "127.0.0.1",
        9100,
        2,
    )
    pool = config.pools["/api"]
    assert [(u.url, u.weight) for u in pool.members] == [
        ("http://10.0.0.7:8000", 1),
        ("http://b:8001/v$1", 3),
    ]
    assert (pool.timeout, pool.preserve_host, pool.max_body_size) == (2.5, True, None)


def test_an_unset_variable_without_default_names_the_key_and_the_variable(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[pools."/api"]\nupstreams = ["http://a:1", "http://${API_B}:8000"]\n')
    assert caught.value.key == 'pools."/api".upstreams[1]'
    assert "API_B is not set" in str(caught.value)
    assert "${API_B:-value}" in str(caught.value)


def test_a_value_is_never_read_as_toml_structure(tmp_path: Path) -> None:
    """A variable holding quotes or newlines stays one string where a string is expected,
    and a plain string in the file is never taken for a number."""
    tricky = '"]\n[pools."/evil"]\nupstreams = ["http://evil:1'
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[pools."/api"]\nupstreams = ["http://${X}"]\n', X=tricky)
    assert caught.value.key == 'pools."/api".upstreams[0].url'
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[server]\nport = "8000"\n[pools."/a"]\nupstreams = ["http://a:1"]\n')
    assert "expected an integer" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[server]\nport = "${P}"\n[pools."/a"]\nupstreams = ["http://a:1"]\n', P="x")
    assert caught.value.key == "server.port"


CONSUL_POOL = '[pools."/users".discovery]\ntype = "consul"\nservice = "users"\n'


def test_consul_variables_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    config = load(
        tmp_path,
        CONSUL_POOL,
        CONSUL_HTTP_ADDR="10.0.0.5:8501",
        CONSUL_HTTP_SSL="true",
        CONSUL_HTTP_TOKEN="from-the-variable",
        CONSUL_HTTP_TOKEN_FILE=str(token_file),
    )
    discovery = config.pools["/users"].discovery
    assert discovery is not None
    assert discovery.address == "https://10.0.0.5:8501"  # type: ignore[attr-defined]
    # Consul's API client: a token file wins over CONSUL_HTTP_TOKEN.
    assert discovery.token == "from-the-file"  # type: ignore[attr-defined]
    config = load(
        tmp_path,
        CONSUL_POOL + 'address = "http://127.0.0.1:8500"\ntoken = "${MY_TOKEN}"\n',
        CONSUL_HTTP_ADDR="http://10.0.0.5:8500",
        CONSUL_HTTP_TOKEN="from-the-variable",
        MY_TOKEN="from-the-key",
    )
    discovery = config.pools["/users"].discovery
    assert discovery.address == "http://127.0.0.1:8500"  # type: ignore[union-attr]
    assert discovery.token == "from-the-key"  # type: ignore[union-attr]


def test_consul_files_that_cannot_be_read_are_start_up_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, CONSUL_POOL, CONSUL_HTTP_TOKEN_FILE=str(tmp_path / "missing"))
    assert caught.value.key == 'pools."/users".discovery.token'
    assert "CONSUL_HTTP_TOKEN_FILE" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, CONSUL_POOL, CONSUL_CACERT=str(tmp_path / "no-ca.pem"))
    assert caught.value.key == 'pools."/users".discovery.ca_file'
    assert "no-ca.pem" in str(caught.value)


def test_check_never_prints_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        CONSUL_POOL + 'token = "${USERS_TOKEN}"\n[pools."/orders".discovery]\n'
        'type = "consul"\nservice = "orders"\n'
    )
    env = {"USERS_TOKEN": "s3cr3t-one", "CONSUL_HTTP_TOKEN": "s3cr3t-two", "PATH": "/usr/bin"}
    result = subprocess.run(
        gateway_command("--check", str(path)),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("token = (set, not shown)") == 2
    assert "s3cr3t" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """A dev agent that enforces ACLs: without a token, it lists no service at all."""
    binary = find_consul()
    if binary is None:
        pytest.skip("consul agent not available: run .ci/install-consul or set CONSUL_BIN")
    acl = 'acl { enabled = true, default_policy = "deny", tokens { master = "root-token" } }'
    agent = start_agent(
        binary, tmp_path_factory.mktemp("consul-acl"), extra_args=["-hcl", acl], token="root-token"
    )
    try:
        yield agent
    finally:
        agent.stop()


@pytest.mark.slow
def test_consul_http_token_reaches_an_agent_that_enforces_acls(
    acl_consul: ConsulAgent, tmp_path: Path
) -> None:
    config = "[server]\nport = 0\n" + CONSUL_POOL.replace('"users"', '"acl-users"') + "wait = 1.0\n"
    with serve(UpstreamApp("a")) as a:
        acl_consul.register("acl-a", "acl-users", "127.0.0.1", a.port)
        anonymous = httpx.get(f"{acl_consul.address}/v1/health/service/acl-users", timeout=5)
        assert anonymous.json() == []  # the agent hides it from a request without a token
        env = {
            "CONSUL_HTTP_ADDR": acl_consul.address.removeprefix("http://"),
            "CONSUL_HTTP_TOKEN": "root-token",
        }
        with run_gateway(tmp_path, config, env=env) as gateway:
            wait_for(
                lambda: (
                    httpx.get(gateway.url + "/users/x", timeout=5).headers.get("x-upstream") == "a"
                ),
                "the instance only the token can see to serve",
            )
            assert "root-token" not in gateway.output()
        acl_consul.deregister("acl-a")
