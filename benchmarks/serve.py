"""Serve one ``bench_apps`` factory with uvicorn on an inherited, already listening socket.

    python benchmarks/serve.py FD FACTORY [--workers N]

Why not ``uvicorn --fd FD``: uvicorn wraps the descriptor with
``socket.fromfd(fd, socket.AF_UNIX, ...)``, so uvloop serves a TCP socket as a Unix one
and never sets ``TCP_NODELAY``; Nagle's algorithm meeting delayed ACKs then stalls every
keep-alive response for ~40 ms (about 730 req/s at 32 connections, whatever the app).
Here the socket is rebuilt with its real family, and the settings are those of
``uvicorn --loop uvloop --http httptools --workers 1 --no-access-log --log-level warning``
(``--workers N`` runs uvicorn's own supervisor over N worker processes sharing the socket).
"""

from __future__ import annotations

import argparse
import socket

import uvicorn
from uvicorn.supervisors import Multiprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fd", type=int, help="descriptor of a bound, listening TCP socket")
    parser.add_argument(
        "factory", help="name of an app factory in bench_apps, or MODULE:NAME of another"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--loop",
        default="uvloop",
        help="uvicorn's --loop (default uvloop; rr-gateway's: rr_middleware.accept:new_event_loop)",
    )
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)  # family and type detected from the descriptor
    config = uvicorn.Config(
        args.factory if ":" in args.factory else f"bench_apps:{args.factory}",
        factory=True,
        loop=args.loop,
        http="httptools",
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
