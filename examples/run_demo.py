"""`make demo`: three demo backends, the basic example app in front, a dozen requests.

Everything runs in this one process on 127.0.0.1 ephemeral ports (uvicorn servers on
pre-bound sockets) and stops when the demo ends or on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import uvicorn

from examples.demo_backend import make_app


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@asynccontextmanager
async def _serve(app: Any, sock: socket.socket) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def main() -> int:
    async with AsyncExitStack() as stack:
        names = ["backend-1", "backend-2", "backend-3"]
        urls = [await stack.enter_async_context(_serve(make_app(n), _socket())) for n in names]
        for name, url in zip(names, urls, strict=True):
            print(f"  {name:<10} listening on {url}")
        os.environ["API_UPSTREAMS"] = ",".join(urls)
        os.environ["USERS_UPSTREAMS"] = urls[2] + "/v1"
        basic = importlib.import_module("examples.basic_app")
        proxy = await stack.enter_async_context(_serve(basic.app, _socket()))
        print(
            f"  basic_app  listening on {proxy}  (pools: /api -> all three, /users -> backend-3/v1)"
        )
        print()
        async with httpx.AsyncClient(base_url=proxy, timeout=10) as client:
            print("  GET /api/orders/<n> twelve times — round robin over the /api pool:")
            for n in range(1, 13):
                reply = (await client.get(f"/api/orders/{n}", params={"page": n})).json()
                print(f"    #{n:<2} -> {reply['backend']:<10} saw {reply['path']}?{reply['query']}")
            reply = (await client.get("/users/42")).json()
            print(
                f"\n  GET /users/42      -> {reply['backend']} saw {reply['path']}"
                f" (X-Forwarded-Prefix: {reply['forwarded_prefix']})"
            )
            local = await client.get("/hello")
            print(
                f"  GET /hello         -> {local.status_code} {local.json()}  (the app's own route)"
            )
    print("\n  all servers stopped.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
