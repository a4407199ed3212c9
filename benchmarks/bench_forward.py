"""In-process CPU cost of one proxied GET through the middleware, in microseconds.

Everything the middleware does for a request except the wire: routing, the request
headers, the pick and its connection slot, the client's side (body, deadlines), the
response headers and the relay, with a transport that answers at once (13 bytes with a
Content-Length) and a ``receive``/``send`` pair that behaves as uvicorn's does (after the
body, ``receive()`` waits until the response is complete). No sockets and no server, so
the figure is the middleware's own cost and barely moves with machine noise.

    .venv/bin/python benchmarks/bench_forward.py [--baseline DIR] [--zone] [--rounds 7]

``--baseline DIR`` measures the ``rr_middleware`` package in DIR too (say, ``git archive
<commit> rr_middleware | tar -x -C DIR``), in alternating rounds, each in a process of its
own, and prints both with their ratio per round. ``--zone`` measures the same build with
its pool in a zone (the state worker processes share: ``Balancer(zone=...)``) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


async def _measure(calls: int, zone: str | None = None) -> float:
    from inprocess import SCOPE, AtOnce, Client

    from rr_middleware import Pool, RoundRobinMiddleware

    async def host(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("nothing falls through")

    pools = {"/api": Pool(["http://127.0.0.1:9", "http://127.0.0.1:10"])}
    if zone is None:  # as every build takes it (a --baseline may predate zones)
        middleware = RoundRobinMiddleware(host, pools=pools, transport=AtOnce())
    else:
        middleware = RoundRobinMiddleware(host, pools=pools, transport=AtOnce(), zone=zone)
    await middleware.startup()
    started = time.perf_counter()
    for _ in range(calls):
        client = Client()
        await middleware(dict(SCOPE), client.receive, client.send)
    elapsed = (time.perf_counter() - started) / calls * 1e6
    await middleware.shutdown()
    return elapsed


def _one_round(calls: int, repeats: int, zone: str | None) -> float:
    import uvloop

    async def best() -> float:
        await _measure(2000, zone)  # warm-up
        return min([await _measure(calls, zone) for _ in range(repeats)])

    return uvloop.run(best())


def _round_in(path: str | None, calls: int, repeats: int, zone: bool = False) -> float:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    output = subprocess.run(
        [sys.executable, __file__, "--child", str(calls), str(repeats), "zone" if zone else ""],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(output)["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="DIR", help="also measure rr_middleware in DIR")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zone", action="store_true", help="also measure with a zone")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        calls, repeats, zone = args.child
        with tempfile.TemporaryDirectory() as directory:
            where = os.path.join(directory, "zone") if zone else None
            print(json.dumps({"us": _one_round(int(calls), int(repeats), where)}))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours: list[float] = []
    theirs: list[float] = []
    zoned: list[float] = []
    for _ in range(args.rounds):
        ours.append(_round_in(here, args.calls, args.repeats))
        if args.baseline:
            theirs.append(_round_in(os.path.abspath(args.baseline), args.calls, args.repeats))
        if args.zone:
            zoned.append(_round_in(here, args.calls, args.repeats, zone=True))
    print(f"proxied GET, in-process: {statistics.median(ours):.2f} us/request (median)")
    print("  rounds: " + " ".join(f"{us:.2f}" for us in ours))
    if theirs:
        print(f"baseline {args.baseline}: {statistics.median(theirs):.2f} us/request")
        print("  rounds: " + " ".join(f"{us:.2f}" for us in theirs))
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(
            f"ratio this/baseline: {statistics.median(ours) / statistics.median(theirs):.3f}x"
            "; per round " + " ".join(f"{r:.3f}" for r in ratios)
        )
    if zoned:
        print(f"with a zone: {statistics.median(zoned):.2f} us/request")
        print("  rounds: " + " ".join(f"{us:.2f}" for us in zoned))
        added = [z - o for z, o in zip(zoned, ours, strict=True)]
        print(
            f"zone minus plain: {statistics.median(zoned) - statistics.median(ours):+.2f} us"
            "; per round " + " ".join(f"{a:+.2f}" for a in added)
        )


if __name__ == "__main__":
    main()
