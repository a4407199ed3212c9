"""``rr-gateway``: the middleware as a standalone reverse proxy, configured by a TOML file.

    rr-gateway --config gateway.toml          # or: python -m rr_middleware --config ...
    rr-gateway --check gateway.toml           # validate, print the resolved pools, exit
    kill -HUP <pid>                           # reload the file (--watch: when it changes)

It serves a bare Starlette app (404 for every path under no pool) wrapped in
``RoundRobinMiddleware``, under uvicorn. Precedence for the listen address and the file:
command-line flag, then environment (``RR_GATEWAY_CONFIG``, ``RR_GATEWAY_HOST``,
``RR_GATEWAY_PORT``), then the file's ``[server]`` table, then the defaults. SIGTERM or
SIGINT stops accepting connections, lets requests in flight finish within
``graceful_timeout`` and exits 0. Exit 2: bad configuration or command line, TLS files
that cannot be loaded included (one line on stderr naming the file and key; ``--check``
finds the same); 1: the server could not run (address in use, ...).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.types import ASGIApp

from . import __version__
from .config_mapping import ConfigError, KeyTable, key_path
from .gateway_admin import PARENT_ENV, STATE_ENV
from .gateway_config import (
    DISCOVERY,
    GATEWAY_MIDDLEWARE_DEFAULTS,
    KEY_TABLES,
    MIDDLEWARE,
    POOL,
    ROUTE,
    SERVER,
    SERVERS,
    GatewayConfig,
    ServerSettings,
)
from .middleware import RoundRobinMiddleware
from .reload import Reloader
from .zone import ZONE_ENV

__all__ = ["ENV_CONFIG", "ENV_HOST", "ENV_PORT", "create_app", "describe", "main"]

ENV_CONFIG = "RR_GATEWAY_CONFIG"
ENV_HOST = "RR_GATEWAY_HOST"
ENV_PORT = "RR_GATEWAY_PORT"
EXIT_FAILURE = 1
EXIT_CONFIG = 2
_FACTORY = "rr_middleware.gateway:create_app"
_GRANIAN_FACTORY = "rr_middleware.gateway:create_granian_app"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="rr-gateway",
        description="Forward path prefixes round robin to pools of upstream servers.",
        epilog=f"Environment: {ENV_CONFIG}, {ENV_HOST}, {ENV_PORT} (a flag wins over them).",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="the gateway's TOML file")
    parser.add_argument(
        "--check",
        nargs="?",
        const="",
        metavar="FILE",
        help="validate the file, print the resolved configuration and exit",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="reload the file when it changes (as SIGHUP does)",
    )
    parser.add_argument("--host", help="listen address (overrides [server] host)")
    parser.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    parser.add_argument(
        "--server", choices=SERVERS, help="the ASGI server (overrides [server] server)"
    )
    parser.add_argument("--version", action="version", version=f"rr-gateway {__version__}")
    args = parser.parse_args(argv)
    # This process is no worker of another gateway (its parent names its own state).
    for inherited in (STATE_ENV, PARENT_ENV):
        os.environ.pop(inherited, None)
    try:
        path = args.check or args.config or os.environ.get(ENV_CONFIG)
        if not path:
            raise ConfigError("", f"no configuration: pass --config FILE or set {ENV_CONFIG}")
        overrides = _listen_overrides(args.host, args.port)
        if args.server:
            overrides["server"] = args.server
        reloader = Reloader(Path(path), overrides, watch=args.watch)
        config = reloader.load()
    except ConfigError as exc:
        print(f"rr-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check is not None:
        print(describe(config))
        return 0
    return serve(config, reloader)


def serve(config: GatewayConfig, reloader: Reloader | None = None) -> int:
    """Serve ``config`` under its ``[server] server`` (uvicorn or granian) until SIGTERM or
    SIGINT; returns the exit status. SIGHUP (and, with the reloader's ``watch``, a change
    of the file) reloads it."""
    settings = config.server
    extra = "gateway" if settings.server == "uvicorn" else "granian"
    try:
        __import__(settings.server)
    except ImportError:
        print(
            f"rr-gateway: needs {settings.server}: pip install 'rr-middleware[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as exc:
        print(
            f"rr-gateway: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return EXIT_FAILURE
    # Workers build their app from the file again (they are fresh processes).
    os.environ[ENV_CONFIG] = str(config.path.resolve())
    if settings.workers > 1 and config.middleware.get("zone") is None:
        # Several workers act as one balancer (shared health, one prober, summed counters):
        # a zone named after what this gateway serves, so a rerun finds and rebuilds what a
        # crashed one left, and two gateways never share one by accident.
        os.environ.setdefault(ZONE_ENV, _zone_name(config.path, settings.host, sock))
    scheme = "https" if settings.ssl_certfile else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"rr-gateway: {config.path}: listening on {scheme}://{host}:{sock.getsockname()[1]}"
        f" ({settings.workers} worker{'s' if settings.workers > 1 else ''}, {settings.server};"
        f" pools {', '.join(config.pools)})",
        file=sys.stderr,
        flush=True,
    )
    overrides, watch = (reloader.overrides, reloader.watch) if reloader else ({}, False)
    # A stop signal ends the process with 0: one that comes before the server has its own
    # handlers, and the one uvicorn re-raises once it has drained.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _exit_cleanly)
    try:
        if settings.server == "granian":
            from .gateway_granian import GranianGateway

            return GranianGateway(_GRANIAN_FACTORY, config, sock, overrides, watch=watch).run()
        return _serve_uvicorn(config, sock, overrides, watch)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else EXIT_FAILURE
    finally:
        sock.close()


def _serve_uvicorn(
    config: GatewayConfig, sock: socket.socket, overrides: dict[str, Any], watch: bool
) -> int:
    import uvicorn

    settings = config.server
    options: dict[str, Any] = {
        "host": settings.host,
        "port": sock.getsockname()[1],
        "workers": settings.workers,
        "lifespan": "on",
        # The middleware decides about Date and Server (see hide_response_headers) and
        # about X-Forwarded-* (trusted_proxies): uvicorn adds and rewrites nothing.
        "server_header": False,
        "date_header": False,
        "proxy_headers": False,
        "access_log": False,
        "log_level": settings.log_level,
        "log_config": _log_config(settings.log_level),
        "timeout_graceful_shutdown": settings.graceful_timeout,
        "timeout_keep_alive": settings.keepalive_timeout,
        "backlog": settings.backlog,
        "limit_concurrency": settings.limit_concurrency,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
        "loop": _loop(),
    }
    # Each worker's event loop takes its share of the accept batch (``accept.WORKERS_ENV``;
    # not imported here: that module needs uvloop).
    os.environ["WEB_CONCURRENCY"] = str(settings.workers)
    try:
        if settings.workers == 1:
            config.app.balancer.zone_follows_layout = True
            server = uvicorn.Server(uvicorn.Config(config.app, **options))
            server.run(sockets=[sock])
            return 0 if server.started else EXIT_FAILURE
        from .supervisor import Supervisor

        factory = uvicorn.Config(_FACTORY, factory=True, **options)
        supervisor = Supervisor(factory, [sock], config.path, overrides, watch=watch)
        supervisor.run()
        if supervisor.startup_failed:
            print("rr-gateway: a worker failed to start (its error is above)", file=sys.stderr)
            return EXIT_FAILURE
        return 0
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else EXIT_FAILURE


def _loop() -> str:
    """uvicorn's event loop: uvloop accepting in batches (``rr_middleware.accept`` says
    why), or asyncio's loop where uvloop is not installed (it accepts in batches itself)."""
    uvloop = importlib.util.find_spec("uvloop") is not None
    return "rr_middleware.accept:new_event_loop" if uvloop else "asyncio"


