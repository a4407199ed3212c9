"""One upstream server, as configured: an immutable value validated once.

Everything the request path needs (the upstream's origin, its ``Host`` value, its base path
as bytes) is derived here, once, so forwarding a request does no parsing of configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import FieldError
from .tls import TLS

if TYPE_CHECKING:
    import httpx
    from starlette.types import ASGIApp

    from .transport.base import UpstreamTransport

__all__ = ["Upstream"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A DNS name or IPv4 address (letters, digits, "-", ".", "_"), or an IPv6 literal.
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._~-]+)?")
# RFC 3986 path characters: unreserved, sub-delims, ":", "@", "/" and percent-escapes.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


@dataclass(frozen=True, eq=False)
class Upstream:
    """One upstream server.

    ``url`` is ``http://host[:port][/base/path]``; the base path is prepended to every
    forwarded path. ``weight`` is the server's share of the pool (``0`` drains it).
    ``app=`` makes the upstream an in-process ASGI app (no sockets, through
    ``httpx.ASGITransport``); ``transport=`` takes any ``httpx.AsyncBaseTransport``;
    ``tls=`` (a ``TLS``) how to trust it and what to present, over the pool's.

    >>> Upstream("http://10.0.0.3:8000/v1", weight=2).origin
    'http://10.0.0.3:8000'
    """

    url: str
    weight: int = 1
    app: ASGIApp | None = field(default=None, repr=False)
    transport: httpx.AsyncBaseTransport | UpstreamTransport | None = field(default=None, repr=False)
    tls: TLS | None = None

    # Derived once in __post_init__; never set them yourself.
    scheme: str = field(init=False, repr=False)
    host: str = field(init=False, repr=False)
    port: int = field(init=False, repr=False)
    origin: str = field(init=False, repr=False)
    host_header: bytes = field(init=False, repr=False)
    base_path: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise _url_error(f"must be a string, got {self.url!r}")
        try:
            parts = urlsplit(self.url)
            port = parts.port
        except ValueError as exc:
            raise _url_error(f"{self.url!r} is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise _url_error(f"{self.url!r} must start with http:// or https://")
        if not parts.hostname:
            raise _url_error(f"{self.url!r} has no host")
        if not _HOST.fullmatch(parts.hostname):
            raise _url_error(f"{self.url!r}: {parts.hostname!r} is not a valid host")
        if not _PATH.fullmatch(parts.path):
            raise _url_error(
                f"{self.url!r}: the path may hold only ASCII URL characters; "
                "percent-encode anything else"
            )
        if parts.query or self.url.rstrip().endswith("?"):
            raise _url_error(f"{self.url!r} must not have a query string")
        if parts.fragment or "#" in self.url:
            raise _url_error(f"{self.url!r} must not have a fragment")
        if parts.username is not None or parts.password is not None:
            raise _url_error(
                f"{self.url!r} must not carry credentials; "
                "set an Authorization header in the upstream app instead"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 0:
            problem = f"must be an integer >= 0, got {self.weight!r}"
            raise FieldError("weight", problem, f"upstream {self.url!r}: weight {problem}")
        if self.app is not None and self.transport is not None:
            raise ValueError(f"upstream {self.url!r}: give app= or transport=, not both")
        if self.tls is not None:
            check_tls(self.tls, self.transport if self.app is None else self.app)

        host = parts.hostname
        port = port if port is not None else _DEFAULT_PORTS[scheme]
        netloc_host = f"[{host}]" if ":" in host else host
        host_value = netloc_host if port == _DEFAULT_PORTS[scheme] else f"{netloc_host}:{port}"
        _derive(
            self,
            scheme=scheme,
            host=host,
            port=port,
            origin=f"{scheme}://{netloc_host}:{port}",
            host_header=host_value.encode("ascii"),
            # Kept exactly as written (already percent-encoded); "/" alone: no base path.
            base_path=parts.path.rstrip("/").encode("ascii"),
        )

    @property
    def identity(self) -> str:
        """Two configurations of one server (say, another weight) are the same member."""
        return self.origin + self.base_path.decode("ascii")

    def __repr__(self) -> str:
        return f"Upstream({self.url!r}, weight={self.weight})"


def check_tls(tls: object, client: object) -> None:
    """``tls`` is a ``TLS``, and nothing else (a transport, an app) says how to connect."""
    if not isinstance(tls, TLS):
        raise FieldError("tls", f"must be a TLS, got {tls!r}")
    if client is not None:
        raise FieldError(
            "tls",
            "applies to the built-in transport: give tls= or a transport/app of your own "
            "(with its own TLS settings), not both",
        )


def _derive(value: Any, **fields: Any) -> None:
    """Set a frozen dataclass's derived fields, once, in its ``__post_init__``."""
    for name, derived in fields.items():
        object.__setattr__(value, name, derived)


def _url_error(problem: str) -> FieldError:
    return FieldError("url", problem, f"upstream URL {problem}")
