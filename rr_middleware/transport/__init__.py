"""Upstream transports: the seam (``base``), the fast default (``http1``), the httpx
adapter, and the optional aiohttp client (``pip install rr-middleware[aiohttp]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    ConnectFailed,
    ConnectTimeout,
    PoolTimeout,
    RequestNotForwardable,
    UpstreamBroken,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTransport,
)
from .http1 import Http1Transport
from .httpx_transport import HttpxTransport

if TYPE_CHECKING:
    from .aiohttp_transport import AiohttpTransport

__all__ = [
    "AiohttpTransport",
    "ConnectFailed",
    "ConnectTimeout",
    "Http1Transport",
    "HttpxTransport",
    "PoolTimeout",
    "RequestNotForwardable",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTransport",
]


def __getattr__(name: str) -> Any:
    # aiohttp is an optional dependency: import it only when asked for.
    if name == "AiohttpTransport":
        try:
            from .aiohttp_transport import AiohttpTransport
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "AiohttpTransport needs aiohttp: pip install 'rr-middleware[aiohttp]'"
            ) from exc
        return AiohttpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
