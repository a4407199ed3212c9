"""The gateway's TOML file in process: what each key becomes, and what each mistake says.

``tests/test_gateway.py`` runs the command as users do; these load files with
``load_config`` and look at the objects and at ``ConfigError``'s key and message.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

import pytest

import rr_middleware
from rr_middleware import (
    TLS,
    ConsulDiscovery,
    DNSDiscovery,
    HealthCheck,
    Pool,
    Route,
    StickyCookie,
    Upstream,
)
from rr_middleware.config import FieldError
from rr_middleware.config_mapping import ConfigError, KeyTable
from rr_middleware.gateway import describe
from rr_middleware.gateway_config import (
    DISCOVERY,
    KEY_TABLES,
    MIDDLEWARE,
    POOL,
    SERVER,
    GatewayConfig,
    ServerSettings,
    load_config,
)

from .upstream_app import values


def load(tmp_path: Path, text: str) -> GatewayConfig:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path)


def mistake(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.file == str(tmp_path / "gateway.toml")
    return caught.value


API = '[pools."/api"]\nupstreams = ["http://10.0.0.1:8000"]\n'


# ---------------------------------------------------------------- the file format


def test_every_key_reaches_the_python_api(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[server]
port = 9000
graceful_timeout = 5          # an integer where seconds are expected
limit_concurrency = 100

[middleware]
trusted_proxies = "10.0.0.0/8, 127.0.0.1"
hide_response_headers = ["server"]
status_path = "/_rr/status"

[pools."/api"]
upstreams = ["http://10.0.0.1:8000", { url = "http://10.0.0.2:8000/v1", weight = 3 }]
timeout = 30
unhealthy_statuses = [502, 503]
websocket_ping_interval = false

[pools."/api".health_check]
path = "/healthz"
expect = [200, 204]

[pools."/users".discovery]
type = "consul"
service = "users"
tag = "v2"

[pools."/dns".discovery]
type = "DNS"
name = "backend.internal"
port = false
""",
    )
    assert config.server.port == 9000
    assert config.server.graceful_timeout == 5.0
    assert isinstance(config.server.graceful_timeout, float)
    assert config.middleware["hide_response_headers"] == ["server"]
    assert config.app.trusted_proxies.always is False
    assert "10.1.2.3" in config.app.trusted_proxies
    api = config.pools["/api"]
    assert [(u.url, u.weight) for u in api.members] == [
        ("http://10.0.0.1:8000", 1),
        ("http://10.0.0.2:8000/v1", 3),
    ]
    assert api.timeout == 30.0
    assert api.unhealthy_statuses == frozenset({502, 503})
    assert api.websocket_ping_interval is None
    assert api.health_check == HealthCheck(path="/healthz", expect=frozenset({200, 204}))
    assert config.pools["/users"].discovery == ConsulDiscovery("users", tag="v2")
    assert config.pools["/dns"].discovery == DNSDiscovery("backend.internal", port=None)


def init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def test_the_checks_below_cover_every_class_a_file_builds() -> None:
    classes = {
        ServerSettings,
        Pool,
        Upstream,
        HealthCheck,
        ConsulDiscovery,
        DNSDiscovery,
        StickyCookie,
        Route,
        TLS,
    }
    assert set(KEY_TABLES) == classes


@pytest.mark.parametrize("table", list(KEY_TABLES.values()), ids=lambda t: t.target.__name__)
def test_every_option_is_a_key_or_python_only(table: KeyTable[Any]) -> None:
    """A new field of Pool, HealthCheck, Upstream, a discovery class or ServerSettings
    needs a line in its table in gateway_config.py, or its name in python_only."""
    assert isinstance(table.target, type)
    keys, python_only = set(table.keys), table.python_only
    assert not keys & python_only
    assert init_fields(table.target) == keys | python_only, "see gateway_config.py"


def test_every_middleware_option_is_a_key_or_python_only() -> None:
    parameters = inspect.signature(rr_middleware.RoundRobinMiddleware).parameters.values()
    options = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert options == set(MIDDLEWARE.keys) | MIDDLEWARE.python_only, "see gateway_config.py"


def test_every_public_discovery_class_has_a_type() -> None:
    public = [getattr(rr_middleware, name) for name in rr_middleware.__all__]
    sources = {c for c in public if dataclasses.is_dataclass(c) and hasattr(c, "watch")}
    assert sources == {choice.target for choice in DISCOVERY.choices.values()}


