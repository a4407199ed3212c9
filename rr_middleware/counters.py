"""What happened with one upstream, counted: the one set of counters every view reads.

Counting is plain attribute and dict arithmetic on the request path (no locks: one event
loop), with fixed-bucket histograms for latency. The views (Prometheus, the status JSON
and page) are in ``metrics.py`` and read these when asked.
"""

from __future__ import annotations

import bisect

__all__ = ["BUCKETS", "Histogram", "UpstreamStats"]

# Seconds; Prometheus' default buckets, which suit request latencies.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Histogram:
    """Counts per latency bucket (the last one is +Inf), and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def quantile(self, q: float) -> float | None:
        """An estimate (the upper bound of the bucket holding the q-th observation)."""
        count = sum(self.counts)
        if not count:
            return None
        rank = q * count
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return BUCKETS[index] if index < len(BUCKETS) else BUCKETS[-1]
        return BUCKETS[-1]


class UpstreamStats:
    """What happened with one upstream.

    An exchange with an outcome is either a success or a failure of one kind (``connect``,
    ``connect_timeout``, ``timeout``, ``reset``, ``protocol``; ``5xx``, or ``status NNN``
    below 500, for a status in the pool's ``unhealthy_statuses``); an exchange the client
    abandoned has none, nor has a failure that does not count against the upstream
    (``pool_timeout``: the upstream is busy, not unhealthy). ``requests`` and
    ``failures`` are derived from those, so they can never disagree with the counts by
    kind.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "checks",
        "codes",
        "ejections",
        "failures_by_kind",
        "headers_latency",
        "in_flight",
        "retries",
        "status_failures",
        "successes",
        "total_latency",
        "transitions",
        "websockets",
    )

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}  # responses by status
        self.successes = 0
        self.failures_by_kind: dict[str, int] = {}
        #: Failures that were a status in ``unhealthy_statuses``, by status (their kind is
        #: ``5xx``, or ``status NNN`` for a 4xx).
        self.status_failures: dict[int, int] = {}
        self.retries = 0  # requests moved on to another upstream after failing here
        self.ejections = 0
        self.transitions = 0  # health state changes (down, up, ejected, recovered)
        self.checks = {"pass": 0, "fail": 0}
        self.bytes_in = 0  # request body bytes sent to the upstream
        self.bytes_out = 0  # response body bytes relayed to clients
        self.headers_latency = Histogram()  # time to response headers
        self.total_latency = Histogram()  # time to the end of the response
        # Gauges, set only on totals read from a zone (a member's own are live values).
        self.in_flight = 0
        self.websockets = 0

    @property
    def failures(self) -> int:
        return sum(self.failures_by_kind.values())

    @property
    def requests(self) -> int:
        """Exchanges with an outcome: successes and failures."""
        return self.successes + self.failures

    def failure(self, kind: str) -> None:
        self.failures_by_kind[kind] = self.failures_by_kind.get(kind, 0) + 1

    def status_failure(self, status: int) -> None:
        """A status in the pool's ``unhealthy_statuses``: kind ``5xx`` or ``status NNN``."""
        self.failure("5xx" if status >= 500 else f"status {status}")
        self.status_failures[status] = self.status_failures.get(status, 0) + 1
