"""The upstream seam: one small interface between forwarding and the wire.

``forwarding`` hands a transport an ``UpstreamRequest`` (raw bytes throughout) and gets an
``UpstreamResponse`` whose body it pulls chunk by chunk. Implementations translate their
library's failures into the ``UpstreamError`` family below, which tells forwarding what it
needs to know: whether anything reached the upstream (so a retry is safe) and which status
the client gets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

if TYPE_CHECKING:
    from ..config import Upstream

__all__ = [
    "ConnectFailed",
    "ConnectTimeout",
    "PoolTimeout",
    "RequestNotForwardable",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTransport",
]

Body = Union[bytes, AsyncIterable[bytes], None]


class UpstreamError(Exception):
    """An exchange with an upstream failed. ``kind`` names the failure for logs and metrics."""

    kind = "error"
    #: False when nothing of the request can have reached the upstream.
    sent = True


class ConnectFailed(UpstreamError):
    """The connection could not be made (refused, unreachable, DNS, TLS)."""

    kind = "connect"
    sent = False


class ConnectTimeout(ConnectFailed):
    """The connection was not made within ``connect_timeout``."""

    kind = "connect_timeout"


class PoolTimeout(UpstreamError):
    """No connection to the upstream became free in time."""

    kind = "pool_timeout"
    sent = False


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer (or went silent mid-body) within ``timeout``."""

    kind = "timeout"


class RequestNotForwardable(UpstreamError):
    """This transport cannot express the request on the wire (say, header bytes its
    client library would re-encode); nothing was sent, and no upstream would do better."""

    kind = "request"
    sent = False


class UpstreamBroken(UpstreamError):
    """The connection broke after the request was (maybe) sent, or the upstream spoke
    something that is not HTTP."""

    kind = "reset"


class UpstreamProtocolError(UpstreamBroken):
    """The upstream's answer is not valid HTTP/1.x (a malformed or oversized head or
    trailer, a status outside 200..599 for a final response, another protocol version)."""

    kind = "protocol"


@dataclass
class UpstreamRequest:
    """One request on its way upstream.

    ``target`` is the origin-form request target (raw path and query, exactly as sent);
    ``headers`` are final, including Host and Content-Length when known; ``body`` is
    None, bytes, or an async iterable of chunks. Timeouts are in seconds.
    """

    method: str
    upstream: Upstream
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
        """Release the connection (it is discarded if the body was not read to the end)."""
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
