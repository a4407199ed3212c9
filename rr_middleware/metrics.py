"""Per-upstream counters, and their Prometheus and JSON views.

Counting is plain attribute and dict arithmetic on the request path (no locks: one event
loop), with fixed-bucket histograms for latency; the views read them when asked. The
Prometheus view needs the optional ``prometheus_client`` (``pip install
'rr-middleware[metrics]'``); everything else works without it.

Health is said twice, apart: ``rr_upstream_up`` (``eligible`` in the JSON) is 1 when an
upstream may take traffic on its own health (not down, ejected, drained or weighing 0);
``rr_pool_panic`` (``panic``) is 1 while none of a pool's upstreams may and the pool routes
to them all the same (``on_all_down="try_all"``). Panic mode does not set ``up``: an alert
on ``up`` keeps firing while the pool limps on.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import PoolRuntime

__all__ = ["BUCKETS", "Histogram", "PrometheusCollector", "UpstreamStats", "status_json"]

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
    """What happened with one upstream."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "checks",
        "codes",
        "ejections",
        "failures",
        "headers_latency",
        "retries",
        "total_latency",
        "transitions",
    )

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}  # responses by status
        self.failures: dict[str, int] = {}  # by kind: connect, timeout, reset, protocol, 5xx
        self.retries = 0  # requests moved on to another upstream after failing here
        self.ejections = 0
        self.transitions = 0  # health state changes (down, up, ejected, recovered)
        self.checks = {"pass": 0, "fail": 0}
        self.bytes_in = 0  # request body bytes sent to the upstream
        self.bytes_out = 0  # response body bytes relayed to clients
        self.headers_latency = Histogram()  # time to response headers
        self.total_latency = Histogram()  # time to the end of the response

    def failure(self, kind: str) -> None:
        kind = "5xx" if kind.startswith("status 5") else kind
        self.failures[kind] = self.failures.get(kind, 0) + 1


def _state(row: dict[str, Any]) -> str:
    if row["drained"]:
        return "drained"
    if not row["healthy"]:
        return "down"
    if row["ejected"]:
        return "ejected"
    if row["half_open"]:
        return "probing"
    return "up"


def status_json(runtimes: dict[str, PoolRuntime]) -> dict[str, Any]:
    """Every pool and upstream: ``pool.snapshot()`` plus the counters."""
    pools = []
    for prefix, runtime in runtimes.items():
        rows = []
        for member, row in zip(runtime.members, runtime.snapshot(), strict=True):
            stats = member.stats
            by_class: dict[str, int] = {}
            for code, n in stats.codes.items():
                key = f"{code // 100}xx"
                by_class[key] = by_class.get(key, 0) + n
            rows.append(
                {
                    **row,
                    "state": _state(row),
                    "responses": by_class,
                    "failures_by_kind": dict(stats.failures),
                    # Failed exchanges (5xx counted here too) over all exchanges.
                    "error_rate": row["failures"] / row["requests"] if row["requests"] else 0.0,
                    "retries": stats.retries,
                    "ejections": stats.ejections,
                    "transitions": stats.transitions,
                    "checks": dict(stats.checks),
                    "bytes_in": stats.bytes_in,
                    "bytes_out": stats.bytes_out,
                    "p50": stats.total_latency.quantile(0.5),
                    "p99": stats.total_latency.quantile(0.99),
                }
            )
        pools.append(
            {
                "prefix": prefix,
                "policy": runtime.pool.policy,
                "panic": runtime.panic,
                "discovery": runtime.discovery_status(),
                "upstreams": rows,
            }
        )
    return {"pools": pools}


class PrometheusCollector:
    """A ``prometheus_client`` collector of every pool's counters, under the conventional
    names (``rr_upstream_requests_total{pool,upstream,code}`` and the rest). Register it
    in your own registry, or let ``metrics_path=`` serve a registry of its own."""

    def __init__(self, runtimes: dict[str, PoolRuntime]) -> None:
        self._runtimes = runtimes

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["pool", "upstream"]
        requests = CounterMetricFamily(
            "rr_upstream_requests", "Responses from upstreams, by status", labels=[*labels, "code"]
        )
        failures = CounterMetricFamily(
            "rr_upstream_failures", "Failed exchanges, by kind", labels=[*labels, "kind"]
        )
        retries = CounterMetricFamily(
            "rr_upstream_retries", "Requests moved on to another upstream", labels=labels
        )
        ejections = CounterMetricFamily("rr_upstream_ejections", "Passive ejections", labels=labels)
        checks = CounterMetricFamily(
            "rr_health_checks", "Active health checks, by result", labels=[*labels, "result"]
        )
        transferred = CounterMetricFamily(
            "rr_upstream_bytes", "Body bytes, by direction", labels=[*labels, "direction"]
        )
        up = GaugeMetricFamily(
            "rr_upstream_up",
            "1 if the upstream is eligible for traffic on its own health (panic mode aside)",
            labels=labels,
        )
        panic = GaugeMetricFamily(
            "rr_pool_panic",
            "1 while no upstream is eligible and the pool routes to all anyway",
            labels=["pool"],
        )
        in_flight = GaugeMetricFamily("rr_upstream_in_flight", "Requests in flight", labels=labels)
        websockets = GaugeMetricFamily(
            "rr_upstream_websockets", "Open WebSocket connections", labels=labels
        )
        latency = HistogramMetricFamily(
            "rr_upstream_request_duration_seconds",
            "Time to the end of the response",
            labels=labels,
        )
        headers_latency = HistogramMetricFamily(
            "rr_upstream_response_headers_seconds",
            "Time to the response headers",
            labels=labels,
        )
        for prefix, runtime in self._runtimes.items():
            runtime.refresh_if_due()
            panic.add_metric([prefix], 1 if runtime.panic else 0)
            eligible = {id(m) for m in runtime.eligible} if not runtime.all_down else set()
            for member in runtime.members:
                key = [prefix, member.upstream.url]
                stats = member.stats
                for code, n in sorted(list(stats.codes.items())):
                    requests.add_metric([*key, str(code)], n)
                for kind, n in sorted(list(stats.failures.items())):
                    failures.add_metric([*key, kind], n)
                retries.add_metric(key, stats.retries)
                ejections.add_metric(key, stats.ejections)
                for result, n in stats.checks.items():
                    checks.add_metric([*key, result], n)
                transferred.add_metric([*key, "in"], stats.bytes_in)
                transferred.add_metric([*key, "out"], stats.bytes_out)
                up.add_metric(key, 1 if id(member) in eligible else 0)
                in_flight.add_metric(key, member.in_flight)
                websockets.add_metric(key, member.websockets)
                for family, histogram in (
                    (latency, stats.total_latency),
                    (headers_latency, stats.headers_latency),
                ):
                    cumulative = 0
                    buckets = []
                    for bound, n in zip(
                        [*map(str, BUCKETS), "+Inf"], histogram.counts, strict=True
                    ):
                        cumulative += n
                        buckets.append((bound, cumulative))
                    family.add_metric(key, buckets, histogram.total)
        yield from (
            requests,
            failures,
            retries,
            ejections,
            checks,
            transferred,
            up,
            panic,
            in_flight,
            websockets,
            latency,
            headers_latency,
        )
