"""``FakeUpstream``: one upstream whose behaviour a test switches while the app serves.

The same fake runs in-process (``fake.upstream()`` is an ``Upstream`` reached with no
socket; the fake is also a plain ASGI app for ``Upstream(url, app=fake)``) or on a real
socket (``with fake.serve():`` or ``async with fake.serve():``, on an ephemeral
127.0.0.1 port, built on the raw upstream of ``raw.py``). Each behaviour is written once,
against the small ``Exchange`` interface of ``exchange.py`` with an ASGI side and a
socket side, so the two modes cannot drift apart.

Every switch takes effect for the next request (a request already being served keeps the
behaviour it started with), from any thread.
"""

from __future__ import annotations

import asyncio
import enum
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Union

from starlette.types import Receive, Scope, Send

from ..errors import ConnectFailed
from ..transport.base import UpstreamRequest, UpstreamResponse, UpstreamTransport
from ..transport.httpx_transport import in_process
from ..upstream import Upstream
from .exchange import (
    AsgiExchange,
    Exchange,
    ReceivedRequest,
    SocketExchange,
    answer,
    received,
    with_length,
)
from .raw import RawConnection, RawUpstream

__all__ = ["FakeUpstream", "Latency", "ReceivedRequest"]

#: Seconds added before each answer: a number, or a callable drawing one per request
#: (``lambda: rng.expovariate(20)``).
Latency = Union[float, Callable[[], float]]


class _Fault(enum.Enum):
    NONE = "answers normally"
    REFUSE = "refuses connections"
    HANG = "reads each request and never answers"
    STOP_READING = "reads each request's head, never its body, and never answers"
    RESET = "resets the connection in the middle of each response body"


@dataclass(frozen=True)
class _Behaviour:
    fault: _Fault = _Fault.NONE
    status: int = 200
    latency: Latency = 0.0
    drip: tuple[int, float] | None = None  # (chunks, seconds between them)
    health_status: int = 200

    def delay(self) -> float:
        return float(self.latency() if callable(self.latency) else self.latency)


