"""Waiting for what the app does on its own time, with a deadline: never a bare sleep.

Much of what a test asserts settles a moment after the response: counters and
``in_flight`` are lowered once the answer has been sent, a health round is applied once
every probe has come back, discovery's list is applied by a task of the app's loop.
``wait_until`` (from a test's thread) and ``settled`` (in the app's event loop) poll a
predicate until it holds, and fail naming what they waited for once the deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["WaitTimeout", "settled", "wait_until"]

T = TypeVar("T")

#: Seconds between two readings of a predicate: the pace of the poll, not a synchronisation.
POLL_INTERVAL = 0.005


class WaitTimeout(AssertionError):
    """A condition did not hold within its deadline (an ``AssertionError``, so a test
    framework reports it as a failed assertion)."""


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, *, what: str = "") -> T:
    """Call ``predicate`` until it returns something true, and return that; raise
    ``WaitTimeout`` after ``timeout`` seconds. For sync tests (``TestClient``), whose app
    runs in another thread.

    >>> wait_until(lambda: 42)
    42
    """
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise WaitTimeout(f"not true after {timeout}s: {what or _name(predicate)}")
        time.sleep(POLL_INTERVAL)
    return result


async def settled(predicate: Callable[[], T], timeout: float = 5.0, *, what: str = "") -> T:
    """Let the event loop run until ``predicate()`` is true, and return that; raise
    ``WaitTimeout`` after ``timeout`` seconds. For async tests, whose app runs on the
    test's own loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise WaitTimeout(f"not true after {timeout}s: {what or _name(predicate)}")
        await asyncio.sleep(POLL_INTERVAL)
    return result


def _name(predicate: Callable[[], object]) -> str:
    return getattr(predicate, "__qualname__", repr(predicate))
