"""The raw upstream: an HTTP/1.1 server on a real socket for what no ASGI server will do
(wrong framing, interim responses, resets, stalls, refused connections, answers that are
not HTTP at all). ``FakeUpstream``'s socket mode is built on it.

An asyncio TCP server on 127.0.0.1, serving each connection it accepts with a handler,
``async def handle(connection: RawConnection)``. A test passes the handler in, or
subclasses ``RawUpstream`` when the upstream keeps state of its own::

    with RawUpstream(answer_once(b"HTTP/1.1 999 Nine\\r\\ncontent-length: 2\\r\\n\\r\\nok")) as up:
        ...Pool([up.url])...
    assert len(up.requests) == 1

``with`` runs it on a thread and event loop of its own; ``async with`` on the running
loop. The common handlers are here: ``answer_once`` (read a head, answer fixed bytes,
close), ``answer_each`` (keep-alive: one answer per request), ``first_then`` (one handler
on the first connection, another on the rest). ``RawConnection`` reads requests and writes
bytes for the rest, returning ``None``/``False`` where the peer has closed the connection.

The upstream counts the connections it accepted and ended, keeps every connection and
every request head it read, and fails the ``with`` block (``AssertionError``) if a handler
raised (other than by the connection breaking under it). Connections still open when the
block ends are cancelled. ``refuse()`` stops listening (connections are refused, the port
stays reserved) until ``listen()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Handler",
    "RawConnection",
    "RawRequest",
    "RawUpstream",
    "answer_each",
    "answer_once",
    "bind_socket",
    "first_then",
]

Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")

_START_TIMEOUT = 10.0  # seconds for a server thread to start or stop


def bind_socket(port: int = 0, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 at ``port`` (0: an ephemeral one)."""
    sock = _bound(port, reuse_port=reuse_port)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _bound(port: int, *, reuse_port: bool, reuse_addr: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse_addr:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@dataclass
class RawRequest:
    """One request as a raw upstream read it off the wire; ``body`` is filled in once it
    has been read (``RawConnection.read_body``)."""

    connection: int  # the index of the connection it came on: 0 for the first accepted
    head: bytes  # as received, up to and including the blank line
    method: bytes
    target: bytes
    headers: Headers
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class RawConnection:
    """One connection a ``RawUpstream`` accepted, seen from the upstream's side."""

    def __init__(
        self,
        upstream: RawUpstream,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        index: int,
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.index = index
        #: Set once the peer has closed (or reset) the connection, as a read or a write saw.
        self.eof = threading.Event()

    async def read_head(self) -> RawRequest | None:
        """The next request's line and headers (not its body); None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        lines = head[:-4].split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        request = RawRequest(self.index, head, method, target, headers)
        self.upstream.requests.append(request)
        return request

    async def read_body(self, request: RawRequest) -> bool:
        """Read the body ``request`` announces (Content-Length or chunked, trailers
        dropped) into it; False if the connection ended first."""
        try:
            if (request.header(b"transfer-encoding") or b"").lower() == b"chunked":
                body = b""
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    body += (await self.reader.readexactly(size + 2))[:-2]
                while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                request.body = body
            else:
                size = int(request.header(b"content-length") or b"0")
                request.body = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return False
        return True

    async def read_request(self) -> RawRequest | None:
        """The next whole request, head and body; None if the connection ended first."""
        request = await self.read_head()
        if request is None or not await self.read_body(request):
            return None
        return request

    async def send(self, data: bytes) -> bool:
        """Write ``data`` and wait while the peer is not taking it (backpressure); False
        if the peer has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            self.eof.set()
            return False
        return True

    async def wait_eof(self) -> None:
        """Read (and drop) whatever comes until the peer closes the connection."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.eof.set()

    async def hold(self) -> None:
        """Keep the connection open, reading nothing more, until the upstream stops."""
        await self.upstream.stopping.wait()

    async def close(self, reset: bool = False) -> None:
        """Close the connection: a FIN once what was written is sent, or at once a RST
        (``reset``). Returns once the socket is closed."""
        if reset:
            with contextlib.suppress(OSError):
                sock = self.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


Handler = Callable[[RawConnection], Awaitable[None]]


class RawUpstream:
    """A raw HTTP/1.1 upstream on 127.0.0.1 (see the module's docstring): ``handle``, or
    the ``handle`` method of a subclass, serves each connection. ``accepted`` and
    ``ended`` count connections (``open`` is the difference); ``connections`` and
    ``requests`` are every connection and request head seen, in order; ``errors`` what
    the handlers raised."""

    def __init__(self, handle: Handler | None = None) -> None:
        self._handle = handle
        # The port stays reserved by a socket that never listens, so that refuse() can
        # close the listening one and listen() open another on the same port. Without
        # SO_REUSEADDR on it, only a socket with SO_REUSEPORT of this user can join it.
        self._reserved = _bound(0, reuse_port=True, reuse_addr=False)
        self.port: int = self._reserved.getsockname()[1]
        self.sock = bind_socket(self.port, reuse_port=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.ended = 0
        self.connections: list[RawConnection] = []
        self.requests: list[RawRequest] = []
        self.errors: list[BaseException] = []
        self.stopping = asyncio.Event()  # set on the upstream's own loop as it stops
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def open(self) -> int:
        return self.accepted - self.ended

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def handle(self, connection: RawConnection) -> None:
        """Serve one connection; the connection is closed once this returns."""
        if self._handle is None:
            raise NotImplementedError("pass a handler, or override handle()")
        await self._handle(connection)

    # -- accepting or refusing ------------------------------------------------------------

    def refuse(self) -> None:
        """Stop listening: new connections are refused (those open stay open)."""
        self.run_in_loop(self._stop_listening)

    def listen(self) -> None:
        """Accept connections again, on the same port. Connections made from now on wait
        in the backlog until accepted, so none is refused."""
        self.run_in_loop(self._listen_again)

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening socket; the reserved one keeps the port

    def _listen_again(self) -> None:
        if self._server is None:
            self.sock = bind_socket(self.port, reuse_port=True)
            task = asyncio.ensure_future(self._start_server())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_server(self) -> None:
        server = await asyncio.start_server(self._connection, sock=self.sock)
        self._server = server

    def run_in_loop(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the upstream's loop and return its result: at once from that
        loop, else waiting (a few milliseconds) for the loop to run it."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the upstream is not running (use it in a with block)")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return function()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(function())
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=_START_TIMEOUT)

    # -- serving ----------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        connection = RawConnection(self, reader, writer, self.accepted)
        self.connections.append(connection)
        self.accepted += 1
        try:
            try:
                await self.handle(connection)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the connection broke under the handler: the peer's doing
            except Exception as exc:
                self.errors.append(exc)
            finally:
                self.ended += 1
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except asyncio.CancelledError:
            # The upstream stopping: asyncio's stream callback reports a handler that ends
            # cancelled as an error, and this is not one.
            return
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def start(self) -> None:
        """Start serving on the running loop (what ``async with`` does)."""
        self._loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        await self._start_server()

    async def stop(self) -> None:
        """Stop serving: stop listening, cancel every connection still open, release the
        port (what leaving ``async with`` does)."""
        self.stopping.set()
        self._stop_listening()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_START_TIMEOUT)
        self.sock.close()
        self._reserved.close()

    async def _serve_in_thread(self, ready: threading.Event) -> None:
        await self.start()
        ready.set()
        try:
            await self.stopping.wait()
        finally:
            await self.stop()

    def _check_errors(self, exc_type: object) -> None:
        if exc_type is None and self.errors:
            raise AssertionError(f"the raw upstream's handlers raised: {self.errors!r}")

    def __enter__(self) -> RawUpstream:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve_in_thread(ready),), daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout=_START_TIMEOUT):
            raise RuntimeError("the raw upstream did not start")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        assert self._loop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self.stopping.set)
        self._thread.join(timeout=_START_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("the raw upstream did not stop")
        self._check_errors(exc_type)

    async def __aenter__(self) -> RawUpstream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.stop()
        self._check_errors(exc_type)


# --------------------------------------------------------------------------- handlers


def answer_once(response: bytes) -> Handler:
    """Read a request head, answer ``response`` (raw bytes), close the connection."""

    async def handle(connection: RawConnection) -> None:
        if await connection.read_head() is not None:
            await connection.send(response)

    return handle


def answer_each(answer: Callable[[RawRequest], bytes]) -> Handler:
    """Keep-alive: read each whole request and answer ``answer(request)``, until the peer
    closes the connection."""

    async def handle(connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            if not await connection.send(answer(request)):
                return

    return handle


def first_then(first: Handler, rest: Handler) -> Handler:
    """``first`` on the first connection, ``rest`` on every later one."""

    async def handle(connection: RawConnection) -> None:
        await (first if connection.index == 0 else rest)(connection)

    return handle
