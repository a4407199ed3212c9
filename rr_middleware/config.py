"""Configuration: plain dataclasses, validated once when they are built.

``Upstream`` is one server, ``Pool`` the servers behind one path prefix. Everything the
request path needs (the upstream's origin, its ``Host`` value, its base path as bytes) is
derived here, once, so forwarding a request does no parsing of configuration.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx
    from starlette.types import ASGIApp

    from .transport.base import UpstreamTransport

__all__ = ["Pool", "PoolsArg", "Upstream", "normalize_pools"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A DNS name or IPv4 address (letters, digits, "-", ".", "_"), or an IPv6 literal.
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._~-]+)?")
# RFC 3986 path characters: unreserved, sub-delims, ":", "@", "/" and percent-escapes.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


@dataclass(eq=False)
class Upstream:
    """One upstream server.

    ``url`` is ``http://host[:port][/base/path]``; the base path is prepended to every
    forwarded path. ``weight`` is the server's share of the pool (``0`` drains it).
    ``app=`` makes the upstream an in-process ASGI app (no sockets, through
    ``httpx.ASGITransport``); ``transport=`` takes any ``httpx.AsyncBaseTransport``.

    >>> Upstream("http://10.0.0.3:8000/v1", weight=2).origin
    'http://10.0.0.3:8000'
    """

    url: str
    weight: int = 1
    app: ASGIApp | None = field(default=None, repr=False)
    transport: httpx.AsyncBaseTransport | UpstreamTransport | None = field(default=None, repr=False)

    # Derived once in __post_init__; never set them yourself.
    scheme: str = field(init=False, repr=False)
    host: str = field(init=False, repr=False)
    port: int = field(init=False, repr=False)
    origin: str = field(init=False, repr=False)
    host_header: bytes = field(init=False, repr=False)
    base_path: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise ValueError(f"upstream URL must be a string, got {self.url!r}")
        try:
            parts = urlsplit(self.url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"upstream URL {self.url!r} is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"upstream URL {self.url!r} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"upstream URL {self.url!r} has no host")
        if not _HOST.fullmatch(parts.hostname):
            raise ValueError(f"upstream URL {self.url!r}: {parts.hostname!r} is not a valid host")
        if not _PATH.fullmatch(parts.path):
            raise ValueError(
                f"upstream URL {self.url!r}: the path may hold only ASCII URL characters; "
                "percent-encode anything else"
            )
        if parts.query or self.url.rstrip().endswith("?"):
            raise ValueError(f"upstream URL {self.url!r} must not have a query string")
        if parts.fragment or "#" in self.url:
            raise ValueError(f"upstream URL {self.url!r} must not have a fragment")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"upstream URL {self.url!r} must not carry credentials; "
                "set an Authorization header in the upstream app instead"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 0:
            raise ValueError(
                f"upstream {self.url!r}: weight must be an integer >= 0, got {self.weight!r}"
            )
        if self.app is not None and self.transport is not None:
            raise ValueError(f"upstream {self.url!r}: give app= or transport=, not both")

        self.scheme = scheme
        self.host = parts.hostname
        self.port = port if port is not None else _DEFAULT_PORTS[scheme]
        netloc_host = f"[{self.host}]" if ":" in self.host else self.host
        self.origin = f"{scheme}://{netloc_host}:{self.port}"
        default_port = self.port == _DEFAULT_PORTS[scheme]
        host_value = netloc_host if default_port else f"{netloc_host}:{self.port}"
        self.host_header = host_value.encode("ascii")
        # Kept exactly as written (already percent-encoded); "/" alone means "no base path".
        self.base_path = parts.path.rstrip("/").encode("ascii")

    def __repr__(self) -> str:
        return f"Upstream({self.url!r}, weight={self.weight})"


@dataclass(eq=False)
class Pool:
    """The upstreams behind one path prefix, and how requests reach them.

    >>> pool = Pool(["http://10.0.0.1:8000", "http://10.0.0.2:8000"], timeout=30.0)
    >>> [u.url for u in pool.upstreams]
    ['http://10.0.0.1:8000', 'http://10.0.0.2:8000']

    Defaults: ``strip_prefix=True``, ``timeout=60.0`` (seconds waiting for response
    headers, and between two body chunks), ``connect_timeout=5.0``, ``pool_timeout=5.0``
    (waiting for a free connection), ``max_connections=100`` per upstream,
    ``preserve_host=False``, ``retries=2`` (capped at the pool size - 1).
    """

    upstreams: Sequence[Upstream | str]
    strip_prefix: bool = True
    timeout: float = 60.0
    connect_timeout: float = 5.0
    pool_timeout: float = 5.0
    max_connections: int = 100
    preserve_host: bool = False
    retries: int = 2
    transport: httpx.AsyncBaseTransport | UpstreamTransport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.upstreams, (str, bytes)) or not isinstance(self.upstreams, Sequence):
            raise ValueError(
                f"a pool needs a list of upstream URLs or Upstream objects, got {self.upstreams!r}"
            )
        members = [u if isinstance(u, Upstream) else _upstream_from(u) for u in self.upstreams]
        if not members:
            raise ValueError("a pool needs at least one upstream")
        seen: set[str] = set()
        for member in members:
            key = member.origin + member.base_path.decode("ascii")
            if key in seen:
                raise ValueError(f"upstream {member.url!r} appears twice in one pool")
            seen.add(key)
        self.upstreams = members
        for name in ("timeout", "connect_timeout", "pool_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if (
            isinstance(self.max_connections, bool)
            or not isinstance(self.max_connections, int)
            or self.max_connections < 1
        ):
            raise ValueError(
                f"max_connections must be an integer >= 1, got {self.max_connections!r}"
            )

    @property
    def members(self) -> list[Upstream]:
        """The upstreams, as ``Upstream`` objects."""
        return self.upstreams  # type: ignore[return-value]  # normalised in __post_init__

    @property
    def max_attempts(self) -> int:
        """How many distinct upstreams one request may try: 1 + retries, at most the pool size."""
        return min(self.retries + 1, len(self.upstreams))


PoolsArg = Mapping[str, Union[Pool, Sequence[Union[Upstream, str]]]]


def _upstream_from(value: Any) -> Upstream:
    if isinstance(value, str):
        return Upstream(value)
    raise ValueError(f"an upstream must be a URL string or an Upstream, got {value!r}")


def normalize_prefix(prefix: Any) -> str:
    """``"/api/"`` → ``"/api"``; ``"/"`` stays. Rejects anything that is not a plain path."""
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"pool prefix {prefix!r} must be a path starting with '/'")
    if (
        not prefix.isascii()
        or any(c in prefix for c in "?#%\\")
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in prefix)
    ):
        raise ValueError(
            f"pool prefix {prefix!r} must be a plain ASCII path: no query, fragment, "
            "percent-escape, backslash, space or control character"
        )
    if prefix == "/":
        return prefix
    segments = prefix.removesuffix("/").split("/")[1:]
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"pool prefix {prefix!r} has an empty or dot segment")
    return "/" + "/".join(segments)


def normalize_pools(pools: Any) -> dict[str, Pool]:
    """Turn the ``pools=`` argument into ``{normalised prefix: Pool}``, or raise ValueError."""
    if not isinstance(pools, Mapping):
        raise ValueError("pools must be a mapping of path prefix -> Pool or list of URLs")
    if not pools:
        raise ValueError("pools must configure at least one prefix")
    result: dict[str, Pool] = {}
    for raw_prefix, spec in pools.items():
        prefix = normalize_prefix(raw_prefix)
        if prefix in result:
            raise ValueError(f"duplicate pool prefix {raw_prefix!r} (same as {prefix!r})")
        try:
            pool = spec if isinstance(spec, Pool) else Pool(spec)
        except ValueError as exc:
            raise ValueError(f"pool {raw_prefix!r}: {exc}") from None
        if any(pool is other for other in result.values()):
            raise ValueError(f"pool {raw_prefix!r}: the same Pool object is used for two prefixes")
        result[prefix] = pool
    return result
