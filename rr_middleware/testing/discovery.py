"""``FakeDiscovery``: a discovery source (``Pool(discovery=...)``) whose member list the
test sets, as a registry would change it while the app serves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Union

from ..discovery.base import DiscoveryError
from ..upstream import Upstream
from .fake_upstream import FakeUpstream

__all__ = ["FakeDiscovery", "MemberArg"]

MemberArg = Union[Upstream, str, FakeUpstream]


class FakeDiscovery:
    """A discovery source for tests: ``set(members)`` changes the list it reports, at
    once, to every pool watching it; ``fail()`` makes reading it fail (a registry outage,
    ``DiscoveryError``) until the next ``set()``.

    Members are URLs, ``Upstream`` values or ``FakeUpstream``s (their ``upstream()``).

    >>> discovery = FakeDiscovery(["http://10.0.0.1:8000"])
    >>> discovery.set(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    >>> discovery.version
    2

    Args:
        members: The first list (none: the pool starts empty and answers 503).
        startup_timeout: How long the lifespan waits for the first list.
        retry_initial: After a failure, the first wait before reading again (doubling
            up to ``retry_max``); short, so a test's outage ends quickly.
    """

    def __init__(
        self,
        members: Iterable[MemberArg] = (),
        *,
        startup_timeout: float = 5.0,
        retry_initial: float = 0.01,
        retry_max: float = 0.1,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._lock = threading.Lock()
        self._members = _upstreams(members)
        self._error: str | None = None
        self._version = 1
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def version(self) -> int:
        """How many lists (or failures) it has had: 1 for the first."""
        return self._version

    @property
    def members(self) -> list[Upstream]:
        """The list it reports now."""
        return list(self._members)

    def set(self, members: Iterable[MemberArg]) -> None:
        """Report ``members`` from now on (and end a failure)."""
        upstreams = _upstreams(members)
        with self._lock:
            self._members, self._error = upstreams, None
            self._version += 1
        self._wake()

    def fail(self, message: str = "registry unreachable (FakeDiscovery.fail)") -> None:
        """Fail every read with ``DiscoveryError(message)`` until the next ``set()``; the
        pools keep the members they last had."""
        with self._lock:
            self._error = message
            self._version += 1
        self._wake()

    def describe(self) -> str:
        return "fake discovery"

    def _wake(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for loop, changed in watchers:
            loop.call_soon_threadsafe(changed.set)

    async def watch(self) -> AsyncIterator[list[Upstream]]:
        changed = asyncio.Event()
        entry = (asyncio.get_running_loop(), changed)
        with self._lock:
            self._watchers.append(entry)
        try:
            seen = 0
            while True:
                changed.clear()
                with self._lock:
                    version, members, error = self._version, self._members, self._error
                if error is not None:
                    raise DiscoveryError(error)
                if version != seen:
                    seen = version
                    yield list(members)
                await changed.wait()
        finally:
            with self._lock:
                self._watchers.remove(entry)


def _upstreams(members: Iterable[MemberArg]) -> list[Upstream]:
    if isinstance(members, (str, bytes)):
        raise TypeError("members must be a list of URLs, Upstreams or FakeUpstreams")
    result = []
    for member in members:
        if isinstance(member, FakeUpstream):
            result.append(member.upstream())
        elif isinstance(member, Upstream):
            result.append(member)
        else:
            result.append(Upstream(member))
    return result
