"""Waiting for an observable condition (a status read, a log line, a process's output).

Where no event can be awaited — the condition lives in another process or thread — the
tests poll it with a deadline; the pause between reads sets the pace of the poll, it is
not a synchronisation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Call ``check`` until it returns something true, and return that; fail the test
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


async def settled(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Let the event loop run until ``check()`` is true, and return that (a change applied
    by a task of this loop, a few loop turns after its cause); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
    return result
