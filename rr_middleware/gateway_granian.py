"""``[server] server = "granian"``: the gateway under granian (``pip install
'rr-middleware[granian]'``) instead of uvicorn.

granian always serves from worker processes (one with ``workers = 1``); each builds its
app from the file (``gateway.create_app``), as uvicorn's workers do. This module maps the
``[server]`` table onto granian and replaces two of its habits:

- a worker whose app fails to start exits 1 with its error (``StartupFailure``), where
  granian would go on serving it without its lifespan;
- the listening socket is the one the gateway bound (``port = 0`` is one port, printed,
  shared by every worker), not one socket per worker;
- SIGHUP does not replace the workers (which would cut WebSockets): the parent validates
  the file once and hands SIGHUP to every worker, which reloads in place (``reload.py``),
  as ``supervisor.py`` does under uvicorn. ``--watch`` is a thread of the parent.

A worker that dies is replaced (granian's ``respawn_failed_workers``); one that fails
again within seconds of starting (a crash loop, a start-up failure) stops the gateway
with exit status 1.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.http import HTTP1Settings
from granian.log import LOGGING_CONFIG
from granian.server import MPServer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .gateway_admin import new_state_directory
from .gateway_config import GatewayConfig, ServerSettings
from .reload import WATCH_INTERVAL, FileWatch, hand_reload_to

__all__ = ["GranianGateway", "StartupFailure", "granian_options", "log_config"]

logger = logging.getLogger("rr_middleware")


def granian_options(settings: ServerSettings) -> dict[str, Any]:
    """granian's arguments for ``[server]`` (see docs/gateway.md for what differs)."""
    certfile, keyfile = settings.ssl_certfile, settings.ssl_keyfile
    level = settings.log_level.lower()
    level = "debug" if level == "trace" else level  # trace: uvicorn's own level
    return {
        "address": settings.host,
        "port": settings.port,
        "interface": Interfaces.ASGI,  # with the lifespan: the app starts its pools there
        "workers": settings.workers,
        # HTTP/1.1, as under uvicorn: one behaviour whichever server runs.
        "http": HTTPModes.http1,
        "websockets": True,
        "backlog": settings.backlog,
        "backpressure": settings.limit_concurrency,
        "http1_settings": HTTP1Settings(
            # hyper's header read timeout is also its idle keep-alive timeout.
            header_read_timeout=max(1, round(settings.keepalive_timeout * 1000)),
        ),
        "log_level": level,
        "log_dictconfig": log_config(level),
        "log_access": False,  # the middleware's access_log, as under uvicorn
        "ssl_cert": Path(certfile) if certfile else None,
        "ssl_key": Path(keyfile) if keyfile else None,
        "ssl_protocol_min": SSLProtocols.tls12,
        "respawn_failed_workers": True,
        # granian stops a worker by SIGTERM and waits this long before SIGKILL.
        "workers_kill_timeout": max(1, math.ceil(settings.graceful_timeout)),
        "factory": True,
    }


def log_config(level: str) -> dict[str, Any]:
    """granian's logging on stderr (as uvicorn's), plus the middleware's logger."""
    config: dict[str, Any] = {
        **LOGGING_CONFIG,
        "formatters": {
            "generic": {"()": "logging.Formatter", "fmt": "%(levelname)s:     %(message)s"},
        },
        "handlers": {
            "default": {
                "formatter": "generic",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
        },
    }
    config["loggers"] = {
        name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
        for name in ("_granian", "granian.access", "rr_middleware")
    }
    return config


class StartupFailure:
    """The app with a lifespan that says ``lifespan.startup.failed`` when it raises before
    it started: granian takes a bare exception for "no lifespan support" and would serve
    without starting the pools; this way the worker exits 1 with the error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        said = False

        async def watched(message: Message) -> None:
            nonlocal said
            said = said or message["type"].startswith("lifespan.startup.")
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if not said:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise


class GranianGateway(MPServer):
    """granian's process manager serving ``target`` on the gateway's socket ``sock``
    (bound, not yet listening), with SIGHUP and ``--watch`` reloading in place."""

    def __init__(
        self,
        target: str,
        config: GatewayConfig,
        sock: socket.socket,
        overrides: dict[str, Any],
        *,
        watch: bool = False,
    ) -> None:
        options = granian_options(config.server)
        options["port"] = sock.getsockname()[1]
        super().__init__(target, **options)
        self.sock = sock
        self.path = config.path
        self.overrides = overrides
        self.watch = watch
        self._why = "SIGHUP"
        self._stop = threading.Event()
        # The admin API's shared state (gateway_admin.py), as supervisor.py makes it.
        self.state = new_state_directory()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 after a clean stop, 1 if workers kept failing."""
        # Workers inherit the gateway's socket by fork: granian would spawn them where fork
        # is not the default (Python 3.14), and a spawned worker cannot take the socket.
        multiprocessing.set_start_method("fork", force=True)
        watcher = threading.Thread(target=self._watch, name="rr-watch", daemon=True)
        if self.watch:
            watcher.start()
        try:
            self.serve()
        except SystemExit as exc:
            if exc.code in (0, None):
                return 0
            print("rr-gateway: a worker failed (its error is above)", file=sys.stderr)
            return 1
        finally:
            self._stop.set()
            if watcher.is_alive():
                watcher.join(timeout=WATCH_INTERVAL * 2)
            shutil.rmtree(self.state, ignore_errors=True)
        return 0

    def _init_shared_socket(self) -> None:
        # Every worker accepts on the gateway's one socket (granian would bind one per
        # worker with SO_REUSEPORT: with port 0, one port each).
        # granian's objects get copies of the descriptor, theirs to close; the gateway
        # closes its own socket as it exits.
        self.sock.listen(self.backlog)
        fd = os.dup(self.sock.fileno())
        self._ssp = None
        self._shd: Any = SocketHolder(fd, False, self.backlog)  # type: ignore[call-arg]
        self._sfd: Any = fd
        self._sso = socket.socket(fileno=os.dup(fd))
        self._sso.set_inheritable(True)

    def _reload(self, spawn_target: Any, target_loader: Any) -> None:
        """SIGHUP (or a change of the watched file): validate once, then every worker
        reloads itself; granian would replace the workers instead."""
        self.reload_signal = False
        self.main_loop_interrupt.clear()
        why, self._why = self._why, "SIGHUP"
        alive = [w.inner.pid for w in self.wrks if w.inner.pid is not None and w.inner.is_alive()]
        hand_reload_to(alive, self.path, self.overrides, why)

    def _watch(self) -> None:
        watch = FileWatch(self.path)
        while not self._stop.wait(WATCH_INTERVAL):
            if watch.changed():
                self._why = "the file changed"
                self.reload_signal = True  # as granian's SIGHUP handler does
                self.main_loop_interrupt.set()
