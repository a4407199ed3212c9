"""Pool members from Consul's health endpoint, followed with blocking queries.

``GET /v1/health/service/<name>?passing=true`` lists the instances whose checks pass;
repeated with ``index=<X-Consul-Index>&wait=<wait>`` the request blocks until the list
changes or ``wait`` runs out. Consul's rules for such loops are kept: an index that goes
backwards resets to 0, an index is never below 1, and the loop is rate-limited
(``min_interval``) so a churning service cannot make it spin.

Per instance: the address is ``Service.Address``, else ``Node.Address``; the weight is
``Service.Meta["weight"]`` when set, else ``Service.Weights.Passing`` (``Warning`` for an
instance whose worst check is warning, when ``passing_only=False``), else 1; the scheme
is ``Service.Meta["scheme"]`` (``http`` unless said).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from ..errors import FieldError
from ..upstream import Upstream
from .base import DiscoveryError, check_seconds, upstream_at

__all__ = ["ConsulDiscovery"]

_FIRST_READ_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

logger = logging.getLogger("rr_middleware")


@dataclass(frozen=True)
class ConsulDiscovery:
    """The instances of Consul service ``service`` are the pool.

    >>> ConsulDiscovery("users", address="http://127.0.0.1:8500", tag="v2").describe()
    "consul service 'users' (tag 'v2') at http://127.0.0.1:8500"

    ``token`` is sent as ``X-Consul-Token``; ``datacenter`` and ``tag`` filter as Consul's
    ``dc`` and ``tag``; ``passing_only=False`` also takes instances whose checks fail
    (leave it to your own health checks). ``wait`` is the blocking query's wait.
    ``ca_file`` (PEM) is the CA that signs an ``https`` agent's certificate, instead of
    the system's. ``transport`` (any ``httpx.AsyncBaseTransport``) reaches Consul, e.g.
    with TLS settings of your own.
    """

    service: str
    address: str = "http://127.0.0.1:8500"
    tag: str | None = None
    datacenter: str | None = None
    token: str | None = field(default=None, repr=False)
    passing_only: bool = True
    wait: float = 30.0
    min_interval: float = 1.0
    startup_timeout: float = 5.0
    retry_initial: float = 0.5
    retry_max: float = 30.0
    ca_file: str | None = None
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.service, str) or not self.service:
            problem = f"must be a non-empty string, got {self.service!r}"
            raise FieldError("service", problem, f"consul service name {problem}")
        try:
            parts = urlsplit(self.address)
        except (TypeError, ValueError):
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise FieldError.of(
                "consul", "address", f"must be http(s)://host[:port], got {self.address!r}"
            )
        if "@" in parts.netloc:
            # It would be logged, shown on the status page and printed by --check.
            raise FieldError.of(
                "consul", "address", "must not carry credentials; give token= instead"
            )
        for name in ("tag", "datacenter", "token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise FieldError.of("consul", name, f"must be a non-empty string, got {value!r}")
        if not isinstance(self.passing_only, bool):
            raise FieldError.of(
                "consul", "passing_only", f"must be true or false, got {self.passing_only!r}"
            )
        # Consul caps a blocking query's wait at 10 minutes.
        check_seconds("consul", "wait", self.wait, maximum=600)
        check_seconds("consul", "min_interval", self.min_interval, allow_zero=True)
        check_seconds("consul", "startup_timeout", self.startup_timeout, allow_zero=True)
        check_seconds("consul", "retry_initial", self.retry_initial)
        check_seconds("consul", "retry_max", self.retry_max)
        if self.ca_file is not None:
            self.ssl_context()  # a file that cannot be loaded is a start-up error

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What verifies the agent's certificate: ``ca_file``'s CA, else the system's."""
        if self.ca_file is None:
            return True
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise FieldError.of(
                "consul", "ca_file", f"{self.ca_file!r} cannot be loaded: {reason}"
            ) from None

    def describe(self) -> str:
        tag = f" (tag {self.tag!r})" if self.tag else ""
        dc = f" in {self.datacenter}" if self.datacenter else ""
        return f"consul service {self.service!r}{tag}{dc} at {self.address}"

    async def watch(self) -> AsyncIterator[list[Upstream]]:
        """Yield the member list now and whenever it changes; raise ``DiscoveryError``
        when Consul cannot be read."""
        headers = {"x-consul-token": self.token} if self.token else {}
        # Consul adds up to wait/16 of jitter to a blocking query.
        timeout = httpx.Timeout(self.wait * 17 / 16 + 10, connect=5.0)
        params: dict[str, str] = {}
        if self.passing_only:
            params["passing"] = "true"
        if self.tag:
            params["tag"] = self.tag
        if self.datacenter:
            params["dc"] = self.datacenter
        url = f"/v1/health/service/{quote(self.service, safe='')}"
        wait = f"{max(1, math.ceil(self.wait * 1000))}ms"
        index = 0
        last: list[tuple[str, int]] | None = None
        async with httpx.AsyncClient(
            base_url=self.address,
            headers=headers,
            timeout=timeout,
            transport=self.transport,
            verify=self.ssl_context(),
        ) as client:
            while True:
                started = time.monotonic()
                if index:
                    query, limit = {**params, "index": str(index), "wait": wait}, timeout
                else:  # a plain read: an agent that hangs is noticed in seconds
                    query, limit = params, _FIRST_READ_TIMEOUT
                entries, new_index = await self._read(client, url, query, limit)
                # Consul's rules: an index going backwards means the data was reset (a
                # snapshot restore, another server answering): start over with a query that
                # does not block; an index below 1 is never used (it would not block).
                index = 0 if new_index < index else max(new_index, 1)
                upstreams = self._members(entries)
                current = [(u.url, u.weight) for u in upstreams]
                if current != last:
                    last = current
                    yield upstreams
                pause = self.min_interval - (time.monotonic() - started)
                if pause > 0:
                    await asyncio.sleep(pause)

    async def _read(
        self, client: httpx.AsyncClient, url: str, query: Mapping[str, str], limit: httpx.Timeout
    ) -> tuple[list[Any], int]:
        try:
            response = await client.get(url, params=query, timeout=limit)
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise DiscoveryError(f"consul at {self.address} unreachable: {reason}") from None
        if response.status_code != 200:
            text = response.text.strip().replace("\n", " ")[:200]
            hint = " (check the token's ACL)" if response.status_code == 403 else ""
            raise DiscoveryError(f"consul answered {response.status_code}{hint}: {text}")
        try:
            index = int(response.headers["x-consul-index"])
            entries = response.json()
        except (KeyError, ValueError) as exc:
            raise DiscoveryError(
                f"consul answered something that is not a health list: {exc}"
            ) from None
        if not isinstance(entries, list):
            raise DiscoveryError("consul answered no health list: not a JSON array")
        return entries, index

    def _members(self, entries: list[Any]) -> list[Upstream]:
        members: dict[str, Upstream] = {}
        for entry in entries:
            try:
                upstream = self._upstream(entry)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                logger.warning("%s: skipped an instance: %s", self.describe(), exc)
                continue
            # The same address registered twice (two agents, one instance; the host in
            # another case): one member.
            members.setdefault(upstream.origin, upstream)
        return sorted(members.values(), key=lambda u: u.url)

    def _upstream(self, entry: Mapping[str, Any]) -> Upstream:
        service = entry["Service"]
        node = entry.get("Node") or {}
        host = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if not host or not isinstance(host, str):
            raise ValueError(f"instance {service.get('ID')!r} has no address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"instance {service.get('ID')!r} has no valid port: {port!r}")
        meta = service.get("Meta") or {}
        scheme = meta.get("scheme", "http")
        if scheme not in ("http", "https"):
            raise ValueError(f"instance {service.get('ID')!r}: scheme {scheme!r} is not http(s)")
        return upstream_at(scheme, host, port, self._weight(entry, meta))

    def _weight(self, entry: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
        if "weight" in meta:
            text = meta["weight"]
            if isinstance(text, str) and text.strip().isdigit():
                return int(text)
            raise ValueError(f"Meta weight must be an integer >= 0, got {text!r}")
        weights = entry["Service"].get("Weights") or {}
        checks = entry.get("Checks") or []
        warning = any(c.get("Status") == "warning" for c in checks)
        weight = weights.get("Warning" if warning else "Passing", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"Weights must be integers >= 0, got {weights!r}")
        return weight
