"""``ManualClock``: the pool clock (``Pool(clock=...)``) a test moves by hand.

Every time-based rule of a pool reads its clock, never the system's: the passive ejection
window (``fail_timeout``), the half-open probe's deadline, slow start's ramp, the
``Retry-After`` of a pool that is down. With a manual clock those run in microseconds and
exactly: ``clock.advance(10)`` and the ejection has run out. (The health checker's own
interval is real time; run a round at once with ``check_health``.)
"""

from __future__ import annotations

import math
import threading

__all__ = ["ManualClock"]


class ManualClock:
    """Seconds that move only when the test says so; a callable, as ``Pool(clock=)`` takes.

    >>> clock = ManualClock()
    >>> clock()
    1000.0
    >>> clock.advance(2.5)
    1002.5

    Args:
        start: The first reading (not 0, so that "never" and "at the start" differ).
    """

    def __init__(self, start: float = 1000.0) -> None:
        _check_finite("start", start)
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self._now!r})"

    @property
    def now(self) -> float:
        """The current reading."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward ``seconds`` (>= 0; time does not run backwards); the new reading."""
        _check_finite("seconds", seconds)
        if seconds < 0:
            raise ValueError(f"a clock moves forward only: advance({seconds!r})")
        with self._lock:  # the app may read it from its own thread: each move is whole
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Jump to ``now`` (not earlier than the current reading)."""
        _check_finite("now", now)
        with self._lock:
            if now < self._now:
                raise ValueError(f"a clock moves forward only: set({now!r}) < {self._now!r}")
            self._now = float(now)


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
