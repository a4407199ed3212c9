"""Every performance target of the project in one run, as one table of figures and ratios.

    .venv/bin/python benchmarks/run_all.py [--only throughput,post,stream,pick,fallthrough,accept]
        [--duration 4] [--rounds 3] [--warmup 1] [--connections 32,256] [--quick]
        [--stream-mib 1024] [--slow-seconds 8] [--fallthrough-rounds 8]
        [--proxy-command TEMPLATE] [--default-malloc] [--json PATH] [--write-page PATH]

Sections (see benchmarks/README.md and docs/performance.md): ``throughput`` small GETs
through a pool of 2 at each ``--connections`` (rr-middleware, asgiproxy, nginx, direct, the
bare app; everything on; rr-gateway with 1 and 2 workers, the latter with and without its
zone; rr-gateway and the bare app under granian when granian is installed), ``post``
64 KiB POST / 1 MiB answer, ``stream`` 1 GiB down, up and chunked up through each proxy and
the smallest ASGI forwarder under uvicorn and granian, plus a slow reader, ``pick`` time
per pick by pool size, ``fallthrough`` a route that matches no prefix, bare and with the
middleware in one server process, ``accept`` the proxy on uvloop and on the gateway's loop
(256 connections opened at once; one request per connection). Contenders of a section run
in alternating rounds within seconds of each other; figures are medians; ratios are of
medians, each round's own ratio beside them. ``--write-page`` renders the table into the docs' page.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench_micro
import bench_pick
import bench_stream
import nginx_ref
import wrk_runner
from bench_apps import POST_RESPONSE_BYTES
from bench_proxy import (
    BENCH_DIR,
    READY_DEADLINE_S,
    BenchError,
    Measurement,
    Reply,
    Server,
    Target,
    _bound_socket,
    environment,
    http_get,
    log_problems,
    progress,
    spawn,
    start_server,
    stop_servers,
    wait_ready,
)
from report import Row, check_page, machine_line, render, write_page
from wrk_runner import WrkError

from rr_middleware.zone import ZONE_ENV

MIB = 1024 * 1024
SECTIONS = ("throughput", "post", "stream", "pick", "fallthrough", "accept")
DEFAULT_PROXY_COMMAND = "{python} {bench}/serve.py {fd} middleware_app --workers {workers}"
#: glibc malloc thresholds every server runs with (unless --default-malloc). By default
#: glibc moves them as the process frees large blocks, so whether uvicorn's 256 KiB body
#: buffers are recycled or page-faulted afresh (after the heap top is trimmed) depends on
#: what the process did before: a direct 1 GiB upload then runs at 1 or at 4 GiB/s.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 * MIB), "MALLOC_TRIM_THRESHOLD_": str(8 * MIB)}
#: wrk runs that reported socket errors or non-2xx/3xx answers.
FLAGGED: list[str] = []


# --- processes -------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """A process and its children (uvicorn's or granian's workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used by a process and its children (uvicorn's or granian's workers)."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_granian(
    name: str, factory: str, env: dict[str, str], log_dir: Path, servers: list[Server]
) -> Server:
    """granian's own command serving ``bench_apps.<factory>()`` as the gateway runs it:
    ASGI with its lifespan, HTTP/1.1, one worker, granian's default event loop and
    threads, the gateway's backlog (2048), no access log."""
    sock = _bound_socket()
    port = sock.getsockname()[1]
    sock.close()  # granian binds it itself
    argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--factory"]
    argv += ["--http", "1", "--workers", "1", "--backlog", "2048", "--no-access-log"]
    argv += ["--log-level", "warning", "--working-dir", str(BENCH_DIR)]
    argv += ["--host", "127.0.0.1", "--port", str(port), f"bench_apps:{factory}"]
    return spawn(name, argv, port, log_dir, servers, env)


def start_proxy(
    name: str,
    template: str,
    workers: int,
    env: dict[str, str],
    log_dir: Path,
    servers: list[Server],
) -> Server:
    """Start an rr-middleware proxy with ``template``: placeholders {python}, {bench},
    {fd} (a listening socket the harness passes down) or {port} (the command binds it
    itself), {workers} and {upstreams} (comma-separated URLs, also in BENCH_UPSTREAMS)."""
    sock = _bound_socket()
    fd, port = sock.fileno(), sock.getsockname()[1]
    argv = shlex.split(
        template.format(
            python=sys.executable,
            bench=BENCH_DIR,
            fd=fd,
            port=port,
            workers=workers,
            upstreams=env["BENCH_UPSTREAMS"],
        )
    )
    if "{fd}" not in template:
        sock.close()  # the command binds the port itself
        return spawn(name, argv, port, log_dir, servers, env)
    try:
        return spawn(name, argv, port, log_dir, servers, env, (fd,))
    finally:
        sock.close()  # the child holds its own copy


