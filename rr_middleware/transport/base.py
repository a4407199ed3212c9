"""The upstream seam: one small interface between forwarding and the wire.

``forwarding`` hands a transport an ``UpstreamRequest`` (raw bytes throughout) and gets an
``UpstreamResponse`` whose body it pulls chunk by chunk. Implementations translate their
library's failures into the ``UpstreamError`` family (``errors.py``, re-exported here for
transport authors), which tells forwarding what it needs to know: whether anything reached
the upstream (so a retry is safe) and which status the client gets.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar, Union

from ..errors import (
    ConnectFailed,
    ConnectTimeout,
    NoUpstream,
    PoolTimeout,
    RequestNotForwardable,
    UpstreamBroken,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

__all__ = [
    "ConnectFailed",
    "ConnectTimeout",
    "NoUpstream",
    "PoolTimeout",
    "RequestNotForwardable",
    "UpstreamAddress",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTransport",
    "headers_within",
]

Body = Union[bytes, AsyncIterable[bytes], None]


class UpstreamAddress(Protocol):
    """Where a request goes, as a transport needs it: what ``Upstream`` (``upstream.py``)
    derives from its URL. (A protocol, so the transports need nothing of configuration.)"""

    @property
    def scheme(self) -> str: ...  # "http" or "https"
    @property
    def host(self) -> str: ...  # a name or an IP address (IPv6 without brackets)
    @property
    def port(self) -> int: ...
    @property
    def origin(self) -> str: ...  # "http://host:port", also a connection pool's key
    @property
    def host_header(self) -> bytes: ...  # its Host value


@dataclass
class UpstreamRequest:
    """One request on its way upstream.

    ``target`` is the origin-form request target (raw path and query, exactly as sent);
    ``headers`` are final, including Host and Content-Length when known; ``body`` is
    None, bytes, or an async iterable of chunks. Timeouts are in seconds.
    """

    method: str
    upstream: UpstreamAddress
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: Body
    connect_timeout: float
    read_timeout: float


class UpstreamResponse(Protocol):
    """An upstream's response whose headers have arrived; the body is pulled with read()."""

    status: int
    #: Raw header pairs as the upstream sent them (any name case, repeats kept).
    headers: list[tuple[bytes, bytes]]

    async def read(self) -> bytes:
        """The next chunk of the (de-chunked, not decoded) body; ``b""`` once complete.

        Raises UpstreamError if the body cannot be completed.
        """
        ...

    def body_complete(self) -> bool:
        """True when the whole body has already arrived, so read() will not wait.

        Lets small responses go out in one piece with no streaming machinery.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection (it is discarded if the body was not read to the end),
        and stop sending the request body if that is still under way: once this returns,
        the request body is read no more. May be called more than once."""
        ...


class UpstreamTransport(ABC):
    """Sends requests to upstreams. One instance serves every upstream that uses it."""

    @abstractmethod
    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request; return once the response headers have arrived."""

    async def aopen(self) -> None:  # noqa: B027 - optional for stateless transports
        """Prepare for traffic; called on lifespan startup (transports may open lazily)."""

    async def aclose(self) -> None:  # noqa: B027 - optional for stateless transports
        """Close every connection this transport holds."""


T = TypeVar("T")


async def headers_within(seconds: float, sending: Awaitable[T]) -> T:
    """``sending`` (a client library sending a request with its body in hand, until the
    response headers arrive), cut off after ``seconds`` with ``UpstreamTimeout``: the
    libraries' own read timeouts start again at each byte, so an upstream dripping its
    head would otherwise hold the exchange as long as it likes. (The built-in transport
    bounds the head itself.) One timer, no task."""
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await sending
    except asyncio.CancelledError:
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if expired and (uncancel is None or uncancel() == 0):
            raise UpstreamTimeout(f"no response headers within {seconds}s") from None
        raise
    finally:
        timer.cancel()
