"""uvloop, accepting new connections in batches: the gateway's event loop under uvicorn.

libuv (which uvloop bundles) accepts one connection each time the event loop polls its
listening socket (libuv pull request 3696, "don't accept() connections in a loop"). A
busy proxy's turn of the loop serves every connection that has data, which under load
takes tens of milliseconds; new connections then wait in the kernel's listen queue, their
requests already sent, at a few dozen per second. Measured with 256 new keep-alive
connections against a proxy already at full load: the listen queue took ~4 s to drain,
and a third of the connections waited over a second for their first answer (asyncio's
own loop, which accepts in a loop, does not do this; nor does granian).

Here a listening socket handed to ``create_server`` is read by the loop itself
(``add_reader``) and each turn accepts up to :data:`ACCEPT_BATCH` connections, each
given to uvloop's ``connect_accepted_socket``; everything else is uvloop as it is.
``rr-gateway`` runs uvicorn with it; an application under its own uvicorn can too::

    uvicorn --loop rr_middleware.accept:new_event_loop app:app

(uvicorn's ``--loop`` takes the import path of a loop factory since 0.36.)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as _ssl
from collections.abc import Callable
from typing import Any

import uvloop

logger = logging.getLogger("rr_middleware")

#: Connections taken off the listen queue per turn of the loop at most. Enough to drain
#: a burst in a few turns; few enough that one turn stays short and that, with several
#: workers on one socket, a worker that wakes first does not take a whole burst.
ACCEPT_BATCH = 16

#: After the process ran out of descriptors (or the kernel of buffers), accepting
#: pauses this long instead of spinning on a socket that stays readable (asyncio: 1 s).
ACCEPT_RETRY_DELAY = 1.0

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def new_event_loop() -> BatchAcceptLoop:
    """A new loop: what uvicorn's ``loop`` option and ``asyncio.run(loop_factory=...)``
    take."""
    return BatchAcceptLoop()


class BatchAcceptLoop(uvloop.Loop):
    """uvloop, but a server on a listening TCP socket accepts up to ``ACCEPT_BATCH``
    connections per turn of the loop."""

    async def create_server(  # type: ignore[override]  # the one form uvicorn uses
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: _ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if sock is None or sock.type != socket.SOCK_STREAM or host is not None or kwargs:
            return await super().create_server(
                protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs
            )
        sock.listen(backlog)
        return BatchAcceptServer(self, protocol_factory, sock, ssl)


class BatchAcceptServer(asyncio.AbstractServer):
    """A listening socket served by accepting in batches (see the module's docstring)."""

    def __init__(
        self,
        loop: uvloop.Loop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        ssl: _ssl.SSLContext | None,
    ) -> None:
        self._loop = loop
        self._protocol_factory = protocol_factory
        self._sock = sock
        self._ssl = ssl
        self._serving = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        # Connections accepted whose transport is not set up yet (a TLS handshake).
        self._starting: set[asyncio.Task[Any]] = set()
        self._ended = loop.create_future()
        sock.setblocking(False)
        self._start()

    def _start(self) -> None:
        self._retry = None
        if not self._closed and not self._serving:
            self._serving = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _pause(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while in the queue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                logger.error(
                    "cannot accept a connection (%s); accepting again in %.0f s",
                    exc.strerror,
                    ACCEPT_RETRY_DELAY,
                )
                self._pause()
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._start)
                return
            self._connect(conn)

    def _connect(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if self._ssl is None:
            connecting = self._loop.connect_accepted_socket(self._protocol_factory, conn)
        else:
            connecting = self._loop.connect_accepted_socket(
                self._protocol_factory, conn, ssl=self._ssl
            )
        task = self._loop.create_task(connecting)
        self._starting.add(task)
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A failed TLS handshake or a connection reset before it was set up:
            # uvloop has closed it; nothing was served on it.
            logger.debug("connection not set up: %r", task.exception())

    # asyncio.AbstractServer

    def close(self) -> None:
        """Stop accepting; connections being set up are dropped. The socket is the
        caller's (uvicorn closes it itself)."""
        self._closed = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for task in self._starting:
            task.cancel()
        if not self._ended.done():
            self._ended.set_result(None)

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._start()

    async def serve_forever(self) -> None:
        self._start()
        await asyncio.shield(self._ended)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)
