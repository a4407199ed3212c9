"""Side-by-side benchmark: RoundRobinMiddleware vs asgiproxy vs direct, and fall-through cost.

    .venv/bin/python benchmarks/bench_proxy.py [--duration 5] [--rounds 3] [--connections 32]
        [--warmup 2] [--max-connections N] [--no-micro] [--json PATH]

Every server is its own uvicorn subprocess (uvloop, httptools, one worker, no access log)
on a socket this script binds to 127.0.0.1:0 and passes down (see serve.py). Each target
gets one warm-up run, then ``--rounds`` rounds each run every target once, in order, so
noise on a shared machine spreads over all of them; the medians across rounds are
reported. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import bench_micro
import wrk_runner
from bench_apps import LOCAL_BODY, UPSTREAM_BODY
from wrk_runner import WrkError, WrkResult

BENCH_DIR = Path(__file__).resolve().parent
READY_DEADLINE_S = 30.0
STOP_TIMEOUT_S = 10.0
FALL_THROUGH_GOAL_PCT = 3.0
MANY_PREFIXES = 50


class BenchError(RuntimeError):
    """A server would not start or answered wrongly."""


# --- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def spawn(
    name: str,
    argv: Sequence[str],
    port: int,
    log_dir: Path,
    servers: list[Server],
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Server:
    """Start one server process, its output in ``<log_dir>/<name>.log``; the Server is
    appended to ``servers`` at once, so the caller can always stop it."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=BENCH_DIR.parent,
        )
    server = Server(name, port, process, log_path)
    servers.append(server)
    return server


def start_server(
    name: str, factory: str, env: dict[str, str], log_dir: Path, servers: list[Server]
) -> Server:
    """Start uvicorn serving ``bench_apps.<factory>()`` on a fresh socket."""
    sock = _bound_socket()
    try:
        fd = sock.fileno()
        # serve.py, not ``uvicorn --fd``: see its docstring (uvicorn --fd loses TCP_NODELAY).
        command = [sys.executable, str(BENCH_DIR / "serve.py"), str(fd), factory]
        return spawn(name, command, sock.getsockname()[1], log_dir, servers, env, (fd,))
    finally:
        sock.close()  # the child holds its own copy; the port is freed when it exits


def stop_servers(servers: Sequence[Server]) -> None:
    """Terminate every server by PID, wait for it, and kill the ones that do not stop.

    The proxies go first and the upstreams once the proxies have exited: a proxy stopping
    still answers what wrk left in flight (and drains what it accepted), which must not
    meet an upstream already gone, or the proxy's log fills with "Connection refused"
    warnings that say nothing about the run."""
    proxies = [s for s in servers if s.name not in UPSTREAMS]
    upstreams = [s for s in servers if s.name in UPSTREAMS]
    for wave in (proxies, upstreams):
        for server in wave:
            if server.process.poll() is None:
                server.process.terminate()
        for server in wave:
            try:
                server.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{server.name} (pid {server.process.pid}) ignored SIGTERM; killing it")
                server.process.kill()
                server.process.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(url_base: str, path: str, timeout: float) -> Reply:
    host, _, port = url_base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Reply(response.status, headers, body)
    finally:
        conn.close()


def wait_ready(server: Server, path: str) -> None:
    """Poll ``GET path`` until it answers, the process dies, or the deadline passes.

    The listening socket exists before the server starts, so a bare TCP connect would
    succeed at once (into the backlog); an HTTP answer is the real sign of readiness.
    """
    deadline = time.monotonic() + READY_DEADLINE_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            http_get(server.base_url, path, timeout=1.0)
            return
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
            time.sleep(0.05)
    raise BenchError(
        f"{server.name} not ready within {READY_DEADLINE_S:g}s ({last_error}):\n{server.log_tail()}"
    )


# --- targets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    server: str
    path: str
    body: bytes
    #: The upstreams a proxy must spread requests over (checked before the benchmark).
    upstream_names: tuple[str, ...] = ()


