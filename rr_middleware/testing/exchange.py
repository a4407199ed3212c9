"""One request as a ``FakeUpstream`` sees it: what it received (``ReceivedRequest``),
and the two ways of answering it, in-process (ASGI) or on a socket (``raw.py``), behind
one small interface (``Exchange``), so that each behaviour is written once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

from starlette.types import Message, Receive, Send

from .raw import RawConnection, RawRequest

__all__ = [
    "AsgiExchange",
    "Exchange",
    "ReceivedRequest",
    "ResetMidBody",
    "SocketExchange",
    "answer",
    "received",
    "with_length",
]


@dataclass
class ReceivedRequest:
    """One request as a ``FakeUpstream`` received it: ``path`` is the raw path as sent
    (percent-escapes kept), ``query`` the raw query string, ``headers`` every header in
    order with lower-case names, ``body`` (filled in once it has been read)."""

    upstream: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)

    def echo(self) -> dict[str, Any]:
        """What the fake answers: this request as JSON-ready values."""
        return {
            "upstream": self.upstream,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(pair) for pair in self.headers],
            "body": self.body.decode("utf-8", "replace"),
        }


class Exchange(Protocol):
    """One request being answered, in-process (ASGI) or on a socket."""

    async def read_body(self) -> bytes | None: ...  # None: the peer left first

    # Keep the request open and unanswered; ``reading``: while dropping what else comes
    # (so a peer's close is seen), else reading nothing at all.
    async def hold(self, reading: bool) -> None: ...

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def write(self, chunk: bytes) -> None: ...

    async def end(self) -> None: ...

    async def reset(self) -> None: ...  # break the exchange mid-response


def received(name: str, raw: RawRequest) -> ReceivedRequest:
    path, _, query = raw.target.partition(b"?")
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw.headers]
    return ReceivedRequest(
        name, raw.method.decode("latin-1"), path.decode("latin-1"), query.decode("latin-1"), headers
    )


def with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    return [*headers, (b"content-length", b"%d" % length)]


async def answer(
    exchange: Exchange,
    status: int,
    headers: list[tuple[bytes, bytes]],
    parts: list[bytes],
    interval: float = 0.0,
    length: int | None = None,
) -> None:
    if status in (204, 304):  # never a body (RFC 9110 §15.3.5, §15.4.5)
        parts = []
    if status == 204:
        await exchange.start(status, headers)
    else:
        size = sum(map(len, parts)) if length is None else length
        await exchange.start(status, with_length(headers, size))
    for index, part in enumerate(parts):
        if index and interval:
            await asyncio.sleep(interval)
        await exchange.write(part)
    await exchange.end()


class ResetMidBody(Exception):
    """Raised by the in-process fake to break its response (the transport reports the
    exchange broken, as a connection reset would)."""


class AsgiExchange:
    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send

    async def read_body(self) -> bytes | None:
        body = b""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            body += chunk
            if not message.get("more_body", False):
                return body

    async def hold(self, reading: bool) -> None:
        await asyncio.get_running_loop().create_future()  # until the caller gives up

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        message: Message = {"type": "http.response.start", "status": status, "headers": headers}
        await self._send(message)

    async def write(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})

    async def reset(self) -> None:
        raise ResetMidBody("FakeUpstream resets the connection mid-body")


class SocketExchange:
    def __init__(self, connection: RawConnection, request: RawRequest) -> None:
        self._connection = connection
        self._request = request

    async def read_body(self) -> bytes | None:
        if not await self._connection.read_body(self._request):
            return None
        return self._request.body

    async def hold(self, reading: bool) -> None:
        if reading:
            await self._connection.wait_eof()  # ends when the peer gives up and closes
        else:
            await self._connection.hold()  # until the fake stops

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        reason = (
            HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b""
        )
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        lines += [name + b": " + value for name, value in headers]
        await self._connection.send(b"\r\n".join(lines) + b"\r\n\r\n")

    async def write(self, chunk: bytes) -> None:
        await self._connection.send(chunk)

    async def end(self) -> None:
        pass

    async def reset(self) -> None:
        await self._connection.close(reset=True)