class FakeUpstream:
    """An upstream for tests (see the module's docstring).

    By default it answers every request ``200`` with a JSON echo of it (``upstream``,
    ``method``, ``path``, ``query``, ``headers``, ``body``) and an ``x-upstream: NAME``
    header, and health checks (``GET health_path``) ``200``. It counts both and keeps
    what it received: ``requests`` and ``probes``, lists of ``ReceivedRequest``.

    >>> a = FakeUpstream("a")
    >>> a.upstream().url
    'http://a.test'
    >>> a.answer(503).set_latency(0.2)  # doctest: +ELLIPSIS
    <FakeUpstream 'a' ...>

    Args:
        name: Names the fake in its answers and, in-process, its URL (``http://NAME.test``).
        health_path: The path of its health checks (what ``HealthCheck.path`` names).
    """

    def __init__(self, name: str = "upstream", *, health_path: str = "/health") -> None:
        self.name = name
        self.health_path = health_path
        self.requests: list[ReceivedRequest] = []
        self.probes: list[ReceivedRequest] = []
        self._behaviour = _Behaviour()
        self._lock = threading.Lock()
        self._transport = _InProcessTransport(self)
        self._server: _SocketServer | None = None
        self._in_process_url = f"http://{name}.test"
        Upstream(self._in_process_url)  # a name that makes no URL fails here, not later

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "in-process"
        return f"<FakeUpstream {self.name!r} {where}: {self.describe()}>"

    # -- where it is --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` while serving on a socket, else ``http://NAME.test``."""
        server = self._server
        return server.url if server is not None else self._in_process_url

    def upstream(self, weight: int = 1) -> Upstream:
        """The ``Upstream`` to put in a ``Pool``: on the socket while ``serve()`` runs,
        else in-process (no socket; connections refused as a ``ConnectFailed``)."""
        if self._server is not None:
            return Upstream(self.url, weight=weight)
        return Upstream(self.url, weight=weight, transport=self._transport)

    def serve(self) -> _Serving:
        """Serve on a real socket for the block: ``with fake.serve():`` runs the server
        on a thread of its own, ``async with fake.serve():`` on the running loop. The port
        is ephemeral, on 127.0.0.1; the server always stops when the block ends."""
        return _Serving(self)

    @property
    def open_connections(self) -> int:
        """Connections open to the socket server now (0 in-process)."""
        server = self._server
        return server.open if server is not None else 0

    # -- what it saw ----------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """Requests received (health checks aside), counted as each head arrives."""
        return len(self.requests)

    @property
    def probe_count(self) -> int:
        """Health checks received."""
        return len(self.probes)

    def clear(self) -> None:
        """Forget what it received (the counts start again from 0)."""
        with self._lock:
            self.requests = []
            self.probes = []

    # -- behaviour ------------------------------------------------------------------------

    @property
    def refusing(self) -> bool:
        """Whether it refuses connections now (``refuse_connections()``)."""
        return self._behaviour.fault is _Fault.REFUSE

    def describe(self) -> str:
        """The current behaviour, in words."""
        b = self._behaviour
        parts = [b.fault.value if b.fault is not _Fault.NONE else f"answers {b.status}"]
        if b.latency:
            parts.append(f"latency {b.latency!r}")
        if b.drip is not None:
            parts.append(f"drips its answers in {b.drip[0]} parts {b.drip[1]}s apart")
        if b.health_status != 200:
            parts.append(f"fails health checks ({b.health_status})")
        return ", ".join(parts)

    def answer(self, status: int = 200) -> FakeUpstream:
        """Answer every request ``status`` with the echo (none with 204 or 304; ends any
        fault or drip)."""
        _check_status(status)
        return self._switch(fault=_Fault.NONE, status=status, drip=None)

    def set_latency(self, latency: Latency) -> FakeUpstream:
        """Wait ``latency`` seconds (or ``latency()``, drawn per request) before each
        answer, health checks aside; ``0`` for none."""
        if not callable(latency) and (isinstance(latency, bool) or latency < 0):
            raise ValueError(f"latency must be seconds >= 0 or a callable, got {latency!r}")
        return self._switch(latency=latency)

    def refuse_connections(self) -> FakeUpstream:
        """Refuse connections, as a server that is down: on a socket the fake stops
        listening and closes the connections open to it; in-process each request fails
        to connect (``ConnectFailed``)."""
        return self._switch(fault=_Fault.REFUSE)

    def hang(self) -> FakeUpstream:
        """Read each request whole and never answer (on a socket the connection stays
        open until the peer closes it)."""
        return self._switch(fault=_Fault.HANG)

    def stop_reading_body(self) -> FakeUpstream:
        """Read each request's head, then neither its body nor anything else, and never
        answer (the connection stays open until the fake stops)."""
        return self._switch(fault=_Fault.STOP_READING)

    def reset_mid_body(self) -> FakeUpstream:
        """Start each answer, then break the connection halfway through its body."""
        return self._switch(fault=_Fault.RESET)

    def drip(self, chunks: int = 10, interval: float = 0.1) -> FakeUpstream:
        """Send each answer's body in ``chunks`` parts, ``interval`` seconds apart."""
        if chunks < 1 or interval < 0:
            raise ValueError(f"drip needs chunks >= 1 and interval >= 0, got {chunks}, {interval}")
        return self._switch(drip=(chunks, interval))

    def fail_health_checks(self, status: int = 503) -> FakeUpstream:
        """Answer health checks ``status`` (traffic is unchanged)."""
        _check_status(status)
        return self._switch(health_status=status)

    def pass_health_checks(self) -> FakeUpstream:
        """Answer health checks 200 again."""
        return self._switch(health_status=200)

    def restore(self) -> FakeUpstream:
        """Every behaviour back to its default (what it received is kept)."""
        return self._switch(**{f: getattr(_Behaviour(), f) for f in _Behaviour.__annotations__})

    def _switch(self, **changes: Any) -> FakeUpstream:
        with self._lock:
            before = self._behaviour
            self._behaviour = replace(before, **changes)
            refusing = self._behaviour.fault is _Fault.REFUSE
        server = self._server
        if server is not None and refusing != (before.fault is _Fault.REFUSE):
            server.set_refusing(refusing)
        return self

    # -- serving, in either mode ------------------------------------------------------------

    async def _serve(self, request: ReceivedRequest, exchange: Exchange) -> bool:
        """Answer one request; False if the connection may not carry another."""
        behaviour = self._behaviour
        if request.path == self.health_path:
            with self._lock:
                self.probes.append(request)
            if await exchange.read_body() is None:
                return False
            body = b"ok" if behaviour.health_status < 400 else b"failing"
            await answer(exchange, behaviour.health_status, [], [body])
            return True
        with self._lock:
            self.requests.append(request)
        if behaviour.fault is _Fault.STOP_READING:
            await exchange.hold(reading=False)
            return False
        received = await exchange.read_body()
        if received is None:
            return False
        request.body = received
        if behaviour.fault is _Fault.HANG:
            await exchange.hold(reading=True)
            return False
        if delay := behaviour.delay():
            await asyncio.sleep(delay)
        payload = json.dumps(request.echo()).encode()
        headers = [(b"x-upstream", self.name.encode()), (b"content-type", b"application/json")]
        if behaviour.fault is _Fault.RESET:
            await exchange.start(behaviour.status, with_length(headers, len(payload)))
            await exchange.write(payload[: len(payload) // 2])
            await exchange.reset()
            return False
        chunks, interval = behaviour.drip or (1, 0.0)
        step = -(-len(payload) // chunks)
        parts = [payload[i : i + step] for i in range(0, len(payload), step)]
        if request.method == "HEAD":
            parts = []  # no body; its Content-Length still tells the GET's
        await answer(exchange, behaviour.status, headers, parts, interval, len(payload))
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The fake as an ASGI app (``Upstream(url, app=fake)``); see ``upstream()``."""
        if scope["type"] != "http":
            return
        if self.refusing:
            raise ConnectionRefusedError(
                f"FakeUpstream {self.name!r} refuses connections: reach it through "
                "fake.upstream() or on a socket for a refused connection"
            )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        request = ReceivedRequest(
            self.name,
            scope["method"],
            scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
            scope["query_string"].decode("latin-1"),
            headers,
        )
        await self._serve(request, AsgiExchange(receive, send))

    async def _serve_connection(self, connection: RawConnection) -> None:
        while not self.refusing:
            raw = await connection.read_head()
            if raw is None or self.refusing:  # refused while the connection was idle
                return
            exchange = SocketExchange(connection, raw)
            if not await self._serve(received(self.name, raw), exchange):
                return


def _check_status(status: int) -> None:
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"status must be a final HTTP status (200-599), got {status!r}")
    HTTPStatus(status)  # and one with a name, for the status line


class _InProcessTransport(UpstreamTransport):
    """The fake in-process, through the same transport as ``Upstream(app=...)``, except
    that a fake refusing connections fails to connect."""

    def __init__(self, fake: FakeUpstream) -> None:
        self._fake = fake
        self._inner = in_process(fake)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if self._fake.refusing:
            raise ConnectFailed(f"connection refused (FakeUpstream {self._fake.name!r})")
        return await self._inner.send(request)


class _SocketServer(RawUpstream):
    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__(fake._serve_connection)

    def set_refusing(self, refusing: bool) -> None:
        if refusing:
            self.run_in_loop(self._refuse_and_close)
        else:
            self.listen()

    def _refuse_and_close(self) -> None:
        self._stop_listening()
        for connection in self.connections:
            connection.writer.close()  # as a server going down would


@dataclass
class _Serving:
    """``fake.serve()``: the socket server's life, as ``with`` or ``async with``."""

    fake: FakeUpstream
    _server: _SocketServer | None = field(default=None, init=False)

    def _started(self) -> _SocketServer:
        if self.fake._server is not None:
            raise RuntimeError(f"FakeUpstream {self.fake.name!r} is already serving")
        self._server = _SocketServer(self.fake)
        return self._server

    def _begin(self, server: _SocketServer) -> FakeUpstream:
        self.fake._server = server
        if self.fake.refusing:
            server.set_refusing(True)
        return self.fake

    def __enter__(self) -> FakeUpstream:
        server = self._started()
        server.__enter__()
        return self._begin(server)

    def __exit__(self, *exc: Any) -> None:
        self.fake._server = None
        assert self._server is not None
        self._server.__exit__(*exc)

    async def __aenter__(self) -> FakeUpstream:
        server = self._started()
        await server.__aenter__()
        return self._begin(server)

    async def __aexit__(self, *exc: Any) -> None:
        self.fake._server = None
        assert self._server is not None
        await self._server.__aexit__(*exc)
