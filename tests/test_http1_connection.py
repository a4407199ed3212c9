"""``Connection`` and ``Exchange`` (``rr_middleware.transport.http1_connection``) on their own.

A connection is made to a listener in the test's own event loop, whose side of the socket
plays the upstream byte by byte; the test drives the exchanges the way ``http1`` does
(``start``, wait, ``take_body``, ``idle``) and checks what each exchange sees. The whole
client, pooling included, is tested through the middleware in ``test_http1_client``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import pytest

from rr_middleware.transport.base import UpstreamBroken, UpstreamTimeout
from rr_middleware.transport.http1_connection import (
    _JOIN_LIMIT,
    _READ_HIGH_WATER,
    Connection,
    Deadlines,
    Exchange,
)

WAIT = 5.0  # the longest any test waits for bytes that should come at once


@dataclass
class Upstream:
    """A ``Connection`` and the upstream's end of its socket."""

    conn: Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    lost: asyncio.Queue[Connection]

    def send(self, data: bytes) -> None:
        self.writer.write(data)


@asynccontextmanager
async def connected(deadlines: Deadlines | None = None) -> AsyncIterator[Upstream]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lost: asyncio.Queue[Connection] = asyncio.Queue()
    try:
        _, conn = await loop.create_connection(
            lambda: Connection(loop, lost.put_nowait, deadlines), "127.0.0.1", port
        )
        reader, writer = await asyncio.wait_for(accepted.get(), WAIT)
        try:
            yield Upstream(conn, reader, writer, lost)
        finally:
            conn.abort()
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def until(exchange: Exchange, done: Callable[[], object]) -> None:
    """Wait, as ``http1`` does, until ``done()`` holds; the exchange's error is raised."""
    while not done():
        if exchange.error is not None:
            raise exchange.error
        await exchange.wait(WAIT)


async def test_a_reused_connection_starts_each_exchange_clean() -> None:
    """Each request gets a new Exchange: nothing of the previous response (an interim
    response, headers, a trailer, the body) is seen by the next."""
    async with connected() as up:
        first = up.conn.start(head_only=False)
        up.send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-First: 1\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        await until(first, lambda: first.complete)
        assert first.status == 200
        assert first.headers == [(b"Transfer-Encoding", b"chunked"), (b"X-First", b"1")]
        assert first.take_body() == b"hello"
        assert first.reusable()
        up.conn.idle()
        idle = up.conn.exchange

        second = up.conn.start(head_only=False)
        assert (idle, up.conn.exchange) == (None, second)
        assert second is not first
        assert (second.status, second.headers, second.body, second.error) == (0, [], [], None)
        assert (second.received_any, second.headers_done, second.complete) == (False,) * 3
        assert (second.header_bytes, second.framing_run, second.body_seen) == (0, 0, 0)
        up.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
        await until(second, lambda: second.complete)
        assert (second.status, second.headers) == (404, [(b"Content-Length", b"2")])
        assert second.take_body() == b"no"
        assert second.reusable()
        assert (first.status, first.body) == (200, [])  # the first exchange is left alone


async def test_after_a_body_that_bypassed_the_parser_the_next_response_is_parsed() -> None:
    async with connected() as up:
        parser = up.conn.parser
        first = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await until(first, lambda: first.headers_done)
        up.send(b"01234")
        await until(first, lambda: first.body)
        up.send(b"56789")
        await until(first, lambda: first.complete)
        assert first.body_due == 0  # the body went past the parser, leaving it mid-message
        assert up.conn.parser is not parser  # so it was replaced
        assert first.take_body() == b"0123456789"
        assert first.reusable()
        up.conn.idle()

        second = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        await until(second, lambda: second.complete)
        assert (second.status, second.take_body()) == (200, b"abc")
        assert second.reusable()


async def test_the_owner_hears_of_an_idle_connection_the_upstream_closed() -> None:
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        await until(exchange, lambda: exchange.complete)
        up.conn.idle()
        loop = asyncio.get_running_loop()
        assert up.conn.usable(loop.time(), 4.0)
        up.writer.close()
        assert await asyncio.wait_for(up.lost.get(), WAIT) is up.conn
        assert up.conn.closed
        assert not up.conn.usable(loop.time(), 4.0)


async def test_an_idle_connection_is_usable_for_keepalive_seconds() -> None:
    async with connected() as up:
        up.conn.idle()
        since = asyncio.get_running_loop().time()
        assert up.conn.usable(since + 3.9, 4.0)
        assert not up.conn.usable(since + 4.1, 4.0)


@pytest.mark.parametrize("complete_first", [False, True], ids=["idle", "after-the-response"])
async def test_bytes_nobody_asked_for_discard_the_connection(complete_first: bool) -> None:
    async with connected() as up:
        if complete_first:
            exchange = up.conn.start(head_only=False)
            up.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await until(exchange, lambda: exchange.complete)
        else:
            up.conn.idle()
        up.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        assert await asyncio.wait_for(up.lost.get(), WAIT) is up.conn
        assert up.conn.closed
        if complete_first:
            assert not exchange.reusable()


