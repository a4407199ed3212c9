"""Where a proxied GET's CPU goes: measured by steps, then sampled by stage.

    python benchmarks/profile_proxy.py [--duration 5] [--rounds 3] [--connections 32]
        [--profile-seconds 10] [--rate 997] [--no-profile] [--baseline DIR] [--json PATH]

**Steps** (measured): five servers, each uvicorn + uvloop + httptools with one worker,
answer the same 13-byte response, each with more of the proxy in it, loaded in turn by
``wrk -t1 -c{connections}`` for ``--rounds`` alternating rounds; each figure is the
server's CPU (user + system, from /proc) over the requests wrk completed:

1. ``asgi``: a bare ASGI app (``stage_apps.asgi_app``): the server's own floor;
2. ``bare``: a Starlette route (``bench_apps.bare_app``): the app the proxy is compared with;
3. ``instant``: Starlette + RoundRobinMiddleware whose transport answers at once
   in-process (``stage_apps.instant_app``): the proxy without its upstream leg;
4. ``least``: the least any ASGI proxy must do for a GET (``stage_apps.least_app``): a
   bare ASGI app forwarding it on a kept-alive connection, with no feature and no check;
5. ``proxy``: the benchmark's proxy (``bench_apps.middleware_app``) in front of two
   uvicorn upstreams.

``least / bare`` is the lowest ratio any Python proxy can reach on this server (the goal
is ``proxy / bare``); ``proxy / least`` is what rr-middleware's features and safety cost.
Differences of medians give the middleware's own cost in a server (3 - 1) and the upstream
leg's (5 - 3: the request written and the response read on a second socket, the parser,
the connection pool, the extra turn of the event loop and the wake-ups it costs).

**Stages** (sampled, unless ``--no-profile``): py-spy samples the proxy under the same
load with ``--native --gil`` (only while it runs Python or C called from it, with the
GIL: the event loop's waits are left out), and each sample is charged to one stage: the
innermost frame of its stack that belongs to a stage in ``STAGES`` (by file and function),
else the server's and the event loop's own work. Shares are of the sampled time; the
microseconds beside them spread the proxy's measured CPU per request in those shares, so
the kernel's work a stage causes outside its own calls is only approximated. py-spy stops
the process for each sample: shares, not speed, are what that run measures.

``--baseline DIR`` runs every rr_middleware server importing it from ``DIR`` (``git
archive <commit> rr_middleware | tar -x -C DIR``). Needs ``wrk``, and ``py-spy`` (the
``bench`` extra) with ptrace rights (root, or ``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import bench_proxy
import wrk_runner
from bench_proxy import Server, start_server, stop_servers, wait_ready
from run_all import tree_cpu_seconds

#: (stage, file suffix, function names or None for any function of the file). The
#: innermost frame matching an entry names the sample's stage; the order below only
#: breaks ties within one frame.
STAGES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("counters and health", "rr_middleware/members.py", None),
    ("counters and health", "rr_middleware/counters.py", None),
    ("counters and health", "rr_middleware/health.py", None),
    ("counters and health", "rr_middleware/zone.py", None),
    ("counters and health", "rr_middleware/zone_link.py", None),
    ("counters and health", "rr_middleware/pool_runtime.py", frozenset({"succeeded", "failed"})),
    ("counters and health", "rr_middleware/attempt.py", frozenset({"__aexit__", "_record"})),
    ("pick and slot", "rr_middleware/balancing.py", None),
    ("pick and slot", "rr_middleware/affinity.py", None),
    ("pick and slot", "rr_middleware/pool_runtime.py", frozenset({"pick", "attempt"})),
    ("pick and slot", "rr_middleware/attempt.py", frozenset({"__aenter__", "__init__"})),
    ("request headers", "rr_middleware/headers.py", frozenset({"request_headers"})),
    ("request headers", "rr_middleware/forwarding.py", frozenset({"upstream_headers"})),
    ("response headers", "rr_middleware/headers.py", frozenset({"response_headers"})),
    ("response headers", "rr_middleware/rewrite.py", None),
    ("routing", "rr_middleware/routing.py", None),
    ("routing", "rr_middleware/matching.py", None),
    ("routing", "rr_middleware/middleware.py", frozenset({"__call__", "_match"})),
    ("client side", "rr_middleware/client.py", None),
    ("connection checkout", "rr_middleware/transport/http1.py", frozenset({"take_idle"})),
    ("connection checkout", "rr_middleware/transport/http1.py", frozenset({"release", "forget"})),
    ("connection checkout", "rr_middleware/transport/http1_connection.py", frozenset({"idle"})),
    (
        "request write",
        "rr_middleware/transport/http1.py",
        frozenset({"_head", "_exchange", "send"}),
    ),
    ("response parse", "rr_middleware/transport/http1_connection.py", None),
    ("response relay", "rr_middleware/transport/http1.py", frozenset({"read", "aclose"})),
    ("response relay", "rr_middleware/forwarding.py", frozenset({"_relay", "_stream"})),
    ("request setup", "rr_middleware/forwarding.py", None),
    ("request setup", "rr_middleware/attempt.py", None),
    ("request setup", "rr_middleware/pool_runtime.py", None),
    ("request setup", "rr_middleware/", None),
    ("starlette (ServerErrorMiddleware, app)", "starlette/", None),
    ("uvicorn: request in, response out", "uvicorn/protocols/http/", None),
    ("uvicorn: other", "uvicorn/", None),
)
#: What a sample with no stage frame is: the event loop, the server, the interpreter.
OTHER = "event loop and rest"


def stage_of(stack: str) -> str:
    """The stage of one collapsed stack (``frame;frame;...``, outermost first); a frame
    reads ``function (file:line)``."""
    for frame in reversed(stack.split(";")):
        qualified, _, where = frame.partition(" (")
        function = qualified.rsplit(".", 1)[-1]  # py-spy names methods Class.method
        path = where.rsplit(":", 1)[0]
        for stage, suffix, functions in STAGES:
            if suffix in path and (functions is None or function in functions):
                return stage
    return OTHER


def shares(raw: Path) -> Counter[str]:
    """Samples per stage from py-spy's ``--format raw`` output (a count per stack)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack)] += int(count)
    return counts