def create_app() -> RoundRobinMiddleware:
    """The gateway's ASGI app, from the file ``RR_GATEWAY_CONFIG`` names: what each worker
    runs, and usable as ``uvicorn --factory rr_middleware.gateway:create_app``."""
    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise RuntimeError(f"set {ENV_CONFIG} to the gateway's TOML file")
    reloader = Reloader(Path(path), {})
    reloader.catch_early_signal()  # the parent hands SIGHUP on: reload, never die of it
    app = reloader.load().app
    # Workers that reloaded another layout must not share the zone of this one.
    app.balancer.zone_follows_layout = True
    return app


def create_granian_app() -> ASGIApp:
    """What each worker runs under granian: ``create_app`` whose failure to start stops
    the worker (see ``gateway_granian.StartupFailure``)."""
    from .gateway_granian import StartupFailure

    return StartupFailure(create_app())


def describe(config: GatewayConfig) -> str:
    """The resolved configuration, TOML-like: every key of the file format with its value,
    ``# default`` beside those left at their default, secrets as ``(set, not shown)``."""
    lines = [f"# {config.path}: OK, {len(config.pools)} pool(s)", "", "[server]"]
    server_defaults = ServerSettings()
    for name in SERVER.keys:
        value = getattr(config.server, name)
        lines.append(_line(name, value, getattr(server_defaults, name)))
    lines += ["", "[middleware]"]
    for name, default in _middleware_defaults().items():
        lines.append(_line(name, config.middleware.get(name, default), default))
    for prefix, pool in config.pools.items():
        lines += ["", f"[{key_path('pools', prefix)}]"]
        lines += _table_lines(pool, POOL, key_path("pools", prefix))
    for route in config.middleware.get("routes", ()):
        lines += ["", "[[routes]]"]
        lines += _table_lines(route, ROUTE, "routes")
    return "\n".join(lines)


