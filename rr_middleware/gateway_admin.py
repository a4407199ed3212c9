"""The admin API in ``rr-gateway``: upstreams added and removed in every worker, and a
reload on request.

An upstream added or removed through the admin API is an *override* on top of the file,
kept until the gateway stops (a reload of the file applies them again): a list of
operations in memory with one worker, or with several in a file of the gateway's state
directory (``RR_GATEWAY_STATE``, made by the parent process and removed when it exits).
With several workers the worker that took the request records the operation and sends
SIGHUP to the parent, which has every worker reload: each one applies the file and the
overrides, so they all converge, also one started later. Each worker writes the outcome
of its every reload to a small file of its own in the state directory (``Outcomes``),
and the worker that took the request answers once every live worker has reloaded since
(or, past ``APPLY_TIMEOUT``, says how many had).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .admin import AdminError, Applying, Operator
from .config import Pool
from .config_mapping import ConfigError
from .gateway_config import load_config
from .upstream import Upstream

if TYPE_CHECKING:
    from .runtime import Balancer

__all__ = [
    "APPLY_TIMEOUT",
    "PARENT_ENV",
    "STATE_ENV",
    "GatewayOperator",
    "Outcomes",
    "Overrides",
    "new_state_directory",
    "parent_pid",
    "process_started",
]

logger = logging.getLogger("rr_middleware")

#: The gateway's state directory, shared by its workers (set by the parent process).
STATE_ENV = "RR_GATEWAY_STATE"
#: The gateway's parent process, as its workers are to see it (set by the parent).
PARENT_ENV = "RR_GATEWAY_PARENT"

#: How long the admin API waits for every worker to apply a change before answering that
#: it is recorded but not yet everywhere.
APPLY_TIMEOUT = 10.0
_APPLY_POLL = 0.02


def new_state_directory() -> str:
    """Make the directory the workers of this (parent) process share, and name it and
    this process to the workers it starts, through the environment they inherit. The
    parent removes it as it exits; if it is killed first, its workers do (``reload.py``
    stops a worker whose parent is gone)."""
    shm = Path("/dev/shm")
    state = tempfile.mkdtemp(prefix="rr-gateway-", dir=shm if shm.is_dir() else None)
    os.environ[STATE_ENV] = state
    os.environ[PARENT_ENV] = f"{os.getpid()}:{process_started(os.getpid())}"
    return state


def process_started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot; "" where unknown, or once
    it has ended, a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19] if fields[0] not in ("Z", "X") else ""
    except (OSError, IndexError):
        return ""


def parent_pid() -> int | None:
    """The gateway's parent process, in one of its workers; None in a gateway of one
    process (or an app of your own), and in a process that only inherited the variables
    (the process they name still runs, and is not its parent)."""
    pid, _, started = os.environ.get(PARENT_ENV, "").partition(":")
    if not (pid.isdigit() and os.environ.get(STATE_ENV)):
        return None
    parent = int(pid)
    if os.getppid() != parent and started and process_started(parent) == started:
        return None
    return parent


class Overrides:
    """The admin API's membership operations, in order: ``{"op": "add" | "remove",
    "pool": ..., "url": ..., "weight": ...}``; in ``path`` (shared by the workers, written
    under a lock, replaced whole) or in memory when it is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: list[dict[str, Any]] = []

    @classmethod
    def from_environment(cls) -> Overrides:
        directory = os.environ.get(STATE_ENV)
        return cls(Path(directory) / "admin.json" if directory else None)

    def operations(self) -> list[dict[str, Any]]:
        if self.path is None:
            return list(self._memory)
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.error("admin overrides %s cannot be read (%s); ignoring them", self.path, exc)
            return []
        return loaded if isinstance(loaded, list) else []

    def append(self, operation: dict[str, Any]) -> None:
        if self.path is None:
            self._memory.append(operation)
            return
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two workers' requests at once
            operations = [*self.operations(), operation]
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(operations), encoding="utf-8")
            os.replace(temporary, self.path)

    def apply(
        self, pools: dict[str, Pool], operations: list[dict[str, Any]] | None = None
    ) -> dict[str, Pool]:
        """``pools`` with the operations (by default, those recorded) applied, in order;
        one that no longer applies (its pool gone, or now following discovery) is
        skipped."""
        pools = dict(pools)
        for operation in self.operations() if operations is None else operations:
            pool = pools.get(str(operation.get("pool")))
            if pool is None or pool.discovery is not None:
                continue
            try:
                upstream = Upstream(str(operation["url"]), weight=int(operation.get("weight", 1)))
            except (KeyError, TypeError, ValueError):
                continue
            present = any(u.identity == upstream.identity for u in pool.members)
            if operation.get("op") == "add":
                if present:
                    continue  # the file has it now: the file's entry wins
                members = [*pool.members, upstream]
            else:
                members = [u for u in pool.members if u.identity != upstream.identity]
            if members:
                pools[str(operation["pool"])] = dataclasses.replace(pool, upstreams=members)
        return pools


