"""Configuration: plain dataclasses, validated once when they are built.

``Upstream`` is one server, ``Pool`` the servers behind one path prefix. Everything the
request path needs (the upstream's origin, its ``Host`` value, its base path as bytes) is
derived here, once, so forwarding a request does no parsing of configuration.
"""

from __future__ import annotations

import math
import random as random_module
import re
import time
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx
    from starlette.types import ASGIApp

    from .discovery import Discovery
    from .state import PoolRuntime
    from .transport.base import UpstreamTransport

__all__ = ["FieldError", "HealthCheck", "Pool", "PoolsArg", "Upstream", "normalize_pools"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A DNS name or IPv4 address (letters, digits, "-", ".", "_"), or an IPv6 literal.
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._~-]+)?")
# RFC 3986 path characters: unreserved, sub-delims, ":", "@", "/" and percent-escapes.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
_PATH_AND_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
# A method name is a token (RFC 9110 §9.1, §5.6.2).
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class FieldError(ValueError):
    """One option has a wrong value: ``field`` is its name (the keyword argument, and the
    gateway's TOML key), ``problem`` what is wrong with it. ``str()`` is the message the
    Python API gives; the gateway prints ``problem`` after the key path instead, so no
    caller has to find the option's name in the text.

    >>> error = FieldError("retries", "must be an integer >= 0, got -1")
    >>> str(error), error.field
    ('retries must be an integer >= 0, got -1', 'retries')
    """

    def __init__(self, field: str, problem: str, message: str | None = None) -> None:
        super().__init__(f"{field} {problem}" if message is None else message)
        self.field = field
        self.problem = problem

    @classmethod
    def of(cls, owner: str, field: str, problem: str) -> FieldError:
        """The Python message names the option's owner: ``"health check rise must ..."``."""
        return cls(field, problem, f"{owner} {field} {problem}" if owner else None)


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


@dataclass(frozen=True)
class HealthCheck:
    """Active health checks of every upstream of a pool, run by the lifespan.

    ``GET path`` every ``interval`` seconds (give or take ``jitter`` times that, so a
    fleet of workers does not probe in lockstep), each bounded by ``timeout``; a status in
    ``expect`` passes. An upstream turns unhealthy after ``fall`` consecutive failures and
    healthy again after ``rise`` consecutive passes (HAProxy's thresholds).

    >>> HealthCheck(path="/healthz", interval=5.0).fall
    3
    """

    path: str = "/health"
    interval: float = 10.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    expect: Container[int] = range(200, 400)
    jitter: float = 0.1

    def __post_init__(self) -> None:
        owner = "health check"
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise FieldError.of(owner, "path", f"must start with '/', got {self.path!r}")
        if not _PATH_AND_QUERY.fullmatch(self.path):
            problem = f"{self.path!r} must be ASCII URL characters"
            raise FieldError("path", problem, f"health check path {problem}")
        _positive_number("interval", self.interval, owner)
        _positive_number("timeout", self.timeout, owner)
        _int_at_least("rise", self.rise, 1, owner)
        _int_at_least("fall", self.fall, 1, owner)
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)):
            raise FieldError.of(owner, "jitter", f"must be a number, got {self.jitter!r}")
        if not 0 <= self.jitter < 1:
            raise FieldError.of(owner, "jitter", f"must be in [0, 1), got {self.jitter!r}")


