"""rr-middleware: forward path prefixes of a Starlette/FastAPI app to pools of upstreams."""

from .config import Pool, Upstream
from .forwarding import ResponseAborted
from .middleware import RoundRobinMiddleware
from .transport import AiohttpTransport, Http1Transport, HttpxTransport, UpstreamTransport

__all__ = [
    "AiohttpTransport",
    "Http1Transport",
    "HttpxTransport",
    "Pool",
    "ResponseAborted",
    "RoundRobinMiddleware",
    "Upstream",
    "UpstreamTransport",
]
__version__ = "0.1.0"
