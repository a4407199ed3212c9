"""Real servers for the tests: uvicorn on 127.0.0.1 ephemeral ports, in threads.

The listening socket is bound before the server starts, so its port is known at once and
connections made before the server is ready wait in the backlog: no polling, no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


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


def bind_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


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


class RawUpstream(socketserver.ThreadingTCPServer):
    """A raw TCP upstream answering with fixed bytes, for responses no ASGI server would
    produce; ``handler`` decides how (keep-alive, or one answer then close). The request
    heads it read are in ``heads``."""

    daemon_threads = True

    def __init__(self, response: bytes, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.response = response
        self.heads: list[bytes] = []
        super().__init__(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def raw_upstream(
    response: bytes, handler: type[socketserver.BaseRequestHandler]
) -> Iterator[RawUpstream]:
    """Serve ``RawUpstream(response, handler)`` in a thread until the block ends."""
    server = RawUpstream(response, handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class RawListener:
    """An asyncio TCP server on its own thread and loop; ``handle`` serves one connection.
    Counts connections accepted and ended (``open`` is the difference)."""

    def __init__(self) -> None:
        self.sock = bind_socket(0)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.ended = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    @property
    def open(self) -> int:
        return self.accepted - self.ended

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self.sock)
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            # Connections still open are left to the loop's end, which cancels them.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            try:
                await self.handle(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.ended += 1
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except asyncio.CancelledError:
            # The listener stopping: asyncio's stream callback reports a handler that ends
            # cancelled as an error, and this is not one.
            return

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def __enter__(self) -> RawListener:
        self._thread.start()
        assert self._ready.wait(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