@dataclass
class Measurement:
    target: Target
    url: str
    warmup: WrkResult | None = None
    rounds: list[WrkResult] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    @property
    def cpu_us_per_request(self) -> float:
        return statistics.median(self.cpu_us)

    @property
    def rps(self) -> float:
        return statistics.median(r.requests_per_sec for r in self.rounds)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.rounds)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.rounds)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median of the rounds' req/s: how noisy this target's runs were."""
        values = [r.requests_per_sec for r in self.rounds]
        return (max(values) - min(values)) / statistics.median(values) * 100.0

    @property
    def errors(self) -> int:
        runs = [*self.rounds, *([self.warmup] if self.warmup else [])]
        return sum(r.errors for r in runs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.target.label,
            "url": self.url,
            "median": {
                "requests_per_sec": self.rps,
                "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms,
                "cpu_us_per_request": self.cpu_us_per_request,
            },
            "spread_pct": self.spread_pct,
            "errors": self.errors,
            "flagged": self.errors > 0,
            "warmup": self.warmup.as_dict() if self.warmup else None,
            "rounds": [r.as_dict() for r in self.rounds],
        }


UPSTREAMS = ("upstream1", "upstream2")
TARGETS = (
    Target("direct", "upstream 1, no proxy", "upstream1", "/hello", UPSTREAM_BODY),
    Target(
        "middleware",
        "RoundRobinMiddleware /api -> 2 upstreams",
        "middleware",
        "/api/hello",
        UPSTREAM_BODY,
        UPSTREAMS,
    ),
    Target(
        "middleware-aiohttp",
        "the same over the optional aiohttp transport",
        "middleware-aiohttp",
        "/api/hello",
        UPSTREAM_BODY,
        UPSTREAMS,
    ),
    Target(
        "asgiproxy",
        "asgiproxy 0.2, alternating 2 upstreams",
        "asgiproxy",
        "/api/hello",
        UPSTREAM_BODY,
        UPSTREAMS,
    ),
    Target("bare", "Starlette /local, no middleware", "bare", "/local", LOCAL_BODY.encode()),
    Target(
        "fallthrough-1",
        "Starlette /local, middleware, 1 prefix",
        "middleware1",
        "/local",
        LOCAL_BODY.encode(),
    ),
    Target(
        f"fallthrough-{MANY_PREFIXES}",
        f"Starlette /local, middleware, {MANY_PREFIXES} prefixes",
        f"middleware{MANY_PREFIXES}",
        "/local",
        LOCAL_BODY.encode(),
    ),
)


def check_target(target: Target, server: Server) -> None:
    """One request (two for a proxy) must answer 200 with the expected body; a proxy must
    reach both upstreams."""
    seen: set[str] = set()
    for _ in range(max(1, len(target.upstream_names))):
        reply = http_get(server.base_url, target.path, timeout=10.0)
        if reply.status != 200 or reply.body != target.body:
            raise BenchError(
                f"{target.name}: GET {target.path} -> {reply.status} {reply.body[:200]!r}, "
                f"expected 200 {target.body!r}\n{server.log_tail()}"
            )
        seen.add(reply.headers.get("x-upstream", "?"))
    if target.upstream_names and seen != set(target.upstream_names):
        raise BenchError(f"{target.name}: two requests reached {sorted(seen)}, not both upstreams")


def start_all(
    log_dir: Path, servers: list[Server], max_connections: int | None = None
) -> dict[str, Server]:
    by_name: dict[str, Server] = {}
    for name in UPSTREAMS:
        by_name[name] = start_server(name, "upstream_app", {"BENCH_NAME": name}, log_dir, servers)
    upstream_urls = ",".join(by_name[name].base_url for name in UPSTREAMS)
    one, many = {"BENCH_PREFIXES": "1"}, {"BENCH_PREFIXES": str(MANY_PREFIXES)}
    # The fall-through targets get servers of their own, so the three differ only in their
    # configuration, not in what the process served before (the proxy runs leave idle
    # upstream connections and a grown heap behind).
    apps = {
        "middleware": (
            "middleware_app",
            {**one, "BENCH_MAX_CONNECTIONS": str(max_connections or "")},
        ),
        "middleware-aiohttp": (
            "middleware_app",
            {
                **one,
                "BENCH_TRANSPORT": "aiohttp",
                "BENCH_MAX_CONNECTIONS": str(max_connections or ""),
            },
        ),
        "asgiproxy": ("asgiproxy_app", {}),
        "bare": ("bare_app", {}),
        "middleware1": ("middleware_app", one),
        f"middleware{MANY_PREFIXES}": ("middleware_app", many),
    }
    for name, (factory, env) in apps.items():
        env = {**env, "BENCH_UPSTREAMS": upstream_urls}
        by_name[name] = start_server(name, factory, env, log_dir, servers)
    for server in by_name.values():
        wait_ready(server, "/local" if server.name not in UPSTREAMS else "/")
    return by_name


def log_problems(servers: Sequence[Server]) -> dict[str, list[str]]:
    """Lines of each server's log (uvicorn at --log-level warning) that report trouble."""
    problems: dict[str, list[str]] = {}
    markers = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception", "Unclosed")
    for server in servers:
        with contextlib.suppress(OSError):
            lines = server.log_path.read_text(errors="replace").splitlines()
            found = [line for line in lines if any(m in line for m in markers)]
            if found:
                problems[server.name] = found
    return problems


