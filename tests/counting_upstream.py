"""An upstream in a process of its own, for the multi-process tests (they kill it with
SIGKILL): it answers every request 200 with its name, counts requests and health checks,
and tells them at ``/_counts`` (which it does not count).

    python -m uvicorn tests.counting_upstream:app --port PORT   (UPSTREAM_NAME=name)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

NAME = os.environ.get("UPSTREAM_NAME", "upstream").encode()
counts: dict[str, Any] = {"requests": 0, "checks": 0, "check_times": []}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/_counts":
        body = json.dumps(counts).encode()
    else:
        if path == "/health":
            counts["checks"] += 1
            counts["check_times"].append(time.monotonic())
        else:
            counts["requests"] += 1
        body = NAME
    headers = [(b"content-length", b"%d" % len(body)), (b"x-upstream", NAME)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    """``python -m tests.counting_upstream FD NAME``: serve on an inherited listening
    socket (rebuilt with its real family, so TCP_NODELAY is set, unlike ``uvicorn
    --fd``)."""
    import socket
    import sys

    import uvicorn

    sock = socket.socket(fileno=int(sys.argv[1]))
    os.environ["UPSTREAM_NAME"] = sys.argv[2]
    global NAME
    NAME = sys.argv[2].encode()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
