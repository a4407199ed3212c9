"""Configuration: immutable values, validated once when they are built.

``Pool`` is the servers behind one path prefix and how requests reach them, ``HealthCheck``
how they are checked, ``Upstream`` (``upstream.py``) one server. They describe; they never
run: what changes while serving (health, counters, the members a registry returns) lives
in the runtime (``runtime.py``), so one ``Pool`` value may serve any number of apps.
"""

from __future__ import annotations

import math
import random as random_module
import re
import time
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from .affinity import key_reader
from .discovery.base import Discovery
from .errors import FieldError
from .latency import parse_hedge_after
from .sticky import StickyCookie
from .tls import TLS
from .upstream import Upstream, check_tls

if TYPE_CHECKING:
    import httpx

    from .hooks import Guard, OnRequest, OnResponse
    from .transport.base import UpstreamTransport

__all__ = [
    "FieldError",
    "HealthCheck",
    "Pool",
    "PoolsArg",
    "StickyCookie",
    "Upstream",
    "normalize_pools",
]

_POLICIES = ("round_robin", "least_requests", "random")

_PATH_AND_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
# A method name is a token (RFC 9110 §9.1, §5.6.2).
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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


@dataclass(frozen=True, eq=False)
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

    Every option and its default is in the configuration reference. A Pool only
    describes: to drain an upstream or read its state while the app serves, use the
    ``Balancer`` serving it (``balancer["/prefix"].drain(url)``).
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
    ewma_decay: float = 10.0
    hash_on: str | Callable[[Any], Any] | None = None
    hash_fallback: str = "round_robin"
    balance_factor: float | None = 1.25
    sticky: StickyCookie | None = None
    mirror: str | None = None
    mirror_fraction: float = 1.0
    mirror_body_limit: int = 64 * 1024
    mirror_max_in_flight: int = 100
    health_check: HealthCheck | None = None
    max_fails: int = 3
    fail_timeout: float = 10.0
    unhealthy_statuses: Collection[int] = frozenset({502, 503, 504})
    on_all_down: str = "try_all"
    retry_non_idempotent: bool = False
    retry_body_limit: int = 64 * 1024
    request_buffer_size: int = 64 * 1024
    retry_on_statuses: Collection[int] = frozenset()
    retry_budget: float | None = 0.2
    retry_budget_min: int = 3
    hedge_after: float | str | None = None
    max_hedges: int = 1
    slow_start: float = 0.0
    max_body_size: int | None = None
    client_body_timeout: float = 30.0
    client_body_min_rate: int = 500
    client_send_timeout: float = 60.0
    websocket_timeout: float | None = None
    websocket_idle_timeout: float | None = None
    websocket_ping_interval: float | None = 20.0
    discovery: Discovery | None = None
    rewrite_redirects: bool = True
    rewrite_cookies: bool = True
    guard: Guard | None = field(default=None, repr=False)
    on_request: OnRequest | None = field(default=None, repr=False)
    on_response: OnResponse | None = field(default=None, repr=False)
    internal: bool = False
    tracing: bool = True
    tls: TLS | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    random: random_module.Random | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        normalised: dict[str, Any] = {"upstreams": self._members()}
        for name in (
            "timeout",
            "connect_timeout",
            "pool_timeout",
            "fail_timeout",
            "client_body_timeout",
            "client_send_timeout",
            "ewma_decay",
        ):
            _positive_number(name, getattr(self, name))
        for name in ("websocket_timeout", "websocket_idle_timeout", "websocket_ping_interval"):
            if getattr(self, name) is not None:
                _positive_number(name, getattr(self, name))
        _int_at_least("retries", self.retries, 0)
        _int_at_least("max_connections", self.max_connections, 1)
        _int_at_least("max_fails", self.max_fails, 0)
        _int_at_least("retry_body_limit", self.retry_body_limit, 0)
        _int_at_least("request_buffer_size", self.request_buffer_size, 0)
        _int_at_least("client_body_min_rate", self.client_body_min_rate, 0)
        _int_at_least("retry_budget_min", self.retry_budget_min, 0)
        _int_at_least("max_hedges", self.max_hedges, 1)
        if isinstance(self.hedge_after, str):
            try:
                parse_hedge_after(self.hedge_after)
            except ValueError as exc:
                raise FieldError("hedge_after", str(exc)) from None
        elif self.hedge_after is not None:
            _positive_number("hedge_after", self.hedge_after)
        if self.retry_budget is not None:
            _fraction("retry_budget", self.retry_budget)
        if self.max_body_size is not None:
            _int_at_least("max_body_size", self.max_body_size, 0)
        for name in ("unhealthy_statuses", "retry_on_statuses"):
            normalised[name] = _statuses(name, getattr(self, name))
        normalised["refuse_methods"] = _methods(self.refuse_methods)
        if self.tls is not None:
            check_tls(self.tls, self.transport)
        self._check_choices()
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def _members(self) -> tuple[Upstream, ...]:
        if isinstance(self.upstreams, (str, bytes)) or not isinstance(self.upstreams, Sequence):
            raise FieldError(
                "upstreams",
                f"must be a list of upstream URLs or Upstream objects, got {self.upstreams!r}",
            )
        members = [u if isinstance(u, Upstream) else _upstream_from(u) for u in self.upstreams]
        if self.discovery is not None:
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
            if member.identity in seen:
                problem = f"has {member.url!r} twice (the same server as an earlier entry)"
                raise FieldError(
                    "upstreams", problem, f"upstream {member.url!r} appears twice in one pool"
                )
            seen.add(member.identity)
        return tuple(members)

    def _check_choices(self) -> None:
        if self.policy not in (*_POLICIES, "peak_ewma", "hash"):
            raise FieldError(
                "policy",
                "must be 'round_robin', 'least_requests', 'peak_ewma', 'random' or 'hash', "
                f"got {self.policy!r}",
            )
        self._check_affinity()
        if self.on_all_down not in ("try_all", "fail"):
            raise FieldError(
                "on_all_down", f"must be 'try_all' or 'fail', got {self.on_all_down!r}"
            )
        if self.health_check is not None and not isinstance(self.health_check, HealthCheck):
            raise FieldError("health_check", f"must be a HealthCheck, got {self.health_check!r}")
        if isinstance(self.slow_start, bool) or not isinstance(self.slow_start, (int, float)):
            raise FieldError("slow_start", f"must be a number of seconds, got {self.slow_start!r}")
        if not math.isfinite(self.slow_start) or self.slow_start < 0:
            raise FieldError("slow_start", f"must be >= 0 seconds, got {self.slow_start!r}")
        if not callable(self.clock):
            raise FieldError("clock", f"must be a callable returning seconds, got {self.clock!r}")
        for name in ("guard", "on_request", "on_response"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise FieldError(name, f"must be a function or None, got {getattr(self, name)!r}")
        for name in (
            "refuse_ambiguous_paths",
            "rewrite_redirects",
            "rewrite_cookies",
            "internal",
            "tracing",
        ):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"must be True or False, got {getattr(self, name)!r}")

    def _check_affinity(self) -> None:
        if self.policy == "hash" and self.hash_on is None:
            raise FieldError("hash_on", "is required with policy='hash' (what to hash on)")
        if self.hash_on is not None:
            if self.policy != "hash":
                raise FieldError("hash_on", f"is only read with policy='hash', not {self.policy!r}")
            try:
                key_reader(self.hash_on)
            except ValueError as exc:
                raise FieldError("hash_on", str(exc)) from None
        if self.hash_fallback not in (*_POLICIES, "peak_ewma"):
            raise FieldError(
                "hash_fallback",
                "must be 'round_robin', 'least_requests', 'peak_ewma' or 'random', "
                f"got {self.hash_fallback!r}",
            )
        factor = self.balance_factor
        if factor is not None and (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or factor < 1
        ):
            raise FieldError(
                "balance_factor", f"must be a number >= 1 or None (no bound), got {factor!r}"
            )
        if self.sticky is not None and not isinstance(self.sticky, StickyCookie):
            raise FieldError("sticky", f"must be a StickyCookie or None, got {self.sticky!r}")
        self._check_mirror()

    def _check_mirror(self) -> None:
        if self.mirror is not None and (not isinstance(self.mirror, str) or not self.mirror):
            raise FieldError("mirror", f"must be the key of another pool, got {self.mirror!r}")
        fraction = self.mirror_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= 1
        ):
            raise FieldError("mirror_fraction", f"must be a number in (0, 1], got {fraction!r}")
        _int_at_least("mirror_body_limit", self.mirror_body_limit, 0)
        _int_at_least("mirror_max_in_flight", self.mirror_max_in_flight, 1)

    @property
    def members(self) -> tuple[Upstream, ...]:
        """The configured upstreams, as ``Upstream`` values (empty with discovery)."""
        return self.upstreams  # type: ignore[return-value]  # normalised in __post_init__


