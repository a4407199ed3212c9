"""The client's side of one proxied exchange: its request body, its leaving, and each send
to it, every one with a deadline.

The proxy faces the internet, so every pause of a client is treated as hostile:

- **The body**: at most ``max_body_size`` bytes (413), and never a pause longer than
  ``client_body_timeout`` between two parts (408; nginx's ``client_body_timeout``).
- **Leaving**: once the body is in, ``receive()`` has nothing left to return but the
  disconnect. A client that hangs up while the proxy waits for the upstream ends the
  exchange at once (nginx aborts the upstream request by default): a task waits on
  ``receive()`` and cancels the exchange's task wherever it waits (a connection slot, the
  response headers, the upstream's body, a send), rather than each of those waits racing
  the disconnect on its own.
- **Sends**: each send to the client must complete within ``client_send_timeout``
  (nginx's ``send_timeout``); a client that stops reading is cut off. The relay marks
  each send's start in ``sending_since``.

None of this may cost a fast exchange anything measurable: a timer or a task per request
costs more than the middleware's whole routing (a uvloop timer about 1.7 us, a task
started and cancelled about 7 us). So each exchange only records, in plain attributes,
what it waits for and since when, and one ``Sweeper`` per middleware looks at the
exchanges in flight every ``TICK`` seconds: it fails a body that stalled, cuts off a
client that stopped reading, and starts the disconnect watch for exchanges that have run
for a tick. Deadlines are therefore kept to within ``TICK`` (0.1 s), a client leaving is
noticed within two, and an exchange shorter than a tick never starts a task of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import BodyTooLarge, ClientBodyError, ClientBodyTimeout, ClientDisconnected

if TYPE_CHECKING:
    from starlette.types import Message, Receive

__all__ = [
    "LINGER_BYTES",
    "LINGER_IDLE",
    "LINGER_TIME",
    "TICK",
    "ClientSide",
    "Sweeper",
    "abort_client",
    "linger",
]

#: Seconds between two looks at the exchanges in flight: how late a deadline may be
#: noticed, and how long an exchange runs before its client is watched for leaving.
TICK = 0.1

#: An answer given before the request body was read (nginx's lingering close): before its
#: last message, what the client still sends is read and dropped, until the body ends, the
#: client leaves, nothing comes for ``LINGER_IDLE`` seconds, ``LINGER_TIME`` seconds pass
#: or ``LINGER_BYTES`` are read (nginx: ``lingering_timeout`` 5 s, ``lingering_time`` 30 s).
LINGER_TIME = 2.0
LINGER_IDLE = 0.5
LINGER_BYTES = 1 << 20


class Sweeper:
    """Looks at every exchange in flight every ``TICK`` seconds (see the module docstring).

    One per middleware; the exchanges of each event loop are swept by a timer of that
    loop (a ``TestClient`` used without ``with`` runs each request in a loop of its own,
    and an app may be served from several threads). A loop's timer runs only while it has
    exchanges in flight, so nothing is left pending when a loop ends.
    """

    __slots__ = ("_last", "_loops", "tick")

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        #: Per event loop: its exchanges in flight, and its pending sweep (None: none).
        self._loops: dict[asyncio.AbstractEventLoop, _LoopSweep] = {}
        self._last: _LoopSweep | None = None  # the last one asked for: nearly always it

    def of(self, loop: asyncio.AbstractEventLoop) -> _LoopSweep:
        """The sweep of ``loop``'s exchanges, which each exchange joins and leaves."""
        last = self._last
        if last is not None and last.loop is loop:
            return last
        sweep = self._loops.get(loop)
        if sweep is None:
            if len(self._loops) > 16:  # loops that ended (TestClient): forget them
                for old in [old for old in self._loops if old.is_closed()]:
                    del self._loops[old]
            sweep = self._loops[loop] = _LoopSweep(loop, self.tick)
        self._last = sweep
        return sweep