def toml_form(value: object) -> object:
    if isinstance(value, (frozenset, set)):
        return sorted(value)  # type: ignore[type-var]
    if isinstance(value, (range, tuple)):
        return list(value)
    return value


@pytest.mark.parametrize(
    "table", [*KEY_TABLES.values(), MIDDLEWARE], ids=lambda t: getattr(t.target, "__name__", "")
)
def test_every_default_is_accepted_by_its_converter(table: KeyTable[Any]) -> None:
    """The converters agree with the fields' types: each default, written in TOML, is
    taken (a float default under INTEGER, say, would not be)."""
    for name, parameter in inspect.signature(table.target).parameters.items():
        if name in table.keys and parameter.default not in (None, inspect.Parameter.empty):
            table.keys[name](toml_form(parameter.default), name)


# ------------------------------------------------------------------------ mistakes


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            '[pools."/api"]\n'
            'upstreams = ["http://10.0.0.1", { url = "http://10.0.0.2", weight = -1 }]',
            'pools."/api".upstreams[1].weight',
            "must be an integer >= 0, got -1",
        ),
        (
            '[pools."/api"]\nupstreams = ["http://10.0.0.1", "http://10.0.0.1:80/"]',
            'pools."/api".upstreams',
            "has 'http://10.0.0.1:80/' twice (the same server as an earlier entry)",
        ),
        (
            '[pools."/api"]\nupstreams = [{ weight = 2 }]',
            'pools."/api".upstreams[0]',
            "missing required key 'url'",
        ),
        (
            API + "retries = -1",
            'pools."/api".retries',
            "must be an integer >= 0, got -1",
        ),
        (
            API + 'policy = "fastest"',
            'pools."/api".policy',
            "must be 'round_robin', 'least_requests', 'peak_ewma', 'random' or 'hash', "
            "got 'fastest'",
        ),
        (
            API + "unhealthy_statuses = [502, 999]",
            'pools."/api".unhealthy_statuses',
            "must be HTTP status codes, got [502, 999]",
        ),
        (
            API + '[pools."/api".health_check]\ninterval = 0',
            'pools."/api".health_check.interval',
            "must be a positive number of seconds, got 0.0",
        ),
        (
            API + '[pools."/api".health_check]\npath = "healthz"',
            'pools."/api".health_check.path',
            "must start with '/', got 'healthz'",
        ),
        (
            '[pools."/u".discovery]\ntype = "consul"\nservice = "u"\nwait = 0',
            'pools."/u".discovery.wait',
            "must be > 0 and at most 600 seconds, got 0.0",
        ),
        (
            '[pools."/u".discovery]\ntype = "consul"\nservice = "u"\naddress = "http://a:b@c"',
            'pools."/u".discovery.address',
            "must not carry credentials; give token= instead",
        ),
        (
            '[pools."/u".discovery]\ntype = "dns"\nname = "b"\nnameservers = ["dns.example"]',
            'pools."/u".discovery.nameservers',
            "'dns.example' must be an IP address[:port]",
        ),
        (
            '[pools."/u".discovery]\ntype = "consul"',
            'pools."/u".discovery',
            "missing required key 'service'",
        ),
        (
            '[pools."/u".discovery]\nservice = "u"',
            'pools."/u".discovery.type',
            "a type is required (known: 'consul', 'dns')",
        ),
        (
            API + '[middleware]\ntrusted_proxies = ["10.0.0.0/8", "proxy.internal"]',
            "middleware.trusted_proxies",
            "'proxy.internal' is not an IP address or network",
        ),
        (
            API + '[middleware]\ntrusted_proxies = ["10.0.0.0/8", 1]',
            "middleware.trusted_proxies[1]",
            "expected a string, got an integer (1)",
        ),
        (
            API + "[middleware]\nmax_url_length = 0",
            "middleware.max_url_length",
            "must be >= 1, got 0",
        ),
        (
            API + '[middleware]\nstatus_path = "/m"\nmetrics_path = "/m.json"',
            "middleware.status_path",
            "'/m' collides with metrics_path",
        ),
        (
            API + '[pools."/api/"]\nupstreams = ["http://10.0.0.2"]',
            "pools",
            "duplicate pool prefix '/api/' (same as '/api')",
        ),
        (
            API + '[server]\nssl_keyfile = "key.pem"',
            "server.ssl_keyfile",
            "needs ssl_certfile beside it (both or neither)",
        ),
        (
            API + "[server]\nworkers = 0",
            "server.workers",
            "must be >= 1, got 0",
        ),
    ],
)
def test_a_mistake_names_its_key_and_says_what_is_wrong(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    error = mistake(tmp_path, text)
    assert (error.key, error.message) == (key, message)
    assert str(error) == f"{tmp_path / 'gateway.toml'}: {key}: {message}"


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        (API + "retires = 3", 'pools."/api".retires', "'retries'"),
        (
            '[pools."/u".discovery]\ntype = "consul"\nservice = "u"\npassing = false',
            'pools."/u".discovery.passing',
            "'passing_only'",
        ),
        (
            API + '[pools."/api".health_check]\nintervall = 5',
            'pools."/api".health_check.intervall',
            "'interval'",
        ),
        (API + "[middleware]\nstatus_pth = '/s'", "middleware.status_pth", "'status_path'"),
        (API + "[servers]\nport = 1", "servers", "'server'"),
    ],
)
def test_an_unknown_key_suggests_the_closest(
    tmp_path: Path, text: str, key: str, suggestion: str
) -> None:
    error = mistake(tmp_path, text)
    assert error.key == key
    assert error.message.startswith(f"unknown key (did you mean {suggestion}?); known keys: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (API + 'clock = "monotonic"', 'pools."/api".clock'),
        (API + 'transport = "h2"', 'pools."/api".transport'),
        (
            '[pools."/api"]\nupstreams = [{ url = "http://a", app = "main:app" }]',
            'pools."/api".upstreams[0].app',
        ),
        (
            '[pools."/u".discovery]\ntype = "consul"\nservice = "u"\ntransport = "tls"',
            'pools."/u".discovery.transport',
        ),
        (API + '[middleware]\nstatus_guard = "admins"', "middleware.status_guard"),
    ],
)
def test_a_python_only_option_says_so(tmp_path: Path, text: str, key: str) -> None:
    error = mistake(tmp_path, text)
    assert (error.key, error.message) == (key, "takes a Python object: set it with the Python API")


