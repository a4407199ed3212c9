"""Header rewriting for both legs: hop-by-hop removal and the forwarding headers.

Works on the raw ``(bytes, bytes)`` pairs of the ASGI scope, never through a dict, so
repeated headers (several ``Cookie`` or ``Set-Cookie`` lines) survive.

Trust: every ``X-Forwarded-*`` header (``-For``, ``-Proto`` and ``-Host``, but also
``-Ssl``, ``-Scheme``, ``-Client-Cert``, ``-Server``, ``-Uri`` and whatever else a framework
reads), ``Forwarded`` and ``X-Real-IP`` sent by a client are dropped unless the client's
address is in ``trusted_proxies``; otherwise any client could tell the upstreams it is
someone else, or that it came over TLS with a certificate. From a trusted proxy they are
kept, and the ones the proxy sets itself are extended (our hop is appended to
``X-Forwarded-For``). The headers the proxy adds itself are added after
``Connection``-named headers are removed, so a client cannot ask us to drop them.

Underscore look-alikes (``X_Forwarded_For``, ``X_Real_IP``, ``X-Forwarded_Proto``: any name
that reads as a forwarding header once ``_`` is ``-``) are dropped from every client,
trusted or not. CGI and WSGI servers turn both ``X-Forwarded-For`` and ``X_Forwarded_For``
into ``HTTP_X_FORWARDED_FOR``, so such a name can only be there to pass for the real one;
no proxy sets it (nginx drops names with underscores by default).

References: RFC 9110 §7.6.1 (Connection, hop-by-hop), RFC 7239 (Forwarded); the
``X-Forwarded-*`` family is the de facto convention of nginx, HAProxy and Envoy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Union

from .errors import FieldError

__all__ = [
    "HOP_BY_HOP",
    "BadRequestHeaders",
    "HeadersTooLarge",
    "TrustedProxies",
    "client_address",
    "request_headers",
    "response_headers",
]

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by a proxy about its client: only believable from a proxy we trust. So is any other
# name starting with "x-forwarded-", which request_headers tests for apart from the set.
_FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-proto",
        b"x-real-ip",
    }
)
# The proxy answers "Expect: 100-continue" itself (the ASGI server sends the 100 when the
# body is first read), so the expectation is not passed on.
_REQUEST_HANDLED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_REQUEST_SPECIAL = _REQUEST_HANDLED | _FORWARDING
# The names starting with "x-forwarded-" are those from here up to (not including) the
# next, "x-forwarded." ("." follows "-" in ASCII): two comparisons, cheaper than startswith.
_FORWARDED_FIRST = b"x-forwarded-"
_FORWARDED_PAST = b"x-forwarded."
_UNDERSCORE = ord("_")  # an int is found by memchr; b"_" in name costs several times more


class BadRequestHeaders(Exception):
    """The request's headers cannot be forwarded safely; answer ``status`` (400)."""

    status = 400


class HeadersTooLarge(BadRequestHeaders):
    """The request's headers add up to more than the limit; answer 431."""

    status = 431


class TrustedProxies:
    """The set of client addresses whose forwarding headers are believed.

    Accepts IP addresses and networks (``"10.0.0.0/8"``, ``"::1"``) or ``"*"`` for all.
    Non-IP client names (a unix socket path) are trusted only with ``"*"``.
    """

    def __init__(self, spec: Union[str, Sequence[str]] = ()) -> None:
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        self.always = "*" in items
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in items:
            if item == "*" or not item:
                continue
            try:
                self._networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                problem = f"{item!r} is not an IP address or network"
                raise FieldError(
                    "trusted_proxies", problem, f"trusted_proxies: {problem}"
                ) from None
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return self.always or bool(self._networks)

    def __contains__(self, host: object) -> bool:
        if self.always:
            return True
        if not isinstance(host, str) or not self._networks:
            return False
        known = self._cache.get(host)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            trusted = False
        else:
            trusted = any(address in net for net in self._networks)
        if len(self._cache) < 4096:  # bounded: client addresses are attacker-chosen
            self._cache[host] = trusted
        return trusted


