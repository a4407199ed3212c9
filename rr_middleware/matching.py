"""Routes beyond the prefix: request matching and weighted splits between pools.

A ``Route`` sends the requests under a path prefix that also match its conditions (host,
method, headers, cookies, query parameters) to one pool, or splits them between pools by
weight (a canary: ``split={"stable": 95, "canary": 5}``). Pools are named by their key in
``pools=``: a prefix, or a plain name for a pool that only routes reach.

The order, for one request (``RouteTable.resolve``): the longest prefix first, as
without routes; under it, its routes in the order given, the first that matches wins;
none matching, the pool keyed by that prefix, if any; else the next shorter prefix, the
same way; else the host app, exactly as an unmatched path does. A forced side of a
canary is a route with the forcing condition placed before the split.

A split without ``stick_on`` follows smooth weighted round robin (95/5 is exactly 95 of
every 100); with ``stick_on`` (a key as ``hash_on`` reads one) a client's side is a hash
of its key, so it stays on its side for as long as the weights stay.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from .affinity import key_hash, key_reader
from .balancing import SmoothWeighted
from .config import normalize_prefix
from .errors import FieldError
from .routing import host_matches

if TYPE_CHECKING:
    from .pool_runtime import PoolRuntime

__all__ = ["Condition", "Route", "RouteTable", "build_tables"]

#: A condition on a header, cookie or query parameter: a ``str`` is the exact value,
#: ``True`` present (any value), ``False`` absent, a compiled regex searched in the value.
Condition = Union[str, bool, "re.Pattern[str]"]
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD = _NAME
_HOST = re.compile(r"(\*\.)?[A-Za-z0-9._-]+")


def _conditions(option: str, conditions: Any) -> dict[str, Condition]:
    if conditions is None:
        return {}
    if not isinstance(conditions, Mapping):
        raise FieldError(option, f"must be a mapping of name to condition, got {conditions!r}")
    checked: dict[str, Condition] = {}
    for name, condition in conditions.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise FieldError(option, f"{name!r} is not a valid name")
        if not isinstance(condition, (str, bool, re.Pattern)):
            raise FieldError(
                option,
                f"{name!r}: a condition is a string (exact), True (present), False (absent) "
                f"or a compiled regex, got {condition!r}",
            )
        checked[name] = condition
    return checked


@dataclass(frozen=True, eq=False)
class Route:
    """Requests under ``prefix`` that match every condition go to ``pool``, or are split
    between pools by weight (``split``). Give ``pools=`` the pools these keys name.

    >>> Route("/api", pool="canary", headers={"x-canary": "always"}).methods is None
    True

    ``host`` is the request's host, without port (``"*.example.com"`` any subdomain);
    ``methods`` the methods taken; ``headers``, ``cookies`` and ``query`` map names to a
    ``Condition``. ``stick_on`` keeps a client on its side of a split by a key, as
    ``Pool(hash_on=...)`` reads one.
    """

    prefix: str
    pool: str | None = None
    split: Mapping[str, int] | None = None
    host: str | None = None
    methods: Collection[str] | None = None
    headers: Mapping[str, Condition] | None = None
    cookies: Mapping[str, Condition] | None = None
    query: Mapping[str, Condition] | None = None
    stick_on: str | Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        try:
            prefix = normalize_prefix(self.prefix)
        except ValueError as exc:
            raise FieldError("prefix", str(exc).removeprefix("pool ")) from None
        normalised: dict[str, Any] = {"prefix": prefix}
        if (self.pool is None) == (self.split is None):
            raise FieldError("pool", "give a route pool= or split=, one of them")
        if self.pool is not None and not isinstance(self.pool, str):
            raise FieldError("pool", f"must be the key of a pool, got {self.pool!r}")
        if self.split is not None:
            normalised["split"] = self._split()
        if self.host is not None:
            if not isinstance(self.host, str) or not _HOST.fullmatch(self.host):
                raise FieldError("host", f"must be a host name, got {self.host!r}")
            normalised["host"] = self.host.lower()
        if self.methods is not None:
            if isinstance(self.methods, str) or not all(
                isinstance(m, str) and _METHOD.fullmatch(m) for m in self.methods
            ):
                raise FieldError("methods", f"must be method names, got {self.methods!r}")
            normalised["methods"] = frozenset(m.upper() for m in self.methods)
        for option in ("headers", "cookies", "query"):
            if getattr(self, option) is not None:
                normalised[option] = _conditions(option, getattr(self, option))
        if self.stick_on is not None:
            if self.split is None:
                raise FieldError("stick_on", "is only read with split=")
            try:
                key_reader(self.stick_on)
            except ValueError as exc:
                raise FieldError("stick_on", str(exc)) from None
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def _split(self) -> dict[str, int]:
        split = self.split
        if not isinstance(split, Mapping) or len(split) < 2:
            raise FieldError("split", f"must map two pools or more to weights, got {split!r}")
        for name, weight in split.items():
            if not isinstance(name, str):
                raise FieldError("split", f"must be keyed by pool keys, got {name!r}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise FieldError("split", f"{name!r}: a weight is an integer >= 0, got {weight!r}")
        if not any(split.values()):
            raise FieldError("split", "needs a weight above 0")
        return dict(split)

    @property
    def targets(self) -> list[str]:
        """The keys of the pools this route sends to."""
        return [self.pool] if self.pool is not None else list(self.split or ())

    def describe(self) -> dict[str, Any]:
        """The route as the status JSON shows it."""
        conditions: dict[str, Any] = {}
        if self.host is not None:
            conditions["host"] = self.host
        if self.methods is not None:
            conditions["methods"] = sorted(self.methods)
        for option in ("headers", "cookies", "query"):
            values = getattr(self, option)
            if values:  # None or empty: no condition
                conditions[option] = {
                    k: v.pattern if isinstance(v, re.Pattern) else v for k, v in values.items()
                }
        return {"prefix": self.prefix, "match": conditions}


class _Test:
    """One condition on one value (a header's, a cookie's, a parameter's)."""

    __slots__ = ("condition", "exact", "read")

    def __init__(self, read: Callable[[Any], bytes | None], condition: Condition) -> None:
        self.read = read
        self.condition = condition
        self.exact = condition.encode("latin-1") if isinstance(condition, str) else None

    def passes(self, scope: Any) -> bool:
        value = self.read(scope)
        condition = self.condition
        if condition is True:
            return value is not None
        if condition is False:
            return value is None
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        assert isinstance(condition, re.Pattern)
        return condition.search(value.decode("latin-1")) is not None


class _RouteState:
    """A route while it serves: its tests, its pools, and what it counted."""

    __slots__ = (
        "_read_key",
        "_sides",
        "_smooth",
        "_tests",
        "_total",
        "_weights",
        "host",
        "matched",
        "methods",
        "pool",
        "route",
        "sent",
    )

    def __init__(self, route: Route, pools: Mapping[str, PoolRuntime]) -> None:
        self.route = route
        self.host = route.host
        self.methods = route.methods
        tests = [
            _Test(key_reader(f"{kind}:{name}"), condition)
            for kind, conditions in (
                ("header", route.headers),
                ("cookie", route.cookies),
                ("query", route.query),
            )
            for name, condition in (conditions or {}).items()
        ]
        self._tests = tests
        self.pool = pools[route.pool] if route.pool is not None else None
        split = route.split or {}
        self._sides = [pools[name] for name in split]
        self._weights = list(split.values())
        self._total = sum(self._weights)
        self._smooth = SmoothWeighted(self._sides, self._weights)
        self._read_key = key_reader(route.stick_on) if route.stick_on is not None else None
        self.matched = 0
        #: Requests sent to each pool (its key).
        self.sent: dict[str, int] = dict.fromkeys(route.targets, 0)

    def matches(self, scope: Any) -> bool:
        methods = self.methods
        if methods is not None:
            method: str = scope.get("method", "GET")
            if method.upper() not in methods:
                return False
        if self.host is not None and not self._host_matches(scope):
            return False
        return all(test.passes(scope) for test in self._tests)

    def _host_matches(self, scope: Any) -> bool:
        host = self.host
        assert host is not None
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        for name, value in headers:
            if name == b"host":
                found = value.decode("latin-1").lower()
                if found.startswith("["):  # an IPv6 literal keeps its colons
                    found = found.partition("]")[0] + "]"
                else:
                    found = found.partition(":")[0]
                return host_matches(host, found)
        return False

    def destination(self, scope: Any) -> PoolRuntime | None:
        self.matched += 1
        pool = self.pool
        if pool is None:
            pool = self._side(scope)
            if pool is None:
                return None
        self.sent[pool.name] += 1
        return pool

    def _side(self, scope: Any) -> PoolRuntime | None:
        read_key = self._read_key
        key = read_key(scope) if read_key is not None else None
        if key is None:
            return self._smooth.pick()
        slot = key_hash(b"split\0" + key) % self._total
        for side, weight in zip(self._sides, self._weights, strict=True):
            if slot < weight:
                return side
            slot -= weight
        return None  # unreachable: the slot is below the total

    def status(self) -> dict[str, Any]:
        return {**self.route.describe(), "matched": self.matched, "sent": dict(self.sent)}


class RouteTable:
    """The routes under one prefix, in order, and the pool keyed by that prefix (None
    if only routes serve it)."""

    __slots__ = ("pool", "routes")

    def __init__(self, routes: Sequence[_RouteState], pool: PoolRuntime | None) -> None:
        self.routes = list(routes)
        self.pool = pool

    def resolve(self, scope: Any) -> PoolRuntime | None:
        """The pool for this request: the first route that matches, else the prefix's
        own pool; None: neither (the next shorter prefix is asked)."""
        for route in self.routes:
            if route.matches(scope):
                return route.destination(scope)
        return self.pool


def build_tables(
    routes: Sequence[Route], pools: Mapping[str, PoolRuntime]
) -> tuple[dict[str, RouteTable], list[_RouteState]]:
    """The route table of each prefix (of a route, or of a prefix-keyed pool), and every
    route's state in order. Raises FieldError for a route naming no pool."""
    if not isinstance(routes, (list, tuple)):
        raise FieldError("routes", f"must be a list of Route, got {routes!r}")
    states: list[_RouteState] = []
    by_prefix: dict[str, list[_RouteState]] = {}
    for route in routes:
        if not isinstance(route, Route):
            raise FieldError("routes", f"must be a list of Route, got {route!r}")
        for key in route.targets:
            if key not in pools:
                known = ", ".join(pools)
                raise FieldError(
                    "routes", f"route {route.prefix!r} names no pool {key!r} ({known})"
                )
        state = _RouteState(route, pools)
        states.append(state)
        by_prefix.setdefault(route.prefix, []).append(state)
    tables = {
        prefix: RouteTable(by_prefix.pop(prefix, []), runtime)
        for prefix, runtime in pools.items()
        if prefix.startswith("/")
    }
    for prefix, states_here in by_prefix.items():
        tables[prefix] = RouteTable(states_here, None)
    return tables, states
