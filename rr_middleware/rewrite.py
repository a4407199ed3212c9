"""Redirects and cookies of an upstream mapped back to the address the client used.

An upstream knows its own address and paths, not the client's: behind a pool at ``/users``
(prefix stripped) an upstream at ``http://10.0.0.3:8000/v1`` answers ``Location: /login``
or ``Location: http://10.0.0.3:8000/v1/login`` and sets ``Path=/`` on its cookies; the
client must get ``/users/login`` and ``Path=/users``. This is nginx's ``proxy_redirect
default`` and ``proxy_cookie_path``/``proxy_cookie_domain``, on raw header pairs.

The rules (``client prefix``: the part of the request path the pool stripped, empty when
it strips nothing; ``base``: the upstream URL's path, ``/v1`` above):

- ``Location``, ``Content-Location`` and the URL in ``Refresh`` (``5; url=...``):

  - an absolute path (``/login``): under ``base`` (``/v1/login``), ``base`` is replaced by
    the client prefix (``/users/login``); anywhere else on the upstream, the client prefix
    is put in front (``/users/login``), so the client stays in the pool; already under the
    client prefix, it is left alone (the upstream read ``X-Forwarded-Prefix``);
  - an absolute URL (or ``//host/path``) naming any member of the pool (its host and
    port, the scheme's default port when none): the same path mapping, with that member's
    ``base``, and the scheme and host dropped, so the client resolves the path against
    the address it used and never sees an internal one;
  - an absolute URL naming the host the client sent (``Host``): the path mapped the same
    way, scheme and host kept;
  - anything else (another host, a relative reference such as ``next`` or ``?page=2``,
    which resolves correctly against the client's URL as it is): untouched.

  The query and the fragment are kept byte for byte.
- ``Set-Cookie``: a ``Path`` is mapped as a path above, ``Path=/`` becoming the client
  prefix itself (``Path=/users``, which also matches ``/users`` without a slash); a
  ``Domain`` equal to a member's host is dropped (the cookie then belongs to the host the
  client used). A cookie without ``Path`` needs nothing: its default is taken from the
  client's URL.

With no client prefix and no base path the paths map to themselves; member URLs still
become paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Scope

    from .members import Member
    from .upstream import Upstream

__all__ = ["ResponseRewriter", "client_view", "map_path"]

Headers = list[tuple[bytes, bytes]]

_URL_HEADERS = frozenset({b"location", b"content-location"})
_REFRESH = b"refresh"
_SET_COOKIE = b"set-cookie"
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*:")
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_SCHEMES = frozenset({b"", b"http", b"https"})
# "5; url=/x", "0;URL='/x'", "3, url=/x" (RFC 9110 has none; browsers' HTML refresh rules).
_REFRESH_URL = re.compile(rb"(\s*[0-9.]+\s*[;,]\s*(?:url\s*=\s*)?)(['\"]?)(.*?)\2(\s*)", re.I)


def _under(path: bytes, base: bytes) -> bool:
    return path == base or (path.startswith(base) and path[len(base) : len(base) + 1] == b"/")


def map_path(path: bytes, base: bytes, client_prefix: bytes) -> bytes:
    """The client's path for an upstream's ``path`` (no query, no fragment): see the
    module's rules.

    >>> map_path(b"/v1/login", b"/v1", b"/users")
    b'/users/login'
    >>> map_path(b"/login", b"", b"/users")
    b'/users/login'
    """
    if base and _under(path, base):
        rest = path[len(base) :]
    elif client_prefix and _under(path, client_prefix):
        return path
    else:
        rest = path
    mapped = client_prefix + rest
    return mapped or b"/"


class _Authorities:
    """The members' ``host:port`` → base path (and ``host`` alone for a default port),
    and their host names, rebuilt when the pool's member list is another one."""

    __slots__ = ("bases", "hosts", "members")

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = members
        self.bases: dict[tuple[bytes, int], bytes] = {}
        self.hosts: set[bytes] = set()
        for member in members:
            upstream = member.upstream
            host = upstream.host.lower().encode("ascii")
            self.bases.setdefault((host, upstream.port), upstream.base_path)
            self.hosts.add(host)