class Outcomes:
    """Each worker's last reload, in a file of its own beside the overrides
    (``worker-PID.json``: how many reloads it tried, how many operations the last one
    read, why it was refused if it was); nothing with one worker. While a worker runs it
    holds a lock on ``worker-PID.lock``: a file whose lock is free is a dead worker's,
    even when its PID now names another process."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.attempts = 0
        self._lock: int | None = None

    @classmethod
    def from_environment(cls) -> Outcomes:
        directory = os.environ.get(STATE_ENV)
        return cls(Path(directory) if directory else None)

    def record(self, operations: int, error: str | None, started: float) -> None:
        """One more reload of this worker, begun (the file and the operations read after)
        at ``started`` (``time.monotonic()``, one clock for every process of the host),
        having read ``operations``; refused if ``error``."""
        self.attempts += 1
        if self.directory is None:
            return
        mine = self.directory / f"worker-{os.getpid()}.json"
        if self._lock is None:
            with contextlib.suppress(OSError):
                lock = os.open(mine.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(lock, fcntl.LOCK_EX)  # the file is this process's: no wait
                self._lock = lock
        temporary = mine.with_suffix(".tmp")
        outcome = {
            "attempts": self.attempts,
            "started": started,
            "operations": operations,
            "error": error,
        }
        with contextlib.suppress(OSError):  # the gateway is stopping: no one waits
            temporary.write_text(json.dumps(outcome), encoding="utf-8")
            os.replace(temporary, mine)

    def parent_refusal(self, since: float) -> str | None:
        """Why the parent process refused to hand a reload on, if it did after ``since``
        (``note_parent_refusal``)."""
        if self.directory is None:
            return None
        try:
            noted = json.loads((self.directory / "parent.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(noted, dict) and float(noted.get("at", 0.0)) >= since:
            return str(noted.get("error"))
        return None

    def forget(self) -> None:
        """This worker stops: no one is to wait for it."""
        if self.directory is not None:
            _remove_worker_files(self.directory / f"worker-{os.getpid()}.json")
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def of_live_workers(self) -> dict[int, dict[str, Any]]:
        """The last reload of every worker still running (a dead one's file goes)."""
        found: dict[int, dict[str, Any]] = {}
        if self.directory is None:
            return found
        for path in self.directory.glob("worker-*.json"):
            pid_text = path.stem.removeprefix("worker-")
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if not _running(pid, path.with_suffix(".lock")):
                _remove_worker_files(path)
                continue
            with contextlib.suppress(OSError, ValueError):
                outcome = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(outcome, dict):
                    found[pid] = outcome
        return found


def note_parent_refusal(error: str) -> None:
    """The parent process refused a reload (the file has a mistake): an admin request
    waiting for the workers answers 409 rather than waiting for reloads that never come."""
    directory = os.environ.get(STATE_ENV)
    if not directory:
        return
    path = Path(directory) / "parent.json"
    with contextlib.suppress(OSError):
        path.with_suffix(".tmp").write_text(
            json.dumps({"at": time.monotonic(), "error": error}), encoding="utf-8"
        )
        os.replace(path.with_suffix(".tmp"), path)


def _remove_worker_files(outcome: Path) -> None:
    """A worker's outcome file and its lock beside it."""
    for path in (outcome, outcome.with_suffix(".lock")):
        with contextlib.suppress(OSError):
            path.unlink()


def _running(pid: int, lock: Path) -> bool:
    """Whether the worker ``pid`` runs: it holds ``lock`` (a process that died let go of
    it, whatever now has its PID); without a lock file, whether the PID is in use."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return _alive(pid)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or cannot tell: taken for running
        return True
    finally:
        os.close(fd)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Reloading(Protocol):
    """What the operator needs of the gateway's ``Reloader`` (``reload.py``)."""

    path: Path
    overrides: dict[str, Any]
    admin_changes: Overrides
    outcomes: Outcomes
    error: str | None

    async def reload(self, why: str) -> object | None: ...


class GatewayOperator(Operator):
    """The admin API's operator in ``rr-gateway``: membership changes and reloads reach
    every worker (see the module docstring)."""

    def __init__(self, balancer: Balancer, reloader: Reloading) -> None:
        super().__init__(balancer)
        self.reloader = reloader
        # The parent: if it dies, this worker is re-parented (to PID 1, or a subreaper)
        # until it stops, and a SIGHUP must not go to whatever process that is.
        self.parent = parent_pid() or os.getppid()

    @property
    def supervised(self) -> bool:
        """Whether this is one of several workers under the gateway's parent process."""
        return self.reloader.admin_changes.path is not None

    async def add(self, pool: str, url: str, weight: int) -> str | Applying:
        upstream = self.check_membership(pool, url, True)
        self._check_file()
        key = self.runtime(pool).name  # as the file's pools are keyed ("/api/": "/api")
        self.reloader.admin_changes.append(
            {"op": "add", "pool": key, "url": upstream.url, "weight": weight}
        )
        return await self._everywhere(f"pool {pool}: {upstream.url} added (weight {weight})")

    async def remove(self, pool: str, url: str) -> str | Applying:
        upstream = self.check_membership(pool, url, False)
        self._check_file()
        key = self.runtime(pool).name
        self.reloader.admin_changes.append({"op": "remove", "pool": key, "url": upstream.url})
        return await self._everywhere(f"pool {pool}: {upstream.url} removed")

    async def reload(self) -> str | Applying:
        self._check_file()
        return await self._everywhere(f"{self.reloader.path} reloaded")

    def _check_file(self) -> None:
        """A change applies as a reload of the file with the overrides: while the file
        has a mistake, none is recorded (every worker would refuse it)."""
        try:
            load_config(self.reloader.path, **self.reloader.overrides)
        except ConfigError as exc:
            raise AdminError(400, f"refused, the running configuration stays: {exc}") from None

    async def _everywhere(self, done: str) -> str | Applying:
        if self.supervised:
            if os.getppid() != self.parent:
                raise AdminError(503, "the gateway's parent process is gone: restart the gateway")
            asked = time.monotonic()  # a reload begun later reads the file and the change
            operations = len(self.reloader.admin_changes.operations())
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.parent, signal.SIGHUP)  # the parent has every worker reload
            return Applying(done, lambda: self._applied(done, asked, operations))
        if await self.reloader.reload("admin API") is None:
            raise AdminError(
                400, f"refused, the running configuration stays: {self.reloader.error}"
            )
        return done

    async def _applied(self, done: str, asked: float, operations: int) -> str:
        """Wait, at most ``APPLY_TIMEOUT``, until every live worker has finished a reload
        begun after ``asked`` (so it read the file and the operations as they are now)."""
        deadline = time.monotonic() + APPLY_TIMEOUT
        while True:
            live = self.reloader.outcomes.of_live_workers()
            since = {
                pid: outcome
                for pid, outcome in live.items()
                if outcome.get("started", 0.0) >= asked
                and outcome.get("operations", 0) >= operations
            }
            parent = self.reloader.outcomes.parent_refusal(asked)
            refusing = [pid for pid, o in since.items() if o.get("error")]
            everyone = bool(live) and len(since) == len(live)
            late = time.monotonic() >= deadline
            if parent is not None or (refusing and (everyone or late)):
                errors = {str(since[pid]["error"]) for pid in refusing}
                if parent is not None:
                    errors.add(parent)
                who = "the gateway" if parent is not None else f"{len(refusing)} worker(s)"
                raise AdminError(
                    409,
                    f"{done} in the recorded changes, but {who} refused the reload, the "
                    f"running configuration stays: {'; '.join(sorted(errors))}",
                )
            if everyone:
                if len(live) == 1:
                    return f"{done}; applied by the one worker running"
                return f"{done}; applied by all {len(live)} workers"
            if late:
                raise AdminError(
                    504,
                    f"{done} in the recorded changes; {len(since)} of {len(live)} workers "
                    f"applied it within {APPLY_TIMEOUT:g}s, the others will as their reload ends",
                )
            await asyncio.sleep(_APPLY_POLL)