#: The steps: name, app factory (``serve.py``'s argument), path.
STEPS = (
    ("asgi", "stage_apps:asgi_app", "/hello"),
    ("bare", "bare_app", "/local"),
    ("instant", "stage_apps:instant_app", "/api/hello"),
    ("least", "stage_apps:least_app", "/api/hello"),
    ("proxy", "middleware_app", "/api/hello"),
)


def cpu_per_request(server: Server, url: str, connections: int, duration: int) -> float:
    """Microseconds of the server's CPU per request over one wrk run."""
    before = tree_cpu_seconds(server.process.pid)
    result = wrk_runner.run(url, connections=connections, duration=duration)
    used = tree_cpu_seconds(server.process.pid) - before
    return used / max(result.requests, 1) * 1e6


def steps(servers: dict[str, Server], args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU µs per request of each step, per round (the steps in turn in each round)."""
    urls = {name: servers[name].base_url + path for name, _, path in STEPS}
    for url in urls.values():
        wrk_runner.run(url, connections=args.connections, duration=1)  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(args.rounds):
        for name, url in urls.items():
            cpu = cpu_per_request(servers[name], url, args.connections, args.duration)
            rounds[name].append(cpu)
    return rounds


def render_steps(rounds: dict[str, list[float]]) -> str:
    median = {name: statistics.median(values) for name, values in rounds.items()}
    lines = [f"{'step':<44} {'CPU µs/request':>14}   per round"]
    for name, values in rounds.items():
        per = " ".join(f"{v:.0f}" for v in values)
        lines.append(f"{name:<44} {median[name]:>14.1f}   {per}")
    differences = (
        ("Starlette route (bare - asgi)", "bare", "asgi"),
        ("middleware, no upstream leg (instant - asgi)", "instant", "asgi"),
        ("upstream leg (proxy - instant)", "proxy", "instant"),
    )
    ratios = (
        ("proxy / bare (goal <= 1.4x)", "proxy", "bare"),
        ("least forwarder / bare", "least", "bare"),
        ("proxy / least forwarder", "proxy", "least"),
    )
    for rows, divide in ((differences, False), (ratios, True)):
        for what, a, b in rows:
            pairs = list(zip(rounds[a], rounds[b], strict=True))
            if divide:
                figure = f"{median[a] / median[b]:>13.2f}x"
                per = " ".join(f"{x / y:.2f}" for x, y in pairs)
            else:
                figure = f"{median[a] - median[b]:>14.1f}"
                per = " ".join(f"{x - y:.0f}" for x, y in pairs)
            lines.append(f"{what:<44} {figure}   {per}")
    return "\n".join(lines)


def profile(server: Server, url: str, args: argparse.Namespace, raw: Path) -> int:
    """py-spy on ``server`` while wrk loads it; returns the requests wrk completed."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [py_spy, "record", "--format", "raw", "--native", "--gil"]
    command += ["--rate", str(args.rate), "--duration", str(args.profile_seconds + 1)]
    command += ["--pid", str(server.process.pid)]
    command += ["--output", str(raw)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # py-spy attaches before the load starts
        result = wrk_runner.run(url, connections=args.connections, duration=args.profile_seconds)
        _, err = spy.communicate(timeout=args.profile_seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not raw.exists():
        raise bench_proxy.BenchError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    return result.requests


def render(counts: Counter[str], cpu_us: float) -> str:
    total = sum(counts.values()) or 1
    lines = [f"{'stage':<40} {'share':>7} {'µs/request':>11}"]
    for stage, count in counts.most_common():
        share = count / total
        lines.append(f"{stage:<40} {share:>6.1%} {share * cpu_us:>11.1f}")
    lines.append(f"{'the proxy (CPU per request, measured)':<40} {'100%':>7} {cpu_us:>11.1f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--profile-seconds", type=int, default=10, help="py-spy's run (10)")
    parser.add_argument("--rate", type=int, default=997, help="py-spy samples per second")
    parser.add_argument("--no-profile", action="store_true", help="the steps only")
    parser.add_argument("--baseline", type=Path, help="import rr_middleware from DIR")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started: list[Server] = []
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="rr-profile-") as tmp:
        log_dir = Path(tmp)
        try:
            upstreams = [
                start_server(
                    f"upstream{i}", "upstream_app", {"BENCH_NAME": f"u{i}"}, log_dir, started
                )
                for i in (1, 2)
            ]
            for upstream in upstreams:
                wait_ready(upstream, "/hello")
            env = {"BENCH_UPSTREAMS": ",".join(u.base_url for u in upstreams)}
            if args.baseline is not None:
                env["PYTHONPATH"] = str(args.baseline.resolve())
            servers = {
                name: start_server(name, factory, env, log_dir, started)
                for name, factory, _ in STEPS
            }
            for name, _, path in STEPS:
                wait_ready(servers[name], path)
            rounds = steps(servers, args)
            if not args.no_profile:
                raw = args.raw or log_dir / "stacks.txt"
                profile(servers["proxy"], servers["proxy"].base_url + "/api/hello", args, raw)
                counts = shares(raw)
        finally:
            # The proxies first, so none sees its upstreams go away under load.
            stop_servers(started[2:])
            stop_servers(started[:2])
    print(render_steps(rounds))
    cpu_us = statistics.median(rounds["proxy"])
    if counts:
        print()
        print(render(counts, cpu_us))
    if args.json is not None:
        total = sum(counts.values()) or 1
        figures = {stage: count / total for stage, count in counts.items()}
        args.json.write_text(json.dumps({"steps": rounds, "shares": figures}, indent=2))
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).parent)
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