def request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    client_host: str | None,
    scheme: str,
    trusted: TrustedProxies,
    keep_host: bool,
    prefix: bytes,
    max_bytes: int = 64 * 1024,
) -> tuple[Headers, bool]:
    """The upstream request's headers, built from the client's, and whether they hold a
    Host: the client's with ``keep_host``, if it sent one; otherwise the caller appends
    the upstream's own (per attempt: the request upstream is HTTP/1.1, which must have
    one, RFC 9112 §3.2). A body framed with Transfer-Encoding is re-framed by the
    transport, so the client's Content-Length goes with it. ``prefix``: the stripped path
    prefix (empty when nothing was stripped). Raises BadRequestHeaders for framing or
    Host ambiguities, HeadersTooLarge past ``max_bytes`` of names and values."""
    out: Headers = []
    host: bytes | None = None
    content_length: bytes | None = None
    chunked = False
    connection: list[bytes] | None = None
    forwarded: Headers | None = None
    size = 0
    for name, value in raw:
        size += len(name) + len(value)
        if name not in _REQUEST_SPECIAL:
            # Most names are done here: every forwarding name and look-alike not in the
            # set starts with "x", so one comparison lets the rest through.
            if name < b"x" or not (
                _UNDERSCORE in name or _FORWARDED_FIRST <= name < _FORWARDED_PAST
            ):
                out.append((name, value))
            elif _UNDERSCORE in name:
                dashed = name.replace(b"_", b"-")
                if dashed not in _FORWARDING and not dashed.startswith(_FORWARDED_FIRST):
                    out.append((name, value))  # an underscore name of its own: kept
            else:  # an X-Forwarded-* name outside the set: a trusted proxy's only
                if forwarded is None:
                    forwarded = []
                forwarded.append((name, value))
        elif name == b"host":
            if host is not None:
                raise BadRequestHeaders("more than one Host header")
            host = value
        elif name == b"content-length":
            if content_length is not None and content_length != value:
                raise BadRequestHeaders("conflicting Content-Length headers")
            content_length = value
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection":
            tokens = [t.strip().lower() for t in value.split(b",")]
            connection = tokens if connection is None else connection + tokens
        elif name in _FORWARDING:
            if forwarded is None:
                forwarded = []
            forwarded.append((name, value))

    if size > max_bytes:
        raise HeadersTooLarge(f"request headers of {size} bytes (limit {max_bytes})")
    if connection is not None:
        named = set(connection) - HOP_BY_HOP
        if named:
            out = [(n, v) for n, v in out if n not in named]

    # Framing: with Transfer-Encoding the body is re-framed and a Content-Length next to
    # it is a smuggling attempt's signature (RFC 9112 §6.3): it is dropped, not forwarded.
    if content_length is not None and not chunked:
        out.append((b"content-length", content_length))

    kept_host = False
    if keep_host and host is not None:
        out.append((b"host", host))
        kept_host = True

    _add_forwarding(out, forwarded, client_host, scheme, trusted, host, prefix)
    return out, kept_host


def client_address(
    headers: Iterable[tuple[bytes, bytes]], peer: str | None, trusted: TrustedProxies
) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the last
    address of ``X-Forwarded-For`` that is not one (nginx's ``real_ip_recursive on``):
    an address the client wrote itself, further left, is never taken."""
    if peer is None or not trusted or peer not in trusted:
        return peer
    chain = [
        address.strip()
        for name, value in headers
        if name == b"x-forwarded-for"
        for address in value.decode("latin-1").split(",")
    ]
    for address in reversed(chain):
        if address and address not in trusted:
            return address
    return chain[0] if chain and chain[0] else peer


def _add_forwarding(
    out: Headers,
    forwarded: Headers | None,
    client_host: str | None,
    scheme: str,
    trusted: TrustedProxies,
    host: bytes | None,
    prefix: bytes,
) -> None:
    """Append the proxy's own forwarding headers, extending a trusted proxy's
    (``forwarded``: the client's forwarding headers, dropped unless it is trusted)."""
    forwarded_for = client_host.encode("latin-1") if client_host else None
    forwarded_proto = scheme.encode("latin-1")
    forwarded_host = host
    if forwarded is not None and client_host in trusted:
        chain = b", ".join(v for n, v in forwarded if n == b"x-forwarded-for")
        if chain:
            forwarded_for = chain + b", " + forwarded_for if forwarded_for else chain
        for name, value in forwarded:
            if name == b"x-forwarded-proto":
                forwarded_proto = value
            elif name == b"x-forwarded-host":
                forwarded_host = value
            elif name == b"x-forwarded-prefix":
                prefix = value.rstrip(b"/") + prefix
            elif name != b"x-forwarded-for":
                out.append((name, value))
    if forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for))
    out.append((b"x-forwarded-proto", forwarded_proto))
    if forwarded_host is not None:
        out.append((b"x-forwarded-host", forwarded_host))
    if prefix:
        out.append((b"x-forwarded-prefix", prefix))


def response_headers(raw: Iterable[tuple[bytes, bytes]], hidden: frozenset[bytes]) -> Headers:
    """The upstream response's headers, lower-cased for ASGI, hop-by-hop and ``hidden``
    ones removed (by default Date and Server, which the ASGI server sets itself: passing
    the upstream's on would send each twice)."""
    out: Headers = []
    connection: set[bytes] | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")} - HOP_BY_HOP
                connection = tokens if connection is None else connection | tokens
        elif lower not in hidden:
            out.append((lower, value))
    if connection:
        out = [(n, v) for n, v in out if n not in connection]
    return out
