"""A real Consul agent for the tests: ``consul agent -dev`` on 127.0.0.1, every port free.

``start_agent()`` picks free ports for everything the agent listens on (HTTP, DNS, Serf LAN,
server RPC; Serf WAN, gRPC and HTTPS are disabled), starts the agent with a temporary data
directory and its output in a log file, and returns once the agent has elected itself leader.
``ConsulAgent`` offers synchronous helpers over the HTTP API (httpx) for what the tests do:
register a service with HTTP and/or TTL checks, flip TTL checks, read the health view, and
make blocking queries. ``stop()`` ends the agent by its PID.

The binary is ``$CONSUL_BIN``, else ``.venv/bin/consul`` (installed by ``.ci/install-consul``),
else ``consul`` on PATH: see ``find_consul()``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

Entry = dict[str, Any]


def find_consul() -> str | None:
    """The consul binary to run: ``$CONSUL_BIN``, ``.venv/bin/consul`` or PATH, else None."""
    configured = os.environ.get("CONSUL_BIN")
    if configured:
        return configured
    local = REPO_ROOT / ".venv" / "bin" / "consul"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("consul")


def free_ports(count: int) -> list[int]:
    """``count`` distinct 127.0.0.1 ports free for both TCP and UDP (DNS and Serf use both).

    The sockets stay bound until all ports are chosen so none is picked twice; another
    process may still take one before the agent binds it, which ``start_agent`` retries.
    """
    ports: list[int] = []
    with ExitStack() as held:
        while len(ports) < count:
            tcp = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            udp = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    return ports


@dataclass(frozen=True)
class Registration:
    """What ``ConsulAgent.register`` created: the service and its checks' IDs."""

    service_id: str
    http_check_id: str | None
    ttl_check_id: str | None


