"""Instructions per proxied GET, counted by valgrind: a figure machine load cannot move.

    python benchmarks/count_instructions.py [--baseline DIR] [--requests 800] [--concurrency 8]

Requests go through ``RoundRobinMiddleware`` and its built-in HTTP/1.1 transport, in
process, to two real uvicorn upstreams (``bench_apps.upstream_app``, started here, not
counted); the client's side is a fixed scope and uvicorn-like ``receive``/``send``
(``inprocess.py``, as in ``bench_forward.py``), so no server's work is in the count. A
child process does ``--requests`` requests, then twice as many, each under ``valgrind
--tool=callgrind``; the difference over ``--requests`` is the count per request, start-up
and imports cancelled out. Counts are of user-space instructions (the kernel's work in system calls
is not in them) and repeat within about 1 % from run to run, whatever else the machine
does, where wall and CPU time on a shared 2-core machine move by 10 % or more: the way to
tell a change of a few percent to the data path. ``--baseline DIR`` counts the
``rr_middleware`` package in DIR too (``git archive <commit> rr_middleware | tar -x -C
DIR``) and prints the ratio. Needs valgrind (``apt-get install valgrind``); about a
minute per build. Keep ``--concurrency`` low: under valgrind an exchange lasts ~50 times
longer, and with many at once each outlives the client side's 0.1 s tick and starts the
disconnect watch, which a real run at that concurrency rarely does (at 256: 312,000
instructions per GET, 246,000 with the tick out of the way).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


def _child(requests: int, concurrency: int, upstreams: list[str]) -> None:
    """The counted process: ``requests`` proxied GETs, ``concurrency`` at a time."""
    import uvloop
    from inprocess import SCOPE, Client

    from rr_middleware import Pool, RoundRobinMiddleware

    async def host(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("nothing falls through")

    async def main() -> None:
        middleware = RoundRobinMiddleware(host, pools={"/api": Pool(upstreams)})
        await middleware.startup()

        async def worker(count: int) -> None:
            for _ in range(count):
                client = Client()
                await middleware(dict(SCOPE), client.receive, client.send)
                if client.status != 200:
                    raise RuntimeError(f"the proxy answered {client.status}")

        await asyncio.gather(*[worker(requests // concurrency) for _ in range(concurrency)])
        await middleware.shutdown()

    uvloop.run(main())


def _count(package_dir: Path | None, requests: int, concurrency: int, upstreams: list[str]) -> int:
    """Instructions the child executes for ``requests`` requests."""
    env = dict(os.environ)
    if package_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_dir), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"]
        command += [sys.executable, __file__, "--child", str(requests), str(concurrency)]
        command += [",".join(upstreams)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found[1])


def per_request(package_dir: Path | None, args: argparse.Namespace, upstreams: list[str]) -> float:
    once = _count(package_dir, args.requests, args.concurrency, upstreams)
    twice = _count(package_dir, 2 * args.requests, args.concurrency, upstreams)
    return (twice - once) / args.requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also count DIR's build")
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        requests, concurrency, upstreams = args.child
        _child(int(requests), int(concurrency), upstreams.split(","))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is needed: apt-get install valgrind", file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH_DIR))
    from bench_proxy import start_server, stop_servers, wait_ready

    servers: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="rr-count-") as tmp:
        try:
            for i in (1, 2):
                env = {"BENCH_NAME": f"upstream{i}"}
                start_server(f"upstream{i}", "upstream_app", env, Path(tmp), servers)
            for server in servers:
                wait_ready(server, "/hello")
            upstreams = [server.base_url for server in servers]
            here = per_request(BENCH_DIR.parent, args, upstreams)
            print(f"this build: {here:,.0f} instructions per proxied GET")
            if args.baseline is not None:
                base = per_request(args.baseline.resolve(), args, upstreams)
                print(f"baseline {args.baseline}: {base:,.0f} instructions per proxied GET")
                print(f"ratio this/baseline: {here / base:.3f}x")
        finally:
            stop_servers(servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
