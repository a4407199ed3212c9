"""rr-middleware: forward path prefixes of a Starlette/FastAPI app to pools of upstreams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import HealthCheck, Pool
from .discovery import ConsulDiscovery, Discovery, DiscoveryError, DNSDiscovery
from .errors import (
    BodyTooLarge,
    ClientBodyError,
    ClientBodyTimeout,
    ClientDisconnected,
    ConnectFailed,
    ConnectTimeout,
    FieldError,
    NoUpstream,
    PoolTimeout,
    ProxyError,
    RequestNotForwardable,
    ResponseAborted,
    UpstreamBroken,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .matching import Route
from .middleware import RoundRobinMiddleware
from .pool_runtime import PoolRuntime
from .runtime import Balancer
from .sticky import StickyCookie
from .tls import TLS
from .transport import Http1Transport, HttpxTransport, UpstreamTransport
from .upstream import Upstream

if TYPE_CHECKING:
    from .transport.aiohttp_transport import AiohttpTransport

__all__ = [
    "TLS",
    "AiohttpTransport",
    "Balancer",
    "BodyTooLarge",
    "ClientBodyError",
    "ClientBodyTimeout",
    "ClientDisconnected",
    "ConnectFailed",
    "ConnectTimeout",
    "ConsulDiscovery",
    "DNSDiscovery",
    "Discovery",
    "DiscoveryError",
    "FieldError",
    "HealthCheck",
    "Http1Transport",
    "HttpxTransport",
    "NoUpstream",
    "Pool",
    "PoolRuntime",
    "PoolTimeout",
    "ProxyError",
    "RequestNotForwardable",
    "ResponseAborted",
    "RoundRobinMiddleware",
    "Route",
    "StickyCookie",
    "Upstream",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamTransport",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "AiohttpTransport":  # optional: needs the "aiohttp" extra
        from . import transport

        return transport.AiohttpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
