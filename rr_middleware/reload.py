"""Reloading the gateway's file while it serves: SIGHUP, and ``--watch``.

Each worker process holds a :class:`Reloader` next to its app. On SIGHUP (or, watching,
when the file changes) it reads and validates the file again; a file with a mistake is
refused with one log line and the running configuration stays; a valid one is applied by
``Balancer.reconfigure`` (``reconfigure.py``: pools added and removed, upstream lists
diffed as discovery updates are, pools whose options changed rebuilt), with no request or
WebSocket cut. ``[server]`` and ``[middleware]`` are read at start-up only: a reload that
changes them says so and applies the pools.

With several workers the gateway's parent process does the watching and validating (so a
mistake is logged once) and hands SIGHUP to every worker, each of which reloads itself.
A worker whose parent is gone (killed with SIGKILL, say) stops as on SIGTERM, finishing
what it serves, and removes the state the parent would have: left running it would hold
the listening socket with no one to replace it or reload it (gunicorn's workers and
HAProxy's do the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .config_mapping import ConfigError
from .gateway_admin import (
    STATE_ENV,
    GatewayOperator,
    Outcomes,
    Overrides,
    note_parent_refusal,
    parent_pid,
)
from .gateway_config import GatewayConfig, load_config
from .reconfigure import Changes
from .tasks import cancel_and_wait

__all__ = ["FileWatch", "Reloader"]

logger = logging.getLogger("rr_middleware")

#: How often a worker looks whether the gateway's parent process is still there, where
#: the system has no pidfds to say so (seconds).
PARENT_INTERVAL = 1.0
#: Seconds between two looks at the watched file.
WATCH_INTERVAL = 1.0


class FileWatch:
    """Whether a file changed since the last look: its modification time, size and inode
    (an editor that writes a new file and renames it changes the inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None  # gone for a moment (a rename under way): not a change yet
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def changed(self) -> bool:
        signature = self._signature()
        if signature is None or signature == self._seen:
            return False
        self._seen = signature
        return True


class Reloader:
    """Reloads ``path`` into the running app of this process (see the module docstring).
    ``lifespan`` is the app's Starlette lifespan: it installs the SIGHUP handler and, with
    ``watch``, the loop that looks at the file every ``WATCH_INTERVAL`` seconds."""

    def __init__(self, path: Path, overrides: dict[str, Any], *, watch: bool = False) -> None:
        self.path = path
        self.overrides = overrides
        self.watch = watch
        self.config: GatewayConfig | None = None
        #: Upstreams added and removed through the admin API, applied over the file.
        self.admin_changes = Overrides.from_environment()
        #: Each reload's outcome, for the worker the admin API asked (``gateway_admin``).
        self.outcomes = Outcomes.from_environment()
        #: Why the last reload was refused (None: it was not).
        self.error: str | None = None
        self.reloads = 0
        self._lock: asyncio.Lock | None = None
        self._pending = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loaded_at = 0.0

    def load(self) -> GatewayConfig:
        """The first configuration, whose app runs with this reloader in its lifespan."""
        self._loaded_at = time.monotonic()
        config = load_config(self.path, lifespan=self.lifespan, **self.overrides)
        admin = config.app.endpoints.admin
        if admin is not None:
            admin.operator = GatewayOperator(config.app.balancer, self)
        self.config = config
        return config

    def catch_early_signal(self) -> None:
        """Until the lifespan installs its handler, remember a SIGHUP instead of dying of
        it (the default): a worker that was starting when it came reloads once it runs."""

        def remember(signum: int, frame: FrameType | None) -> None:
            self._pending = True

        with contextlib.suppress(ValueError):  # not the main thread: no signals here
            signal.signal(signal.SIGHUP, remember)

    async def reload(self, why: str) -> Changes | None:
        """Read the file again and apply it; None if it was refused."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one at a time, each against what the last one left
            running = self.config
            assert running is not None, "load() first"
            started = time.monotonic()  # before the file and the operations are read
            operations = self.admin_changes.operations()
            try:
                config = load_config(self.path, **self.overrides)
            except ConfigError as exc:
                self._refused(why, str(exc), len(operations), started)
                return None
            pools = self.admin_changes.apply(config.pools, operations)
            try:
                changes = await running.app.balancer.reconfigure(pools)
            except ValueError as exc:  # checked before anything changed
                self._refused(why, f"{self.path}: {exc}", len(operations), started)
                return None
            self.error = None
            self.outcomes.record(len(operations), None, started)
            config.app = running.app
            self.config = config
            self.reloads += 1
            logger.warning("reload (%s) of %s: %s", why, self.path, changes.describe())
            for note in _start_up_only(running, config):
                logger.warning("reload (%s): %s", why, note)
            return changes

    def _refused(self, why: str, error: str, operations: int, started: float) -> None:
        self.error = error
        self.outcomes.record(operations, error, started)
        logger.error("reload (%s) refused, the running configuration stays: %s", why, error)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._spawn, "SIGHUP")
            handling = True
        except (ValueError, RuntimeError, NotImplementedError):
            # Served outside the main thread (an embedding of your own): no SIGHUP here;
            # --watch and the admin API still reload.
            handling = False
            logger.warning("reload: not in the main thread, so SIGHUP is not handled")
        if self._pending:
            self._pending = False
            self._spawn("SIGHUP")
        if self.watch:
            self._keep(asyncio.ensure_future(self._watch()))
        parent = parent_pid()
        if parent is not None:
            self._keep(asyncio.ensure_future(watch_parent(parent)))
        loaded_at = self._loaded_at
        if self.admin_changes.operations():
            await self.reload("the admin API's changes")  # a worker started after some
        else:
            self.outcomes.record(0, None, loaded_at)  # the file as load() read it
        try:
            yield
        finally:
            self.outcomes.forget()
            if handling:
                loop.remove_signal_handler(signal.SIGHUP)
            tasks = list(self._tasks)
            await cancel_and_wait(tasks)
            for task in tasks:  # collect outcomes so none is reported as never retrieved
                if not task.cancelled():
                    task.exception()

    def _spawn(self, why: str) -> None:
        self._keep(asyncio.ensure_future(self.reload(why)))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        watch = FileWatch(self.path)
        await watch_file(watch, lambda: self.reload("the file changed"))


async def watch_parent(parent: int) -> None:
    """In a worker: once ``parent`` is no longer this process's parent, remove the state
    it shared and stop this worker as SIGTERM does (the server drains its connections and
    runs the lifespan's end)."""
    await _parent_gone(parent)
    logger.error(
        "the gateway's parent process (PID %d) is gone: this worker stops, finishing what "
        "it serves",
        parent,
    )
    state = os.environ.get(STATE_ENV)
    if state:
        shutil.rmtree(state, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)


async def _parent_gone(parent: int) -> None:
    """Return once ``parent`` is not this process's parent: woken by the parent's pidfd
    (it reads as ready when the process ends), or, without pidfds (Linux before 5.3, other
    systems), by a look every ``PARENT_INTERVAL``."""
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfds, or the parent already gone
        pidfd = -1
    if pidfd >= 0:
        try:
            if os.getppid() != parent:  # gone already (the pidfd names a reused PID)
                return
            loop = asyncio.get_running_loop()
            ended = asyncio.Event()
            try:
                loop.add_reader(pidfd, ended.set)
            except (NotImplementedError, RuntimeError):  # a loop that watches no fds
                pass
            else:
                try:
                    await ended.wait()
                finally:
                    loop.remove_reader(pidfd)
                return
        finally:
            os.close(pidfd)
    while os.getppid() == parent:  # noqa: ASYNC110 - no event to wait on without a pidfd
        await asyncio.sleep(PARENT_INTERVAL)


async def watch_file(watch: FileWatch, on_change: Callable[[], Any]) -> None:
    """Look at the file every ``WATCH_INTERVAL`` on a fixed schedule (a slow reload does
    not shift the next look) and await ``on_change()`` after each change."""
    loop = asyncio.get_running_loop()
    deadline = loop.time()
    while True:
        deadline += WATCH_INTERVAL
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        if watch.changed():
            await on_change()
        deadline = max(deadline, loop.time() - WATCH_INTERVAL)


def _start_up_only(running: GatewayConfig, config: GatewayConfig) -> list[str]:
    notes = []
    if running.server != config.server:
        notes.append("[server] changed; it is read at start-up only (restart to apply)")
    if {k: v for k, v in running.middleware.items() if k != "routes"} != {
        k: v for k, v in config.middleware.items() if k != "routes"
    }:
        notes.append("[middleware] changed; it is read at start-up only (restart to apply)")
    if running.middleware.get("routes") != config.middleware.get("routes"):
        notes.append("[[routes]] changed; they are read at start-up only (restart to apply)")
    return notes


def hand_reload_to(workers: list[int], path: Path, overrides: dict[str, Any], why: str) -> None:
    """The parent's side of a reload with several workers: read the file once (a mistake
    is logged once, and no worker hears of it), then SIGHUP every worker in ``workers``
    (PIDs), each of which reloads itself. One that died meanwhile is replaced by one that
    reads the file anew."""
    try:
        load_config(path, **overrides)
    except ConfigError as exc:
        logger.error("reload (%s) refused, the running configuration stays: %s", why, exc)
        note_parent_refusal(str(exc))
        return
    logger.info("reload (%s): handing it to %d workers", why, len(workers))
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
