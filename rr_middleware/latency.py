"""How fast an upstream answers lately: the peak-sensitive EWMA that ``policy="peak_ewma"``
balances on, and a pool's window of recent latencies that ``hedge_after="p95"`` reads.

Peak EWMA is Finagle's and Linkerd's (tower's ``PeakEwma``): each upstream keeps an
estimate of its response-header latency. An observation above the estimate replaces it
at once (the *peak*: a slowdown is believed immediately); one below is blended in with
weight ``1 - exp(-Δt/τ)``, ``Δt`` the time since the previous observation and ``τ`` the
pool's ``ewma_decay`` (10 s by default, as theirs), so an estimate moves about as fast
in wall time whatever the request rate. Between observations the estimate decays
towards zero with the same ``τ``: an upstream that got no traffic because it was slow is
tried again after a while, and its next answer says whether it still is. Reading an
estimate changes nothing, so a pick costs two ``exp`` and no write.

An upstream with no estimate yet, or coming back into rotation (recovered, undrained,
rejoined), starts at the median of its peers' estimates (``seed``): not zero, which would
send it every request until its first answers came, and not the worst, which would keep
it out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FLOOR", "LatencyWindow", "PeakEwma", "cost", "parse_hedge_after", "seed"]

# Seconds added to every estimate: with none yet (a new pool), the cost is the load alone.
FLOOR = 1e-6

_QUANTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


class PeakEwma:
    """One upstream's peak-sensitive EWMA of response-header latency, in seconds.

    >>> ewma = PeakEwma(decay=10.0)
    >>> ewma.observe(0.010, now=0.0); ewma.value(0.0)
    0.01
    >>> ewma.observe(0.200, now=1.0); ewma.value(1.0)  # a peak is taken at once
    0.2
    >>> round(ewma.value(11.0), 4)  # ten seconds later, decayed by e
    0.0736
    """

    __slots__ = ("_decay", "estimate", "stamp")

    def __init__(self, decay: float) -> None:
        self._decay = decay
        #: The estimate as of ``stamp`` (None: nothing observed nor seeded yet).
        self.estimate: float | None = None
        self.stamp = 0.0

    def value(self, now: float) -> float:
        """The estimate at ``now``: decayed towards zero since the last observation."""
        estimate = self.estimate
        if estimate is None:
            return 0.0
        elapsed = now - self.stamp
        if elapsed <= 0.0:
            return estimate
        return estimate * math.exp(-elapsed / self._decay)

    def observe(self, seconds: float, now: float) -> None:
        """An answer's headers came ``seconds`` after it was sent."""
        estimate = self.estimate
        if estimate is None:
            self.estimate = seconds
        else:
            elapsed = now - self.stamp
            kept = math.exp(-elapsed / self._decay) if elapsed > 0.0 else 1.0
            if seconds > estimate * kept:
                self.estimate = seconds  # the peak
            else:
                self.estimate = estimate * kept + seconds * (1.0 - kept)
        self.stamp = now

    def retune(self, decay: float) -> None:
        """Decay with ``decay`` from now on (the pool's ``ewma_decay`` changed)."""
        self._decay = decay

    def reset(self, estimate: float | None, now: float) -> None:
        """Start again from ``estimate`` (None: from nothing)."""
        self.estimate = estimate
        self.stamp = now


def cost(estimate: float | None, in_flight: int, weight: int) -> float | None:
    """``peak_ewma``'s cost of an upstream: (estimate + FLOOR) * (in-flight + 1) / weight
    (None at weight 0: never picked)."""
    if weight <= 0:
        return None
    return ((estimate or 0.0) + FLOOR) * (in_flight + 1) / weight


def seed(newcomers: Iterable[PeakEwma], peers: Iterable[PeakEwma], now: float) -> None:
    """Start each of ``newcomers`` at the median of the current estimates of ``peers``
    that have one (from nothing when none has)."""
    values = sorted(p.value(now) for p in peers if p.estimate is not None)
    median: float | None = None
    if values:
        middle = len(values) // 2
        median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    for ewma in newcomers:
        ewma.reset(median, now)


class LatencyWindow:
    """The last ``size`` response-header latencies of a pool, and one quantile of them,
    computed again every ``every`` observations (a sort of ``size`` floats: amortised, a
    fraction of a microsecond per request). ``quantile`` is None until ``minimum``
    observations came: no estimate from a handful."""

    __slots__ = ("_every", "_minimum", "_next", "_q", "_samples", "_since", "_size", "quantile")

    def __init__(self, q: float, size: int = 512, every: int = 32, minimum: int = 50) -> None:
        self._q = q
        self._size = size
        self._every = every
        self._minimum = minimum
        self._samples: list[float] = []
        self._next = 0
        self._since = 0
        self.quantile: float | None = None

    def record(self, seconds: float) -> None:
        samples = self._samples
        if len(samples) < self._size:
            samples.append(seconds)
        else:
            samples[self._next] = seconds
            self._next = (self._next + 1) % self._size
        self._since += 1
        if self._since >= self._every and len(samples) >= self._minimum:
            self._since = 0
            ordered = sorted(samples)
            self.quantile = ordered[min(len(ordered) - 1, int(self._q * len(ordered)))]


def parse_hedge_after(value: float | str) -> float | None:
    """The quantile a ``hedge_after`` like ``"p95"`` names (0.95); None for seconds.
    ValueError for any other string."""
    if isinstance(value, str):
        match = _QUANTILE.fullmatch(value)
        if match is None or not 0 < float(match[1]) < 100:
            raise ValueError(f"must be seconds or a quantile like 'p95', got {value!r}")
        return float(match[1]) / 100
    return None


def recorder(
    window: LatencyWindow | None, clock: Callable[[], float], ewma: bool
) -> Callable[[PeakEwma, float, bool], None] | None:
    """What an attempt calls with its upstream's estimate, the latency and whether the
    answer was a server error (5xx) when response headers come: the estimate and the
    window fed as the pool needs (None: neither). A server error stays out of the window:
    a failing upstream answers fast, and its errors would pull the pool's quantile, and
    so the moment it hedges, down."""
    if window is None and not ewma:
        return None
    if window is None:
        return lambda estimate, seconds, error: estimate.observe(seconds, clock())
    record = window.record
    if not ewma:

        def window_only(estimate: PeakEwma, seconds: float, error: bool) -> None:
            if not error:
                record(seconds)

        return window_only

    def both(estimate: PeakEwma, seconds: float, error: bool) -> None:
        estimate.observe(seconds, clock())
        if not error:
            record(seconds)

    return both