class ConsulAgent:
    """A running dev-mode agent and sync helpers for its HTTP API."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        http_port: int,
        dns_port: int,
        log_path: Path,
        token: str | None = None,
    ) -> None:
        self.process = process
        self.http_port = http_port
        self.dns_port = dns_port
        self.log_path = log_path
        self.address = f"http://127.0.0.1:{http_port}"
        headers = {"x-consul-token": token} if token else {}
        self.client = httpx.Client(base_url=self.address, timeout=10.0, headers=headers)
        # Services registered and not yet deregistered, so a test's leftovers can be removed.
        self.registered: set[str] = set()

    # -- services --------------------------------------------------------------------------

    def register(
        self,
        service_id: str,
        name: str,
        address: str,
        port: int,
        *,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        weights: Mapping[str, int] | None = None,
        check_http: str | None = None,
        check_interval: str = "1s",
        check_ttl: str | None = None,
    ) -> Registration:
        """Register a service with the agent (``PUT /v1/agent/service/register``).

        ``check_http`` adds an HTTP check of that URL every ``check_interval``; ``check_ttl``
        adds a TTL check the test drives with ``pass_ttl``/``fail_ttl``. Both start critical,
        as in Consul, so a new instance is not "passing" until its checks say so.
        ``weights`` is Consul's ``{"Passing": n, "Warning": m}``.
        """
        checks: list[Entry] = []
        http_check_id = ttl_check_id = None
        if check_http is not None:
            http_check_id = f"service:{service_id}:http"
            checks.append(
                {
                    "CheckID": http_check_id,
                    "Name": f"{name} HTTP",
                    "HTTP": check_http,
                    "Interval": check_interval,
                    "Timeout": "1s",
                }
            )
        if check_ttl is not None:
            ttl_check_id = f"service:{service_id}:ttl"
            checks.append({"CheckID": ttl_check_id, "Name": f"{name} TTL", "TTL": check_ttl})
        body: Entry = {
            "ID": service_id,
            "Name": name,
            "Address": address,
            "Port": port,
            "Tags": list(tags),
            "Meta": dict(meta or {}),
            "Checks": checks,
        }
        if weights is not None:
            body["Weights"] = dict(weights)
        self.client.put("/v1/agent/service/register", json=body).raise_for_status()
        self.registered.add(service_id)
        return Registration(service_id, http_check_id, ttl_check_id)

    def deregister(self, service_id: str) -> None:
        """Remove a service and its checks (``PUT /v1/agent/service/deregister/:id``)."""
        self.client.put(f"/v1/agent/service/deregister/{service_id}").raise_for_status()
        self.registered.discard(service_id)

    def pass_ttl(self, check_id: str, note: str = "") -> None:
        """Mark a TTL check passing now (``PUT /v1/agent/check/pass/:id``)."""
        self.client.put(
            f"/v1/agent/check/pass/{check_id}", params={"note": note}
        ).raise_for_status()

    def fail_ttl(self, check_id: str, note: str = "") -> None:
        """Mark a TTL check critical now (``PUT /v1/agent/check/fail/:id``)."""
        self.client.put(
            f"/v1/agent/check/fail/{check_id}", params={"note": note}
        ).raise_for_status()

    # -- reads -----------------------------------------------------------------------------

    def services(self, name: str, *, passing: bool = False) -> list[Entry]:
        """The ``/v1/health/service/:name`` view: one entry (Node, Service, Checks) per
        instance, only those whose checks all pass when ``passing``."""
        return self.watch(name, passing=passing)[1]

    def watch(
        self, name: str, *, index: int | None = None, wait: str = "5s", passing: bool = False
    ) -> tuple[int, list[Entry]]:
        """``/v1/health/service/:name``, as a blocking query when ``index`` is given: Consul
        holds the request until the result's index passes ``index`` or ``wait`` runs out.
        Returns the ``X-Consul-Index`` to pass next time and the entries."""
        params: dict[str, str] = {}
        if passing:
            params["passing"] = "true"
        if index is not None:
            params["index"] = str(index)
            params["wait"] = wait
        response = self.client.get(
            f"/v1/health/service/{name}", params=params, timeout=_seconds(wait) + 10.0
        )
        response.raise_for_status()
        entries: list[Entry] = response.json()
        return int(response.headers["X-Consul-Index"]), entries

    def wait_for(
        self,
        name: str,
        condition: Callable[[list[Entry]], bool],
        *,
        passing: bool = False,
        timeout: float = 15.0,
    ) -> list[Entry]:
        """Block until the health view of ``name`` satisfies ``condition``; return it.

        Driven by blocking queries, so it wakes on each change rather than polling.
        """
        deadline = time.monotonic() + timeout
        index, entries = self.watch(name, passing=passing)
        while not condition(entries):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{name}: condition not met in {timeout}s; last: {entries}")
            wait = f"{max(int(remaining * 1000), 1)}ms"
            # An index going backwards means the agent's state was reset: start over.
            new_index, entries = self.watch(name, index=index, wait=wait, passing=passing)
            index = new_index if new_index >= index else 0
        return entries

    def log_tail(self, start: int = 0, limit: int = 20_000) -> str:
        """The agent's log from byte ``start``, at most the last ``limit`` bytes of it."""
        data = self.log_path.read_bytes()[start:]
        return data[-limit:].decode("utf-8", "replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the agent, wait for it, SIGKILL it if it does not go."""
        self.client.close()
        stop_process(self.process)


def _seconds(duration: str) -> float:
    """A Consul duration such as "5s", "500ms" or "1m" in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * scale
    return float(duration)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


class AgentStartError(RuntimeError):
    pass


def start_agent(
    binary: str,
    workdir: Path,
    attempts: int = 3,
    *,
    extra_args: Sequence[str] = (),
    token: str | None = None,
) -> ConsulAgent:
    """Start ``consul agent -dev`` in ``workdir`` and wait until it has a leader
    (``extra_args`` added to its command line; ``token``: what the helpers send as
    ``X-Consul-Token``, for an agent started with ACLs).

    A port taken by someone else between ``free_ports`` and the agent binding it makes
    the agent exit at once; that is retried with new ports.
    """
    for attempt in range(1, attempts + 1):
        http, dns, serf_lan, server = free_ports(4)
        data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
        log_path = workdir / f"consul-{attempt}.log"
        command = [
            binary,
            "agent",
            "-dev",
            "-node=rr-test",
            "-disable-host-node-id",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-data-dir={data_dir}",
            f"-http-port={http}",
            f"-dns-port={dns}",
            f"-serf-lan-port={serf_lan}",
            f"-server-port={server}",
            "-serf-wan-port=-1",
            "-grpc-port=-1",
            "-https-port=-1",
            *extra_args,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        agent = ConsulAgent(process, http, dns, log_path, token)
        try:
            _wait_for_leader(agent)
        except AgentStartError:
            agent.stop()
            if attempt == attempts or "address already in use" not in agent.log_tail():
                raise
            continue
        except BaseException:
            agent.stop()
            raise
        return agent
    raise AssertionError("unreachable")


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the test process dies, so a
    killed test run (where no fixture teardown runs) leaves no agent behind."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_leader(agent: ConsulAgent) -> None:
    # The leader is an observable condition: poll for it, with a deadline.
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise AgentStartError(
                f"consul agent exited with {agent.process.returncode}:\n{agent.log_tail()}"
            )
        try:
            response = agent.client.get("/v1/status/leader", timeout=1.0)
            if response.status_code == 200 and response.json():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AgentStartError(
        f"consul agent had no leader after {STARTUP_TIMEOUT}s:\n{agent.log_tail()}"
    )
