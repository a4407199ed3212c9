"""The raw upstream: for what no ASGI server will do (wrong framing, interim responses,
resets, stalls, answers that are not HTTP at all).

An asyncio TCP server on 127.0.0.1, on its own thread and event loop, serving each
connection it accepts with a handler: ``async def handle(connection: RawConnection)``.
A test passes the handler in, or subclasses ``RawUpstream`` when the upstream keeps state
of its own::

    with RawUpstream(answer_once(b"HTTP/1.1 999 Nine\\r\\ncontent-length: 2\\r\\n\\r\\nok")) as up:
        ...Pool([up.url])...
    assert len(up.requests) == 1

The common handlers are here: ``answer_once`` (read a head, answer fixed bytes, close),
``answer_each`` (keep-alive: one answer per request), ``first_then`` (one handler on the
first connection, another on the rest). ``RawConnection`` reads requests and writes bytes
for the rest, returning ``None``/``False`` where the proxy has closed the connection.

The upstream counts the connections it accepted and ended, keeps every connection and
every request head it read, and fails the ``with`` block if a handler raised (other than
by the connection breaking under it). Connections still open when the block ends are
cancelled with the upstream's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .servers import bind_socket

Headers = list[tuple[bytes, bytes]]


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
        #: Set once the proxy has closed (or reset) the connection, as a read or a write saw.
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
        """Write ``data`` and wait while the proxy is not taking it (backpressure); False
        if the proxy has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            self.eof.set()
            return False
        return True

    async def wait_eof(self) -> None:
        """Read (and drop) whatever comes until the proxy closes the connection."""
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
        self.sock = bind_socket(0)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.ended = 0
        self.connections: list[RawConnection] = []
        self.requests: list[RawRequest] = []
        self.errors: list[BaseException] = []
        self.stopping = asyncio.Event()  # set on the upstream's own loop as it stops
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    @property
    def open(self) -> int:
        return self.accepted - self.ended

    async def handle(self, connection: RawConnection) -> None:
        """Serve one connection; the connection is closed once this returns."""
        if self._handle is None:
            raise NotImplementedError("pass a handler, or override handle()")
        await self._handle(connection)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._connection, sock=self.sock)
        self._ready.set()
        async with server:
            await self.stopping.wait()
            server.close()
            # Connections still open are left to the loop's end, which cancels them.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = RawConnection(self, reader, writer, self.accepted)
        self.connections.append(connection)
        self.accepted += 1
        try:
            try:
                await self.handle(connection)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the connection broke under the handler: the proxy's doing
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

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        assert self._ready.wait(timeout=10)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.stopping.set)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
        if exc_type is None:
            assert not self.errors, self.errors


# --------------------------------------------------------------------------- handlers


def answer_once(response: bytes) -> Handler:
    """Read a request head, answer ``response`` (raw bytes), close the connection."""

    async def handle(connection: RawConnection) -> None:
        if await connection.read_head() is not None:
            await connection.send(response)

    return handle


def answer_each(answer: Callable[[RawRequest], bytes]) -> Handler:
    """Keep-alive: read each whole request and answer ``answer(request)``, until the proxy
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
