"""uvloop, accepting new connections in batches: the gateway's event loop under uvicorn.

libuv (which uvloop bundles) accepts one connection each time the event loop polls its
listening socket (libuv pull request 3696, "don't accept() connections in a loop"). A
busy proxy's turn of the loop serves every connection that has data, which under load
takes tens of milliseconds; new connections then wait in the kernel's listen queue, their
requests already sent, at a few dozen per second. Measured with 256 keep-alive
connections opened at once (the first ones accepted keep the proxy at full load): the
listen queue took ~4 s to drain, and a third of the connections waited over a second for
their first answer. asyncio's own loop accepts up to the backlog per turn.

Here the listening sockets of ``create_server`` (a socket handed over, or a host and
port bound here) are read by the loop itself (``add_reader``) and each turn accepts up
to :data:`ACCEPT_BATCH` connections, each given to uvloop's ``connect_accepted_socket``;
everything else is uvloop as it is. A new connection costs ~30 µs more of Python than
uvloop's own accept (measured with one request per connection); keep-alive traffic pays
nothing. ``rr-gateway`` runs uvicorn with it; an application under its own uvicorn can
too::

    uvicorn --loop rr_middleware.accept:new_event_loop app:app

(uvicorn's ``--loop`` takes the import path of a loop factory since 0.36.)

Worker processes on one socket share the batch: each takes ``ACCEPT_BATCH`` divided by
their number (``WEB_CONCURRENCY``, the variable uvicorn's ``--workers`` reads; the gateway
sets it for its workers) per turn. Together they drain a burst as fast as one worker
would, and none takes a burst for itself. Measured with two workers, 256 connections
opened at once, 8 rounds: with the whole batch each, one worker took up to 228 of them;
with half each, the split stayed within 109/147 (uvloop's own, one per turn: 85/171).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Callable, Sequence
from typing import Any

import uvloop

logger = logging.getLogger("rr_middleware")

#: Connections taken off the listen queue per turn of the loop at most, by all the
#: worker processes on the socket together (see ``accept_batch``). Enough to drain a
#: burst in a few turns; few enough that one turn stays short.
ACCEPT_BATCH = 16

#: The environment variable that tells each worker how many share its socket.
WORKERS_ENV = "WEB_CONCURRENCY"

#: After an accept error that would come back at once (out of descriptors, say),
#: accepting pauses this long instead of spinning on a socket that stays readable
#: (asyncio: 1 s).
ACCEPT_RETRY_DELAY = 1.0

#: accept() errors that concern one connection only (Linux reports a pending network
#: error of the new socket this way): that one is dropped, accepting goes on. Any other
#: error (out of descriptors or memory, a security module refusing, the socket no longer
#: listening) would come again at once: accepting pauses ACCEPT_RETRY_DELAY instead.
_CONNECTION_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETDOWN,
        errno.ENETUNREACH,
    }
)


def new_event_loop() -> BatchAcceptLoop:
    """A new loop: what uvicorn's ``loop`` option and ``asyncio.run(loop_factory=...)``
    take. Its batch is this worker's share (``WEB_CONCURRENCY`` workers; 1 if unset or
    not a number)."""
    loop = BatchAcceptLoop()
    loop.accept_batch = accept_batch(os.environ.get(WORKERS_ENV, ""))
    return loop


def accept_batch(workers: str) -> int:
    """One worker's share of ``ACCEPT_BATCH`` when ``workers`` processes accept on one
    socket (rounded up; the whole batch when ``workers`` is not a number >= 1)."""
    try:
        count = int(workers) if workers.strip().isascii() else 1
    except ValueError:  # not a number (and "²" is a digit int() refuses)
        count = 1
    return max(1, -(-ACCEPT_BATCH // max(count, 1)))


class BatchAcceptLoop(uvloop.Loop):
    """uvloop, but a TCP (or Unix) server accepts up to ``accept_batch`` connections per
    turn of the loop (``ACCEPT_BATCH``, unless ``new_event_loop`` made it a worker's
    share)."""

    accept_batch = ACCEPT_BATCH

    async def create_server(  # type: ignore[override]  # the forms uvicorn uses
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: _ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if kwargs or (sock is None) == (port is None) or (sock is not None and host is not None):
            # Options of asyncio's this does not implement, or a mistake uvloop explains.
            create: Any = super().create_server
            server: asyncio.AbstractServer = await create(
                protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs
            )
            return server
        sockets = [sock] if sock is not None else await self._bind(host, port)
        for listening in sockets:
            listening.listen(backlog)
        return BatchAcceptServer(self, protocol_factory, sockets, ssl, self.accept_batch)

    async def _bind(self, host: str | Sequence[str] | None, port: Any) -> list[socket.socket]:
        """Listening sockets for every address of ``host`` (all interfaces when None or
        ""), as asyncio binds them: SO_REUSEADDR, IPv6 sockets IPv6 only."""
        hosts = [None] if host in (None, "") else [host] if isinstance(host, str) else host
        found: set[tuple[Any, ...]] = set()
        for name in hosts:
            found.update(
                await self.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in found:
                listening = socket.socket(family, kind, proto)
                sockets.append(listening)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listening.bind(address)
                except OSError as exc:
                    message = f"error while attempting to bind on address {address!r}: "
                    raise OSError(exc.errno, message + (exc.strerror or "")) from None
        except BaseException:
            for listening in sockets:
                listening.close()
            raise
        return sockets


class BatchAcceptServer(asyncio.AbstractServer):
    """Listening sockets served by accepting in batches (see the module's docstring).
    The server owns its sockets, as asyncio's does: closing it closes them."""

    def __init__(
        self,
        loop: uvloop.Loop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sockets: list[socket.socket],
        ssl: _ssl.SSLContext | None,
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self._loop = loop
        self._batch = batch
        self._protocol_factory = protocol_factory
        self._sockets = sockets
        self._ssl = ssl
        self._reading = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        # Connections accepted whose transport is not set up yet (a TLS handshake, or a
        # turn of the loop): they are the server's until their protocol has them.
        self._starting: set[asyncio.Task[Any]] = set()
        self._ended = loop.create_future()
        for listening in sockets:
            listening.setblocking(False)
        self._start()

    def _start(self) -> None:
        self._retry = None
        if not self._closed and not self._reading:
            self._reading = True
            for listening in self._sockets:
                self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            for listening in self._sockets:
                self._loop.remove_reader(listening.fileno())

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CONNECTION_ERRORS:
                    continue  # that connection is gone; the next one may be fine
                logger.error(
                    "cannot accept connections (%s); trying again in %g s",
                    exc.strerror or exc,
                    ACCEPT_RETRY_DELAY,
                )
                self._stop_reading()
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._start)
                return
            # uvloop makes the socket non-blocking and sets TCP_NODELAY as it takes it.
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
        error = None if task.cancelled() else task.exception()
        if isinstance(error, OSError):
            # The client reset the connection or failed its TLS handshake: uvloop has
            # closed it, nothing was served on it.
            logger.debug("connection not set up: %r", error)
        elif error is not None:
            logger.error("connection not set up", exc_info=error)  # the protocol failed

    # asyncio.AbstractServer

    def close(self) -> None:
        """Stop accepting and close the listening sockets. Connections being set up
        are left to finish (a cancelled one could close its socket under a protocol that
        already has it); ``wait_closed`` waits for them."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for listening in self._sockets:
            listening.close()
        self._ended.set_result(None)

    async def wait_closed(self) -> None:
        while self._starting:
            await asyncio.wait(tuple(self._starting))

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed  # also while accepting pauses: it will go on

    async def start_serving(self) -> None:
        self._start()

    async def serve_forever(self) -> None:
        self._start()
        await asyncio.shield(self._ended)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else tuple(self._sockets)