# ----------------------------------------------- where a pool's members come from


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            '[pools."/api"]\ntimeout = 5',
            'pools."/api"',
            'a pool needs upstreams = [...] or a [pools."/api".discovery] table',
        ),
        (
            '[pools."/api"]\nupstreams = []',
            'pools."/api".upstreams',
            'is empty: list at least one upstream, or give a [pools."/api".discovery] table',
        ),
        (
            '[pools."/api"]\nupstreams = ["http://10.0.0.1"]\n'
            '[pools."/api".discovery]\ntype = "dns"\nname = "backend"',
            'pools."/api"',
            'give upstreams = [...] or a [pools."/api".discovery] table, not both',
        ),
    ],
)
def test_pool_members_are_explained_in_toml(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    error = mistake(tmp_path, text)
    assert (error.key, error.message) == (key, message)
    assert "discovery=" not in str(error)  # Python's spelling, not the file's


def test_the_python_api_explains_pool_members_in_python() -> None:
    with pytest.raises(ValueError, match=r"^a pool needs at least one upstream \(or discovery=\)$"):
        Pool()
    with pytest.raises(ValueError, match=r"^give a pool upstreams or discovery=, not both$"):
        Pool(["http://10.0.0.1"], discovery=DNSDiscovery("backend"))


# ------------------------------------------------------------ the Python side of it


def test_validation_errors_name_their_field_and_keep_the_python_message() -> None:
    with pytest.raises(FieldError) as caught:
        Upstream("http://10.0.0.2", weight=-1)
    assert caught.value.field == "weight"
    assert caught.value.problem == "must be an integer >= 0, got -1"
    assert str(caught.value) == "upstream 'http://10.0.0.2': weight must be an integer >= 0, got -1"
    with pytest.raises(FieldError) as caught:
        HealthCheck(rise=0)
    assert (caught.value.field, str(caught.value)) == (
        "rise",
        "health check rise must be an integer >= 1, got 0",
    )


# --------------------------------------------------------------------- --check


def test_check_prints_every_key_and_hides_secrets(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        API + '[pools."/users".discovery]\ntype = "consul"\nservice = "users"\ntoken = "s3cr3t"\n',
    )
    text = describe(config)
    for name in SERVER.keys:
        assert f"\n{name} = " in text
    for name in MIDDLEWARE.keys:
        assert f"\n{name} = " in text
    for name in POOL.keys:
        if name not in ("health_check", "discovery"):
            assert f"\n{name} = " in text
    assert "token = (set, not shown)" in text
    assert "s3cr3t" not in text
    users = text.split('[pools."/users".discovery]')[1]
    assert users.startswith('\ntype = "consul"')


# ------------------------------------------------------------------- [server] server


def test_the_server_is_uvicorn_unless_the_file_or_flag_says_granian(tmp_path: Path) -> None:
    assert load(tmp_path, API).server.server == "uvicorn"
    assert load(tmp_path, '[server]\nserver = "granian"\n' + API).server.server == "granian"
    path = tmp_path / "gateway.toml"
    assert load_config(path, server="granian").server.server == "granian"  # --server
    error = mistake(tmp_path, '[server]\nserver = "hypercorn"\n' + API)
    assert str(error).endswith("server.server: must be one of uvicorn, granian, got 'hypercorn'")


@pytest.mark.parametrize("hidden", ['["Server"]', '["x-powered-by", "date"]'])
def test_granian_cannot_hide_the_headers_it_adds(tmp_path: Path, hidden: str) -> None:
    middleware = f"[middleware]\nhide_response_headers = {hidden}\n"
    assert load(tmp_path, middleware + API).server.server == "uvicorn"  # uvicorn adds none
    error = mistake(tmp_path, f'[server]\nserver = "granian"\n{middleware}{API}')
    assert error.key == "middleware.hide_response_headers"
    assert 'under server = "granian", which adds its own' in str(error)


def test_granian_gets_the_server_table(tmp_path: Path) -> None:
    pytest.importorskip("granian")
    from granian.constants import SSLProtocols

    from rr_middleware.gateway_granian import granian_options

    settings = ServerSettings(
        server="granian",
        workers=3,
        keepalive_timeout=2.5,
        graceful_timeout=0.2,
        limit_concurrency=64,
        log_level="trace",
    )
    options = granian_options(settings)
    assert options["workers"] == 3
    assert options["http1_settings"].header_read_timeout == 2500
    assert options["workers_kill_timeout"] == 1  # whole seconds, at least one
    assert options["backpressure"] == 64
    assert options["log_level"] == "debug"  # granian has no trace
    assert options["ssl_protocol_min"] == SSLProtocols.tls12  # as uvicorn accepts


def test_guard_and_hooks_are_import_strings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [pools."/api"]
        upstreams = ["http://10.0.0.1:8000"]
        guard = "tests.upstream_app:values"
        on_response = "os.path:join"
        rewrite_redirects = false
        """,
    )
    pool = config.pools["/api"]
    assert pool.guard is values
    assert pool.on_response is os.path.join
    assert (pool.on_request, pool.rewrite_redirects, pool.rewrite_cookies) == (None, False, True)
    # --check names them back as the file can (os.path.join lives in posixpath).
    text = describe(config)
    assert 'guard = "tests.upstream_app:values"' in text
    assert 'on_response = "posixpath:join"' in text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"no_such_module_x:f"', "cannot import 'no_such_module_x'"),
        ('"os.path:nothing_here"', "'os.path' has no 'nothing_here'"),
        ('"os.path"', "expected 'module:function', got 'os.path'"),
        ("3", "expected a 'module:function' string"),
    ],
)
def test_a_wrong_import_string_names_the_key(tmp_path: Path, value: str, problem: str) -> None:
    error = mistake(
        tmp_path, f'[pools."/api"]\nupstreams = ["http://10.0.0.1:8000"]\nguard = {value}\n'
    )
    assert error.key == 'pools."/api".guard'
    assert problem in error.message


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated")  # granian's own call
async def test_a_worker_whose_app_fails_to_start_stops_under_granian() -> None:
    """granian takes a lifespan that raises for "no lifespan support" and serves on;
    the gateway's workers say the start failed, so granian stops the worker instead."""
    pytest.importorskip("granian")
    from granian.asgi import LifespanProtocol

    from rr_middleware.gateway_granian import StartupFailure

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("the zone cannot be made")

    bare = LifespanProtocol(broken)
    await bare.startup()
    assert not bare.interrupt  # what StartupFailure is for

    wrapped = LifespanProtocol(StartupFailure(broken))
    await wrapped.startup()
    assert wrapped.interrupt
    assert str(wrapped.exc) == "the zone cannot be made"

    async def fine(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    working = LifespanProtocol(StartupFailure(fine))
    await working.startup()
    assert not working.interrupt
    await working.shutdown()
    assert not working.interrupt
