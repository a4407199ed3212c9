"""Sticky sessions by cookie: the first answer sets a cookie naming its upstream; a request
that brings it back goes to that upstream while it may take traffic.

The cookie's value never shows the upstream's address: it is a keyed hash (HMAC-SHA256,
truncated to 96 bits, base64url) of the upstream's identity, so a client can neither read
nor forge a pin to an upstream it was not sent to. Every worker process and replica must
share the key to read each other's cookies: ``StickyCookie(secret=...)`` or the
``RR_STICKY_SECRET`` environment variable. Without either, each process draws a random
key (and the balancer warns at startup): stickiness then holds only within one process.

An upstream keeps its value as long as its identity (scheme, host, port, base path) stays,
whatever discovery does around it. When the pinned upstream cannot take the request (down,
ejected, drained, removed, or already tried by this request), the pool picks another and
the answer sets the cookie again, to the new upstream (Traefik's and nginx's behaviour).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import FieldError
from .routing import host_matches

__all__ = [
    "COLLISION",
    "SECRET_ENV",
    "Affinity",
    "StickyCookie",
    "StickyValues",
    "check_cookies_apart",
    "cookie_collision",
]

#: The environment variable holding the key of every sticky cookie that names none.
SECRET_ENV = "RR_STICKY_SECRET"
# A cookie name is an RFC 9110 token (RFC 6265 §4.1.1).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH = re.compile(r"/[\x21-\x3a\x3c-\x7e]*")  # printable ASCII but ";" (RFC 6265 §4.1.1)
_SAMESITE = ("Strict", "Lax", "None")


@dataclass(frozen=True)
class StickyCookie:
    """Keep a client on one upstream with a cookie (``Pool(sticky=StickyCookie())``).

    ``name`` is the cookie's name; ``max_age`` its lifetime in seconds (``None``: until
    the browser closes); ``path`` where the browser sends it (``None``: the pool's
    prefix); ``secure``, ``httponly`` and ``samesite`` its attributes. ``secret`` is the
    key of the value's HMAC (``None``: ``RR_STICKY_SECRET``, else random per process).

    >>> StickyCookie(name="backend", max_age=3600).samesite
    'Lax'
    """

    name: str = "rr_sticky"
    max_age: int | None = None
    path: str | None = None
    secure: bool = False
    httponly: bool = True
    samesite: str | None = "Lax"
    secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        owner = "sticky cookie"
        if not isinstance(self.name, str) or not _TOKEN.fullmatch(self.name):
            raise FieldError.of(
                owner, "name", f"must be a cookie name (a token), got {self.name!r}"
            )
        if self.max_age is not None and (
            isinstance(self.max_age, bool) or not isinstance(self.max_age, int) or self.max_age < 1
        ):
            raise FieldError.of(
                owner, "max_age", f"must be an integer >= 1 or None, got {self.max_age!r}"
            )
        if self.path is not None and (
            not isinstance(self.path, str) or not _PATH.fullmatch(self.path)
        ):
            raise FieldError.of(
                owner, "path", f"must be a path starting with '/', without ';', got {self.path!r}"
            )
        for name in ("secure", "httponly"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError.of(
                    owner, name, f"must be True or False, got {getattr(self, name)!r}"
                )
        if self.samesite is not None and self.samesite not in _SAMESITE:
            raise FieldError.of(
                owner, "samesite", f"must be 'Strict', 'Lax', 'None' or None, got {self.samesite!r}"
            )
        if self.samesite == "None" and not self.secure:
            # Browsers drop a SameSite=None cookie that is not Secure.
            raise FieldError.of(owner, "samesite", "'None' needs secure=True")
        if self.secret is not None and (not isinstance(self.secret, str) or not self.secret):
            raise FieldError.of(owner, "secret", "must be a non-empty string or None")

    def path_for(self, pool: str) -> str:
        """The cookie's ``Path`` in the pool keyed ``pool``: its own, else the pool's
        prefix (``/`` for a pool reached by routes only)."""
        return self.path or (pool if pool.startswith("/") else "/")


def cookie_collision(
    pools: Iterable[tuple[str, StickyCookie | None]], routes: Iterable[Any] = ()
) -> tuple[str, str, str] | None:
    """The first two pools (by key) whose sticky cookies a browser would keep as one
    (same name, same ``Path``, hosts that may meet: the cookie has no ``Domain``, so it
    is kept per host), and that cookie: each pool's answer would overwrite the other's
    pin and neither would stick. A pool keyed by a prefix is reached on any host; one
    keyed by a name on the hosts of the ``routes`` (``Route`` values) that send to it."""
    hosts = _hosts_reaching(routes)
    seen: dict[tuple[str, str], list[str]] = {}
    for key, cookie in pools:
        if cookie is None:
            continue
        name, path = cookie.name, cookie.path_for(key)
        mine = None if key.startswith("/") else hosts.get(key, frozenset())
        others = seen.setdefault((name, path), [])
        for other in others:
            theirs = None if other.startswith("/") else hosts.get(other, frozenset())
            if _hosts_meet(mine, theirs):
                return other, key, f"{name}, Path={path}"
        others.append(key)
    return None


def _hosts_reaching(routes: Iterable[Any]) -> dict[str, frozenset[str] | None]:
    """The hosts each pool key is reached on through ``routes`` (None: any host)."""
    hosts: dict[str, frozenset[str] | None] = {}
    for route in routes:
        for key in route.targets:  # a pool's name (a prefix pool is on any host anyway)
            known = hosts.get(key, frozenset())
            if known is None or route.host is None:
                hosts[key] = None
            else:
                hosts[key] = known | {route.host.lower()}
    return hosts


def _hosts_meet(mine: frozenset[str] | None, theirs: frozenset[str] | None) -> bool:
    if mine is None or theirs is None:
        return True
    return any(_host_patterns_meet(a, b) for a in mine for b in theirs)


def _host_patterns_meet(a: str, b: str) -> bool:
    """Whether a host could match both patterns (``*.example.com``: any subdomain; of two
    such, the one a subdomain of the other matches it)."""
    return host_matches(a, b) or host_matches(b, a)


#: Why two pools may not share a cookie (after "pools A and B", or "sticky of pool B").
COLLISION = (
    "the browser keeps one of the two, so neither pool would stick; give one of them a "
    "cookie name of its own"
)


def check_cookies_apart(
    pools: Iterable[tuple[str, StickyCookie | None]], routes: Iterable[Any] = ()
) -> None:
    """ValueError if two pools set the same sticky cookie (``cookie_collision``)."""
    found = cookie_collision(pools, routes)
    if found is not None:
        first, second, cookie = found
        raise ValueError(
            f"pools {first!r} and {second!r} set the same sticky cookie ({cookie}): {COLLISION}"
        )


class Affinity:
    """Where one request asks to go: ``pinned``, its sticky cookie's value, and ``key``,
    its hash key (each None when absent). Built once per request, for pools that use
    either."""

    __slots__ = ("key", "pinned")

    def __init__(self, key: bytes | None, pinned: bytes | None) -> None:
        self.key = key
        self.pinned = pinned


class StickyValues:
    """A pool's sticky cookie while it serves: each upstream's value, and the
    ``Set-Cookie`` header naming one."""

    __slots__ = ("_key", "_tail", "_values", "cookie", "name", "random_secret")

    def __init__(self, cookie: StickyCookie, prefix: str) -> None:
        self.cookie = cookie
        self.name = cookie.name.encode("ascii")
        secret = cookie.secret or os.environ.get(SECRET_ENV) or None
        #: True when no key was given: this process drew its own.
        self.random_secret = secret is None
        self._key = os.urandom(32) if secret is None else secret.encode("utf-8")
        attributes = [f"Path={cookie.path_for(prefix)}"]
        if cookie.max_age is not None:
            attributes.append(f"Max-Age={cookie.max_age}")
        if cookie.secure:
            attributes.append("Secure")
        if cookie.httponly:
            attributes.append("HttpOnly")
        if cookie.samesite is not None:
            attributes.append(f"SameSite={cookie.samesite}")
        self._tail = ("; " + "; ".join(attributes)).encode("ascii")
        self._values: dict[str, bytes] = {}

    def value(self, identity: str) -> bytes:
        """The cookie value of the upstream of this identity (computed once)."""
        value = self._values.get(identity)
        if value is None:
            digest = hmac.new(self._key, identity.encode("utf-8"), hashlib.sha256).digest()
            value = self._values[identity] = base64.urlsafe_b64encode(digest[:12])
        return value

    def carry_on(self, previous: StickyValues) -> None:
        """Take the key ``previous`` drew, when neither was given one: the pool it
        replaces (a reload) handed out cookies that must still pin its clients."""
        if self.random_secret and previous.random_secret:
            self._key = previous._key
            self._values.clear()

    def forget(self, identities: set[str]) -> None:
        """Keep only the values of these identities (the members that stay)."""
        for identity in [i for i in self._values if i not in identities]:
            del self._values[identity]

    def set_cookie(self, value: bytes) -> tuple[bytes, bytes]:
        """The ``Set-Cookie`` header pinning a client to the upstream of ``value``."""
        return b"set-cookie", self.name + b"=" + value + self._tail
