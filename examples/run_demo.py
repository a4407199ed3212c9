"""`make demo`: three backends behind rr-gateway, under load, one killed and brought back.

    python -m examples.run_demo [--duration SECONDS]

Starts three demo backends (``backend-1`` with weight 3) and the gateway
(``python -m rr_middleware``) with health checks, retries, a status page and metrics, each
as its own process on a free 127.0.0.1 port. Then it drives traffic for ``--duration``
seconds (default 20) and shows, per upstream, the requests served, the share of the last
two seconds, the median latency and the state the gateway reports. A third of the way in,
``backend-2`` is killed (SIGKILL): it leaves the rotation and no request fails. Later it
is restarted on the same port and rejoins. Ctrl-C stops everything at any point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = (("backend-1", 3), ("backend-2", 1), ("backend-3", 1))
VICTIM = "backend-2"
STATUS_PATH = "/_rr/status"
METRICS_PATH = "/metrics"
CONCURRENCY = 4
PAUSE = 0.02  # between two requests of one client: a gentle, bounded load
WINDOW = 2.0  # seconds of traffic the share column covers
READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Backend:
    name: str
    weight: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "uvicorn", "examples.demo_backend:app"]
        command += ["--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "BACKEND_NAME": self.name},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@dataclass
class Traffic:
    """What the clients saw: per backend, requests and recent latencies."""

    sent: int = 0
    failed: int = 0
    served: dict[str, int] = field(default_factory=dict)
    latencies: dict[str, deque[float]] = field(default_factory=dict)
    recent: deque[tuple[float, str]] = field(default_factory=deque)

    def record(self, name: str, latency: float) -> None:
        self.served[name] = self.served.get(name, 0) + 1
        self.latencies.setdefault(name, deque(maxlen=200)).append(latency)
        self.recent.append((time.monotonic(), name))

    def shares(self) -> dict[str, float]:
        horizon = time.monotonic() - WINDOW
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        counts: dict[str, int] = {}
        for _, name in self.recent:
            counts[name] = counts.get(name, 0) + 1
        return {name: n / len(self.recent) for name, n in counts.items()}


class Screen:
    """The table, redrawn in place on a terminal; plain snapshots and event lines otherwise."""

    def __init__(self, out: IO[str], tty: bool, every: float) -> None:
        self.out, self.tty, self.every = out, tty, every
        self.events: list[str] = []
        self.drawn = 0
        self.last_snapshot = 0.0

    def event(self, elapsed: float, text: str) -> None:
        line = f"  {elapsed:5.1f}s  {text}"
        self.events.append(line)
        if not self.tty:
            print(line, file=self.out, flush=True)

    def show(self, lines: list[str], elapsed: float, final: bool = False) -> None:
        if self.tty:
            block = [*lines, "", *self.events]
            clear = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
            self.out.write(clear + "\n".join(block) + "\n")
            self.out.flush()
            self.drawn = len(block)
        elif final or elapsed - self.last_snapshot >= self.every:
            self.last_snapshot = elapsed
            print("\n".join(["", *lines, ""]), file=self.out, flush=True)


def table(
    backends: list[Backend], traffic: Traffic, states: dict[str, str], head: str
) -> list[str]:
    shares = traffic.shares()
    lines = [head, f"  {'upstream':<26}{'weight':>6}{'requests':>10}{'share':>7}{'p50':>9}  state"]
    for b in backends:
        recent = traffic.latencies.get(b.name)
        p50 = f"{statistics.median(recent) * 1000:.1f}ms" if recent else "-"
        lines.append(
            f"  {b.name + ' ' + b.url[7:]:<26}{b.weight:>6}{traffic.served.get(b.name, 0):>10}"
            f"{shares.get(b.name, 0.0):>7.0%}{p50:>9}  {states.get(b.url, '?')}"
        )
    return lines


def gateway_config(backends: list[Backend]) -> str:
    upstreams = ",\n".join(f'    {{ url = "{b.url}", weight = {b.weight} }}' for b in backends)
    return f"""[server]
port = 0
log_level = "warning"
graceful_timeout = 5.0

[middleware]
status_path = "{STATUS_PATH}"
metrics_path = "{METRICS_PATH}"

[pools."/api"]
upstreams = [
{upstreams},
]
retries = 2         # a request that meets the dead backend moves on to the next
fail_timeout = 2.0  # passive ejection: 3 failures in 2 s take a backend out for 2 s