@dataclass(eq=False)
class Pool:
    """The upstreams behind one path prefix, and how requests reach them.

    >>> pool = Pool(["http://10.0.0.1:8000", "http://10.0.0.2:8000"], timeout=30.0)
    >>> [u.url for u in pool.upstreams]
    ['http://10.0.0.1:8000', 'http://10.0.0.2:8000']

    Give ``discovery=`` (``ConsulDiscovery``, ``DNSDiscovery``) instead of upstreams for
    members that follow a registry while the app runs.

    Some requests the pool answers itself, before any upstream: a method in
    ``refuse_methods`` (CONNECT and TRACE) with 405, and with 400 a path with a dot
    segment or unsafe bytes, or (``refuse_ambiguous_paths=True``) one that some upstream
    servers read as having a dot segment (``/api/..;/admin``, ``%252e%252e``, ``%c0%ae``).

    Every option and its default is in the README's configuration reference. Keep a
    reference to the Pool to read ``pool.snapshot()`` or ``pool.drain(url)`` while it
    serves.
    """

    upstreams: Sequence[Upstream | str] = ()
    strip_prefix: bool = True
    refuse_methods: Collection[str] = frozenset({"CONNECT", "TRACE"})
    refuse_ambiguous_paths: bool = True
    timeout: float = 60.0
    connect_timeout: float = 5.0
    pool_timeout: float = 5.0
    max_connections: int = 100
    preserve_host: bool = False
    retries: int = 2
    transport: httpx.AsyncBaseTransport | UpstreamTransport | None = field(default=None, repr=False)
    policy: str = "round_robin"
    health_check: HealthCheck | None = None
    max_fails: int = 3
    fail_timeout: float = 10.0
    unhealthy_statuses: Collection[int] = frozenset({502, 503, 504})
    on_all_down: str = "try_all"
    retry_non_idempotent: bool = False
    retry_body_limit: int = 64 * 1024
    request_buffer_size: int = 64 * 1024
    retry_on_statuses: Collection[int] = frozenset()
    slow_start: float = 0.0
    max_body_size: int | None = None
    client_body_timeout: float = 30.0
    client_send_timeout: float = 60.0
    websocket_timeout: float | None = None
    websocket_idle_timeout: float | None = None
    websocket_ping_interval: float | None = 20.0
    discovery: Discovery | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    random: random_module.Random | None = field(default=None, repr=False)
    # The run-time state of the middleware serving this pool (set when one does).
    _runtime: PoolRuntime | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.upstreams, (str, bytes)) or not isinstance(self.upstreams, Sequence):
            raise FieldError(
                "upstreams",
                f"must be a list of upstream URLs or Upstream objects, got {self.upstreams!r}",
            )
        members = [u if isinstance(u, Upstream) else _upstream_from(u) for u in self.upstreams]
        if self.discovery is not None:
            from .discovery import Discovery

            if not isinstance(self.discovery, Discovery):
                raise FieldError(
                    "discovery",
                    "must be a ConsulDiscovery, a DNSDiscovery or another Discovery, "
                    f"got {self.discovery!r}",
                )
            if members:
                raise ValueError("give a pool upstreams or discovery=, not both")
        elif not members:
            raise ValueError("a pool needs at least one upstream (or discovery=)")
        seen: set[str] = set()
        for member in members:
            key = member.origin + member.base_path.decode("ascii")
            if key in seen:
                problem = f"has {member.url!r} twice (the same server as an earlier entry)"
                raise FieldError(
                    "upstreams", problem, f"upstream {member.url!r} appears twice in one pool"
                )
            seen.add(key)
        self.upstreams = members
        for name in (
            "timeout",
            "connect_timeout",
            "pool_timeout",
            "fail_timeout",
            "client_body_timeout",
            "client_send_timeout",
        ):
            _positive_number(name, getattr(self, name))
        _int_at_least("retries", self.retries, 0)
        _int_at_least("max_connections", self.max_connections, 1)
        _int_at_least("max_fails", self.max_fails, 0)
        _int_at_least("retry_body_limit", self.retry_body_limit, 0)
        _int_at_least("request_buffer_size", self.request_buffer_size, 0)
        if self.policy not in ("round_robin", "least_requests", "random"):
            raise FieldError(
                "policy",
                f"must be 'round_robin', 'least_requests' or 'random', got {self.policy!r}",
            )
        if self.on_all_down not in ("try_all", "fail"):
            raise FieldError(
                "on_all_down", f"must be 'try_all' or 'fail', got {self.on_all_down!r}"
            )
        if self.health_check is not None and not isinstance(self.health_check, HealthCheck):
            raise FieldError("health_check", f"must be a HealthCheck, got {self.health_check!r}")
        for name in ("unhealthy_statuses", "retry_on_statuses"):
            statuses = getattr(self, name)
            if isinstance(statuses, (str, bytes)) or not all(
                isinstance(code, int) and 100 <= code <= 599 for code in statuses
            ):
                raise FieldError(name, f"must be HTTP status codes, got {statuses!r}")
            setattr(self, name, frozenset(statuses))
        if isinstance(self.slow_start, bool) or not isinstance(self.slow_start, (int, float)):
            raise FieldError("slow_start", f"must be a number of seconds, got {self.slow_start!r}")
        if not math.isfinite(self.slow_start) or self.slow_start < 0:
            raise FieldError("slow_start", f"must be >= 0 seconds, got {self.slow_start!r}")
        if self.max_body_size is not None:
            _int_at_least("max_body_size", self.max_body_size, 0)
        for name in ("websocket_timeout", "websocket_idle_timeout", "websocket_ping_interval"):
            if getattr(self, name) is not None:
                _positive_number(name, getattr(self, name))
        if not callable(self.clock):
            raise FieldError("clock", f"must be a callable returning seconds, got {self.clock!r}")
        methods = self.refuse_methods
        if (
            isinstance(methods, (str, bytes))
            or not isinstance(methods, Collection)
            or not all(isinstance(m, str) and _METHOD.fullmatch(m) for m in methods)
        ):
            raise FieldError(
                "refuse_methods", f"must be a collection of HTTP method names, got {methods!r}"
            )
        # Method names are case-sensitive (RFC 9110 §9.1), but an upstream that reads
        # "trace" as TRACE is not rare: the refusal goes by the upper-case name.
        self.refuse_methods = frozenset(m.upper() for m in methods)
        if not isinstance(self.refuse_ambiguous_paths, bool):
            raise FieldError(
                "refuse_ambiguous_paths",
                f"must be True or False, got {self.refuse_ambiguous_paths!r}",
            )

    @property
    def members(self) -> list[Upstream]:
        """The upstreams, as ``Upstream`` objects."""
        return self.upstreams  # type: ignore[return-value]  # normalised in __post_init__

    def snapshot(self) -> list[dict[str, Any]]:
        """Per upstream (the current members, with discovery): url, weight, effective
        weight, health (active), ejection (passive), drained, in-flight, requests,
        failures, last check. Reads the state of the middleware serving this pool (the
        last one built with it)."""
        return self._serving().snapshot()

    def drain(self, url: str) -> None:
        """Stop sending new requests to ``url``; requests in flight finish."""
        self._serving().set_drained(url, True)

    def undrain(self, url: str) -> None:
        """Send requests to ``url`` again."""
        self._serving().set_drained(url, False)

    def _serving(self) -> PoolRuntime:
        if self._runtime is None:
            raise RuntimeError("this Pool is not served by a RoundRobinMiddleware yet")
        return self._runtime


PoolsArg = Mapping[str, Union[Pool, Sequence[Union[Upstream, str]]]]


def _positive_number(name: str, value: Any, owner: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError.of(owner, name, f"must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise FieldError.of(owner, name, f"must be a positive number of seconds, got {value!r}")


def _int_at_least(name: str, value: Any, minimum: int, owner: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldError.of(owner, name, f"must be an integer >= {minimum}, got {value!r}")


def _url_error(problem: str) -> FieldError:
    return FieldError("url", problem, f"upstream URL {problem}")


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
