"""The views of the counters (``counters.py``): the status JSON (which the status page
shows) and a Prometheus collector.

The Prometheus view needs the optional ``prometheus_client`` (``pip install
'rr-middleware[metrics]'``); everything else works without it.

Health is said twice, apart: ``rr_upstream_up`` (``eligible`` in the JSON) is 1 when an
upstream may take traffic on its own health (not down, ejected, drained or weighing 0);
``rr_pool_panic`` (``panic``) is 1 while none of a pool's upstreams may and the pool routes
to them all the same (``on_all_down="try_all"``). Panic mode does not set ``up``: an alert
on ``up`` keeps firing while the pool limps on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .counters import BUCKETS, Histogram, UpstreamStats

if TYPE_CHECKING:
    from .pool_runtime import PoolRuntime
    from .zone import Zone

__all__ = ["PrometheusCollector", "status_json"]


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


def status_json(
    pools: Mapping[str, PoolRuntime], zone: Zone | None, routes: Sequence[Any] = ()
) -> dict[str, Any]:
    """Every pool and upstream: ``balancer[prefix].snapshot()`` plus the counters, the
    zone the pools share (None without one), and the routes with their counts."""
    shown = []
    for prefix, runtime in pools.items():
        rows = []
        for row, stats in runtime.rows():
            by_class: dict[str, int] = {}
            for code, n in stats.codes.items():
                key = f"{code // 100}xx"
                by_class[key] = by_class.get(key, 0) + n
            rows.append(
                {
                    **row,
                    "state": _state(row),
                    "responses": by_class,
                    "failures_by_kind": dict(stats.failures_by_kind),
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
        shown.append(
            {
                "prefix": prefix,
                "policy": runtime.pool.policy,
                "panic": runtime.panic,
                "affinity": runtime.affinity_status(),
                "mirror": runtime.mirror.status() if runtime.mirror is not None else None,
                "discovery": runtime.discovery_status(),
                "retry_budget": _budget(runtime),
                "hedging": _hedging(runtime),
                "upstreams": rows,
            }
        )
    return {
        "pools": shown,
        "zone": zone.describe() if zone is not None else None,
        "routes": [route.status() for route in routes],
    }


def _budget(runtime: PoolRuntime) -> dict[str, Any]:
    budget = runtime.budget
    limit = budget.limit
    return {
        "fraction": budget.fraction,
        "minimum": budget.minimum,
        "active": budget.active,
        "in_flight": budget.retrying,
        "limit": None if limit == float("inf") else limit,
        "refused": budget.refused,
    }


def _hedging(runtime: PoolRuntime) -> dict[str, Any] | None:
    hedging = runtime.hedging
    if hedging is None:
        return None
    return {
        "hedge_after": runtime.pool.hedge_after,
        "delay": hedging.delay(),
        "max_hedges": hedging.max_hedges,
        "sent": hedging.sent,
        "won": hedging.won,
    }


class PrometheusCollector:
    """A ``prometheus_client`` collector of every pool's counters, under the conventional
    names (``rr_upstream_requests_total{pool,upstream,code}`` and the rest). Register
    ``balancer.prometheus_collector()`` in your own registry, or let ``metrics_path=``
    serve a registry of its own."""

    def __init__(
        self,
        pools: Mapping[str, PoolRuntime],
        routes: Callable[[], Sequence[Any]] = tuple,
    ) -> None:
        self._pools = pools
        self._routes = routes

    def collect(self) -> Iterator[Any]:
        families = _Families()
        for prefix, runtime in self._pools.items():
            rows = runtime.rows()  # brought up to date first (time, other workers)
            families.panic.add_metric([prefix], 1 if runtime.panic else 0)
            families.add_traffic(prefix, runtime)
            families.add_pool([prefix], runtime)
            for row, stats in rows:
                key = [prefix, row["url"]]
                families.add_upstream(key, stats, row["eligible"])
                families.in_flight.add_metric(key, stats.in_flight)
                families.websockets.add_metric(key, stats.websockets)
                if row["latency_ewma"] is not None:
                    families.ewma.add_metric(key, row["latency_ewma"])
        for index, route in enumerate(self._routes()):
            for pool, n in route.sent.items():
                families.routes.add_metric([str(index), route.route.prefix, pool], n)
        yield from families.all()


class _Families:
    """The metric families of one scrape."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["pool", "upstream"]
        self.requests = CounterMetricFamily(
            "rr_upstream_requests", "Responses from upstreams, by status", labels=[*labels, "code"]
        )
        self.failures = CounterMetricFamily(
            "rr_upstream_failures", "Failed exchanges, by kind", labels=[*labels, "kind"]
        )
        self.retries = CounterMetricFamily(
            "rr_upstream_retries", "Requests moved on to another upstream", labels=labels
        )
        self.ejections = CounterMetricFamily(
            "rr_upstream_ejections", "Passive ejections", labels=labels
        )
        self.checks = CounterMetricFamily(
            "rr_health_checks", "Active health checks, by result", labels=[*labels, "result"]
        )
        self.transferred = CounterMetricFamily(
            "rr_upstream_bytes", "Body bytes, by direction", labels=[*labels, "direction"]
        )
        self.up = GaugeMetricFamily(
            "rr_upstream_up",
            "1 if the upstream is eligible for traffic on its own health (panic mode aside)",
            labels=labels,
        )
        self.panic = GaugeMetricFamily(
            "rr_pool_panic",
            "1 while no upstream is eligible and the pool routes to all anyway",
            labels=["pool"],
        )
        self.in_flight = GaugeMetricFamily(
            "rr_upstream_in_flight", "Requests in flight", labels=labels
        )
        self.websockets = GaugeMetricFamily(
            "rr_upstream_websockets", "Open WebSocket connections", labels=labels
        )
        self.affinity = CounterMetricFamily(
            "rr_pool_affinity",
            "Hashing and sticky cookies: keyed, unkeyed, spilled, sticky_kept, sticky_set",
            labels=["pool", "event"],
        )
        self.mirrored = CounterMetricFamily(
            "rr_mirror_requests",
            "Copies to the mirror pool: sent, answered, failed, dropped, skipped",
            labels=["pool", "mirror", "outcome"],
        )
        self.routes = CounterMetricFamily(
            "rr_route_requests",
            "Requests a route sent to each pool (route: its index in routes=)",
            labels=["route", "prefix", "pool"],
        )
        self._add_retry_families(labels)
        self.latency = HistogramMetricFamily(
            "rr_upstream_request_duration_seconds",
            "Time to the end of the response",
            labels=labels,
        )
        self.headers_latency = HistogramMetricFamily(
            "rr_upstream_response_headers_seconds",
            "Time to the response headers",
            labels=labels,
        )

    def _add_retry_families(self, labels: list[str]) -> None:
        """The retry budget's, hedging's and peak EWMA's families."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.refused = CounterMetricFamily(
            "rr_pool_retries_refused",
            "Retries and hedges not made because the pool's retry budget was spent",
            labels=["pool"],
        )
        self.budget_in_use = GaugeMetricFamily(
            "rr_pool_retry_budget_in_use",
            "Retries and hedges in flight, which the retry budget limits",
            labels=["pool"],
        )
        self.hedges = CounterMetricFamily(
            "rr_pool_hedges", "Hedged requests sent (hedge_after)", labels=["pool"]
        )
        self.hedges_won = CounterMetricFamily(
            "rr_pool_hedges_won", "Hedged requests whose answer came first", labels=["pool"]
        )
        self.ewma = GaugeMetricFamily(
            "rr_upstream_latency_ewma_seconds",
            "policy=peak_ewma: the peak EWMA of the time to response headers",
            labels=labels,
        )

    def add_pool(self, key: list[str], runtime: PoolRuntime) -> None:
        budget = runtime.budget
        self.refused.add_metric(key, budget.refused)
        self.budget_in_use.add_metric(key, budget.retrying)
        hedging = runtime.hedging
        if hedging is not None:
            self.hedges.add_metric(key, hedging.sent)
            self.hedges_won.add_metric(key, hedging.won)

    def add_upstream(self, key: list[str], stats: UpstreamStats, up: bool) -> None:
        for code, n in sorted(list(stats.codes.items())):
            self.requests.add_metric([*key, str(code)], n)
        for kind, n in sorted(list(stats.failures_by_kind.items())):
            self.failures.add_metric([*key, kind], n)
        self.retries.add_metric(key, stats.retries)
        self.ejections.add_metric(key, stats.ejections)
        for result, n in stats.checks.items():
            self.checks.add_metric([*key, result], n)
        self.transferred.add_metric([*key, "in"], stats.bytes_in)
        self.transferred.add_metric([*key, "out"], stats.bytes_out)
        self.up.add_metric(key, 1 if up else 0)
        for family, histogram in (
            (self.latency, stats.total_latency),
            (self.headers_latency, stats.headers_latency),
        ):
            family.add_metric(key, _buckets(histogram), histogram.total)

    def add_traffic(self, prefix: str, runtime: PoolRuntime) -> None:
        affinity = runtime.affinity_status()
        for event, n in (affinity or {}).items():
            self.affinity.add_metric([prefix, event], n)
        mirror = runtime.mirror
        if mirror is not None:
            for outcome, n in mirror.counts.items():
                self.mirrored.add_metric([prefix, mirror.target.name, outcome], n)

    def all(self) -> tuple[Any, ...]:
        return (
            self.requests,
            self.failures,
            self.retries,
            self.ejections,
            self.checks,
            self.transferred,
            self.up,
            self.panic,
            self.refused,
            self.budget_in_use,
            self.hedges,
            self.hedges_won,
            self.ewma,
            self.in_flight,
            self.websockets,
            self.affinity,
            self.mirrored,
            self.routes,
            self.latency,
            self.headers_latency,
        )


def _buckets(histogram: Histogram) -> list[tuple[str, int]]:
    cumulative = 0
    buckets = []
    for bound, n in zip([*map(str, BUCKETS), "+Inf"], histogram.counts, strict=True):
        cumulative += n
        buckets.append((bound, cumulative))
    return buckets