# --- running and reporting -----------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(servers: dict[str, Server], args: argparse.Namespace) -> dict[str, Measurement]:
    results = {t.name: Measurement(t, servers[t.server].base_url + t.path) for t in TARGETS}
    for target in TARGETS:
        check_target(target, servers[target.server])
    if args.warmup > 0:
        for m in results.values():
            m.warmup = wrk_runner.run(m.url, duration=args.warmup, connections=args.connections)
            progress(f"warm-up  {m.target.name:<15} {m.warmup.requests_per_sec:>10.1f} req/s")
    for round_no in range(1, args.rounds + 1):
        for m in results.values():
            pid = servers[m.target.server].process.pid
            cpu_before = cpu_seconds(pid)
            result = wrk_runner.run(m.url, duration=args.duration, connections=args.connections)
            # CPU per request of the server under test: unlike req/s, barely moved by
            # whatever else the shared machine is doing.
            m.cpu_us.append((cpu_seconds(pid) - cpu_before) * 1e6 / max(result.requests, 1))
            m.rounds.append(result)
            flag = f"  ERRORS: {result.errors}" if result.errors else ""
            progress(
                f"round {round_no}  {m.target.name:<15} {result.requests_per_sec:>10.1f} req/s"
                f"  p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms{flag}"
            )
    return results


@dataclass
class Comparison:
    """``a`` against ``b``: the ratio of their median req/s, and the same ratio per round
    (each round ran them within seconds of each other, so those pairs share their noise)."""

    key: str
    label: str
    a: str
    b: str
    #: "x": req/s ratio a/b; "%": how much slower a is than b, in percent.
    unit: str
    #: Goal as (is it an upper bound?, threshold), or None.
    goal: tuple[bool, float] | None = None

    def _value(self, a_rps: float, b_rps: float) -> float:
        return a_rps / b_rps if self.unit == "x" else (1.0 - a_rps / b_rps) * 100.0

    def evaluate(self, results: dict[str, Measurement]) -> dict[str, Any]:
        a, b = results[self.a], results[self.b]
        value = self._value(a.rps, b.rps)
        per_round = [
            self._value(x.requests_per_sec, y.requests_per_sec)
            for x, y in zip(a.rounds, b.rounds, strict=True)
        ]
        met = None
        if self.goal is not None:
            upper, threshold = self.goal
            met = value <= threshold if upper else value >= threshold
        return {
            "label": self.label,
            "unit": self.unit,
            "value": value,
            "per_round": per_round,
            "paired_median": statistics.median(per_round),
            "goal": None
            if self.goal is None
            else f"{'<=' if self.goal[0] else '>='} {self.goal[1]:g}{self.unit}",
            "met": met,
        }


COMPARISONS = (
    Comparison(
        "middleware_vs_asgiproxy",
        "middleware / asgiproxy req/s",
        "middleware",
        "asgiproxy",
        "x",
        (False, 1.0),
    ),
    Comparison(
        "aiohttp_vs_asgiproxy",
        "middleware-aiohttp / asgiproxy req/s",
        "middleware-aiohttp",
        "asgiproxy",
        "x",
    ),
    Comparison("middleware_vs_direct", "middleware / direct req/s", "middleware", "direct", "x"),
    Comparison("asgiproxy_vs_direct", "asgiproxy / direct req/s", "asgiproxy", "direct", "x"),
    Comparison(
        "fallthrough_vs_bare",
        "fall-through: middleware vs bare, % slower",
        "fallthrough-1",
        "bare",
        "%",
        (True, FALL_THROUGH_GOAL_PCT),
    ),
    Comparison(
        f"fallthrough_{MANY_PREFIXES}_vs_1",
        f"fall-through: {MANY_PREFIXES} prefixes vs 1, % slower",
        f"fallthrough-{MANY_PREFIXES}",
        "fallthrough-1",
        "%",
    ),
)


def compare(results: dict[str, Measurement]) -> dict[str, dict[str, Any]]:
    return {c.key: c.evaluate(results) for c in COMPARISONS}


def render(results: dict[str, Measurement], comparisons: dict[str, dict[str, Any]]) -> str:
    header = (
        f"{'target':<18} {'what':<42} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'CPU us/req':>10} {'errors':>6} {'spread':>6}  req/s per round"
    )
    lines = [header, "-" * len(header)]
    for m in results.values():
        errors = f"{m.errors}!" if m.errors else "0"
        per_round = " / ".join(f"{r.requests_per_sec:.0f}" for r in m.rounds)
        lines.append(
            f"{m.target.name:<18} {m.target.label:<42} {m.rps:>9.1f} {m.p50_ms:>7.2f} "
            f"{m.p99_ms:>7.2f} {m.cpu_us_per_request:>10.1f} {errors:>6} {m.spread_pct:>5.0f}%"
            f"  {per_round}"
        )

    def fmt(value: float, unit: str) -> str:
        return f"{value:.2f}x" if unit == "x" else f"{value:+.1f}%"

    lines += ["", f"{'comparison (medians)':<43} {'value':>7}  {'goal':<16} per round"]
    for c in comparisons.values():
        goal = ""
        if c["goal"] is not None:
            goal = f"{c['goal']}: {'MET' if c['met'] else 'NOT MET'}"
        per_round = ", ".join(fmt(v, c["unit"]) for v in c["per_round"])
        lines.append(f"{c['label']:<43} {fmt(c['value'], c['unit']):>7}  {goal:<16} {per_round}")
    lines.append(
        "spread = (max - min) / median of the rounds' req/s; a difference smaller than the "
        "spread is noise."
    )
    flagged = [m.target.name for m in results.values() if m.errors]
    if flagged:
        lines.append(
            f"\nFLAGGED: wrk reported socket errors or non-2xx/3xx for {', '.join(flagged)}"
        )
    return "\n".join(lines)