PoolsArg = Mapping[str, Union[Pool, Sequence[Union[Upstream, str]]]]


def _positive_number(name: str, value: Any, owner: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError.of(owner, name, f"must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise FieldError.of(owner, name, f"must be a positive number of seconds, got {value!r}")


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"must be a number (a fraction, 0.2 for 20 %), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise FieldError(name, f"must be a finite number >= 0, got {value!r}")


def _int_at_least(name: str, value: Any, minimum: int, owner: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldError.of(owner, name, f"must be an integer >= {minimum}, got {value!r}")


def _statuses(name: str, statuses: Any) -> frozenset[int]:
    if isinstance(statuses, (str, bytes)) or not all(
        isinstance(code, int) and 100 <= code <= 599 for code in statuses
    ):
        raise FieldError(name, f"must be HTTP status codes, got {statuses!r}")
    return frozenset(statuses)


def _methods(methods: Any) -> frozenset[str]:
    if (
        isinstance(methods, (str, bytes))
        or not isinstance(methods, Collection)
        or not all(isinstance(m, str) and _METHOD.fullmatch(m) for m in methods)
    ):
        raise FieldError(
            "refuse_methods", f"must be a collection of HTTP method names, got {methods!r}"
        )
    # Method names are case-sensitive (RFC 9110 §9.1), but an upstream that reads "trace"
    # as TRACE is not rare: the refusal goes by the upper-case name.
    return frozenset(m.upper() for m in methods)


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


#: A pool keyed by a name, not a prefix, is reached only through routes (``matching.py``).
_POOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def normalize_pool_key(key: Any) -> str:
    """A prefix normalised (``normalize_prefix``), or a pool name as is."""
    if isinstance(key, str) and _POOL_NAME.fullmatch(key):
        return key
    if isinstance(key, str) and not key.startswith("/"):
        raise ValueError(
            f"pool key {key!r} must be a path prefix starting with '/' or a name "
            "(a letter, then letters, digits, '_', '.', '-') that routes refer to"
        )
    return normalize_prefix(key)


def normalize_pools(pools: Any) -> dict[str, Pool]:
    """Turn the ``pools=`` argument into ``{normalised prefix or name: Pool}``, or raise
    ValueError."""
    if not isinstance(pools, Mapping):
        raise ValueError("pools must be a mapping of path prefix -> Pool or list of URLs")
    if not pools:
        raise ValueError("pools must configure at least one prefix")
    result: dict[str, Pool] = {}
    for raw_prefix, spec in pools.items():
        prefix = normalize_pool_key(raw_prefix)
        if prefix in result:
            raise ValueError(f"duplicate pool prefix {raw_prefix!r} (same as {prefix!r})")
        try:
            pool = spec if isinstance(spec, Pool) else Pool(spec)
        except ValueError as exc:
            raise ValueError(f"pool {raw_prefix!r}: {exc}") from None
        result[prefix] = pool
    return result
