"""Waiting for an observable condition (a status read, a log line, a process's output).

Where no event can be awaited — the condition lives in another process or thread — the
tests poll it with a deadline; the pause between reads sets the pace of the poll, it is
not a synchronisation. The waits are the testing kit's (``rr_middleware.testing``):
``settled`` as it is, ``wait_for`` with the tests' longer default deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rr_middleware.testing import settled, wait_until

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Call ``check`` until it returns something true, and return that; fail the test
    naming ``what`` after ``timeout`` seconds (the kit's ``wait_until``)."""
    return wait_until(check, timeout, what=what)


__all__ = ["settled", "wait_for"]