[pools."/api".health_check]
path = "/health"
interval = 0.5
timeout = 1.0
rise = 2
fall = 2
"""


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m rr_middleware --config ...``, its output to ``log``."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "rr_middleware", "--config", str(config)],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def wait_until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


async def answers(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url)).status_code == 200
    except httpx.TransportError:
        return False


async def load(client: httpx.AsyncClient, traffic: Traffic, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        traffic.sent += 1
        try:
            reply = await client.get("/api/work")
            if reply.status_code != 200:
                raise RuntimeError(reply.status_code)
            traffic.record(reply.json()["backend"], time.monotonic() - started)
        except Exception:
            traffic.failed += 1
        await asyncio.sleep(PAUSE)


async def demo(duration: float, out: IO[str], work: Path, children: list[Any]) -> int:
    """Run the demo, appending every process it starts to ``children`` (the caller stops
    them, whatever happens)."""
    tty = out.isatty()
    backends = [Backend(name, weight) for name, weight in BACKENDS]
    victim = next(b for b in backends if b.name == VICTIM)
    config, log = work / "gateway.toml", work / "gateway.log"
    config.write_text(gateway_config(backends))
    async with httpx.AsyncClient(timeout=5) as probe:
        for b in backends:
            b.start()
            children.append(b)
        for b in backends:
            await wait_until(lambda b=b: answers(probe, b.url + "/health"), b.name)
            print(f"  {b.name} (weight {b.weight}) listening on {b.url}", file=out)
        gateway = start_gateway(config, log)
        children.append(gateway)

        async def address() -> str | None:
            if gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{log.read_text()}")
            found = re.search(r"listening on (http://\S+)", log.read_text())
            return found.group(1) if found else None

        url = await wait_until(address, "the gateway")
        await wait_until(lambda: answers(probe, url + STATUS_PATH + ".json"), "the gateway")
        print(f"  rr-gateway listening on {url}, /api -> the three", file=out)
        print(f"  status page: {url}{STATUS_PATH}", file=out)
        print(f"  metrics:     {url}{METRICS_PATH}", file=out)
        print(f"  running {duration:.0f} s; {VICTIM} is killed and restarted midway", file=out)

        screen = Screen(out, tty, every=max(duration / 5, 1.0))
        traffic, stop = Traffic(), asyncio.Event()
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
            clients = [asyncio.create_task(load(client, traffic, stop)) for _ in range(CONCURRENCY)]
            states: dict[str, str] = {}
            began = time.monotonic()
            killed_at = restarted_at = rejoined_at = None
            while True:
                elapsed = time.monotonic() - began
                status = (await probe.get(url + STATUS_PATH + ".json")).json()
                now = {u["url"]: u["state"] for u in status["pools"][0]["upstreams"]}
                for b in backends:
                    before, after = states.get(b.url, "up"), now[b.url]
                    if before == "up" and after != "up":
                        screen.event(elapsed, f"{b.name} left the rotation ({after})")
                    elif before != "up" and after == "up":
                        screen.event(elapsed, f"{b.name} is back in the rotation")
                        rejoined_at = elapsed if b is victim and restarted_at else rejoined_at
                states = now
                if killed_at is None and elapsed >= 0.3 * duration:
                    assert victim.process is not None
                    screen.event(elapsed, f"kill -9 {victim.name} (pid {victim.process.pid})")
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait()
                    killed_at = elapsed
                elif restarted_at is None and killed_at and elapsed >= 0.55 * duration:
                    victim.start()
                    screen.event(elapsed, f"restarted {victim.name} on port {victim.port}")
                    restarted_at = elapsed
                head = (
                    f"  {min(elapsed, duration):4.1f}/{duration:.0f} s   "
                    f"{traffic.sent} requests, {traffic.failed} failed"
                )
                screen.show(table(backends, traffic, states, head), elapsed)
                if elapsed >= duration and (rejoined_at or elapsed >= duration + 15):
                    break
                await asyncio.sleep(0.25)
            stop.set()
            await asyncio.gather(*clients)
        screen.show(table(backends, traffic, states, head), elapsed, final=True)
    print(f"  done: {traffic.sent} requests, {traffic.failed} failed", file=out)
    return 0


def stop_all(children: list[Any], out: IO[str]) -> None:
    """SIGTERM every process started here (gateway first), then SIGKILL any left after 5 s."""
    processes = [c.process if isinstance(c, Backend) else c for c in reversed(children)]
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        if process is None:
            continue
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print("  gateway and backends stopped.", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of traffic")
    args = parser.parse_args(argv)
    children: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="rr-demo-") as work:
        try:
            return asyncio.run(demo(args.duration, sys.stdout, Path(work), children))
        except KeyboardInterrupt:
            print("\n  interrupted.", flush=True)
            return 0
        finally:
            stop_all(children, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
