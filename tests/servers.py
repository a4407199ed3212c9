"""Real servers for the tests: uvicorn on 127.0.0.1 ephemeral ports, in threads (for raw
TCP upstreams, see ``rr_middleware.testing.raw``).

The listening socket is bound before the server starts, so its port is known at once and
connections made before the server is ready wait in the backlog: no polling, no sleeps.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from rr_middleware.testing.raw import bind_socket


class RunningServer:
    def __init__(self, app: Any, sock: socket.socket, server: uvicorn.Server) -> None:
        self.app = app
        self.socket = sock
        self.server = server
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "uvicorn server did not stop"
        self.socket.close()


# The sockets behind dead_url(), bound for the rest of the test run.
_DEAD: list[socket.socket] = []


def dead_url() -> str:
    """A URL on which connections are refused: its port is bound and never listened on,
    and stays bound, so no server started later (by this run or another process) can take
    it and answer in its place."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _DEAD.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def serve(app: Any, port: int = 0, **config: Any) -> Iterator[RunningServer]:
    """Run ``app`` under uvicorn (httptools, uvloop) on 127.0.0.1 until the block ends."""
    sock = bind_socket(port)
    settings: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "auto",
        "http": "httptools",
        "loop": "uvloop",
        "timeout_graceful_shutdown": 5,
    }
    settings.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    running = RunningServer(app, sock, server)
    running.start()
    try:
        yield running
    finally:
        running.stop()