def start_gateway(
    name: str,
    workers: int,
    upstreams: str,
    log_dir: Path,
    servers: list[Server],
    server: str = "uvicorn",
    env: dict[str, str] | None = None,
) -> Server:
    """``rr-gateway`` (``python -m rr_middleware``) with ``workers`` processes in front of
    ``upstreams`` under ``server`` (uvicorn or granian), configured the way a user would:
    a TOML file. Every gateway serves its status JSON at ``/status.json`` (the harness
    reads its zone there), so all of them carry the same configuration."""
    config = log_dir / f"{name}.toml"
    urls = ", ".join(f'"{u}"' for u in upstreams.split(","))
    config.write_text(
        f'[server]\nserver = "{server}"\nworkers = {workers}\nlog_level = "warning"\n\n'
        f'[middleware]\nstatus_path = "/status"\n\n'
        f'[pools."/api"]\nupstreams = [{urls}]\n'
    )
    sock = _bound_socket()
    port = sock.getsockname()[1]
    sock.close()  # the gateway binds it itself
    argv = [sys.executable, "-m", "rr_middleware", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    return spawn(name, argv, port, log_dir, servers, env)


def gateway_zone(server: Server) -> dict[str, Any] | None:
    """The zone a gateway's worker reports in its status JSON (None: no zone)."""
    reply = http_get(server.base_url, "/status.json", 10.0)
    if reply.status != 200:
        raise BenchError(f"{server.name}: GET /status.json -> {reply.status}")
    zone: dict[str, Any] | None = json.loads(reply.body)["zone"]
    return zone


# --- wrk rounds ------------------------------------------------------------------------


def wrk_rounds(
    targets: Sequence[tuple[Target, Server]],
    args: argparse.Namespace,
    connections: int,
    script: str | None = None,
    timeout_s: int | None = None,
    title: str = "",
    rounds: int | None = None,
    duration: int | None = None,
    alternate: bool = False,
    threads: int = 1,
    subject_errors: frozenset[str] = frozenset(),
) -> dict[str, Measurement]:
    """Warm every target up, then ``rounds`` (default ``--rounds``) rounds of ``duration``
    seconds (``--duration``) each running every target once; ``alternate``: every other
    round runs them in the reverse order, so a drift of the machine within a round does
    not always favour the same target. Errors of the targets in ``subject_errors`` are
    what a row measures, not flagged."""
    results = {t.name: Measurement(t, s.base_url + t.path) for t, s in targets}
    pids = {t.name: s.process.pid for t, s in targets}

    def run(m: Measurement, duration: int) -> wrk_runner.WrkResult:
        return wrk_runner.run(
            m.url,
            duration=duration,
            connections=connections,
            threads=threads,
            script=script,
            timeout_s=timeout_s,
        )

    if args.warmup > 0:
        for m in results.values():
            m.warmup = run(m, args.warmup)
    for round_no in range(1, (rounds or args.rounds) + 1):
        order = list(results.items())
        if alternate and round_no % 2 == 0:
            order.reverse()
        for name, m in order:
            before = tree_cpu_seconds(pids[name])
            result = run(m, duration or args.duration)
            m.cpu_us.append((tree_cpu_seconds(pids[name]) - before) * 1e6 / max(result.requests, 1))
            m.rounds.append(result)
            if result.errors and name not in subject_errors:
                FLAGGED.append(f"{title} round {round_no} {name}: {result.errors} errors")
            flag = f"  ERRORS {result.errors}" if result.errors else ""
            progress(
                f"{title} round {round_no} {name:<20} {result.requests_per_sec:>9.0f} req/s"
                f"  p99 {result.p99_ms:.2f} ms{flag}"
            )
    return results


def paired(a: Measurement, b: Measurement) -> list[float]:
    return [
        x.requests_per_sec / y.requests_per_sec for x, y in zip(a.rounds, b.rounds, strict=True)
    ]


def compared(
    target: str, what: str, figure: str, reference: str, a: Measurement, b: Measurement
) -> Row:
    """A row for information (no goal): ``a``'s request rate over ``b``'s, per round too."""
    return Row(target, what, figure, reference, a.rps / b.rps, "", None, paired(a, b))


def rps(m: Measurement) -> str:
    return f"{m.rps:,.0f} req/s, p99 {m.p99_ms:.1f} ms"


# --- sections --------------------------------------------------------------------------


def throughput(ctx: Context) -> list[Row]:
    s, args = ctx.servers, ctx.args
    rows: list[Row] = []
    specs = [
        ("direct", "upstream1", "/hello"),
        ("bare", "bare", "/local"),
        ("asgi-floor", "asgi", "/hello"),
        ("rr-instant", "instant", "/api/hello"),
        ("least-forwarder", "least", "/api/hello"),
        ("rr-middleware", "rr", "/api/hello"),
        ("asgiproxy", "asgiproxy", "/api/hello"),
        ("nginx", "nginx", "/api/hello"),
        ("rr-everything", "rr-all", "/api/hello"),
        ("rr-gateway", "rr-gw1", "/api/hello"),
        ("rr-gateway-2w", "rr-gw2", "/api/hello"),
        ("rr-gateway-2w-nozone", "rr-gw2-nozone", "/api/hello"),
        ("rr-gateway-granian", "rr-gwg", "/api/hello"),
        ("bare-granian", "bare-granian", "/local"),
        ("rr-baseline", "rr-base", "/api/hello"),
    ]
    targets = [(Target(n, n, srv, p, b""), s[srv]) for n, srv, p in specs if srv in s]
    for c in args.connection_levels:
        r = wrk_rounds(targets, args, c, title=f"GET -c{c}")
        ctx.raw[f"throughput_c{c}"] = {k: m.as_dict() for k, m in r.items()}
        rows += _goal1_rows(r, c)
        rows += _step_rows(r, c)
        rows += _goal6_rows(r, c)
        rows += _gateway_rows(r, c, args.workers)
    return rows


def cpu_paired(a: Measurement, b: Measurement) -> list[float]:
    """``a``'s CPU per request over ``b``'s, round by round."""
    return [x / y for x, y in zip(a.cpu_us, b.cpu_us, strict=True)]


def _goal1_rows(r: dict[str, Measurement], c: int) -> list[Row]:
    rr, ap, d = r["rr-middleware"], r["asgiproxy"], r["direct"]
    t = f"   GET -c{c}"
    # Goal 2 of round two: at 256 connections >= 1.5x asgiproxy in every round; other
    # levels keep round one's goal on the medians.
    every = c == 256
    versus = paired(rr, ap)
    rows = [
        Row(
            f"2. GET -c{c}" if every else t,
            "rr-middleware",
            rps(rr),
            "asgiproxy " + rps(ap),
            rr.rps / ap.rps,
            ">= 1.5x every round" if every else ">= 1.5x",
            min(versus) >= 1.5 if every else rr.rps >= 1.5 * ap.rps,
            versus,
        ),
        Row(
            f"2. GET -c{c}" if every else t,
            "p99 rr / asgiproxy",
            f"{rr.p99_ms:.2f} ms",
            f"{ap.p99_ms:.2f} ms",
            rr.p99_ms / ap.p99_ms,
            "<= 1.0x",
            rr.p99_ms <= ap.p99_ms,
        ),
    ]
    if "nginx" in r:
        ng = r["nginx"]
        rows.append(
            Row(
                t,
                "rr vs nginx",
                "",
                "nginx " + rps(ng),
                rr.rps / ng.rps,
                ">= 0.35x (aim)",
                rr.rps >= 0.35 * ng.rps,
                paired(rr, ng),
            )
        )
    rows.append(
        Row(t, "rr vs direct", "", "direct " + rps(d), rr.rps / d.rps, "", None, paired(rr, d))
    )
    if "nginx" in r:
        rows.append(
            compared(t, "nginx vs direct", "", "(issue: 30.5k/36.2k = 0.84x)", r["nginx"], d)
        )
    rows.append(
        Row(
            t,
            "CPU per request",
            f"rr {rr.cpu_us_per_request:.0f} us",
            f"asgiproxy {ap.cpu_us_per_request:.0f} us",
            rr.cpu_us_per_request / ap.cpu_us_per_request,
            "",
            None,
            cpu_paired(rr, ap),
        )
    )
    if "bare" in r:
        # The reference a proxied GET is held to: the CPU a bare Starlette app on the same
        # server (uvicorn, one worker) spends answering a request itself.
        bare = r["bare"]
        ratio = rr.cpu_us_per_request / bare.cpu_us_per_request
        rows.append(
            Row(
                f"1. GET -c{c}",
                "proxy CPU vs bare app CPU",
                f"rr {rr.cpu_us_per_request:.0f} us/req",
                f"bare app {bare.cpu_us_per_request:.0f} us/req, {rps(bare)}",
                ratio,
                "<= 1.4x",
                ratio <= 1.4,
                cpu_paired(rr, bare),
            )
        )
        if "least-forwarder" in r:
            # How low goal 1's ratio can go: the least any ASGI proxy must do for a GET
            # (``stage_apps.least_app``: no feature, no check) against the same bare app;
            # then what rr-middleware costs over that least.
            least = r["least-forwarder"]
            for what, a, b, figure, reference in (
                (
                    "least forwarder CPU vs bare app CPU",
                    least,
                    bare,
                    f"least {least.cpu_us_per_request:.0f} us/req, {rps(least)}",
                    f"bare app {bare.cpu_us_per_request:.0f} us/req",
                ),
                (
                    "proxy CPU vs least forwarder CPU",
                    rr,
                    least,
                    f"rr {rr.cpu_us_per_request:.0f} us/req",
                    f"least {least.cpu_us_per_request:.0f} us/req",
                ),
            ):
                ratio = a.cpu_us_per_request / b.cpu_us_per_request
                rows.append(
                    Row(f"1. GET -c{c}", what, figure, reference, ratio, "", None, cpu_paired(a, b))
                )
    return rows


def _step_rows(r: dict[str, Measurement], c: int) -> list[Row]:
    """Where the proxy's CPU per request goes, as differences of measured steps: the
    server with a bare ASGI app, a Starlette route, the proxy whose upstream leg answers
    at once in-process, the proxy (``profile_proxy.py`` samples the stages within). Per
    round: the difference in µs."""
    if not {"asgi-floor", "rr-instant", "bare"} <= r.keys():
        return []
    rr, bare = r["rr-middleware"], r["bare"]
    floor, instant = r["asgi-floor"], r["rr-instant"]

    def step(what: str, a: Measurement, b: Measurement) -> Row:
        per = [x - y for x, y in zip(a.cpu_us, b.cpu_us, strict=True)]
        extra = a.cpu_us_per_request - b.cpu_us_per_request
        share = extra / rr.cpu_us_per_request
        return Row(
            f"1. GET -c{c}",
            what,
            f"{extra:+.0f} us/req ({share:.0%} of rr's)",
            f"{a.cpu_us_per_request:.0f} - {b.cpu_us_per_request:.0f} us",
            None,
            "",
            None,
            per,
        )

    return [
        Row(
            f"1. GET -c{c}",
            "CPU step: server + bare ASGI app",
            f"{floor.cpu_us_per_request:.0f} us/req "
            f"({floor.cpu_us_per_request / rr.cpu_us_per_request:.0%} of rr's)",
            rps(floor),
            None,
            "",
            None,
            floor.cpu_us,
        ),
        step("CPU step: Starlette route (bare - asgi)", bare, floor),
        step("CPU step: middleware, no upstream leg", instant, floor),
        step("CPU step: upstream leg (rr - instant)", rr, instant),
    ]


def _goal6_rows(r: dict[str, Measurement], c: int) -> list[Row]:
    rows: list[Row] = []
    rr, ap = r["rr-middleware"], r["asgiproxy"]
    if "rr-everything" in r:
        ev = r["rr-everything"]
        rows.append(
            Row(
                f"   GET -c{c}",
                "everything on",
                f"{rps(ev)}, CPU {ev.cpu_us_per_request:.0f} us",
                f"rr-middleware, CPU {rr.cpu_us_per_request:.0f} us",
                ev.rps / rr.rps,
                ">= 0.90x",
                ev.rps >= 0.9 * rr.rps,
                paired(ev, rr),
            )
        )
        rows.append(
            Row(
                f"   GET -c{c}",
                "everything on vs asgiproxy",
                "",
                "asgiproxy",
                ev.rps / ap.rps,
                ">= 1.35x",
                ev.rps >= 1.35 * ap.rps,
                paired(ev, ap),
            )
        )
    if "rr-gateway-2w" in r and "rr-gateway-2w-nozone" in r:
        on, off = r["rr-gateway-2w"], r["rr-gateway-2w-nozone"]
        rows.append(
            compared(
                f"6. GET -c{c}",
                "shared state (zone) on vs off, req/s",
                f"zone on {rps(on)}",
                f"zone off {rps(off)}",
                on,
                off,
            )
        )
        rows.append(
            Row(
                f"6. GET -c{c}",
                "shared state (zone) on vs off, CPU/req",
                f"zone on {on.cpu_us_per_request:.0f} us",
                f"zone off {off.cpu_us_per_request:.0f} us",
                on.cpu_us_per_request / off.cpu_us_per_request,
                "",
                None,
                cpu_paired(on, off),
            )
        )
    return rows


def _gateway_rows(r: dict[str, Measurement], c: int, workers: int) -> list[Row]:
    """Contenders side by side: (row number, measure, this, that, that's label)."""
    pairs = (
        ("", "rr vs --baseline build", "rr-middleware", "rr-baseline", "baseline"),
        ("", f"rr-gateway {workers} workers vs 1", "rr-gateway-2w", "rr-gateway", "1 worker"),
        ("4.", "rr-gateway granian vs uvicorn", "rr-gateway-granian", "rr-gateway", "uvicorn"),
    )
    rows: list[Row] = []
    for number, what, a, b, label in pairs:
        if a in r and b in r:
            this, that = r[a], r[b]
            rows.append(
                compared(
                    f"{number:>2} GET -c{c}",
                    what,
                    f"{rps(this)}, CPU {this.cpu_us_per_request:.0f} us/req",
                    f"{label} {rps(that)}, CPU {that.cpu_us_per_request:.0f} us/req",
                    this,
                    that,
                )
            )
    if "rr-gateway" in r and "rr-gateway-granian" in r:
        rows += _granian_rows(r, c)
    return rows


def _granian_rows(r: dict[str, Measurement], c: int) -> list[Row]:
    """Goal 4: the rows of goal 1 for the gateway under each server, side by side."""
    g1, gg, ap = r["rr-gateway"], r["rr-gateway-granian"], r["asgiproxy"]
    rows = [
        compared(
            f"4. GET -c{c}",
            "rr-gateway on uvicorn vs asgiproxy",
            rps(g1),
            f"asgiproxy {rps(ap)}",
            g1,
            ap,
        ),
        compared(
            f"4. GET -c{c}",
            "rr-gateway on granian vs asgiproxy",
            rps(gg),
            f"asgiproxy {rps(ap)}",
            gg,
            ap,
        ),
    ]
    for server, gateway, bare in (("uvicorn", g1, "bare"), ("granian", gg, "bare-granian")):
        if bare in r:
            b = r[bare]
            rows.append(
                Row(
                    f"4. GET -c{c}",
                    f"{server}: gateway CPU vs bare app CPU",
                    f"rr-gateway {gateway.cpu_us_per_request:.0f} us/req",
                    f"bare app {b.cpu_us_per_request:.0f} us/req, {rps(b)}",
                    gateway.cpu_us_per_request / b.cpu_us_per_request,
                    "",
                    None,
                    cpu_paired(gateway, b),
                )
            )
    return rows


def post(ctx: Context) -> list[Row]:
    s, args = ctx.servers, ctx.args
    specs = [
        ("direct", "upstream1", "/post"),
        ("rr-middleware", "rr", "/api/post"),
        ("asgiproxy", "asgiproxy", "/api/post"),
        ("nginx", "nginx", "/api/post"),
        ("rr-baseline", "rr-base", "/api/post"),
        ("rr-gateway", "rr-gw1", "/api/post"),
        ("rr-gateway-granian", "rr-gwg", "/api/post"),
    ]
    targets = [(Target(n, n, srv, p, b""), s[srv]) for n, srv, p in specs if srv in s]
    c = args.post_connections
    for target, server in targets:  # every contender must really answer the 1 MiB
        reply = http_post(server.base_url, target.path, b"x" * 65536)
        if reply.status != 200 or len(reply.body) != POST_RESPONSE_BYTES:
            raise BenchError(
                f"{target.name}: POST {target.path} -> {reply.status}, "
                f"{len(reply.body)} bytes, expected 200 and {POST_RESPONSE_BYTES}"
            )
    r = wrk_rounds(
        targets, args, c, script=str(BENCH_DIR / "post.lua"), timeout_s=30, title=f"POST -c{c}"
    )
    ctx.raw["post"] = {k: m.as_dict() for k, m in r.items()}

    def mib(m: Measurement) -> str:
        return f"{m.rps * POST_RESPONSE_BYTES / MIB:,.0f} MiB/s ({m.rps:,.0f} req/s)"

    rr, ap, d = r["rr-middleware"], r["asgiproxy"], r["direct"]
    t = f"   POST 64K/1M -c{c}"
    rows = [
        Row(
            t,
            "rr-middleware",
            mib(rr),
            "asgiproxy " + mib(ap),
            rr.rps / ap.rps,
            ">= 1.0x",
            rr.rps >= ap.rps,
            paired(rr, ap),
        )
    ]
    rows.append(Row(t, "rr vs direct", "", "direct " + mib(d), rr.rps / d.rps, "", None))
    if "nginx" in r:
        rows.append(
            Row(t, "rr vs nginx", "", "nginx " + mib(r["nginx"]), rr.rps / r["nginx"].rps, "", None)
        )
    if "rr-gateway" in r and "rr-gateway-granian" in r:
        g1, gg = r["rr-gateway"], r["rr-gateway-granian"]
        rows.append(
            compared(
                f"4. POST 64K/1M -c{c}",
                "rr-gateway granian vs uvicorn",
                f"{mib(gg)}, CPU {gg.cpu_us_per_request:.0f} us/req",
                f"uvicorn {mib(g1)}, CPU {g1.cpu_us_per_request:.0f} us/req",
                gg,
                g1,
            )
        )
    if "rr-baseline" in r:
        b = r["rr-baseline"]
        rows.append(
            compared(
                t,
                "rr vs --baseline",
                f"CPU {rr.cpu_us_per_request:.0f} us/req",
                f"baseline {mib(b)}, CPU {b.cpu_us_per_request:.0f} us/req",
                rr,
                b,
            )
        )
    return rows


#: Stream contenders: (name in the rows, server, path prefix). "proxy" is rr-middleware in
#: a Starlette app under uvicorn (serve.py); "gateway" rr-gateway with one worker under
#: uvicorn, "gateway-granian" the same file under granian; "floor" and "floor-granian" the
#: smallest ASGI forwarder (bench_apps.forwarder_app) under each server.
STREAM_CONTENDERS = (
    ("direct", "upstream1", ""),
    ("proxy", "rr-stream", "/api"),
    ("baseline", "rr-base", "/api"),
    ("floor", "asgi-floor", "/api"),
    ("gateway", "rr-gw-stream", "/api"),
    ("gateway-granian", "rr-gwg-stream", "/api"),
    ("floor-granian", "asgi-floor-granian", "/api"),
)
STREAM_MOVES = (
    ("download", "/download", bench_stream.download),
    ("upload", "/upload", bench_stream.upload),
    ("chunked upload", "/upload", bench_stream.chunked_upload),
)


class StreamRuns:
    """Per transfer kind and contender: MiB/s and the server's CPU s/GiB per round, and
    the peak RSS growth of its process tree over the rounds."""

    def __init__(self) -> None:
        kinds = [kind for kind, _, _ in STREAM_MOVES]
        self.rates: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
        self.cpu: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
        self.growth: dict[str, dict[str, int]] = {kind: {} for kind in kinds}

    def rate(self, kind: str, name: str) -> float:
        return statistics.median(self.rates[kind][name])

    def cpu_s(self, kind: str, name: str) -> float:
        return statistics.median(self.cpu[kind][name])

    def per_round(self, kind: str, a: str, b: str) -> list[float]:
        pairs = zip(self.rates[kind][a], self.rates[kind][b], strict=True)
        return [x / y for x, y in pairs]

    def figure(self, kind: str, name: str) -> str:
        return f"{self.rate(kind, name):,.0f} MiB/s, {self.cpu_s(kind, name):.2f} CPU s/GiB"


def stream(ctx: Context) -> list[Row]:
    s, args = ctx.servers, ctx.args
    nbytes = args.stream_mib * MIB
    contenders = {name: (s[srv], prefix) for name, srv, prefix in STREAM_CONTENDERS if srv in s}
    runs = StreamRuns()
    for round_no in range(1, args.stream_rounds + 1):
        for kind, path, move in STREAM_MOVES:
            for name, (server, prefix) in contenders.items():
                pids = tree_pids(server.process.pid)
                before = tree_cpu_seconds(server.process.pid)
                with bench_stream.PeakRss(*pids) as rss:
                    transfer = move(server.port, prefix + path, nbytes)
                used = tree_cpu_seconds(server.process.pid) - before
                runs.rates[kind].setdefault(name, []).append(transfer.mib_per_s)
                runs.cpu[kind].setdefault(name, []).append(used / (nbytes / 1024 / MIB))
                runs.growth[kind][name] = max(runs.growth[kind].get(name, 0), rss.growth)
            progress(
                f"stream round {round_no} {kind}: "
                + ", ".join(f"{n} {v[-1]:.0f}" for n, v in runs.rates[kind].items())
                + " MiB/s"
            )
    proxy, up = s["rr-stream"], s["upstream1"]
    slow = bench_stream.slow_download(
        proxy.port,
        "/api/download",
        {"upstream1": up.port, "upstream2": s["upstream2"].port},
        proxy.process.pid,
        rate=MIB,
        seconds=args.slow_seconds,
    )
    ctx.raw["stream"] = {
        "mib_per_s": runs.rates,
        "cpu_s_per_gib": runs.cpu,
        "rss_growth_bytes": runs.growth,
        "slow": slow.__dict__,
    }
    rows: list[Row] = []
    for kind, _, _ in STREAM_MOVES:
        rows += _stream_rows(f"3. stream {args.stream_mib} MiB", kind, runs)
    return rows + _slow_rows(slow)


def _stream_rows(t: str, kind: str, runs: StreamRuns) -> list[Row]:
    have = runs.rates[kind]

    def versus(a: str, b: str, what: str, goal: str, least: float | None) -> Row:
        ratio = runs.rate(kind, a) / runs.rate(kind, b)
        met = None if least is None else ratio >= least
        label = {"direct": "direct", "baseline": "baseline"}.get(b, b.replace("-", " "))
        reference = f"{label} {runs.figure(kind, b)}"
        return Row(
            t, what, runs.figure(kind, a), reference, ratio, goal, met, runs.per_round(kind, a, b)
        )

    rows = [versus("proxy", "direct", f"{kind} via proxy", ">= 0.50x", 0.5)]
    if "floor" in have:
        rows.append(
            versus("proxy", "floor", f"{kind}, rr vs bare ASGI forwarder", ">= 0.95x", 0.95)
        )
    if "baseline" in have:
        rows.append(versus("proxy", "baseline", f"{kind}, rr vs --baseline", "", None))
    if "gateway" in have:
        rows.append(
            versus("gateway", "direct", f"{kind} via rr-gateway (uvicorn)", ">= 0.50x", 0.5)
        )
    if "gateway-granian" in have:
        g = "gateway-granian"
        rows.append(versus(g, "direct", f"{kind} via rr-gateway on granian", ">= 0.50x", 0.5))
        if "floor-granian" in have:
            rows.append(
                versus(
                    g, "floor-granian", f"{kind}, granian: rr vs bare forwarder", ">= 0.95x", 0.95
                )
            )
        if "gateway" in have:
            rows.append(versus(g, "gateway", f"{kind}, rr-gateway granian vs uvicorn", "", None))
    for name in ("proxy", "gateway", "gateway-granian"):
        if name in have:
            growth = runs.growth[kind][name]
            rows.append(
                Row(
                    t,
                    f"peak RSS growth, {kind}, {name}",
                    f"{growth / MIB:.1f} MiB",
                    f"CPU {runs.cpu_s(kind, name):.2f} s/GiB",
                    None,
                    "< 64 MiB",
                    growth < 64 * MIB,
                )
            )
    return rows


def _slow_rows(slow: bench_stream.SlowRead) -> list[Row]:
    return [
        Row(
            "3. slow reader 1 MiB/s",
            f"{slow.seconds:.0f} s: RSS growth",
            f"{slow.rss_growth / MIB:.1f} MiB",
            "",
            None,
            "< 64 MiB",
            slow.rss_growth < 64 * MIB,
        ),
        Row(
            "3. slow reader 1 MiB/s",
            "upstream ahead of client",
            f"{slow.ahead / MIB:.1f} MiB",
            f"client read {slow.client_read / MIB:.1f} MiB",
            None,
            "< 32 MiB",
            slow.ahead < 32 * MIB,
        ),
        Row(
            "3. slow reader 1 MiB/s",
            "upstream rate, 2nd half",
            f"{slow.late_rate / MIB:.2f} MiB/s",
            "client 1 MiB/s",
            slow.late_rate / MIB,
            "",  # kernel socket buffers still grow in the first seconds: shown, not judged
            None,
        ),
    ]


def pick(ctx: Context) -> list[Row]:
    picks = 5_000 if ctx.args.quick else 20_000
    results = bench_pick.measure(picks, 3 if ctx.args.quick else 7)
    ctx.raw["pick_ns"] = results
    rows = []
    for label in ("round_robin, weights 1/2/5", "round_robin, equal weights", "least_requests"):
        row = results[label]
        values = [row[n] for n in bench_pick.SIZES]
        figure = " / ".join(f"{v:.0f}" for v in values) + " ns"
        rows.append(
            Row(
                "   pick 2/100/1k/10k",
                label,
                figure,
                "",
                max(values) / min(values),
                "<= 2x (max/min)",
                max(values) <= 2 * min(values),
            )
        )
    return rows


def fallthrough(ctx: Context) -> list[Row]:
    """Goal 5. The bare app and the same app with the middleware (1 and 50 prefixes) in
    one server process (``bench_apps.fallthrough_apps``), so the only difference between
    two runs is the middleware: many short rounds, alternating, the ratio taken per round."""
    s, args = ctx.servers, ctx.args
    specs = [
        ("bare", "/bare/local"),
        ("fallthrough-1", "/mw1/local"),
        ("fallthrough-50", "/mw50/local"),
    ]
    targets = [(Target(n, n, "ft", p, b""), s["ft"]) for n, p in specs]
    c = min(args.connection_levels)
    r = wrk_rounds(
        targets,
        args,
        c,
        title=f"fall-through -c{c}",
        rounds=args.fallthrough_rounds,
        duration=args.fallthrough_duration,
        alternate=True,
    )
    ctx.raw["fallthrough"] = {k: m.as_dict() for k, m in r.items()}
    bare, one, many = r["bare"], r["fallthrough-1"], r["fallthrough-50"]
    t = f"5. fall-through -c{c}"
    ratios = paired(one, bare)
    median = statistics.median(ratios)
    cpu = cpu_paired(one, bare)
    rows = [
        Row(
            t,
            "1 prefix vs bare, one process",
            slower(median),
            f"bare {rps(bare)}; rounds {min(ratios):.2f}-{max(ratios):.2f}x",
            median,
            "<= 3% slower",
            median >= 0.97,
            ratios,
        ),
        Row(
            t,
            "1 prefix vs bare, CPU/req",
            f"{one.cpu_us_per_request:.1f} us",
            f"bare {bare.cpu_us_per_request:.1f} us; rounds {min(cpu):.2f}-{max(cpu):.2f}x",
            statistics.median(cpu),
            "",
            None,
            cpu,
        ),
        Row(
            t,
            "50 prefixes vs 1, one process",
            slower(statistics.median(paired(many, one))),
            "",
            statistics.median(paired(many, one)),
            "~ 1.0x",
            None,
            paired(many, one),
        ),
    ]
    return rows + _micro_rows(args, bare)


#: The gateway's event loop (rr_middleware.accept) against uvloop's own accept.
ACCEPT_LOOPS = {"loop-uvloop": "uvloop", "loop-batch": "rr_middleware.accept:new_event_loop"}


def accept_section(ctx: Context) -> list[Row]:
    """The same proxy on uvloop and on the gateway's loop: 256 connections opened at
    once against a loaded proxy (wrk opens them at each run's start, from two threads),
    and one request per connection."""
    s, args = ctx.servers, ctx.args
    targets = [(Target(n, n, n, "/api/hello", b""), s[n]) for n in ACCEPT_LOOPS]
    burst = wrk_rounds(
        targets,
        args,
        256,
        title="accept: GET -c256",
        threads=2,
        alternate=True,
        subject_errors=frozenset({"loop-uvloop"}),  # its timeouts are the row's subject
    )
    single = wrk_rounds(
        targets,
        args,
        32,
        script=str(BENCH_DIR / "close.lua"),
        title="accept: Connection: close -c32",
        alternate=True,
    )
    ctx.raw["accept"] = {
        "burst": {k: m.as_dict() for k, m in burst.items()},
        "close": {k: m.as_dict() for k, m in single.items()},
    }
    new, old = burst["loop-batch"], burst["loop-uvloop"]
    one, one_old = single["loop-batch"], single["loop-uvloop"]
    t = "   accept"

    def timeouts(m: Measurement) -> int:
        return sum(r.socket_errors.get("timeout", 0) for r in m.rounds)

    return [
        Row(
            t + " GET -c256",
            "p99, 256 new connections, batch / uvloop",
            f"{new.p99_ms:.1f} ms, {timeouts(new)} wrk timeouts",
            f"uvloop {old.p99_ms:.1f} ms, {timeouts(old)} wrk timeouts",
            new.p99_ms / old.p99_ms,
            "no timeouts",
            timeouts(new) == 0,
            [a.p99_ms / b.p99_ms for a, b in zip(new.rounds, old.rounds, strict=True)],
        ),
        compared(
            t + " GET -c256", "req/s, batch / uvloop", rps(new), f"uvloop {rps(old)}", new, old
        ),
        compared(
            t + " close -c32",
            "one request per connection, batch / uvloop",
            f"{rps(one)}, CPU {one.cpu_us_per_request:.0f} us/req",
            f"uvloop {rps(one_old)}, CPU {one_old.cpu_us_per_request:.0f} us/req",
            one,
            one_old,
        ),
    ]


def slower(ratio: float) -> str:
    """A request-rate ratio as how much slower (or faster) the first one ran."""
    pct = (1 - ratio) * 100
    return f"{abs(pct):.1f}% {'slower' if pct >= 0 else 'faster'}"


def _micro_rows(args: argparse.Namespace, bare: Measurement) -> list[Row]:
    cost = bench_micro.fallthrough_cost(repeats=10 if args.quick else 40)
    local = cost["/local"]
    per_req = 1e6 / max(x.requests_per_sec for x in bare.rounds)
    est = local["overhead-1"] / (per_req + local["overhead-1"]) * 100
    return [
        Row(
            "5. fall-through in-process",
            "+us per request, 1 / 50 prefixes",
            f"+{local['overhead-1']:.2f} / +{local['overhead-50']:.2f} us",
            f"bare {local['bare']:.2f} us",
            None,
            "50 <= 1 (+0.3 us)",
            local["overhead-50"] <= local["overhead-1"] + 0.3,
        ),
        Row(
            "5. fall-through in-process",
            "estimated slowdown of bare",
            f"{est:+.1f}%",
            f"bare at {per_req:.0f} us/req",
            None,
            "<= 3%",
            est <= 3.0,
        ),
    ]


# --- driver ----------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace, servers: dict[str, Server]) -> None:
        self.args = args
        self.servers = servers
        self.raw: dict[str, Any] = {}


def start(args: argparse.Namespace, log_dir: Path, servers: list[Server]) -> dict[str, Server]:
    """Start the servers the chosen sections need, and wait until each answers."""
    want = set(args.only)
    by: dict[str, Server] = {}
    for name in ("upstream1", "upstream2"):
        by[name] = start_server(name, "upstream_app", {"BENCH_NAME": name}, log_dir, servers)
    urls = ",".join(by[n].base_url for n in ("upstream1", "upstream2"))
    base = {"BENCH_UPSTREAMS": urls, "BENCH_PREFIXES": "1"}
    if want & {"throughput", "post"}:
        by["rr"] = start_proxy("rr", args.proxy_command, 1, base, log_dir, servers)
        by["asgiproxy"] = start_server("asgiproxy", "asgiproxy_app", base, log_dir, servers)
        if args.nginx and nginx_ref.available():
            ports = [by[n].port for n in ("upstream1", "upstream2")]
            by["nginx"] = nginx_ref.start(ports, log_dir, servers)
    if args.baseline is not None and want & {"throughput", "post", "stream"}:
        # The same proxy, importing rr_middleware from the baseline directory instead.
        old = {**base, "PYTHONPATH": str(args.baseline.resolve())}
        by["rr-base"] = start_proxy("rr-base", args.proxy_command, 1, old, log_dir, servers)
    if "throughput" in want:
        by["bare"] = start_server("bare", "bare_app", base, log_dir, servers)
        # Steps between the bare server and the proxy (``profile_proxy.py`` says why):
        # a bare ASGI app, and the proxy with an upstream leg that answers at once.
        by["asgi"] = start_server("asgi", "stage_apps:asgi_app", base, log_dir, servers)
        by["instant"] = start_server("instant", "stage_apps:instant_app", base, log_dir, servers)
        by["least"] = start_server("least", "stage_apps:least_app", base, log_dir, servers)
        everything = {**base, "BENCH_EVERYTHING": "1"}
        by["rr-all"] = start_proxy("rr-all", args.proxy_command, 1, everything, log_dir, servers)
        if args.workers > 1:
            by["rr-gw1"] = start_gateway("rr-gw1", 1, urls, log_dir, servers)
            by["rr-gw2"] = start_gateway("rr-gw2", args.workers, urls, log_dir, servers)
            # The same workers without their zone: the gateway names one only when
            # RR_MIDDLEWARE_ZONE is not set, and the middleware takes "" as none.
            by["rr-gw2-nozone"] = start_gateway(
                "rr-gw2-nozone", args.workers, urls, log_dir, servers, env={ZONE_ENV: ""}
            )
    if want & {"throughput", "post"} and importlib.util.find_spec("granian") is not None:
        # The same gateway, file and middleware under granian (1 worker, as rr-gw1).
        by["rr-gw1"] = by.get("rr-gw1") or start_gateway("rr-gw1", 1, urls, log_dir, servers)
        by["rr-gwg"] = start_gateway("rr-gwg", 1, urls, log_dir, servers, "granian")
        if "throughput" in want:
            by["bare-granian"] = start_granian("bare-granian", "bare_app", base, log_dir, servers)
    if "stream" in want:
        by["rr-stream"] = start_proxy("rr-stream", args.proxy_command, 1, base, log_dir, servers)
        by["asgi-floor"] = start_server("asgi-floor", "forwarder_app", base, log_dir, servers)
        by["rr-gw-stream"] = start_gateway("rr-gw-stream", 1, urls, log_dir, servers)
        if importlib.util.find_spec("granian") is not None:
            by["rr-gwg-stream"] = start_gateway(
                "rr-gwg-stream", 1, urls, log_dir, servers, "granian"
            )
            by["asgi-floor-granian"] = start_granian(
                "asgi-floor-granian", "forwarder_app", base, log_dir, servers
            )
    if "fallthrough" in want:
        by["ft"] = start_server("ft", "fallthrough_apps", base, log_dir, servers)
    if "accept" in want:
        for name, loop in ACCEPT_LOOPS.items():
            command = f"{DEFAULT_PROXY_COMMAND} --loop {loop}"
            by[name] = start_proxy(name, command, 1, base, log_dir, servers)
    for name, server in by.items():
        path = "/hello" if name.startswith("upstream") else "/local"
        path = "/mw50/local" if name == "ft" else path
        proxied = name in ("asgiproxy", "nginx", "instant", "least", *ACCEPT_LOOPS)
        if proxied or name.startswith("rr-gw"):
            path = "/api/hello"
        wait_ready(server, path)
    for name in (
        "rr",
        "rr-all",
        "rr-gw1",
        "rr-gw2",
        "rr-gw2-nozone",
        "rr-gwg",
        "rr-stream",
        "rr-gw-stream",
        "rr-gwg-stream",
        "rr-base",
        "asgiproxy",
        "nginx",
    ):
        if name in by:
            seen = {
                http_get(by[name].base_url, "/api/hello", 10.0).headers.get("x-upstream")
                for _ in range(4)
            }
            if seen != {"upstream1", "upstream2"}:
                raise BenchError(f"{name}: 4 requests reached {seen}, not both upstreams")
    check_zones(by, args.workers)
    return by


def check_zones(by: dict[str, Server], workers: int) -> None:
    """The multi-worker gateway shares a zone among all its workers; the one started
    without must have none, or the zone rows compare nothing."""
    if "rr-gw2" in by:
        # A worker attaches when it has started, which may be after the first answered.
        deadline = time.monotonic() + READY_DEADLINE_S
        zone = gateway_zone(by["rr-gw2"])
        while (zone is None or zone["workers"] != workers) and time.monotonic() < deadline:
            time.sleep(0.1)
            zone = gateway_zone(by["rr-gw2"])
        if zone is None or zone["workers"] != workers:
            raise BenchError(f"rr-gw2: expected a zone of {workers} workers, got {zone}")
    if "rr-gw2-nozone" in by and gateway_zone(by["rr-gw2-nozone"]) is not None:
        raise BenchError("rr-gw2-nozone: its workers share a zone; expected none")


SECTION_FUNCS: dict[str, Callable[[Context], list[Row]]] = {
    "throughput": throughput,
    "post": post,
    "stream": stream,
    "pick": pick,
    "fallthrough": fallthrough,
    "accept": accept_section,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per target (1)")
    p.add_argument("--connections", default="32,256", help="wrk -c levels for GETs (32,256)")
    p.add_argument("--post-connections", type=int, default=32, help="wrk -c for POSTs (32)")
    p.add_argument("--stream-mib", type=int, default=1024, help="MiB per transfer (1024)")
    p.add_argument("--stream-rounds", type=int, default=2, help="rounds of transfers (2)")
    p.add_argument("--slow-seconds", type=float, default=8.0, help="slow reader's time (8)")
    p.add_argument("--workers", type=int, default=2, help="workers of the multi-worker proxy")
    p.add_argument(
        "--fallthrough-rounds", type=int, default=8, help="fall-through: alternating rounds (8)"
    )
    p.add_argument(
        "--fallthrough-duration", type=int, default=2, help="fall-through: seconds per run (2)"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the proxy with rr_middleware imported from DIR (a "
        "directory holding another build's rr_middleware package), side by side",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="run the servers with glibc's moving malloc thresholds, not fixed ones",
    )
    p.add_argument("--no-nginx", dest="nginx", action="store_false", help="skip nginx")
    p.add_argument(
        "--proxy-command",
        default=DEFAULT_PROXY_COMMAND,
        help=f"how to start an rr-middleware proxy ({DEFAULT_PROXY_COMMAND!r})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 s runs, 2 rounds, 256 MiB transfers, 4 s slow reader",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    p.add_argument(
        "--write-page",
        type=Path,
        metavar="PATH",
        help="render the table into this Markdown page between its generated markers "
        "(docs/performance.md; only when every section ran)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 2, 2, 1
        args.stream_mib, args.stream_rounds, args.slow_seconds = 256, 1, 4.0
        args.fallthrough_rounds = 4
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.connection_levels = [int(c) for c in args.connections.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None and set(args.only) - {"pick"}:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.write_page is not None:
        try:
            check_page(args.write_page)
        except (OSError, ValueError) as exc:
            print(f"--write-page: {exc}", file=sys.stderr)
            return 2
    started = time.monotonic()
    env = environment(argparse.Namespace(connections=args.connections, duration=args.duration))
    env["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    env["commit"] = git_commit()
    if not args.default_malloc:
        os.environ.update(FIXED_MALLOC)  # inherited by every server started below
    servers: list[Server] = []
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rr-bench-") as tmp:
        try:
            by = start(args, Path(tmp), servers)
            ctx = Context(args, by)
            for section in args.only:
                rows += SECTION_FUNCS[section](ctx)
            raw = ctx.raw
        except (BenchError, WrkError, OSError, RuntimeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_servers(servers)
        problems = log_problems(servers)
        tails = {server.name: server.log_tail(6) for server in servers if server.name in problems}
    env["loadavg_at_end"] = os.getloadavg()
    env["seconds"] = time.monotonic() - started
    env["run"] = describe_run(args)
    print()
    print(machine_line(env))
    print(render(rows))
    if FLAGGED:
        print("\nFLAGGED (wrk saw socket errors or non-2xx/3xx):\n    " + "\n    ".join(FLAGGED))
    for name, lines in problems.items():
        print(f"\n{name} logged {len(lines)} warning/error line(s); its log ends:")
        print("\n".join("    " + line for line in tails[name].splitlines()))
    payload = {
        "environment": env,
        "rows": [r.as_dict() for r in rows],
        "flagged": FLAGGED,
        "log_problems": {name: len(lines) for name, lines in problems.items()},
        "raw": raw,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.write_page is not None:
        if set(SECTIONS) - set(args.only):
            print(f"\n{args.write_page} not written: a page holds every section's rows")
        else:
            write_page(args.write_page, json.loads(json.dumps(payload, default=str)))
            print(f"\n{args.write_page} written")
    # asgiproxy's and nginx's own troubles are theirs: reported above, not a failure here.
    ours = [name for name in problems if name not in ("asgiproxy", "nginx")]
    return 1 if ours or FLAGGED or any(r.met is False for r in rows) else 0


def describe_run(args: argparse.Namespace) -> str:
    """How the run was made, for the line above its table."""
    parts = []
    if {"throughput", "post"} & set(args.only):
        parts.append(
            f"wrk -t1 -d{args.duration}s -c{args.connections} (POST -c{args.post_connections}) "
            f"after a {args.warmup} s warm-up, {args.rounds} alternating rounds, medians"
        )
    if "fallthrough" in args.only:
        parts.append(
            f"fall-through {args.fallthrough_rounds} rounds of {args.fallthrough_duration} s"
        )
    if "stream" in args.only:
        parts.append(f"streams {args.stream_mib} MiB, {args.stream_rounds} round(s)")
    parts.append(f"{'default' if args.default_malloc else 'fixed'} malloc thresholds")
    if args.baseline is not None:
        parts.append(f"--baseline {args.baseline.name}")  # its name, not where it lies
    parts.append("sections " + ", ".join(args.only) + (" (--quick)" if args.quick else ""))
    return "; ".join(parts)


def git_commit() -> str:
    """The commit measured, ``+changes`` when the checkout differs from it (the page
    being written does not count)."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=BENCH_DIR.parent, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/performance.md")
    return commit + ("+changes" if dirty else "")


def http_post(base: str, path: str, body: bytes) -> Reply:
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30.0)
    try:
        conn.request("POST", path, body=body)
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
