"""Where leaks show: the logs where asyncio, the middleware and uvicorn report destroyed
tasks, unretrieved exceptions and unclosed resources (``LeakLog``, ``leaks``); the warnings
and asyncio logs of one block (``no_leaks``); and what the operating system says the
process holds (``/proc``: ``rss_bytes``, ``held_sockets``).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

LEAK_TEXTS = ("Task was destroyed", "Task exception was never retrieved", "Unclosed", "unclosed")


class LeakLog(logging.Handler):
    """The messages of the loggers where leaks and crashes are reported, as text: a record
    kept whole would keep its traceback's frames, and the tasks they refer to, alive.
    uvicorn configures its own loggers (dropping their handlers) whenever a server is
    configured, so ``watch`` must be called once the servers are created."""

    NAMES = ("asyncio", "rr_middleware", "uvicorn")  # uvicorn.error propagates to uvicorn

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._messages: list[str] = []
        self._messages_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name} {record.levelname}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        with self._messages_lock:
            self._messages.append(text)

    def watch(self) -> None:
        for name in self.NAMES:
            logger = logging.getLogger(name)
            if self not in logger.handlers:
                logger.addHandler(self)

    def unwatch(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)

    def messages(self) -> list[str]:
        with self._messages_lock:
            return list(self._messages)


def leaks(log: LeakLog) -> list[str]:
    gc.collect()  # a task destroyed while pending is reported when it is collected
    return [m for m in log.messages() if any(text in m for text in LEAK_TEXTS)]


_LEAK_WORDS = ("unclosed", "was destroyed", "never awaited", "exception was never retrieved")


class _Collect(logging.Handler):
    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(word in message.lower() for word in _LEAK_WORDS):
            self.found.append(f"log {record.name}: {message.splitlines()[0]}")


def _is_leak(warning: warnings.WarningMessage) -> bool:
    text = str(warning.message).lower()
    return issubclass(warning.category, ResourceWarning) or any(w in text for w in _LEAK_WORDS)


@contextmanager
def no_leaks() -> Iterator[list[str]]:
    """Yield a list that, once the block is left, holds every leak report of the block.

    Garbage is collected until no more warnings come: a recorded warning keeps its
    ``source`` object alive, so each round drops the records and collects again.
    """
    found: list[str] = []
    handler = _Collect(found)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield found
            finally:
                for _ in range(5):
                    gc.collect()
                    if not caught:
                        break
                    found.extend(
                        f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
                        for w in caught
                        if _is_leak(w)
                    )
                    caught.clear()
    finally:
        asyncio_logger.removeHandler(handler)


def rss_bytes() -> int:
    """The resident set size of this process (proxy, upstreams and clients all run in it)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux) to read the RSS")
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssGrowth:
    """While in its ``with`` block, samples this process's RSS every 20 ms from a thread;
    ``growth`` is the peak seen over the RSS at entry."""

    def __enter__(self) -> RssGrowth:
        self.before = self.peak = rss_bytes()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._sampler.join()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.before


def held_sockets(port: int) -> int:
    """TCP sockets this process holds open to 127.0.0.1:``port``: the proxy's connections
    to the upstream listening there, as the kernel reports them (``/proc/net/tcp``). A
    socket the process has closed shows inode 0 while the kernel finishes it, and is not
    counted; nor are the upstream's own ends (their local port is ``port``)."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp (Linux) to count sockets")
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[9] != "0" and fields[9] in ours:
                count += 1
    return count


def proxy_sockets_to(proxy_port: int, client_port: int) -> int:
    """Sockets this process holds on its side of a client's connection to a proxy it
    serves (local port ``proxy_port``, remote ``client_port``), from ``/proc/net/tcp``."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp (Linux) to count sockets")
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if (local, remote) == (proxy_port, client_port) and fields[9] != "0":
                count += 1
    return count