class _LoopSweep:
    __slots__ = ("exchanges", "loop", "tick", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.exchanges: set[ClientSide] = set()
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Sweep a tick from now (called when an exchange joins and none is pending)."""
        self.timer = self.loop.call_later(self.tick, self.sweep)

    def sweep(self) -> None:
        self.timer = None
        if not self.exchanges:
            return
        now = self.loop.time()
        for exchange in list(self.exchanges):
            exchange.check(now)
        if self.exchanges:
            self.timer = self.loop.call_later(self.tick, self.sweep)


class ClientSide:
    """One client's side of one exchange: its body, its leaving, the sends to it.

    ``start()`` reads the body whole when it is short; otherwise ``chunks()`` streams the
    rest upstream as the upstream takes it, starting with what was already read. Whatever
    ends the body early is raised (a ``ClientBodyError``) and kept in ``failure``, because
    a transport may report it as the broken upstream connection it causes instead.
    The relay sets ``sending_since`` around each send to the client. Once the exchange is
    over, ``close()`` (also when it fails): from then on nothing is watched.
    """

    # No __slots__: the state that starts the same for every exchange lives on the class,
    # so building one sets only what differs (this object is made for every request).
    _first = b""
    started = False  # chunks() has begun: the body cannot be sent again
    complete = False  # the whole body is in
    ended = False  # the body's last message was read (even one over the limit)
    failure: ClientBodyError | None = None
    size = 0  # body bytes read so far
    gone = False  # the client left, or stopped reading (``stalled``)
    stalled = False
    closed = False
    _waiting: asyncio.Task[Any] | None = None  # a task in receive(), and since when
    _waiting_since = 0.0
    #: While the body streams upstream: seconds spent waiting for the client in all, and
    #: the body's size when the streaming began (see ``min_rate``).
    _streamed_wait = 0.0
    _stream_start = 0
    #: When the send to the client now in progress began (None: not sending). Set by the
    #: relay around each send, as plain attribute writes: a wrapper coroutine per send
    #: would cost more than the bookkeeping.
    sending_since: float | None = None
    _watch: asyncio.Future[Message] | None = None
    #: The server's body message was not read (``empty``): the watch reads past it.
    _unread = False

    def __init__(
        self,
        receive: Receive,
        *,
        limit: int | None,
        body_timeout: float,
        send_timeout: float,
        sweeper: Sweeper,
        min_rate: float = 0.0,
        empty: bool = False,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task  # the exchange's task: what leaving or stalling cancels
        self.loop = loop = task.get_loop()
        self._since = loop.time()
        self._receive = receive
        self.limit = limit
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout
        self.min_rate = min_rate
        if empty:
            # A request its framing says has no body (HTTP/1.x with neither a
            # Content-Length nor a Transfer-Encoding): complete as it stands, with no
            # receive() for the empty body message, which the disconnect watch reads.
            self.complete = True
            self._unread = True
        sweep = self._sweep = sweeper.of(loop)
        sweep.exchanges.add(self)
        if sweep.timer is None:
            sweep.arm()

    @property
    def receive(self) -> Receive:
        """The server's ``receive`` (what an answer that lingers reads: ``linger``)."""
        return self._receive

    @property
    def reading(self) -> bool:
        """Whether a read of the body is under way (a transport's body writer still in
        ``receive()``): then no one else may read it."""
        return self._waiting is not None

    # -- the body -------------------------------------------------------------------------

    async def start(self, buffer_limit: int) -> bytes | None:
        """Read until the body ends (return it: complete, so replayable; None if empty)
        or passes ``buffer_limit`` bytes (return None, ``complete`` False: stream the
        rest with ``chunks()``). Raises ClientBodyError. (Not called when ``empty``.)"""
        chunk, more = await self._next()
        if not more:  # most requests: the whole body (or none) in one message
            self.complete = True
            return chunk or None
        parts = [chunk]
        while self.size <= buffer_limit:
            chunk, more = await self._next()
            parts.append(chunk)
            if not more:
                self.complete = True
                return b"".join(parts) or None
        self._first = b"".join(parts)
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        self._stream_start = self.size
        if self._first:
            yield self._first
            self._first = b""
        while True:
            chunk, more = await self._next()
            if not more:
                self.complete = True
                if chunk:
                    yield chunk
                return
            if chunk:
                yield chunk

    async def _next(self) -> tuple[bytes, bool]:
        # Only the time spent waiting for the client counts, not the upstream's pace.
        self._waiting_since = self.loop.time()
        # start() runs in the exchange's task, chunks() in the transport's writer.
        task = self._task if not self.started else asyncio.current_task()
        self._waiting = task
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if isinstance(self.failure, ClientBodyTimeout):
                uncancel = getattr(task, "uncancel", None)  # Python 3.11+
                if uncancel is None or uncancel() == 0:  # ours alone: not a shutdown
                    raise self.failure from None
            raise
        finally:
            self._waiting = None
            if self.started:
                self._streamed_wait += self.loop.time() - self._waiting_since
        if message["type"] == "http.disconnect":
            self._fail(ClientDisconnected("the client left during the request body"))
        chunk: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        self.ended = not more
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            self._fail(BodyTooLarge(f"request body over max_body_size ({self.limit})"))
        return chunk, more

    def _fail(self, error: ClientBodyError) -> NoReturn:
        self.failure = error
        raise error

    # -- the sweep ----------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """The sweeper's look: act on a deadline that passed, watch a long exchange."""
        if self.closed or self.gone:
            return
        waiting = self._waiting
        if waiting is not None and self.failure is None:
            waited = now - self._waiting_since
            if waited >= self.body_timeout:
                self.failure = ClientBodyTimeout(
                    f"no request body from the client for {self.body_timeout}s"
                )
                waiting.cancel()
            elif (
                self.started
                and self.min_rate
                and (
                    self._streamed_wait + waited
                    > self.body_timeout + (self.size - self._stream_start) / self.min_rate
                )
            ):
                # A drip (a byte now and then, never a whole pause) holding an upstream
                # connection: each byte buys 1/min_rate seconds, and no more.
                self.failure = ClientBodyTimeout(
                    f"request body streamed slower than {self.min_rate:g} bytes/s"
                )
                waiting.cancel()
            return
        since = self.sending_since
        if since is not None and now - since >= self.send_timeout:
            self.stalled = self.gone = True
            self._task.cancel()
            return
        if self.complete and self._watch is None and now - self._since >= self._sweep.tick:
            self._start_watch()

    def _start_watch(self) -> None:
        self._watch = asyncio.ensure_future(self._receive())
        self._watch.add_done_callback(self._on_message)

    def _on_message(self, future: asyncio.Future[Message]) -> None:
        # A callback already scheduled runs even once closed: after close(), a no-op.
        if self.closed or future.cancelled() or future.exception() is not None:
            return
        kind = future.result()["type"]
        if kind == "http.disconnect":
            self.gone = True
            self._task.cancel()
        elif kind == "http.request" and self._unread:
            self._unread = False  # the empty body's message, left unread: watch on
            self._start_watch()

    def close(self) -> None:
        """The exchange is over (the server answers ``receive()`` with a disconnect once
        the response is complete: call this before yielding after the last send)."""
        if self.closed:
            return
        self.closed = True
        self._sweep.exchanges.discard(self)
        watch = self._watch
        if watch is not None and not watch.done():
            watch.cancel()

    def swallows(self) -> bool:
        """For a CancelledError in the exchange: True if the client leaving (or stalling)
        caused it, and no one else (a server shutting down) asked for the cancellation."""
        if not self.gone:
            return False
        uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
        return uncancel is None or uncancel() == 0


async def linger(receive: Receive) -> None:
    """Read and drop the rest of a request body the answer did not need, within bounds (see
    ``LINGER_TIME``), before the answer's last message lets the server close.

    A server closes a connection at once after an answer that says ``Connection: close``;
    body bytes still arriving then (or unread in the socket) make the kernel answer with a
    reset, and a client still writing its upload usually reports that reset ("connection
    reset by peer") instead of the answer, which it may never read. Once the body is in,
    or the client has stopped sending, the close is an ordinary one."""
    loop = asyncio.get_running_loop()
    end = loop.time() + LINGER_TIME
    size = 0
    while size < LINGER_BYTES:
        wait = min(LINGER_IDLE, end - loop.time())
        if wait <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), wait)
        except Exception:  # nothing came in time, or the server's receive() failed:
            return  # lingering is a courtesy; the answer ends either way
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        size += len(message.get("body", b""))


async def abort_client(send: Any) -> bool:
    """Cut the client's connection at once (a TCP reset), where the server lets us: an
    aborted response must not sit in the server's buffers waiting for a client that reads
    nothing (a close would wait for them to drain). uvicorn's ``send`` is a method of the
    exchange that holds the connection's transport. Returns False where that is not so:
    the caller raises ``ResponseAborted`` for the server to cut it instead."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        return False
    abort()
    await asyncio.sleep(0)  # the server's connection_lost runs: it knows the client went
    return True
