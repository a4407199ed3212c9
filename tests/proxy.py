"""The proxy under test, as the fault and stall tests run it: the middleware under real
uvicorn around a host app that reports, from the proxy's own event loop, its task count
and its open upstream connections; plus the logs where leaks and crashes show, and what
the operating system says the process holds (``/proc``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rr_middleware import RoundRobinMiddleware

from .servers import RunningServer, serve

SETTLE = 5.0  # the longest any test waits for connections or tasks to settle
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


# --------------------------------------------------------------------------- the proxy


class ProxyProbe:
    """The host app the middleware wraps: ``/debug/state`` answers, from the proxy's own
    event loop, how many asyncio tasks exist on it and how many upstream connections the
    middleware's default transport holds. ``tasks_at_shutdown``: the coroutine names of
    the tasks alive on the loop as the host app's own lifespan shutdown runs, which is
    after the middleware's own shutdown (it handles the message before passing it on)."""

    def __init__(self) -> None:
        self.middleware: RoundRobinMiddleware | None = None
        self.tasks_at_shutdown: list[str] | None = None

    def app(self) -> Starlette:
        async def state(request: Request) -> JSONResponse:
            assert self.middleware is not None
            transport: Any = self.middleware.transport
            return JSONResponse(
                {"tasks": len(asyncio.all_tasks()), "connections": transport.open_connections}
            )

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            self.tasks_at_shutdown = [
                getattr(task.get_coro(), "__qualname__", repr(task.get_coro()))
                for task in asyncio.all_tasks()
            ]

        return Starlette(routes=[Route("/debug/state", state)], lifespan=lifespan)


@contextmanager
def fault_proxy(
    pools: dict[str, Any], log: LeakLog | None = None, **config: Any
) -> Iterator[tuple[RunningServer, RoundRobinMiddleware, ProxyProbe]]:
    """The middleware around a ``ProxyProbe`` app under uvicorn. Start it after the
    upstreams: ``log`` (if given) is attached once uvicorn has configured its loggers."""
    probe = ProxyProbe()
    middleware = RoundRobinMiddleware(probe.app(), pools=pools)
    probe.middleware = middleware
    with serve(middleware, proxy_headers=False, **config) as server:
        if log is not None:
            log.watch()
        yield server, middleware, probe


def proxy_state(http: httpx.Client, proxy: RunningServer) -> dict[str, int]:
    response = http.get(f"{proxy.url}/debug/state")
    assert response.status_code == 200, response.text
    state: dict[str, int] = response.json()
    return state


def settle(
    http: httpx.Client, proxy: RunningServer, done: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    """Poll the proxy (one request per poll) until ``done(state)``, or ``SETTLE`` seconds
    have passed; the last state seen, settled or not."""
    deadline = time.monotonic() + SETTLE
    while True:
        state = proxy_state(http, proxy)
        if done(state) or time.monotonic() > deadline:
            return state


async def aproxy_state(http: httpx.AsyncClient, proxy: RunningServer) -> dict[str, int]:
    response = await http.get(f"{proxy.url}/debug/state")
    assert response.status_code == 200, response.text
    state: dict[str, int] = response.json()
    return state


async def asettle(
    http: httpx.AsyncClient, proxy: RunningServer, done: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    deadline = time.monotonic() + SETTLE
    while True:
        state = await aproxy_state(http, proxy)
        if done(state) or time.monotonic() > deadline:
            return state


def client(**options: Any) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10, **options)


def aclient(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10, **options)


def rss_bytes() -> int:
    """The resident set size of this process (proxy, upstreams and clients all run in it)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux) to read the RSS")
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


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
