"""Upstreams whose latency a test changes while they serve: ``UpstreamApp`` (every action
of it) behind a delay before the headers, for the latency, budget and hedging tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from .servers import RunningServer, serve
from .upstream_app import UpstreamApp


class SlowableUpstream:
    """``UpstreamApp`` behind a delay the test sets while it serves: every request waits
    ``delay`` seconds, and every ``slow_every``-th one (0: none) ``slow_delay`` seconds
    instead, before its headers. A client leaving during the wait is counted in
    ``disconnects``; ``delayed``/``delayed_done``: the slow waits begun and completed.
    ``fail_with``: a status every request gets at once instead (0: none)."""

    def __init__(self, name: str) -> None:
        self.inner = UpstreamApp(name)
        self.delay = 0.0
        self.slow_every = 0
        self.slow_delay = 1.0
        self.seen = 0
        self.delayed = 0
        self.delayed_done = 0
        self.disconnects = 0
        self.fail_with = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.seen += 1
        if self.fail_with:
            await send({"type": "http.response.start", "status": self.fail_with, "headers": []})
            await send({"type": "http.response.body", "body": b"failed at once"})
            return
        delay, slow = self.delay, False
        if self.slow_every and self.seen % self.slow_every == 0:
            delay, slow = self.slow_delay, True
            self.delayed += 1
        if delay:
            body = await receive()  # the request (no body in these tests)
            disconnect = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait((disconnect,), timeout=delay)
            if done:
                self.disconnects += 1
                return
            disconnect.cancel()
            if slow:
                self.delayed_done += 1
            replayed = iter([body])

            async def receive_again() -> Any:
                return next(replayed)

            receive = receive_again
        await self.inner(scope, receive, send)


@contextmanager
def slowable_upstreams(count: int) -> Iterator[tuple[list[SlowableUpstream], list[str]]]:
    apps = [SlowableUpstream(name) for name in "abcdefgh"[:count]]
    with ExitStack() as stack:
        servers: list[RunningServer] = [stack.enter_context(serve(app)) for app in apps]
        yield apps, [s.url for s in servers]
