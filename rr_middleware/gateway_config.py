"""The gateway's TOML file, mapped onto the Python API.

``[server]`` becomes :class:`ServerSettings`; ``[middleware]`` the keyword options of
``RoundRobinMiddleware``; each ``[pools."/prefix"]`` a ``Pool`` (its ``upstreams`` entries
URLs or ``{url = ..., weight = ...}`` tables, ``[pools."/prefix".health_check]`` a
``HealthCheck``, ``[pools."/prefix".discovery]`` the discovery class its ``type`` names).

The mapping is generic (``config_mapping``): it reads the dataclass fields, and the
middleware's signature, with their type hints, so an option added to the Python API is a
TOML key at once. Every mistake becomes a :class:`ConfigError` naming the file and the key
path, never a traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import ssl
import sys
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from .config import Pool, normalize_prefix
from .config_mapping import (
    ConfigError,
    build_dataclass,
    convert,
    key_named_in,
    key_path,
    reject_unknown,
    resolve_hint,
    supported,
    table_of,
)
from .middleware import RoundRobinMiddleware

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the backport, declared by the "gateway" extra
    import tomli as tomllib

__all__ = ["ConfigError", "GatewayConfig", "ServerSettings", "load_config"]

# Options of RoundRobinMiddleware that differ in the gateway, and why: uvicorn adds no Date
# or Server header of its own there, so the upstream's pass through (once each) by default.
GATEWAY_MIDDLEWARE_DEFAULTS: dict[str, Any] = {"hide_response_headers": ()}
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """``[server]``: how the gateway listens (uvicorn's settings)."""

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
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        for name in ("graceful_timeout", "keepalive_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be >= 1, got {self.backlog}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            # Loaded here, once: a bad file must be a start-up error, not a worker that
            # dies (and, with workers > 1, is respawned) as it starts.
            try:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
                raise ValueError(
                    f"ssl_certfile {self.ssl_certfile!r} with its key cannot be loaded: {reason}"
                ) from None


@dataclasses.dataclass
class GatewayConfig:
    """A loaded, validated configuration and the app it describes."""

    path: Path
    server: ServerSettings
    middleware: dict[str, Any]
    pools: dict[str, Pool]
    app: RoundRobinMiddleware


def load_config(path: str | Path, **server_overrides: Any) -> GatewayConfig:
    """Read and validate a gateway TOML file; ``server_overrides`` (e.g. ``port=9000``)
    win over its ``[server]`` table. Raises :class:`ConfigError`."""
    path = Path(path)
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
        return _build(path, document, server_overrides)
    except ConfigError as exc:
        exc.file = str(path)
        raise


def _build(path: Path, document: dict[str, Any], overrides: dict[str, Any]) -> GatewayConfig:
    reject_unknown(document, ("server", "middleware", "pools"), "")
    server_table = {**table_of(document.get("server", {}), "server"), **overrides}
    server = build_dataclass(ServerSettings, server_table, "server")
    options = middleware_options()
    middleware_table = table_of(document.get("middleware", {}), "middleware")
    signature = inspect.signature(RoundRobinMiddleware.__init__).parameters.values()
    python_only = [p.name for p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY]
    reject_unknown(middleware_table, options, "middleware", python_only)
    middleware = dict(GATEWAY_MIDDLEWARE_DEFAULTS)
    for key, value in middleware_table.items():
        middleware[key] = convert(value, options[key], key_path("middleware", key))

    pools_table = table_of(document.get("pools", {}), "pools")
    if not pools_table:
        raise ConfigError("pools", 'no pool configured: add a [pools."/prefix"] table')
    pools: dict[str, Pool] = {}
    for prefix, table in pools_table.items():
        where = key_path("pools", prefix)
        try:
            normalize_prefix(prefix)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        pools[prefix] = build_dataclass(Pool, table_of(table, where), where)
    try:
        app = RoundRobinMiddleware(Starlette(), pools, **middleware)
    except ValueError as exc:
        named = key_named_in(str(exc), middleware_table)
        where = key_path("middleware", named) if named else "pools"
        raise ConfigError(where, str(exc).removeprefix(f"{named}: ")) from None
    return GatewayConfig(path, server, middleware, pools, app)


def middleware_options() -> dict[str, Any]:
    """RoundRobinMiddleware's keyword options that TOML can set, with their type hints."""
    module = vars(sys.modules[RoundRobinMiddleware.__module__])
    options = {}
    for name, param in inspect.signature(RoundRobinMiddleware.__init__).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            hint = resolve_hint(param.annotation, module)
            if supported(hint):
                options[name] = hint
    return options
