"""The gateway's TOML file, mapped onto the Python API.

``[server]`` becomes :class:`ServerSettings`; ``[middleware]`` the keyword options of
``RoundRobinMiddleware``; each ``[pools."/prefix"]`` a ``Pool`` (its ``upstreams`` entries
URLs or ``{url = ..., weight = ...}`` tables, ``[pools."/prefix".health_check]`` a
``HealthCheck``, ``[pools."/prefix".discovery]`` the discovery class its ``type`` names).

The key tables below are the whole file format: one line per key, next to the converter
that checks its TOML type (see ``config_mapping``). A new option of a class becomes a TOML
key by one line in its table, or is listed as ``python_only``; a test fails until it is
one or the other. Every mistake becomes a :class:`ConfigError` naming the file and the key
path, never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import ssl
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from .config import FieldError, HealthCheck, Pool, Upstream, normalize_pool_key
from .config_mapping import (
    BOOLEAN,
    INTEGER,
    NUMBER,
    STRING,
    AnyOf,
    Array,
    ConfigError,
    Converter,
    KeyTable,
    MapOf,
    Regex,
    Table,
    Tagged,
    key_path,
    optional,
    reject_unknown,
    table_of,
)
from .discovery import ConsulDiscovery, DNSDiscovery
from .environment import consul_from_environment, interpolate
from .matching import Route
from .middleware import RoundRobinMiddleware
from .sticky import COLLISION, StickyCookie, cookie_collision
from .tls import TLS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the backport, declared by the "gateway" extra
    import tomli as tomllib

__all__ = ["ConfigError", "GatewayConfig", "ServerSettings", "load_config"]

# Options of RoundRobinMiddleware that differ in the gateway, and why: uvicorn adds no Date
# or Server header of its own there, so the upstream's pass through (once each) by default.
GATEWAY_MIDDLEWARE_DEFAULTS: dict[str, Any] = {"hide_response_headers": ()}
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


#: The ASGI servers the gateway runs under (granian: the optional extra ``granian``).
SERVERS = ("uvicorn", "granian")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """``[server]``: how the gateway listens (uvicorn's settings, or granian's)."""

    server: str = "uvicorn"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    graceful_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    backlog: int = 2048
    limit_concurrency: int | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.server not in SERVERS:
            raise FieldError("server", f"must be one of {', '.join(SERVERS)}, got {self.server!r}")
        if not 0 <= self.port <= 65535:
            raise FieldError("port", f"must be in 0..65535, got {self.port}")
        if self.workers < 1:
            raise FieldError("workers", f"must be >= 1, got {self.workers}")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise FieldError("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
        for name in ("graceful_timeout", "keepalive_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise FieldError(name, f"must be a number of seconds >= 0, got {value}")
        if self.backlog < 1:
            raise FieldError("backlog", f"must be >= 1, got {self.backlog}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise FieldError("limit_concurrency", f"must be >= 1, got {self.limit_concurrency}")
        if self.ssl_certfile is None and self.ssl_keyfile is not None:
            raise FieldError("ssl_keyfile", "needs ssl_certfile beside it (both or neither)")
        if self.ssl_certfile is not None and self.ssl_keyfile is None:
            raise FieldError("ssl_certfile", "needs ssl_keyfile beside it (both or neither)")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            # Loaded here, once: a bad file must be a start-up error (exit 2, and caught by
            # --check), not a worker that dies (and, with workers > 1, is respawned).
            try:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
                raise FieldError(
                    "ssl_certfile",
                    f"{self.ssl_certfile!r} with its key cannot be loaded: {reason}",
                ) from None


class _ImportString(Converter[Any]):
    """``"package.module:function"``: the function a pool's guard or hook names, imported
    when the file is loaded (so a wrong name is a start-up error, as uvicorn's app is)."""

    expected = "a 'module:function' string"

    def __call__(self, value: object, where: str) -> Any:
        if not isinstance(value, str):
            raise self.mismatch(value, where)
        module_name, _, name = value.partition(":")
        if not module_name or not name:
            raise ConfigError(where, f"expected 'module:function', got {value!r}")
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(where, f"cannot import {module_name!r}: {exc}") from None
        for part in name.split("."):
            try:
                found = getattr(found, part)
            except AttributeError:
                raise ConfigError(where, f"{module_name!r} has no {name!r}") from None
        return found


FUNCTION = _ImportString()

# The file format: one line per key. A new option of one of these classes needs a line
# here, or its name in python_only (tests/test_gateway_config.py checks every init field).
SERVER = KeyTable(
    ServerSettings,
    {
        "server": STRING,
        "host": STRING,
        "port": INTEGER,
        "workers": INTEGER,
        "log_level": STRING,
        "graceful_timeout": NUMBER,
        "keepalive_timeout": NUMBER,
        "backlog": INTEGER,
        "limit_concurrency": optional(INTEGER),
        "ssl_certfile": optional(STRING),
        "ssl_keyfile": optional(STRING),
    },
)
MIDDLEWARE = KeyTable(
    RoundRobinMiddleware,
    {
        "trusted_proxies": AnyOf(STRING, Array(STRING)),
        "max_url_length": INTEGER,
        "hide_response_headers": Array(STRING),
        "max_header_bytes": INTEGER,
        "metrics_path": optional(STRING),
        "status_path": optional(STRING),
        "access_log": BOOLEAN,
        "request_id": BOOLEAN,
        "zone": optional(STRING),
        "admin_path": optional(STRING),
    },
    # routes: [[routes]] tables at the top of the file, beside [pools.*].
    python_only={
        "balancer",
        "transport",
        "status_guard",
        "routes",
        "admin_token",
        "admin_guard",
    },
)
TLS_KEYS = KeyTable(
    TLS,
    {
        "ca_file": optional(STRING),
        "cert_file": optional(STRING),
        "key_file": optional(STRING),
        "server_name": optional(STRING),
        "verify": BOOLEAN,
    },
)
UPSTREAM = KeyTable(
    Upstream,
    {"url": STRING, "weight": INTEGER, "tls": optional(Table(TLS_KEYS))},
    python_only={"app", "transport"},
    shorthand="url",
)
HEALTH_CHECK = KeyTable(
    HealthCheck,
    {
        "path": STRING,
        "interval": NUMBER,
        "timeout": NUMBER,
        "rise": INTEGER,
        "fall": INTEGER,
        "expect": Array(INTEGER, frozenset),
        "jitter": NUMBER,
    },
)
CONSUL = KeyTable(
    ConsulDiscovery,
    {
        "service": STRING,
        "address": STRING,
        "tag": optional(STRING),
        "datacenter": optional(STRING),
        "token": optional(STRING),
        "passing_only": BOOLEAN,
        "wait": NUMBER,
        "min_interval": NUMBER,
        "startup_timeout": NUMBER,
        "retry_initial": NUMBER,
        "retry_max": NUMBER,
        "ca_file": optional(STRING),
    },
    python_only={"transport"},
)
DNS = KeyTable(
    DNSDiscovery,
    {
        "name": STRING,
        "port": optional(INTEGER),  # false: SRV records
        "interval": NUMBER,
        "scheme": STRING,
        "family": STRING,
        "nameservers": optional(Array(STRING, tuple)),
        "timeout": NUMBER,
        "startup_timeout": NUMBER,
        "retry_initial": NUMBER,
        "retry_max": NUMBER,
    },
)
STICKY = KeyTable(
    StickyCookie,
    {
        "name": STRING,
        "max_age": optional(INTEGER),
        "path": optional(STRING),
        "secure": BOOLEAN,
        "httponly": BOOLEAN,
        "samesite": optional(STRING),
        "secret": optional(STRING),
    },
)
# [pools."/x".discovery] type = "...": every discovery class the file can name.
DISCOVERY = Tagged({"consul": CONSUL, "dns": DNS})
POOL = KeyTable(
    Pool,
    {
        "upstreams": Array(Table(UPSTREAM)),
        "strip_prefix": BOOLEAN,
        "refuse_methods": Array(STRING),
        "refuse_ambiguous_paths": BOOLEAN,
        "timeout": NUMBER,
        "connect_timeout": NUMBER,
        "pool_timeout": NUMBER,
        "max_connections": INTEGER,
        "preserve_host": BOOLEAN,
        "retries": INTEGER,
        "policy": STRING,
        "ewma_decay": NUMBER,
        "hash_on": STRING,
        "hash_fallback": STRING,
        "balance_factor": optional(NUMBER),
        "sticky": optional(Table(STICKY)),
        "mirror": optional(STRING),
        "mirror_fraction": NUMBER,
        "mirror_body_limit": INTEGER,
        "mirror_max_in_flight": INTEGER,
        "health_check": optional(Table(HEALTH_CHECK)),
        "max_fails": INTEGER,
        "fail_timeout": NUMBER,
        "unhealthy_statuses": Array(INTEGER),
        "on_all_down": STRING,
        "retry_non_idempotent": BOOLEAN,
        "retry_body_limit": INTEGER,
        "request_buffer_size": INTEGER,
        "retry_on_statuses": Array(INTEGER),
        "retry_budget": optional(NUMBER),
        "retry_budget_min": INTEGER,
        "hedge_after": optional(AnyOf(NUMBER, STRING)),
        "max_hedges": INTEGER,
        "slow_start": NUMBER,
        "max_body_size": optional(INTEGER),
        "client_body_timeout": NUMBER,
        "client_body_min_rate": INTEGER,
        "client_send_timeout": NUMBER,
        "websocket_timeout": optional(NUMBER),
        "websocket_idle_timeout": optional(NUMBER),
        "websocket_ping_interval": optional(NUMBER),  # false: no pings
        "discovery": optional(DISCOVERY),
        "rewrite_redirects": BOOLEAN,
        "rewrite_cookies": BOOLEAN,
        "guard": optional(FUNCTION),
        "on_request": optional(FUNCTION),
        "on_response": optional(FUNCTION),
        "tracing": BOOLEAN,
        "tls": optional(Table(TLS_KEYS)),
    },
    # internal: reached only from a route of your own app, which the gateway has not.
    python_only={"transport", "clock", "random", "internal"},
)
CONDITION = AnyOf(STRING, BOOLEAN, Regex())
ROUTE = KeyTable(
    Route,
    {
        "prefix": STRING,
        "pool": optional(STRING),
        "split": optional(MapOf(INTEGER)),
        "host": optional(STRING),
        "methods": optional(Array(STRING)),
        "headers": MapOf(CONDITION),
        "cookies": MapOf(CONDITION),
        "query": MapOf(CONDITION),
        "stick_on": optional(STRING),
    },
)
_TOP_LEVEL: list[KeyTable[Any]] = [SERVER, POOL, ROUTE]
#: The key table of each class a file builds, for ``--check`` to print them back.
KEY_TABLES = {keys.target: keys for top in _TOP_LEVEL for keys in (top, *top.tables())}


@dataclasses.dataclass
class GatewayConfig:
    """A loaded, validated configuration and the app it describes."""

    path: Path
    server: ServerSettings
    middleware: dict[str, Any]
    pools: dict[str, Pool]
    app: RoundRobinMiddleware


def load_config(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    *,
    lifespan: Callable[[Any], AbstractAsyncContextManager[None]] | None = None,
    **server_overrides: Any,
) -> GatewayConfig:
    """Read and validate a gateway TOML file; ``server_overrides`` (e.g. ``port=9000``)
    win over its ``[server]`` table. ``${VAR}`` references and Consul's variables are read
    from ``environ`` (default: ``os.environ``; see ``environment.py``); ``lifespan`` is
    the inner app's (the reloader's). Raises :class:`ConfigError`."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("", "no such file", str(path)) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read it: {exc.strerror}", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", str(path)) from None
    try:
        document = interpolate(document, environ)
        return _build(path, document, server_overrides, environ, Starlette(lifespan=lifespan))
    except ConfigError as exc:
        exc.file = str(path)
        raise


def _build(
    path: Path,
    document: dict[str, Any],
    overrides: dict[str, Any],
    environ: Mapping[str, str],
    inner: Starlette,
) -> GatewayConfig:
    reject_unknown(document, ("server", "middleware", "pools", "routes"), "")
    server_table = {**table_of(document.get("server", {}), "server"), **overrides}
    server = SERVER.build(server_table, "server")
    middleware = {
        **GATEWAY_MIDDLEWARE_DEFAULTS,
        **MIDDLEWARE.arguments(
            table_of(document.get("middleware", {}), "middleware"), "middleware"
        ),
    }
    _check_server_headers(server, middleware)
    pools_table = table_of(document.get("pools", {}), "pools")
    if not pools_table:
        raise ConfigError("pools", 'no pool configured: add a [pools."/prefix"] table')
    pools: dict[str, Pool] = {}
    for prefix, table in pools_table.items():
        where = key_path("pools", prefix)
        try:
            normalize_pool_key(prefix)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        arguments = POOL.arguments(_with_environment(table_of(table, where), where, environ), where)
        _check_members(arguments, where)
        pools[prefix] = POOL.create(arguments, where)
    routes = Array(Table(ROUTE))(document.get("routes", []), "routes")
    keys = {normalize_pool_key(key): key for key in pools}  # as the file writes them
    found = cookie_collision(
        ((key, pools[written].sticky) for key, written in keys.items()), routes
    )
    if found is not None:
        first, second, cookie = found
        where = key_path(key_path("pools", keys[second]), "sticky")
        raise ConfigError(where, f"the cookie of pool {keys[first]!r} too ({cookie}): {COLLISION}")
    if routes:
        middleware["routes"] = routes
    # Errors of the pools as a whole (two prefixes the same once normalised) are at "pools".
    app = MIDDLEWARE.create(middleware, "middleware", inner, pools, elsewhere="pools")
    return GatewayConfig(path, server, middleware, pools, app)


def _check_server_headers(server: ServerSettings, middleware: dict[str, Any]) -> None:
    """granian adds ``Server`` and ``Date`` to a response without them: hiding either is
    not possible under it, so the file may not ask for it."""
    hidden = {str(name).lower() for name in middleware.get("hide_response_headers", ())}
    added = sorted(hidden & {"server", "date"})
    if server.server == "granian" and added:
        raise ConfigError(
            "middleware.hide_response_headers",
            f'cannot hide {" and ".join(added)} under server = "granian", which adds its own'
            " where a response has none (uvicorn does not)",
        )


def _with_environment(
    table: dict[str, Any], where: str, environ: Mapping[str, str]
) -> dict[str, Any]:
    """A pool's table with a consul discovery completed from Consul's variables."""
    discovery = table.get("discovery")
    if not isinstance(discovery, dict) or str(discovery.get("type", "")).lower() != "consul":
        return table
    where = key_path(where, "discovery")
    return {**table, "discovery": consul_from_environment(discovery, environ, where)}


def _check_members(arguments: dict[str, Any], where: str) -> None:
    """A pool's members come from ``upstreams = [...]`` or a discovery table: said in
    TOML here (``Pool`` says the same in Python: "upstreams or discovery=")."""
    discovery = f"a [{key_path(where, 'discovery')}] table"
    if arguments.get("discovery") is None:
        if "upstreams" not in arguments:
            raise ConfigError(where, f"a pool needs upstreams = [...] or {discovery}")
        if not arguments["upstreams"]:
            raise ConfigError(
                key_path(where, "upstreams"),
                f"is empty: list at least one upstream, or give {discovery}",
            )
    elif arguments.get("upstreams"):
        raise ConfigError(where, f"give upstreams = [...] or {discovery}, not both")