def micro_estimate(cost: dict[str, dict[str, float]], bare: Measurement) -> dict[str, Any]:
    """Turn the in-process overhead on ``/local`` into an expected slowdown of the bare
    server: at R req/s on its one core a request costs 1e6/R us, and the middleware adds
    its overhead to that. R is the best round, the one least slowed by other load, as the
    overhead is measured at its best too."""
    best_rps = max(r.requests_per_sec for r in bare.rounds)
    per_request_us = 1e6 / best_rps
    row = cost["/local"]
    estimate = {
        str(n): row[f"overhead-{n}"] / (per_request_us + row[f"overhead-{n}"]) * 100.0
        for n in (1, MANY_PREFIXES)
    }
    return {"us_per_request": cost, "bare_rps": best_rps, "estimated_pct_slower": estimate}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    packages = ("rr-middleware", "starlette", "uvicorn", "uvloop", "httptools", "aiohttp")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "packages": {p: version(p) for p in (*packages, "asgiproxy")},
        "wrk": f"wrk -t1 -c{args.connections} -d{args.duration}s --latency",
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of warm-up per target, 0: none (2)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="max_connections per upstream of the middleware target's pool "
        "(default: Pool's, 100; asgiproxy allows 20 requests in flight in all)",
    )
    parser.add_argument(
        "--no-micro",
        dest="micro",
        action="store_false",
        help="skip the in-process fall-through measurement (bench_micro.py, ~10 s)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.connections < 1 or args.warmup < 0:
        parser.error("--duration and --connections must be > 0, --rounds >= 1, --warmup >= 0")
    if args.max_connections is not None and args.max_connections < 1:
        parser.error("--max-connections must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    env = environment(args)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="rr-bench-") as tmp:
        try:
            started = start_all(Path(tmp), servers, args.max_connections)
            progress("servers: " + ", ".join(f"{s.name}={s.port}" for s in servers))
            results = measure(started, args)
            env["loadavg_at_end"] = os.getloadavg()
        except (BenchError, WrkError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_servers(servers)
        problems = log_problems(servers)

    comparisons = compare(results)
    micro: dict[str, Any] | None = None
    if args.micro:
        progress("in-process fall-through cost (bench_micro.py)...")
        micro = micro_estimate(bench_micro.fallthrough_cost(), results["bare"])
    print()
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration}s --latency; {args.rounds} rounds, "
        f"medians; {env['cpus']} CPUs, 1-min load {env['loadavg_at_start'][0]:.2f} at start, "
        f"{env['loadavg_at_end'][0]:.2f} at end"
    )
    if args.max_connections is not None:
        print(f"middleware target: max_connections={args.max_connections} per upstream")
    print(render(results, comparisons))
    if micro is not None:
        print()
        print(bench_micro.render(micro["us_per_request"]))
        print(
            f"estimated fall-through slowdown of a server doing {micro['bare_rps']:.0f} req/s "
            f"(best bare round): {micro['estimated_pct_slower']['1']:+.1f}% with 1 prefix, "
            f"{micro['estimated_pct_slower']['50']:+.1f}% with {MANY_PREFIXES} "
            f"(goal <= {FALL_THROUGH_GOAL_PCT:g}%)"
        )
    for name, lines in problems.items():
        print(f"\n{name} logged {len(lines)} warning/error line(s), first ones:")
        print(_indent(lines[:10]))

    if args.json is not None:
        payload = {
            "config": {
                "duration_s": args.duration,
                "rounds": args.rounds,
                "connections": args.connections,
                "warmup_s": args.warmup,
                "middleware_max_connections": args.max_connections,
            },
            "environment": env,
            "targets": {name: m.as_dict() for name, m in results.items()},
            "comparisons": comparisons,
            "in_process_fallthrough": micro,
            "server_log_problems": problems,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 1 if any(m.errors for m in results.values()) or problems else 0


def _indent(lines: list[str]) -> str:
    return "\n".join("    " + line for line in lines)


if __name__ == "__main__":
    sys.exit(main())
