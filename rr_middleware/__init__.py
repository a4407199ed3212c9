"""rr-middleware: forward path prefixes of a Starlette/FastAPI app to pools of upstreams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import HealthCheck, Pool, Upstream
from .discovery import ConsulDiscovery, Discovery, DiscoveryError, DNSDiscovery
from .forwarding import ResponseAborted
from .middleware import RoundRobinMiddleware
from .transport import Http1Transport, HttpxTransport, UpstreamTransport

if TYPE_CHECKING:
    from .transport.aiohttp_transport import AiohttpTransport

__all__ = [
    "AiohttpTransport",
    "ConsulDiscovery",
    "DNSDiscovery",
    "Discovery",
    "DiscoveryError",
    "HealthCheck",
    "Http1Transport",
    "HttpxTransport",
    "Pool",
    "ResponseAborted",
    "RoundRobinMiddleware",
    "Upstream",
    "UpstreamTransport",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "AiohttpTransport":  # optional: needs the "aiohttp" extra
        from . import transport

        return transport.AiohttpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
