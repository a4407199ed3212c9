"""Upstream transports: the seam (``base``), the fast default, and the httpx adapter."""

from .aiohttp_transport import AiohttpTransport
from .base import (
    ConnectFailed,
    ConnectTimeout,
    PoolTimeout,
    UpstreamBroken,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTransport,
)
from .http1 import Http1Transport
from .httpx_transport import HttpxTransport

__all__ = [
    "AiohttpTransport",
    "ConnectFailed",
    "ConnectTimeout",
    "Http1Transport",
    "HttpxTransport",
    "PoolTimeout",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTransport",
]
