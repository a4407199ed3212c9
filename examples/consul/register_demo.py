"""Register demo backends as instances of a Consul service, each with an HTTP check.

    python -m examples.consul.register_demo http://127.0.0.1:9001 http://127.0.0.1:9002
    python -m examples.consul.register_demo --weight 3 http://127.0.0.1:9003
    python -m examples.consul.register_demo --deregister http://127.0.0.1:9001

The instance ID is ``<service>-<host>-<port>``; the check is ``GET <url>/health`` every
``--interval``. ``--weight`` goes into ``Service.Meta["weight"]``, which rr-middleware reads.
The agent is ``--consul`` (default ``$CONSUL_HTTP_ADDR`` or http://127.0.0.1:8500).
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlsplit

import httpx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="backend base URLs, http://host:port")
    parser.add_argument(
        "--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500")
    )
    parser.add_argument("--service", default="users")
    parser.add_argument("--weight", type=int, default=None)
    parser.add_argument("--interval", default="2s", help="Consul check interval")
    parser.add_argument("--deregister", action="store_true")
    args = parser.parse_args(argv)

    with httpx.Client(base_url=args.consul, timeout=10, trust_env=False) as consul:
        for url in args.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                parser.error(f"{url!r}: give backends as http://host:port")
            instance = f"{args.service}-{parts.hostname}-{parts.port}"
            try:
                if args.deregister:
                    response = consul.put(f"/v1/agent/service/deregister/{instance}")
                else:
                    meta = {"scheme": parts.scheme}
                    if args.weight is not None:
                        meta["weight"] = str(args.weight)
                    response = consul.put(
                        "/v1/agent/service/register",
                        json={
                            "ID": instance,
                            "Name": args.service,
                            "Address": parts.hostname,
                            "Port": parts.port,
                            "Meta": meta,
                            "Check": {
                                "HTTP": f"{url.rstrip('/')}/health",
                                "Interval": args.interval,
                                "Timeout": "1s",
                            },
                        },
                    )
            except httpx.HTTPError as exc:
                print(f"consul at {args.consul} unreachable: {exc}", file=sys.stderr)
                return 1
            if response.status_code != 200:
                print(f"consul refused {instance}: {response.text.strip()}", file=sys.stderr)
                return 1
            print(f"{'deregistered' if args.deregister else 'registered'} {instance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