def _table_lines(obj: Any, keys: KeyTable[Any], where: str) -> list[str]:
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name in keys.keys:
        value = getattr(obj, name)
        if callable(value) and hasattr(value, "__qualname__"):  # a guard or hook
            module = getattr(value, "__module__", "?")
            lines.append(f"{name} = {json.dumps(f'{module}:{value.__qualname__}')}")
        elif not fields[name].repr and value is not None:
            lines.append(f"{name} = (set, not shown)")  # a secret, such as a token
        elif type(value) in KEY_TABLES:
            tables.append((name, value))
        elif isinstance(value, (list, tuple)) and value and type(value[0]) in KEY_TABLES:
            lines.append(f"{name} = [")
            lines += [f"    {_inline(item)}," for item in value]
            lines.append("]")
        else:
            lines.append(_line(name, value, fields[name].default))
    for name, table in tables:
        lines += ["", f"[{key_path(where, name)}]"]
        if name == "discovery":
            lines.append(_line(DISCOVERY.tag, DISCOVERY.name_of(table)))
        lines += _table_lines(table, KEY_TABLES[type(table)], key_path(where, name))
    return lines


def _line(name: str, value: Any, default: Any = dataclasses.MISSING) -> str:
    text = f"{name} = {_render(value)}"
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        value, default = list(value), list(default)
    return f"{text:<40} # default" if value == default else text


def _render(value: Any) -> str:
    if value is None:
        return "unset"
    if type(value) in KEY_TABLES:
        return _inline(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, range) and value.step == 1:
        return f"{value.start}..{value.stop - 1}"
    if isinstance(value, (set, frozenset)):
        return "[" + ", ".join(_render(v) for v in sorted(value)) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{key_path('', k)} = {_render(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, re.Pattern):
        return f"{{ regex = {json.dumps(value.pattern)} }}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return repr(value)


def _inline(obj: Any) -> str:
    """An inline table: each key with its value, but those unset (TOML has no null)."""
    values = [(name, getattr(obj, name)) for name in KEY_TABLES[type(obj)].keys]
    return "{ " + ", ".join(f"{k} = {_render(v)}" for k, v in values if v is not None) + " }"


def _middleware_defaults() -> dict[str, Any]:
    parameters = inspect.signature(RoundRobinMiddleware).parameters
    defaults = {name: parameters[name].default for name in MIDDLEWARE.keys}
    return {**defaults, **GATEWAY_MIDDLEWARE_DEFAULTS}


def _listen_overrides(host: str | None, port: int | None) -> dict[str, Any]:
    """The listen address from flags, else the environment; checked here so a mistake
    names the flag or variable it came from."""
    overrides: dict[str, Any] = {}
    host = host or os.environ.get(ENV_HOST)
    if host:
        overrides["host"] = host
    source = "--port"
    if port is None and os.environ.get(ENV_PORT):
        source, raw = ENV_PORT, os.environ[ENV_PORT].strip()
        if not raw.isdigit():
            raise ConfigError(source, f"must be a port number in 0..65535, got {raw!r}")
        port = int(raw)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(source, f"must be a port number in 0..65535, got {port}")
        overrides["port"] = port
    return overrides


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, before uvicorn starts, so port 0 yields the real port to print and every
    worker shares one socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _zone_name(path: Path, host: str, sock: socket.socket) -> str:
    where = f"{path.resolve()}|{host}|{sock.getsockname()[1]}"
    return "rr-gateway-" + hashlib.sha256(where.encode("utf-8")).hexdigest()[:16]


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the middleware's logger (state changes, failures)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["rr_middleware"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