@pytest.mark.parametrize(
    ("sent", "received_any", "message"),
    [
        (b"", False, "before the response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", True, "before the response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", True, "mid-body"),
    ],
    ids=["nothing", "half-a-head", "part-of-the-body"],
)
async def test_an_upstream_closing_mid_exchange_fails_it(
    sent: bytes, received_any: bool, message: str
) -> None:
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        up.send(sent)
        up.writer.close()
        with pytest.raises(UpstreamBroken, match=message):
            await until(exchange, lambda: exchange.complete)
        assert exchange.received_any is received_any
        assert not exchange.reusable()


async def test_a_body_delimited_by_close_completes_when_the_upstream_closes() -> None:
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        up.writer.close()
        await until(exchange, lambda: exchange.complete)
        assert exchange.take_body() == b"until the end"
        assert exchange.error is None
        assert not exchange.reusable()


async def test_a_head_response_ends_with_its_head_and_is_not_reused() -> None:
    async with connected() as up:
        exchange = up.conn.start(head_only=True)
        up.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await until(exchange, lambda: exchange.complete)
        assert (exchange.status, exchange.body) == (200, [])
        assert not exchange.reusable()


async def test_reading_pauses_past_the_high_water_mark_until_the_body_is_taken() -> None:
    size = 1024 * 1024
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
        await until(exchange, lambda: exchange.body_size > _READ_HIGH_WATER)
        paused = up.conn.reading_paused
        taken = 0
        while exchange.body_size > _READ_HIGH_WATER:
            assert up.conn.reading_paused
            taken += len(exchange.take_body())
        assert (paused, up.conn.reading_paused) == (True, False)
        while not exchange.complete or exchange.body:
            if exchange.body:
                taken += len(exchange.take_body())
            else:
                await exchange.wait(WAIT)
        assert taken == size
        assert exchange.reusable()


async def test_reading_stays_paused_while_more_than_the_high_water_mark_is_left() -> None:
    piece = 40 * 1024  # two of them are past the join limit: each is read on its own
    pieces = [bytes([65 + i]) * piece for i in range(3)]
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * piece))
        await until(exchange, lambda: exchange.headers_done)
        for data in pieces:  # three socket reads, 120 KiB buffered
            up.conn.data_received(data)
        assert up.conn.reading_paused
        assert exchange.take_body() == pieces[0]
        assert up.conn.reading_paused, "80 KiB left: reading stays paused"
        assert exchange.take_body() == pieces[1]
        assert not up.conn.reading_paused, "40 KiB left: reading resumes"
        assert exchange.take_body() == pieces[2]
        assert exchange.complete
        assert exchange.reusable()


async def test_small_body_pieces_are_read_together_up_to_the_join_limit() -> None:
    """A chunked body's small chunks are read together (one send to the client, not one
    per chunk), and never more than the join limit at a time."""
    chunks = [b"%04d" % i + b"s" * 1020 for i in range(3 * _JOIN_LIMIT // 1024)]  # 1 KiB
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        up.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await until(exchange, lambda: exchange.headers_done)
        up.conn.data_received(framed)  # one socket read holding every chunk
        reads = []
        while exchange.body:
            reads.append(exchange.take_body())
        assert b"".join(reads) == b"".join(chunks)
        assert [len(r) for r in reads] == [_JOIN_LIMIT] * 3
        assert exchange.complete
        assert exchange.reusable()


async def test_a_silent_upstream_times_the_wait_out_and_loses_the_connection() -> None:
    async with connected() as up:
        exchange = up.conn.start(head_only=False)
        await exchange.wait(0.01)
        assert isinstance(exchange.error, UpstreamTimeout)
        assert up.conn.closed
        assert await asyncio.wait_for(up.lost.get(), WAIT) is up.conn


async def test_read_deadlines_shared_by_connections_each_fire_on_time() -> None:
    """One timer serves the read deadlines of every connection of a loop (``Deadlines``):
    a wait that began later but ends sooner still times out on time, the others wait on,
    and a wait its upstream answered is never timed out afterwards."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    async with connected(deadlines) as slow, connected(deadlines) as silent:
        answered = slow.conn.start(head_only=False)
        slow_wait = asyncio.ensure_future(answered.wait(WAIT))
        await asyncio.sleep(0)  # its deadline, WAIT away, is the one the timer is set to
        timed = silent.conn.start(head_only=False)
        began = loop.time()
        await timed.wait(0.05)
        took = loop.time() - began
        assert isinstance(timed.error, UpstreamTimeout)
        assert 0.05 <= took < 1.0
        assert not slow_wait.done()
        assert answered.error is None
        slow.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        await asyncio.wait_for(slow_wait, WAIT)
        assert answered.error is None
        assert answered.status == 204
        assert not deadlines.waiting


async def test_closing_the_deadlines_leaves_a_wait_under_way_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    async with connected(deadlines) as silent:
        exchange = silent.conn.start(head_only=False)
        waiting = asyncio.ensure_future(exchange.wait(0.05))
        await asyncio.sleep(0)
        deadlines.close()  # as a transport closing while a wait is under way
        await asyncio.wait_for(waiting, WAIT)
        assert isinstance(exchange.error, UpstreamTimeout)