class ResponseRewriter:
    """Rewrites one pool's response headers (``Location``, ``Content-Location``,
    ``Refresh``, ``Set-Cookie``) by the module's rules. ``redirects`` and ``cookies``
    switch the two halves (``Pool(rewrite_redirects=..., rewrite_cookies=...)``)."""

    __slots__ = ("_authorities", "cookies", "names", "redirects")

    def __init__(self, redirects: bool, cookies: bool) -> None:
        self.redirects = redirects
        self.cookies = cookies
        names: set[bytes] = set()
        if redirects:
            names |= {*_URL_HEADERS, _REFRESH}
        if cookies:
            names.add(_SET_COOKIE)
        #: The header names to look at: any other response passes with one set test a header.
        self.names = frozenset(names)
        self._authorities: _Authorities | None = None

    def rewrite(
        self,
        headers: Headers,
        members: Sequence[Member],
        upstream: Upstream,
        scope: Scope,
        path: bytes,
    ) -> None:
        """Rewrite ``headers`` (lower-case names) in place: the answer of ``upstream`` (one
        of ``members``) to the request of ``scope``, forwarded as ``path`` (its raw path
        less what the pool stripped)."""
        names = self.names
        for name, _ in headers:
            if name in names:
                break
        else:
            return  # most answers: nothing to look at
        client_prefix = b""
        client_host: bytes | None = None
        authorities: _Authorities | None = None
        for index, (name, value) in enumerate(headers):
            if name not in names:
                continue
            if authorities is None:
                authorities = self._authorities
                if authorities is None or authorities.members is not members:
                    authorities = self._authorities = _Authorities(members)
                client_prefix, client_host = client_view(scope, path)
            if name == _SET_COOKIE:
                new = _cookie(value, upstream.base_path, client_prefix, authorities)
            elif name == _REFRESH:
                new = _refresh(value, upstream, client_prefix, client_host, authorities)
            else:
                new = _url(value, upstream, client_prefix, client_host, authorities)
            if new is not value:
                headers[index] = (name, new)


def client_view(scope: Scope, path: bytes) -> tuple[bytes, bytes | None]:
    """The raw path prefix the client used that ``path`` lacks (what the pool stripped),
    and the ``Host`` it sent."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if b"?" in raw_path:
        raw_path = raw_path.partition(b"?")[0]
    prefix = raw_path[: len(raw_path) - len(path)] if raw_path.endswith(path) else b""
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            break
    return prefix, host


def _url(
    value: bytes,
    upstream: Upstream,
    client_prefix: bytes,
    client_host: bytes | None,
    authorities: _Authorities,
) -> bytes:
    url = value.strip()
    if url.startswith(b"//"):
        scheme, rest = b"", url[2:]
    elif url.startswith(b"/"):
        return _with_path(url, upstream.base_path, client_prefix, b"")
    else:
        match = _SCHEME.match(url)
        if match is None or not url[match.end() :].startswith(b"//"):
            return value  # a relative reference: right against the client's URL already
        scheme, rest = url[: match.end() - 1].lower(), url[match.end() + 2 :]
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    base = _member_base(authority, scheme, authorities)
    if base is not None:
        return _with_path(tail, base, client_prefix, b"")
    if client_host is not None and authority.lower() == client_host.lower():
        return _with_path(tail, upstream.base_path, client_prefix, url[: len(url) - len(tail)])
    return value


def _with_path(reference: bytes, base: bytes, client_prefix: bytes, origin: bytes) -> bytes:
    """``origin`` + ``reference`` (a path with its query and fragment) mapped."""
    end = len(reference)
    for stop in (b"?", b"#"):
        found = reference.find(stop)
        if found != -1:
            end = min(end, found)
    path = reference[:end]
    if not path.startswith(b"/"):  # "http://host?q": the path is "/"
        path = b"/"
    return origin + map_path(path, base, client_prefix) + reference[end:]


def _member_base(authority: bytes, scheme: bytes, authorities: _Authorities) -> bytes | None:
    if b"@" in authority or scheme not in _SCHEMES:
        return None  # credentials in a redirect: not the upstream's own address
    host, port = authority.lower(), 0
    if host.startswith(b"["):
        close = host.find(b"]")
        if close == -1:
            return None
        host, port_part = host[1:close], host[close + 1 :]
    else:
        host, _, port_part = host.partition(b":")
        port_part = b":" + port_part if port_part else b""
    if port_part:
        if not port_part.startswith(b":") or not port_part[1:].isdigit():
            return None
        port = int(port_part[1:])
    else:
        port = _DEFAULT_PORTS.get(scheme or b"http", 0)
    base = authorities.bases.get((host, port))
    if base is None and not scheme and not port_part:  # "//host/x": either default port
        base = authorities.bases.get((host, 443))
    return base


def _refresh(
    value: bytes,
    upstream: Upstream,
    client_prefix: bytes,
    client_host: bytes | None,
    authorities: _Authorities,
) -> bytes:
    match = _REFRESH_URL.fullmatch(value)
    if match is None or not match[3]:
        return value
    url = _url(match[3], upstream, client_prefix, client_host, authorities)
    if url is match[3]:
        return value
    return match[1] + match[2] + url + match[2] + match[4]


def _cookie(value: bytes, base: bytes, client_prefix: bytes, authorities: _Authorities) -> bytes:
    parts = value.split(b";")
    changed = False
    kept = [parts[0]]
    for part in parts[1:]:
        name, sep, attribute = part.partition(b"=")
        key = name.strip().lower()
        if key == b"path" and sep:
            path = attribute.strip()
            if path.startswith(b"/"):
                mapped = map_path(path, base, client_prefix)
                if path == b"/" and len(mapped) > 1 and mapped.endswith(b"/"):
                    mapped = mapped[:-1]
                if mapped != path:
                    part = name + b"=" + mapped
                    changed = True
        elif key == b"domain" and attribute.strip().lstrip(b".").lower() in authorities.hosts:
            changed = True
            continue
        kept.append(part)
    return b";".join(kept) if changed else value
