"""rr_middleware.accept: the gateway's event loop takes a burst of new connections off
the listen queue in a few turns of a busy loop (worker processes on one socket sharing
the batch), pauses (not spins) when out of
descriptors, serves TLS, and stops accepting when closed. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn

from rr_middleware import accept, gateway

from .gateway_process import SERVER_LOG, STARTED, run_gateway
from .polling import wait_for

DEADLINE = 10.0


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """``main()`` on a new BatchAcceptLoop, with a deadline (asyncio.Runner is 3.11+)."""
    loop = accept.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), DEADLINE))
    finally:
        loop.close()


class Connections:
    """The connections a server made: each is answered ``hi`` and closed."""

    def __init__(self) -> None:
        self.made = 0
        self.closed = 0
        self._changed = asyncio.Event()

    def protocol(self) -> asyncio.Protocol:
        connections = self

        class Answer(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:  # uvloop's: no asyncio class
                transport.write(b"hi")
                transport.close()
                connections.made += 1
                connections._changed.set()

            def connection_lost(self, exc: Exception | None) -> None:
                connections.closed += 1
                connections._changed.set()

        return Answer()

    async def served(self, count: int) -> None:
        """Wait until ``count`` connections were made and closed (``run`` has the deadline)."""
        while self.closed < count:
            self._changed.clear()
            await self._changed.wait()


def listening(backlog: int = 512) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


@pytest.mark.parametrize(("workers", "batch"), [(None, 16), ("2", 8), ("3", 6), ("x", 16)])
def test_a_burst_is_accepted_in_a_few_turns_of_a_busy_loop(
    monkeypatch: pytest.MonkeyPatch, workers: str | None, batch: int
) -> None:
    """64 connections wait in the listen queue (the kernel completed their handshakes)
    while every turn of the loop spends 5 ms serving others: uvloop as it is takes one
    connection per turn (64 turns, a third of a second here, seconds under real load);
    this loop takes them in batches of ACCEPT_BATCH, or of a worker's share of it when
    ``WEB_CONCURRENCY`` workers accept on one socket (so that a worker that wakes first
    does not take a whole burst; a value that is no count is ignored)."""
    if workers is None:
        monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    else:
        monkeypatch.setenv("WEB_CONCURRENCY", workers)
    count = 64
    with ExitStack() as stack:
        listener = stack.enter_context(listening())
        clients = [
            stack.enter_context(socket.create_connection(listener.getsockname()))
            for _ in range(count)
        ]

        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            connections = Connections()
            per_turn: list[int] = []  # connections made by the end of each busy turn

            def busy() -> None:  # one turn's worth of other connections' work
                per_turn.append(connections.made)
                until = time.perf_counter() + 0.005
                while time.perf_counter() < until:
                    pass
                if connections.made < count:
                    loop.call_soon(busy)

            server = await loop.create_server(connections.protocol, sock=listener, backlog=512)
            loop.call_soon(busy)
            await connections.served(count)
            server.close()
            await server.wait_closed()
            return per_turn

        per_turn = run(main)
        assert len(per_turn) <= count // batch + 4, per_turn
        taken = [b - a for a, b in itertools.pairwise(per_turn)]
        assert max(taken) == batch, per_turn
        for client in clients:
            client.settimeout(DEADLINE)
            assert client.recv(2) == b"hi"


def fill_descriptors(fillers: list[int]) -> None:
    """Open /dev/null into every free descriptor below the limit."""
    while True:
        try:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            return


def test_out_of_descriptors_pauses_accepting_then_resumes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE on accept: one error logged per pause, no busy loop on a listening socket
    that stays readable, and the waiting connections are served once descriptors are free."""
    monkeypatch.setattr(accept, "ACCEPT_RETRY_DELAY", 0.1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with ExitStack() as stack:
        listener = stack.enter_context(listening())
        clients = [stack.enter_context(socket.create_connection(listener.getsockname()))]

        async def main() -> None:
            loop = asyncio.get_running_loop()
            connections = Connections()
            fillers: list[int] = []
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
            try:
                fill_descriptors(fillers)
                server = await loop.create_server(connections.protocol, sock=listener)
                await asyncio.sleep(0.35)  # the outage lasts about three pauses
                assert connections.made == 0
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await connections.served(1)
            server.close()
            await server.wait_closed()

        with caplog.at_level(logging.ERROR, logger="rr_middleware"):
            run(main)
        errors = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
        assert 1 <= len(errors) <= 5, errors  # once per pause, not once per turn
        assert "Too many open files" in errors[0]
        clients[0].settimeout(DEADLINE)
        assert clients[0].recv(2) == b"hi"


def test_tls_is_served_and_a_failed_handshake_harms_no_other_connection(
    tmp_path: Any,
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with listening() as listener:
        address = listener.getsockname()

        async def main() -> tuple[bytes, bytes]:
            loop = asyncio.get_running_loop()
            connections = Connections()
            server = await loop.create_server(
                connections.protocol, sock=listener, ssl=server_context
            )
            plain_reader, plain_writer = await asyncio.open_connection(*address)
            plain_writer.write(b"GET / HTTP/1.1\r\n\r\n")  # no TLS: the handshake fails
            refused = await plain_reader.read()
            reader, writer = await asyncio.open_connection(
                *address, ssl=client_context, server_hostname="127.0.0.1"
            )
            answer = await reader.read()
            writer.close()
            plain_writer.close()
            server.close()
            await server.wait_closed()
            return refused, answer

        refused, answer = run(main)
    assert answer == b"hi"
    assert b"hi" not in refused


def test_closing_stops_accepting_and_closes_the_listening_socket() -> None:
    with listening() as listener:
        address = listener.getsockname()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            connections = Connections()
            server = await loop.create_server(connections.protocol, sock=listener)
            assert server.is_serving()
            assert server.sockets == (listener,)
            server.close()
            await server.wait_closed()
            assert not server.is_serving()
            assert not server.sockets

        run(main)
        assert listener.fileno() == -1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address).close()


def test_a_connection_accepted_as_the_server_closes_is_served() -> None:
    """A stop (uvicorn's shutdown on SIGTERM) in the turn a connection was accepted: the
    connection is set up and served, not closed under the protocol that has it (which
    left uvicorn waiting for it until its graceful timeout)."""
    with ExitStack() as stack:
        listener = stack.enter_context(listening())
        client = stack.enter_context(socket.create_connection(listener.getsockname()))

        async def main() -> None:
            loop = asyncio.get_running_loop()
            connections = Connections()
            server = await loop.create_server(connections.protocol, sock=listener)
            assert isinstance(server, accept.BatchAcceptServer)
            server._accept(listener)  # as the loop does when the socket is readable
            server.close()
            await server.wait_closed()
            await connections.served(1)

        run(main)
        client.settimeout(DEADLINE)
        assert client.recv(2) == b"hi"


def test_a_host_and_port_are_bound_and_served_in_batches() -> None:
    """uvicorn with ``--host``/``--port`` and one worker asks for a host and port, not a
    socket: served the same way."""

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        connections = Connections()
        server = await loop.create_server(connections.protocol, host="127.0.0.1", port=0)
        assert isinstance(server, accept.BatchAcceptServer)
        (bound,) = server.sockets
        reader, writer = await asyncio.open_connection(*bound.getsockname()[:2])
        answer = await reader.read()
        writer.close()
        with pytest.raises(OSError, match="error while attempting to bind"):
            await loop.create_server(connections.protocol, "127.0.0.1", bound.getsockname()[1])
        server.close()
        await server.wait_closed()
        return answer

    assert run(main) == b"hi"


def test_a_lasting_accept_error_pauses_accepting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that comes back at every try (here EINVAL: the listening socket was shut
    down) is logged once per pause: no busy loop, no flood of tracebacks."""
    monkeypatch.setattr(accept, "ACCEPT_RETRY_DELAY", 0.1)
    with listening() as listener:

        async def main() -> float:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(Connections().protocol, sock=listener)
            listener.shutdown(socket.SHUT_RDWR)
            cpu = time.process_time()
            await asyncio.sleep(0.35)  # about three pauses
            cpu = time.process_time() - cpu
            assert server.is_serving()  # it goes on trying
            server.close()
            await server.wait_closed()
            return cpu

        with caplog.at_level(logging.ERROR, logger="rr_middleware"):
            cpu = run(main)
    errors = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert 1 <= len(errors) <= 5, errors
    assert "Invalid argument" in errors[0]
    assert cpu < 0.2  # a busy loop would spend the whole 0.35 s


def test_the_gateway_runs_uvicorn_on_this_loop() -> None:
    """The import path the gateway gives uvicorn builds this loop, through uvicorn's own
    option (its ``--loop`` takes a loop factory's import path since 0.36)."""
    factory = uvicorn.Config("x:y", loop=gateway._loop()).get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, accept.BatchAcceptLoop)
    finally:
        loop.close()


def test_the_gateway_tells_each_worker_how_many_share_its_socket(tmp_path: Path) -> None:
    """``rr-gateway`` with ``workers = 2`` runs each worker with ``WEB_CONCURRENCY=2``,
    whatever its own environment said, so each worker's loop takes half the batch."""
    config = (
        '[server]\nport = 0\nworkers = 2\nserver = "uvicorn"\n'
        '[pools."/api"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    with run_gateway(tmp_path, config, env={"WEB_CONCURRENCY": "7"}) as running:
        wait_for(lambda: running.output().count(STARTED["uvicorn"]) == 2, "both workers", DEADLINE)
        workers = re.findall(SERVER_LOG["uvicorn"][0], running.output())
        assert len(set(workers)) == 2, workers
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"WEB_CONCURRENCY=2" in environ


@pytest.mark.parametrize("workers", ["\u00b2", "\u2460", "1" * 5000])
def test_a_worker_count_that_is_no_count_is_ignored(workers: str) -> None:
    """(review) ``accept_batch``'s docstring: the whole batch when ``WEB_CONCURRENCY`` is
    not a number >= 1. "²" and "①" pass ``str.isdigit`` but not ``int``; a 5000-digit
    count passes ``isdigit`` but exceeds ``int``'s digit limit: the loop factory raises
    and the worker does not start."""
    assert accept.accept_batch(workers) in (accept.ACCEPT_BATCH, 1)
