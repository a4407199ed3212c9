"""The gateway's parent process with ``workers > 1``: uvicorn's ``Multiprocess``, except
that SIGHUP reloads instead of restarting every worker.

uvicorn answers SIGHUP by replacing each worker with a new process, which ends the old
one's connections and WebSockets. Here the parent validates the file once (a mistake is
logged once, and no worker is bothered) and hands SIGHUP to every worker, which applies
the new pools live (``reload.py``). With ``--watch`` a thread of the parent looks at the
file every ``WATCH_INTERVAL`` seconds and queues the same reload. A worker started later
(one that died is replaced) reads the file as it is then, so every worker converges.
The admin API's membership changes reach every worker the same way (``gateway_admin.py``).
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from .gateway_admin import new_state_directory
from .reload import WATCH_INTERVAL, FileWatch, hand_reload_to

__all__ = ["Supervisor"]

logger = logging.getLogger("rr_middleware")


class Supervisor(Multiprocess):
    """``Multiprocess`` whose SIGHUP (or a change of the watched file) reloads the
    workers in place."""

    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        path: Path,
        overrides: dict[str, Any],
        *,
        watch: bool = False,
    ) -> None:
        super().__init__(config, sockets)
        # What the workers share beyond their zone: the admin API's changes (see
        # gateway_admin.py), in a directory of this process's own, removed as it exits.
        self.state = new_state_directory()
        self.path = path
        self.overrides = overrides
        self._why = "SIGHUP"
        #: Whether a worker failed before it served (its app, a zone): the gateway exits 1.
        self.startup_failed = False
        self._watcher: threading.Thread | None = None
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="rr-watch", daemon=True)

    def run(self) -> None:
        if self._watcher is not None:
            self._watcher.start()
        try:
            super().run()
        finally:
            self.should_exit.set()
            if self._watcher is not None:
                self._watcher.join(timeout=WATCH_INTERVAL * 2)
            shutil.rmtree(self.state, ignore_errors=True)

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        # uvicorn stops when a worker fails before serving, but exits 0: remember it.
        if self.should_exit.is_set() and not self.startup_failed:
            self.startup_failed = any(p.exitcode == STARTUP_FAILURE for p in self.processes)

    def handle_hup(self) -> None:
        why, self._why = self._why, "SIGHUP"
        workers = [process.pid for process in self.processes if process.pid is not None]
        hand_reload_to(workers, self.path, self.overrides, why)

    def _watch(self) -> None:
        """Look at the file on a fixed schedule until the parent exits; queue a reload
        (handled by the parent's loop, as a signal is) after each change."""
        watch = FileWatch(self.path)
        while not self.should_exit.wait(WATCH_INTERVAL):
            if watch.changed():
                self._why = "the file changed"
                self.signal_queue.append(signal.SIGHUP)
