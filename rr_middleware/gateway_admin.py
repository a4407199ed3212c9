"""The admin API in ``rr-gateway``: upstreams added and removed in every worker, and a
reload on request.

An upstream added or removed through the admin API is an *override* on top of the file,
kept until the gateway stops (a reload of the file applies them again): a list of
operations in memory with one worker, or with several in a file of the gateway's state
directory (``RR_GATEWAY_STATE``, made by the parent process and removed when it exits).
With several workers the worker that took the request records the operation and sends
SIGHUP to the parent, which has every worker reload: each one applies the file and the
overrides, so they all converge, also one started later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .admin import AdminError, Operator
from .config import Pool
from .config_mapping import ConfigError
from .gateway_config import load_config
from .upstream import Upstream

if TYPE_CHECKING:
    from .runtime import Balancer

__all__ = ["STATE_ENV", "GatewayOperator", "Overrides"]

logger = logging.getLogger("rr_middleware")

#: The gateway's state directory, shared by its workers (set by the parent process).
STATE_ENV = "RR_GATEWAY_STATE"


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

    def apply(self, pools: dict[str, Pool]) -> dict[str, Pool]:
        """``pools`` with the operations applied, in order; one that no longer applies
        (its pool gone, or now following discovery) is skipped."""
        pools = dict(pools)
        for operation in self.operations():
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


class Reloading(Protocol):
    """What the operator needs of the gateway's ``Reloader`` (``reload.py``)."""

    path: Path
    overrides: dict[str, Any]
    admin_changes: Overrides
    error: str | None

    async def reload(self, why: str) -> object | None: ...


class GatewayOperator(Operator):
    """The admin API's operator in ``rr-gateway``: membership changes and reloads reach
    every worker (see the module docstring)."""

    def __init__(self, balancer: Balancer, reloader: Reloading) -> None:
        super().__init__(balancer)
        self.reloader = reloader
        # The parent at start-up: if it dies, this worker is re-parented (to PID 1, or a
        # subreaper), and a SIGHUP must not go to whatever process that is.
        self.parent = os.getppid()

    @property
    def supervised(self) -> bool:
        """Whether this is one of several workers under the gateway's parent process."""
        return self.reloader.admin_changes.path is not None

    async def add(self, pool: str, url: str, weight: int) -> str:
        upstream = self.check_membership(pool, url, True)
        key = self.runtime(pool).name  # as the file's pools are keyed ("/api/": "/api")
        self.reloader.admin_changes.append(
            {"op": "add", "pool": key, "url": upstream.url, "weight": weight}
        )
        return await self._everywhere(f"pool {pool}: {upstream.url} added (weight {weight})")

    async def remove(self, pool: str, url: str) -> str:
        upstream = self.check_membership(pool, url, False)
        key = self.runtime(pool).name
        self.reloader.admin_changes.append({"op": "remove", "pool": key, "url": upstream.url})
        return await self._everywhere(f"pool {pool}: {upstream.url} removed")

    async def reload(self) -> str:
        try:
            load_config(self.reloader.path, **self.reloader.overrides)
        except ConfigError as exc:
            raise AdminError(400, f"refused, the running configuration stays: {exc}") from None
        return await self._everywhere(f"{self.reloader.path} reloaded")

    async def _everywhere(self, done: str) -> str:
        if self.supervised:
            if os.getppid() != self.parent:
                raise AdminError(503, "the gateway's parent process is gone: restart the gateway")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.parent, signal.SIGHUP)  # the parent has every worker reload
            return f"{done}; every worker applies it"
        if await self.reloader.reload("admin API") is None:
            raise AdminError(
                400, f"refused, the running configuration stays: {self.reloader.error}"
            )
        return done
