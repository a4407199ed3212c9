"""rr-gateway as users run it: a real process (``python -m rr_middleware``) on a TOML file,
started until it answers HTTP, stopped by signals, and killed with its workers at the end."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from .polling import wait_for

DEADLINE = 30.0

# What each server logs: a worker started (its PID), and the gateway draining.
SERVER_LOG = {
    "uvicorn": (r"Started server process \[(\d+)\]", "Waiting for connections to close"),
    "granian": (r"Spawning worker-\d+ with PID: (\d+)", "Stopping worker-"),
}
STARTED = {"uvicorn": "Application startup complete", "granian": r"Started worker-\d+"}


class Gateway:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.process = process
        self.log = log
        self.url = url

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=DEADLINE)


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rr_middleware", *args]


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a service manager stops it (its workers clean up: a zone they share
    is removed by the last one out); SIGKILL to the whole tree if it takes too long."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=DEADLINE)
    kill_tree(process)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the gateway and its worker processes, by PID."""
    if process.poll() is None:
        for child in children_of(process.pid):
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.kill()
    process.wait(timeout=DEADLINE)


@contextmanager
def run_gateway(
    tmp_path: Path,
    config: str,
    *args: str,
    env: dict[str, str] | None = None,
    config_flag: bool = True,
    verify: ssl.SSLContext | bool = True,
) -> Iterator[Gateway]:
    """Start the gateway on ``config`` (named by --config, or else by RR_GATEWAY_CONFIG)
    and yield it once it answers HTTP (``verify``: a client's TLS context, for a gateway
    serving TLS)."""
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    log = tmp_path / "gateway.log"
    command = gateway_command(*(["--config", str(path)] if config_flag else []), *args)
    env = {**(env or {}), **({} if config_flag else {"RR_GATEWAY_CONFIG": str(path)})}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:

        def listening() -> str | None:
            assert process.poll() is None, f"gateway exited:\n{log.read_text()}"
            found = re.search(r"listening on (https?://\S+)", log.read_text())
            return found.group(1) if found else None

        url = wait_for(listening, "the gateway's address")

        def answers() -> bool:
            try:
                return httpx.get(url + "/", timeout=1, verify=verify).status_code == 404
            except httpx.TransportError:
                return False

        wait_for(answers, "the gateway to answer")
        yield Gateway(process, log, url)
    except BaseException:
        stop_tree(process)
        # pytest shows it with the failure: what the gateway said is half the story.
        print(f"--- the gateway's output ({log}):\n{log.read_text(errors='replace')}")
        raise
    finally:
        stop_tree(process)
