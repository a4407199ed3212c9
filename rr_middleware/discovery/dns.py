"""Pool members from DNS: the addresses a name resolves to, re-resolved every ``interval``.

With a ``port``, the name's A/AAAA records are the members, resolved by the system's
resolver (``getaddrinfo`` in a thread: ``/etc/hosts``, Docker's embedded DNS and
``--scale`` replicas all work). Without one, the name's SRV records give the members and
their ports (lowest priority only; SRV weight → weight). SRV, and an explicit
``nameservers`` list, need ``dnspython`` (``pip install 'rr-middleware[dns]'``).

A name that does not exist, or has no such records, is an empty pool (503s); a resolver
that fails or times out is a discovery failure, and the last good members stay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import FieldError
from ..upstream import Upstream
from .base import DiscoveryError, check_seconds, upstream_at

__all__ = ["DNSDiscovery"]

_FAMILIES = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


@dataclass(frozen=True)
class DNSDiscovery:
    """The addresses ``name`` resolves to are the pool.

    >>> DNSDiscovery("backend", port=8000).describe()
    "dns name 'backend' port 8000"

    ``port=None`` reads SRV records instead. ``nameservers`` (``"10.0.0.2"``,
    ``"127.0.0.1:8600"``, ``"[::1]:53"``) replaces the system's resolver; ``family``
    (``"any"``, ``"ipv4"``, ``"ipv6"``) filters the addresses; ``timeout`` bounds one
    resolution.
    """

    name: str
    port: int | None = 8000
    interval: float = 5.0
    scheme: str = "http"
    family: str = "any"
    nameservers: Sequence[str] | None = None
    timeout: float = 5.0
    startup_timeout: float = 5.0
    retry_initial: float = 0.5
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip("."):
            raise FieldError.of("dns", "name", f"must be a non-empty string, got {self.name!r}")
        if self.port is not None and (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 < self.port < 65536
        ):
            raise FieldError.of(
                "dns", "port", f"must be 1..65535 (or None for SRV), got {self.port!r}"
            )
        if self.scheme not in ("http", "https"):
            raise FieldError.of("dns", "scheme", f"must be 'http' or 'https', got {self.scheme!r}")
        if self.family not in _FAMILIES:
            raise FieldError.of(
                "dns", "family", f"must be 'any', 'ipv4' or 'ipv6', got {self.family!r}"
            )
        check_seconds("dns", "interval", self.interval)
        check_seconds("dns", "timeout", self.timeout)
        check_seconds("dns", "startup_timeout", self.startup_timeout, allow_zero=True)
        check_seconds("dns", "retry_initial", self.retry_initial)
        check_seconds("dns", "retry_max", self.retry_max)
        if self.nameservers is not None:
            if isinstance(self.nameservers, str) or not self.nameservers:
                raise FieldError.of(
                    "dns", "nameservers", f"must be a list of addresses, got {self.nameservers!r}"
                )
            object.__setattr__(self, "nameservers", tuple(self.nameservers))
            for server in self.nameservers:
                _split_nameserver(server)
        if self.port is None or self.nameservers is not None:
            try:
                import dns.asyncresolver  # noqa: F401
            except ImportError:
                raise ValueError(
                    "DNSDiscovery with SRV records (port=None) or nameservers= needs dnspython: "
                    "pip install 'rr-middleware[dns]'"
                ) from None

    def describe(self) -> str:
        record = "SRV" if self.port is None else f"port {self.port}"
        via = f" via {', '.join(self.nameservers)}" if self.nameservers else ""
        return f"dns name {self.name!r} {record}{via}"

    async def watch(self) -> AsyncIterator[list[Upstream]]:
        """Yield the member list now and whenever it changes, resolving every
        ``interval`` seconds; raise ``DiscoveryError`` when resolution fails."""
        resolver = (
            None
            if self.port is not None and self.nameservers is None
            else (await self._dnspython_resolver())
        )
        last: list[tuple[str, int]] | None = None
        while True:
            if resolver is None:
                assert self.port is not None
                found = [(address, self.port, 1) for address in await self._getaddrinfo()]
            else:
                found = await _resolve(resolver, self)
            upstreams = sorted(
                {u.url: u for u in (upstream_at(self.scheme, *f) for f in found)}.values(),
                key=lambda u: u.url,
            )
            current = [(u.url, u.weight) for u in upstreams]
            if current != last:
                last = current
                yield upstreams
            await asyncio.sleep(self.interval)

    async def _getaddrinfo(self) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(
                    self.name, self.port, family=_FAMILIES[self.family], type=socket.SOCK_STREAM
                ),
                self.timeout,
            )
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                return []
            raise DiscoveryError(f"resolving {self.name!r} failed: {exc.strerror}") from None
        except asyncio.TimeoutError:
            raise DiscoveryError(f"resolving {self.name!r} took over {self.timeout}s") from None
        return sorted({str(info[4][0]) for info in infos})

    async def _dnspython_resolver(self) -> Any:
        import dns.asyncresolver
        import dns.nameserver

        if self.nameservers is None:
            # Reads /etc/resolv.conf: a file read, so off the event loop.
            resolver = await asyncio.to_thread(dns.asyncresolver.Resolver)
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in map(_split_nameserver, self.nameservers)
            ]
        resolver.lifetime = self.timeout
        return resolver


async def _resolve(resolver: Any, source: DNSDiscovery) -> list[tuple[str, int, int]]:
    """(address, port, weight) per member, through dnspython."""
    import dns.exception
    import dns.rdatatype
    import dns.resolver

    name = source.name
    types = {"any": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}[source.family]

    # The system's search domains apply to a short name, as getaddrinfo applies them
    # (``_http._tcp.backend`` in a cluster); explicit nameservers have none.
    search = source.nameservers is None

    async def query(qname: str, rdtype: str) -> Any:
        try:
            return await resolver.resolve(qname, rdtype, search=search)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"resolving {qname!r} {rdtype} failed: {exc}") from None

    if source.port is not None:
        found: list[tuple[str, int, int]] = []
        for rdtype in types:
            answer = await query(name, rdtype)
            found += [(rd.address, source.port, 1) for rd in answer or ()]
        return found

    answer = await query(name, "SRV")
    if answer is None:
        return []
    best = min(rd.priority for rd in answer)
    # The addresses of SRV targets usually ride along in the additional section.
    glue: dict[Any, list[str]] = {}
    for rrset in answer.response.additional:
        if dns.rdatatype.to_text(rrset.rdtype) in types:
            glue.setdefault(rrset.name, []).extend(rd.address for rd in rrset)
    found = []
    for rd in answer:
        if rd.priority != best:
            continue
        addresses = glue.get(rd.target)
        if addresses is None:
            addresses = []
            for rdtype in types:
                target = await query(rd.target.to_text(), rdtype)
                addresses += [a.address for a in target or ()]
        # RFC 2782: weight 0 is "very rarely"; here it gets the smallest share.
        found += [(address, rd.port, max(rd.weight, 1)) for address in addresses]
    return found


def _split_nameserver(server: Any) -> tuple[str, int]:
    """``"10.0.0.2"`` → (``"10.0.0.2"``, 53); ``"[::1]:5353"`` → (``"::1"``, 5353)."""
    if not isinstance(server, str):
        raise _nameserver_error(f"must be a string, got {server!r}")
    host, port = server, 53
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            port = _port(server, rest.removeprefix(":"))
    elif server.count(":") == 1:
        host, _, text = server.partition(":")
        port = _port(server, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _nameserver_error(f"{server!r} must be an IP address[:port]") from None
    return host, port


def _nameserver_error(problem: str) -> FieldError:
    return FieldError("nameservers", problem, f"dns nameserver {problem}")


def _port(server: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _nameserver_error(f"{server!r} has a bad port")
    return int(text)
