"""Observability end to end: Prometheus metrics, the status JSON and page, the guard, logs.

Real uvicorn upstreams, the proxy itself under uvicorn, real traffic; then what the
middleware reports is checked against what happened, as seen by the client (status,
``x-upstream``, bytes received) and by the upstreams (the requests they recorded). Waits
are events (the gated stream) or bounded deadline polls of the status JSON, never a sleep.
The status page is rendered by headless Chromium (skipped without it, unless CI=true).

The last tests pin down bugs found while writing this file (a stale ``rr_upstream_up``,
bytes of aborted responses, the access log of answers the proxy gives itself, a relayed
5xx left unlogged, colliding admin paths).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from rr_middleware import HealthCheck, Pool, RoundRobinMiddleware, Upstream
from rr_middleware.metrics import BUCKETS
from rr_middleware.testing import FakeUpstream, ManualClock

from .chromium import dump_dom
from .polling import wait_for
from .proxy import client, host_app, running_proxy
from .servers import dead_url, serve
from .upstream_app import UpstreamApp

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
LOGGER = "rr_middleware"


# --------------------------------------------------------------------------- helpers


def row(http: httpx.Client, prefix: str, url: str, path: str = "/status.json") -> dict[str, Any]:
    """One upstream's entry in the status JSON, fetched now."""
    response = http.get(path)
    assert response.status_code == 200, response.text
    for pool in response.json()["pools"]:
        if pool["prefix"] == prefix:
            for upstream in pool["upstreams"]:
                if upstream["url"] == url:
                    return upstream  # type: ignore[no-any-return]
    raise AssertionError(f"no {url} in pool {prefix} of the status JSON")


class Metrics:
    """A Prometheus exposition, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.samples, f"duplicate sample {key}"
                self.samples[key] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return {
            key: value
            for (sample, key), value in self.samples.items()
            if sample == name and wanted <= key
        }

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``{value of label: sample value}`` over the samples of ``name`` matching labels."""
        return {dict(key)[label]: value for key, value in self.series(name, **labels).items()}


def scrape(http: httpx.Client, path: str = "/metrics") -> Metrics:
    response = http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Metrics(response.text)


PANIC_TEXT = "panic: every upstream is down; requests go to all of them anyway"


class StatusTable(HTMLParser):
    """The rows of the status page's table, its panic lines (``{pool: text}``), and its
    "updated" note."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.panics: dict[str, str] = {}
        self.updated = ""
        self._row: dict[str, Any] | None = None
        self._cell: list[str] | None = None
        self._in_updated = False
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and "data-upstream" in attributes:
            self._row = {"url": attributes["data-upstream"], "class": attributes.get("class")}
            self._row["cells"] = []
        elif tag == "tr" and "data-panic" in attributes:
            self._row = {"panic": attributes["data-panic"], "cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "span" and attributes.get("id") == "updated":
            self._in_updated = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if "panic" in self._row:
                assert self._row["cells"][0] == self._row["panic"]
                self.panics[self._row["panic"]] = self._row["cells"][1]
            else:
                self.rows.append(self._row)
            self._row = None
        elif tag == "span":
            self._in_updated = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_updated:
            self.updated += data


def page_ms(seconds: float | None) -> str:
    """How the page shows a latency (JavaScript's Math.round)."""
    return "-" if seconds is None else f"{math.floor(seconds * 1000 + 0.5)} ms"


def expected_cells(prefix: str, upstream: dict[str, Any]) -> list[str]:
    """A row as the page must show it: pool, upstream, weight, state, in flight, req/s
    (any number: it depends on the page's timing), requests, errors, p50, p99."""
    return [
        prefix,
        upstream["url"],
        f"{upstream['effective_weight']:g}/{upstream['weight']}",
        upstream["state"],
        str(upstream["in_flight"]),
        "<rate>",
        str(upstream["requests"]),
        f"{upstream['error_rate'] * 100:.1f}%",
        page_ms(upstream["p50"]),
        page_ms(upstream["p99"]),
    ]


def check_page(dom: str, status: dict[str, Any]) -> dict[str, list[str]]:
    """The page shows one row per pool and upstream, as the JSON says, refreshed by its
    script; returns the rows' cells by "prefix url"."""
    table = StatusTable(dom)
    assert table.updated.startswith("Updated "), "the page's script never refreshed the table"
    rows: dict[str, list[str]] = {}
    for row_ in table.rows:
        cells = row_["cells"]
        assert len(cells) == 10, cells
        assert row_["url"] == cells[1]
        assert row_["class"] == cells[3]
        # A number, not the server-rendered "-": the script's second refresh computed it.
        assert re.fullmatch(r"\d+\.\d", cells[5]), cells
        key = f"{cells[0]} {cells[1]}"
        assert key not in rows, f"two rows for {key}"
        rows[key] = [*cells[:5], "<rate>", *cells[6:]]
    expected = {
        f"{pool['prefix']} {up['url']}": expected_cells(pool["prefix"], up)
        for pool in status["pools"]
        for up in pool["upstreams"]
    }
    assert rows == expected
    return rows


def received_before_abort(http: httpx.Client, path: str) -> int:
    """Body bytes of a response the proxy aborts mid-body, as the client received them."""
    got = 0
    with http.stream("GET", path) as response:
        try:
            for chunk in response.iter_raw():
                got += len(chunk)
        except httpx.RemoteProtocolError:
            return got
    pytest.fail(f"GET {path} was not aborted")


def rr_records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def lines_with(lines: list[str], *words: str) -> list[str]:
    return [line for line in lines if all(word in line for word in words)]


# ------------------------------------------------------------------------ Prometheus


def test_prometheus_metrics_count_what_happened() -> None:
    a_app, c_app = UpstreamApp("a"), UpstreamApp("c")
    with serve(a_app) as a, FakeUpstream("b").serve() as b, serve(c_app) as c:
        dead, dead2 = dead_url(), dead_url()
        api = Pool(
            [a.url, b.url, dead], retries=2, max_fails=2, fail_timeout=60, retry_on_statuses={503}
        )
        checked = Pool([c.url, dead2], health_check=HealthCheck(interval=0.05, rise=1, fall=1))
        pools = {"/api": api, "/checked": checked}
        with ExitStack() as stack:
            server, mw = stack.enter_context(
                running_proxy(pools, metrics_path="/metrics", status_path="/status")
            )
            http = stack.enter_context(client(base_url=server.url))
            relayed: Counter[str] = Counter()  # responses the client got, by upstream
            received: Counter[str] = Counter()  # body bytes the client got, by upstream

            def get(path: str) -> None:
                response = http.get(path)
                assert response.status_code == 200, response.text
                relayed[response.headers["x-upstream"]] += 1
                received[response.headers["x-upstream"]] += response.num_bytes_downloaded

            # The dead upstream refuses connections: each attempt there fails and moves on
            # to the next upstream, until max_fails (2) ejects it.
            for n in range(20):
                if row(http, "/api", dead)["state"] == "ejected":
                    break
                get(f"/api/one/{n}")
            else:
                pytest.fail("the dead upstream was never ejected")
            # b answers 503 now (retried on the next upstream), until it is ejected too.
            b.answer(503)
            for n in range(20):
                if row(http, "/api", b.url)["state"] == "ejected":
                    break
                get(f"/api/two/{n}")
            else:
                pytest.fail("the failing upstream was never ejected")
            served_before = relayed["a"]
            for n in range(3):
                get(f"/api/three/{n}")
            assert relayed["a"] == served_before + 3  # the only one left
            wait_for(
                lambda: (
                    row(http, "/checked", dead2)["state"] == "down"
                    and row(http, "/checked", c.url)["checks"]["pass"] >= 2
                ),
                "the health checks to mark the dead upstream down",
            )

            # A gated stream holds a request in flight with a.
            with http.stream("GET", "/api/held?action=stream&n=2&size=100&wait=1") as held:
                assert held.headers["x-upstream"] == "a"
                during = scrape(http)
                assert during.by("rr_upstream_in_flight", "upstream", pool="/api") == {
                    a.url: 1,
                    b.url: 0,
                    dead: 0,
                }
                a_app.proceed.release()
                a_app.proceed.release()
                assert held.read() == b"A" * 100 + b"B" * 100
            relayed["a"] += 1
            received["a"] += 200
            wait_for(lambda: row(http, "/api", a.url)["in_flight"] == 0, "the stream to end")

            metrics = scrape(http)

            # What the upstreams saw agrees with what the client saw.
            assert b.request_count == relayed["b"] + 2  # two answered 503, then ejected
            assert len(a_app.requests) == relayed["a"]
            assert relayed["b"] >= 1

            for name, kind in {
                "rr_upstream_requests": "counter",
                "rr_upstream_failures": "counter",
                "rr_upstream_retries": "counter",
                "rr_upstream_ejections": "counter",
                "rr_health_checks": "counter",
                "rr_upstream_bytes": "counter",
                "rr_upstream_up": "gauge",
                "rr_upstream_in_flight": "gauge",
                "rr_upstream_websockets": "gauge",
                "rr_upstream_request_duration_seconds": "histogram",
                "rr_upstream_response_headers_seconds": "histogram",
            }.items():
                assert metrics.types.get(name) == kind, name

            api_only = {"pool": "/api"}
            requests = {
                (dict(k)["upstream"], dict(k)["code"]): v
                for k, v in metrics.series("rr_upstream_requests_total", **api_only).items()
            }
            assert requests == {
                (a.url, "200"): relayed["a"],
                (b.url, "200"): relayed["b"],
                (b.url, "503"): 2,
            }
            failures = {
                (dict(k)["upstream"], dict(k)["kind"]): v
                for k, v in metrics.series("rr_upstream_failures_total").items()
            }
            assert failures == {(dead, "connect"): 2, (b.url, "5xx"): 2}
            assert metrics.by("rr_upstream_retries_total", "upstream", **api_only) == {
                a.url: 0,
                b.url: 2,
                dead: 2,
            }
            assert metrics.by("rr_upstream_ejections_total", "upstream", **api_only) == {
                a.url: 0,
                b.url: 1,
                dead: 1,
            }
            assert metrics.by("rr_upstream_up", "upstream", **api_only) == {
                a.url: 1,
                b.url: 0,
                dead: 0,
            }
            assert metrics.by("rr_upstream_up", "upstream", pool="/checked") == {
                c.url: 1,
                dead2: 0,
            }
            assert set(metrics.by("rr_upstream_in_flight", "upstream").values()) == {0}
            assert metrics.by(
                "rr_upstream_bytes_total", "upstream", pool="/api", direction="out"
            ) == {a.url: received["a"], b.url: received["b"], dead: 0}

            # One observation per response relayed; the retried 503s reached their headers.
            for family, extra in (
                ("rr_upstream_request_duration_seconds", 0),
                ("rr_upstream_response_headers_seconds", 2),
            ):
                counts = metrics.by(f"{family}_count", "upstream", **api_only)
                assert counts == {a.url: relayed["a"], b.url: relayed["b"] + extra, dead: 0}
                for url, count in counts.items():
                    buckets = metrics.by(f"{family}_bucket", "le", pool="/api", upstream=url)
                    bounds = sorted(buckets, key=float)
                    assert bounds == [*map(str, BUCKETS), "+Inf"]
                    cumulative = [buckets[bound] for bound in bounds]
                    assert cumulative == sorted(cumulative)
                    assert cumulative[-1] == count
                    total = metrics.get(f"{family}_sum", pool="/api", upstream=url)
                    assert total is not None
                    assert (total > 0) == (count > 0)

            checks = {
                (dict(k)["upstream"], dict(k)["result"]): v
                for k, v in metrics.series("rr_health_checks_total", pool="/checked").items()
            }
            assert checks[(c.url, "pass")] >= 2
            assert checks[(c.url, "fail")] == 0
            assert checks[(dead2, "pass")] == 0
            assert checks[(dead2, "fail")] >= 1
            assert set(metrics.by("rr_health_checks_total", "result", **api_only).values()) == {0}

            # The collector in a registry of the user's own (auto_describe collects once at
            # registration) exposes the same samples.
            registry = CollectorRegistry(auto_describe=True)
            registry.register(mw.balancer.prometheus_collector())
            own = Metrics(generate_latest(registry).decode())
            assert own.series("rr_upstream_requests_total")
            for name in {name for name, _ in metrics.samples}:
                assert own.series(name, **api_only) == metrics.series(name, **api_only), name
            labels = {"pool": "/api", "upstream": b.url, "code": "503"}
            assert registry.get_sample_value("rr_upstream_requests_total", labels) == 2


def test_metrics_path_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ValueError, match=r"metrics_path.*pip install 'rr-middleware\[metrics\]'"):
        RoundRobinMiddleware(host_app(), pools={"/api": ["http://127.0.0.1:9"]}, metrics_path="/m")
    # Everything else works without it.
    mw = RoundRobinMiddleware(
        host_app(), pools={"/api": ["http://127.0.0.1:9"]}, status_path="/status"
    )
    assert mw.status()["pools"][0]["upstreams"][0]["state"] == "up"


# ----------------------------------------------------------------------- status JSON


def test_status_json_reports_what_happened() -> None:
    apps = {"a": UpstreamApp("a"), "b": UpstreamApp("b")}
    with serve(apps["a"]) as a, serve(apps["b"]) as b, serve(UpstreamApp("c")) as c:
        urls = {"a": a.url, "b": b.url}
        dead, dead2 = dead_url(), dead_url()
        api = Pool([a.url, b.url, dead], retries=2, max_fails=2, fail_timeout=60)
        checked = Pool([c.url, dead2], health_check=HealthCheck(interval=0.05, rise=1, fall=1))
        with ExitStack() as stack:
            server, mw = stack.enter_context(
                running_proxy({"/api": api, "/checked": checked}, status_path="/status")
            )
            http = stack.enter_context(client(base_url=server.url))
            received: Counter[str] = Counter()

            def note(response: httpx.Response) -> str:
                received[response.headers["x-upstream"]] += response.num_bytes_downloaded
                return response.headers["x-upstream"]  # type: ignore[no-any-return]

            sizes = [0, 1, 999, 70_000, 5, 123_457, 64 * 1024, 17]
            for n in range(20):
                if row(http, "/api", dead)["state"] == "ejected":
                    break
                response = http.get(f"/api/big/{n}?action=big&size={sizes[n % len(sizes)]}")
                assert response.status_code == 200
                assert len(response.content) == sizes[n % len(sizes)]
                note(response)
            else:
                pytest.fail("the dead upstream was never ejected")
            failed = note(http.get("/api/fail?action=status&code=503"))
            posted = note(http.post("/api/post", content=b"p" * 1234))

            # A gated stream: in flight with one upstream until the test lets it finish.
            with http.stream("GET", "/api/held?action=stream&n=3&size=1000&wait=1") as held:
                holder = held.headers["x-upstream"]
                other = "b" if holder == "a" else "a"
                assert row(http, "/api", urls[holder])["in_flight"] == 1
                assert row(http, "/api", urls[other])["in_flight"] == 0
                assert row(http, "/api", dead)["in_flight"] == 0
                for _ in range(3):
                    apps[holder].proceed.release()
                assert len(held.read()) == 3000
                note(held)
            wait_for(lambda: row(http, "/api", urls[holder])["in_flight"] == 0, "the stream end")

            served = http.get("/status.json")
            assert served.headers["content-type"] == "application/json"
            assert served.headers["cache-control"] == "no-store"
            status = served.json()
            api_rows = {
                up["url"]: up
                for pool in status["pools"]
                if pool["prefix"] == "/api"
                for up in pool["upstreams"]
            }
            for name, url in urls.items():
                up = api_rows[url]
                exchanges = len(apps[name].requests)  # every one of them counted
                failures = 1 if name == failed else 0
                assert up["state"] == "up"
                assert up["eligible"] is True
                assert up["requests"] == exchanges
                assert up["failures"] == failures
                assert up["failures_by_kind"] == ({"5xx": 1} if failures else {})
                assert up["responses"] == (
                    {"2xx": exchanges - 1, "5xx": 1} if failures else {"2xx": exchanges}
                )
                assert up["error_rate"] == pytest.approx(failures / exchanges)
                assert up["in_flight"] == 0
                assert up["bytes_out"] == received[name]
                assert up["bytes_in"] == (1234 if name == posted else 0)
                assert up["retries"] == 0
                assert up["p50"] in BUCKETS
                assert up["p99"] in BUCKETS
                assert up["p50"] <= up["p99"]
            gone = api_rows[dead]
            assert gone["state"] == "ejected"
            assert gone["ejected"] is True
            assert gone["eligible"] is False
            assert gone["requests"] == gone["failures"] == 2
            assert gone["failures_by_kind"] == {"connect": 2}
            assert gone["retries"] == 2
            assert gone["ejections"] == 1
            assert gone["responses"] == {}
            assert gone["error_rate"] == 1.0
            assert gone["bytes_out"] == 0
            assert gone["p50"] is None
            assert gone["p99"] is None
            # mw.status() is what the endpoint serves.
            assert [p for p in mw.status()["pools"] if p["prefix"] == "/api"] == [
                p for p in status["pools"] if p["prefix"] == "/api"
            ]

            # Drained: out of rotation, said so.
            mw.balancer["/api"].drain(b.url)
            drained = row(http, "/api", b.url)
            assert drained["state"] == "drained"
            assert drained["eligible"] is False
            assert {http.get("/api/x").headers["x-upstream"] for _ in range(3)} == {"a"}
            mw.balancer["/api"].undrain(b.url)
            assert row(http, "/api", b.url)["state"] == "up"

            # Down, by the active checks.
            down = wait_for(
                lambda: (r := row(http, "/checked", dead2))["state"] == "down" and r,
                "the health checks to mark the dead upstream down",
            )
            assert down["healthy"] is False
            assert down["last_check"]["ok"] is False
            assert "connect" in down["last_check"]["error"]
            assert down["checks"]["pass"] == 0
            assert down["transitions"] == 1
            healthy = row(http, "/checked", c.url)
            assert healthy["state"] == "up"
            assert healthy["last_check"]["status"] == 200
            assert healthy["checks"]["fail"] == 0
            assert healthy["requests"] == 0  # checks are not requests


# ---------------------------------------------------------------------- status_guard


ADMIN_PATHS = ("/status", "/status.json", "/metrics")


def test_a_guard_returning_false_forbids_every_admin_path() -> None:
    with serve(UpstreamApp("a")) as a, ExitStack() as stack:
        server, _ = stack.enter_context(
            running_proxy(
                {"/api": [a.url]},
                metrics_path="/metrics",
                status_path="/status",
                status_guard=lambda request: False,
            )
        )
        http = stack.enter_context(client(base_url=server.url))
        for path in ADMIN_PATHS:
            response = http.get(path)
            assert response.status_code == 403, path
            assert response.text == "403 Forbidden\n"
            assert "rr_upstream" not in response.text
        # Only the admin paths are guarded.
        assert http.get("/api/x").json()["server"] == "a"
        assert http.get("/local").text == "host local"


async def _async_guard(request: Request) -> bool:
    await asyncio.sleep(0)  # really awaits
    return request.headers.get("x-admin-token") == "s3cret"


@pytest.mark.parametrize(
    "guard",
    [lambda request: request.headers.get("x-admin-token") == "s3cret", _async_guard],
    ids=["sync", "async"],
)
def test_a_guard_checking_a_header_allows_the_right_requests(
    guard: Callable[[Request], Any],
) -> None:
    with serve(UpstreamApp("a")) as a, ExitStack() as stack:
        server, _ = stack.enter_context(
            running_proxy(
                {"/api": [a.url]},
                metrics_path="/metrics",
                status_path="/status",
                status_guard=guard,
            )
        )
        http = stack.enter_context(client(base_url=server.url))
        for path in ADMIN_PATHS:
            assert http.get(path).status_code == 403, path
            assert http.get(path, headers={"x-admin-token": "wrong"}).status_code == 403, path
            allowed = http.get(path, headers={"x-admin-token": "s3cret"})
            assert allowed.status_code == 200, path
            assert allowed.headers["cache-control"] == "no-store"
        page = http.get("/status", headers={"x-admin-token": "s3cret"})
        assert page.headers["content-type"].startswith("text/html")
        assert f"data-upstream='{a.url}'" in page.text


def test_without_status_path_the_paths_reach_the_host_app() -> None:
    with serve(UpstreamApp("a")) as a, ExitStack() as stack:
        server, _ = stack.enter_context(
            running_proxy({"/api": [a.url]}, status_guard=lambda request: False)
        )
        http = stack.enter_context(client(base_url=server.url))
        for path in ADMIN_PATHS:
            response = http.get(path)
            assert response.status_code == 404, path  # the host app's own 404
            assert response.text == "Not Found"
        # With only status_path, the metrics path is still the host app's.
        with running_proxy({"/api": [a.url]}, status_path="/status") as (only_status, _):
            assert http.get(only_status.url + "/status.json").status_code == 200
            missing = http.get(only_status.url + "/metrics")
            assert (missing.status_code, missing.text) == (404, "Not Found")


# ---------------------------------------------------------------- the page, in Chromium


def test_status_page_in_headless_chromium(tmp_path: Path, chromium: str) -> None:
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, ExitStack() as stack:
        c = stack.enter_context(serve(UpstreamApp("c")))
        api = Pool(
            [a.url, Upstream(b.url, weight=2), c.url],
            health_check=HealthCheck(interval=0.1, rise=1, fall=1),
        )
        pools = {"/api": api, "/web": [a.url]}
        server, _ = stack.enter_context(running_proxy(pools, status_path="/status"))
        http = stack.enter_context(client(base_url=server.url))
        for n in range(8):
            assert http.get(f"/api/{n}").status_code == 200
        assert http.get("/api/x?action=status&code=503").status_code == 503
        for n in range(2):
            assert http.get(f"/web/{n}").status_code == 200

        before = http.get("/status.json").json()
        rows = check_page(
            dump_dom(server.url + "/status", tmp_path / "profile-1", chromium), before
        )
        assert len(rows) == 4
        assert {cells[3] for cells in rows.values()} == {"up"}
        assert rows[f"/api {b.url}"][2] == "2/2"
        assert any(cells[7] != "0.0%" for cells in rows.values())  # the 503

        # Take c down: its server stops, the health check notices.
        c.stop()
        wait_for(lambda: row(http, "/api", c.url)["state"] == "down", "c to be marked down")
        after = http.get("/status.json").json()
        rows = check_page(dump_dom(server.url + "/status", tmp_path / "profile-2", chromium), after)
        assert rows[f"/api {c.url}"][3] == "down"
        assert rows[f"/api {a.url}"][3] == rows[f"/api {b.url}"][3] == "up"


def test_status_page_screenshot(tmp_path: Path, chromium: str) -> None:
    """docs/make_screenshot.py, run as its docstring says, writes the README's picture."""
    output = tmp_path / "status-page.png"
    done = subprocess.run(
        [sys.executable, str(REPO / "docs" / "make_screenshot.py"), str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CHROMIUM": chromium},
    )
    assert done.returncode == 0, done.stderr
    data = output.read_bytes()
    assert done.stdout == f"wrote {output} ({len(data)} bytes)\n"
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1100, 330)


# ------------------------------------------------------------------------------ logs


def test_one_warning_per_state_change_and_per_failed_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    a_app = UpstreamApp("a")
    clock = ManualClock()
    with serve(a_app) as a, ExitStack() as stack:
        b = stack.enter_context(FakeUpstream("b").serve())
        h = stack.enter_context(FakeUpstream("h").serve())
        c = stack.enter_context(serve(UpstreamApp("c")))
        dead = dead_url()
        flaky = Pool(
            [a.url, b.url], max_fails=1, fail_timeout=5, retry_on_statuses={503}, clock=clock
        )
        gone = Pool([a.url, dead], max_fails=1, fail_timeout=60)
        checked = Pool([h.url, a.url], health_check=HealthCheck(interval=0.05, rise=1, fall=1))
        drainable = Pool([a.url, c.url])
        pools = {"/flaky": flaky, "/gone": gone, "/checked": checked, "/drain": drainable}
        pools["/broken"] = Pool([a.url])
        server, mw = stack.enter_context(running_proxy(pools, status_path="/status"))
        http = stack.enter_context(client(base_url=server.url))

        # Successful requests log nothing.
        for n in range(4):
            assert http.get(f"/flaky/{n}").status_code == 200
            assert http.get(f"/drain/{n}").status_code == 200
        assert rr_records(caplog) == []

        # A connect failure (then ejection), retried on a.
        for n in range(4):
            if row(http, "/gone", dead)["state"] == "ejected":
                break
            assert http.get(f"/gone/{n}").status_code == 200
        else:
            pytest.fail("the dead upstream was never ejected")

        # b answers 503 (retried on a): ejected; answers again, the ejection runs out, and
        # the half-open probe recovers it.
        b.answer(503)
        for n in range(4):
            if row(http, "/flaky", b.url)["state"] == "ejected":
                break
            assert http.get(f"/flaky/f{n}").status_code == 200
        else:
            pytest.fail("b was never ejected")
        b.answer(200)
        clock.advance(5.5)
        for n in range(4):
            if row(http, "/flaky", b.url)["state"] == "up":
                break
            assert http.get(f"/flaky/r{n}").status_code == 200
        else:
            pytest.fail("b never recovered")

        # Active checks: h DOWN, then UP.
        h.fail_health_checks(503)
        wait_for(lambda: row(http, "/checked", h.url)["state"] == "down", "h to go down")
        h.pass_health_checks()
        wait_for(lambda: row(http, "/checked", h.url)["state"] == "up", "h to come back up")

        # Drained, and back.
        mw.balancer["/drain"].drain(c.url)
        mw.balancer["/drain"].undrain(c.url)

        # A response that breaks mid-body (a pool of one: never ejected).
        with pytest.raises(httpx.RemoteProtocolError):
            http.get("/broken/x?action=broken")

        warnings = rr_records(caplog, logging.WARNING)
        assert rr_records(caplog) == warnings, "nothing below WARNING, nothing per success"
        expected = {
            "connect failure": lines_with(warnings, f"GET {dead} failed (connect)"),
            "dead ejected": lines_with(warnings, f"upstream {dead} ejected", "last: connect"),
            "503 answered": lines_with(warnings, f"GET {b.url} answered 503"),
            "b ejected": lines_with(warnings, f"upstream {b.url} ejected", "last: status 503"),
            "b recovered": lines_with(warnings, f"upstream {b.url} recovered"),
            "h down": lines_with(warnings, f"upstream {h.url} is DOWN", "status 503"),
            "h up": lines_with(warnings, f"upstream {h.url} is UP"),
            "c drained": lines_with(warnings, f"upstream {c.url} drained"),
            "c back": lines_with(warnings, f"upstream {c.url} back in rotation"),
            "broken": lines_with(warnings, f"{a.url} failed mid-response (reset)"),
        }
        assert {what: len(lines) for what, lines in expected.items()} == dict.fromkeys(
            expected, 1
        ), warnings
        assert len(warnings) == len(expected), warnings


def test_access_log_one_info_line_per_proxied_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, ExitStack() as stack:
        quiet, _ = stack.enter_context(running_proxy({"/api": [a.url, b.url]}))
        loud, _ = stack.enter_context(
            running_proxy({"/api": [a.url, b.url]}, access_log=True, status_path="/status")
        )
        http = stack.enter_context(client())
        for n in range(5):
            assert http.get(f"{quiet.url}/api/q{n}").status_code == 200
        assert rr_records(caplog) == []

        served = [http.get(f"{loud.url}/api/l{n}?page={n}") for n in range(5)]
        served.append(http.post(f"{loud.url}/api/post", content=b"x"))
        served.append(http.get(f"{loud.url}/api/s?action=status&code=404"))
        # Not proxied: no line.
        assert http.get(f"{loud.url}/local").status_code == 200
        assert http.get(f"{loud.url}/status.json").status_code == 200
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
        names = {"a": a.url, "b": b.url}
        expected = [
            (
                logging.INFO,
                f"pool /api: {r.request.method} {r.request.url.path} -> "
                f"{names[r.headers['x-upstream']]} {r.status_code} in ",
            )
            for r in served
        ]
        assert len(lines) == len(expected), lines
        for (level, line), (want_level, start) in zip(lines, expected, strict=True):
            assert level == want_level
            assert line.startswith(start), (line, start)
            assert re.fullmatch(r"\d+\.\d ms", line[len(start) :]), line


def test_access_log_has_a_line_for_every_answer_the_proxy_gave_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusal, a guard's answer, an upload too large, a failing on_response hook: each
    gets its line, with the status the client got (the hook's 500, not the upstream's
    200) and ``-`` where no upstream was asked."""

    def on_response(request: Request, response: Any) -> None:
        if request.url.path.endswith("/broken"):
            raise RuntimeError("hook fails")

    caplog.set_level(logging.INFO, logger=LOGGER)
    with serve(UpstreamApp("a")) as a:
        pools = {
            "/api": Pool([a.url], max_body_size=10, on_response=on_response),
            "/guarded": Pool([a.url], guard=lambda request: False),
        }
        with running_proxy(pools, access_log=True) as (server, _), client() as http:
            answers = {
                "GET /api/%2e%2e/secret": http.get(server.url + "/api/%2e%2e/secret"),
                "GET /guarded/x": http.get(server.url + "/guarded/x"),
                "POST /api/upload": http.post(server.url + "/api/upload", content=b"x" * 100),
                "GET /api/broken": http.get(server.url + "/api/broken"),
                "GET /api/fine": http.get(server.url + "/api/fine"),
            }
    statuses = {what: r.status_code for what, r in answers.items()}
    assert statuses == {
        "GET /api/%2e%2e/secret": 400,
        "GET /guarded/x": 403,
        "POST /api/upload": 413,
        "GET /api/broken": 500,
        "GET /api/fine": 200,
    }
    lines = [line for line in rr_records(caplog) if " -> " in line]
    assert len(lines) == len(answers), lines
    for line, (what, response) in zip(lines, answers.items(), strict=True):
        method, path = what.split()
        upstream = a.url if path in ("/api/broken", "/api/fine") else "-"
        prefix = "/guarded" if path.startswith("/guarded") else "/api"
        start = f"pool {prefix}: {method} "
        assert line.startswith(start), (line, start)
        assert line.split(" -> ")[1].startswith(f"{upstream} {response.status_code} in "), line


def test_access_log_names_the_upstream_of_a_client_that_left_and_escapes_the_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that leaves while the upstream is slow: 499 and that upstream (it said
    ``-``). A path with encoded CR, LF and spaces stays one line, as the client sent it
    (decoded, it forged a second line)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    forged = "/api/x%0d%0apool%20/api:%20GET%20/api/admin%20-%3E%20http://10.9.9.9%20200"
    with (
        serve(UpstreamApp("a")) as a,
        running_proxy({"/api": [a.url]}, access_log=True) as (server, _),
        client() as http,
    ):
        with socket.create_connection(("127.0.0.1", server.port)) as leaving:
            leaving.sendall(b"GET /api/slow?action=sleep&s=3 HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_for(lambda: a.app.requests, "the request to reach the upstream", 10)
        assert http.get(server.url + forged).status_code == 200
        wait_for(lambda: len(access_lines(caplog)) == 2, "two access log lines", 10)
    left, escaped = sorted(access_lines(caplog), key=lambda line: "/slow" not in line)
    assert left.startswith("pool /api: GET /api/slow -> ")
    assert left.split(" -> ")[1].startswith(f"{a.url} 499 in "), left
    assert "\r" not in escaped
    assert "\n" not in escaped
    assert escaped.startswith(f"pool /api: GET {forged} -> {a.url} 200 in "), escaped


def test_access_log_marks_a_response_cut_off_mid_body(caplog: pytest.LogCaptureFixture) -> None:
    """An upstream that drops its connection mid-body: the client's connection is cut
    off after the 200's head, and its line says ``200 incomplete`` (it said ``200``, as
    for a whole answer); a whole answer's line has no mark."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with (
        serve(UpstreamApp("a")) as a,
        running_proxy({"/api": [a.url]}, access_log=True) as (server, _),
        client() as http,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(server.url + "/api/cut?action=broken")
        assert http.get(server.url + "/api/whole").status_code == 200
        wait_for(lambda: len(access_lines(caplog)) == 2, "two access log lines", 10)
    cut, whole = sorted(access_lines(caplog), key=lambda line: "/cut" not in line)
    assert cut.startswith(f"pool /api: GET /api/cut -> {a.url} 200 incomplete in "), cut
    assert whole.startswith(f"pool /api: GET /api/whole -> {a.url} 200 in "), whole


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line for line in rr_records(caplog) if " -> " in line]


# ----------------------------------------------------------------------- panic mode


def pool_status(http: httpx.Client, prefix: str) -> dict[str, Any]:
    """One pool's entry in the status JSON, fetched now."""
    response = http.get("/status.json")
    assert response.status_code == 200, response.text
    [pool] = [p for p in response.json()["pools"] if p["prefix"] == prefix]
    return pool  # type: ignore[no-any-return]


def test_panic_mode_is_a_pool_gauge_and_flag_and_leaves_rr_upstream_up_alone() -> None:
    """Every upstream fails its checks. ``/api`` (``on_all_down="try_all"``) routes to
    them anyway: ``rr_pool_panic`` 1, ``panic`` true in the JSON, a line on the page, while
    ``rr_upstream_up`` stays 0 (each upstream, on its own health, is not eligible).
    ``/fail`` answers 503 instead: not panic. Once checks pass again, all of it reverts."""
    checks = HealthCheck(interval=0.05, rise=1, fall=1)
    with FakeUpstream("a").serve() as a, FakeUpstream("b").serve() as b, ExitStack() as stack:
        pools = {
            "/api": Pool([a.url, b.url], health_check=checks),
            "/fail": Pool([a.url, b.url], health_check=checks, on_all_down="fail"),
        }
        server, _ = stack.enter_context(
            running_proxy(pools, metrics_path="/metrics", status_path="/status")
        )
        http = stack.enter_context(client(base_url=server.url))
        before = scrape(http)
        assert before.types["rr_pool_panic"] == "gauge"
        assert before.by("rr_pool_panic", "pool") == {"/api": 0, "/fail": 0}
        assert pool_status(http, "/api")["panic"] is False

        a.fail_health_checks()
        b.fail_health_checks()
        wait_for(
            lambda: all(
                up["state"] == "down"
                for prefix in pools
                for up in pool_status(http, prefix)["upstreams"]
            ),
            "the checks to mark every upstream down",
        )
        served = {http.get(f"/api/{n}").headers["x-upstream"] for n in range(4)}
        assert served == {"a", "b"}  # panic mode: both still take traffic
        refused = http.get("/fail/x")
        assert refused.status_code == 503
        assert "retry-after" in refused.headers

        during = scrape(http)
        assert during.by("rr_pool_panic", "pool") == {"/api": 1, "/fail": 0}
        assert set(during.by("rr_upstream_up", "upstream", pool="/api").values()) == {0}
        assert set(during.by("rr_upstream_up", "upstream", pool="/fail").values()) == {0}
        api = pool_status(http, "/api")
        assert api["panic"] is True
        assert {up["eligible"] for up in api["upstreams"]} == {False}
        assert pool_status(http, "/fail")["panic"] is False
        page = http.get("/status").text
        assert "data-panic='/api'" in page
        assert "data-panic='/fail'" not in page

        a.pass_health_checks()
        b.pass_health_checks()
        wait_for(lambda: not pool_status(http, "/api")["panic"], "the checks to pass again")
        after = scrape(http)
        assert after.by("rr_pool_panic", "pool") == {"/api": 0, "/fail": 0}
        assert set(after.by("rr_upstream_up", "upstream", pool="/api").values()) == {1}
        assert "data-panic" not in http.get("/status").text


def test_panic_mode_from_ejections_ends_when_they_run_out() -> None:
    """Both upstreams ejected by their own 503s (passive, on the pool's injected clock):
    panic until the ejections run out."""
    clock = ManualClock()
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, ExitStack() as stack:
        pool = Pool([a.url, b.url], max_fails=1, fail_timeout=5, clock=clock)
        server, mw = stack.enter_context(
            running_proxy({"/api": pool}, metrics_path="/metrics", status_path="/status")
        )
        http = stack.enter_context(client(base_url=server.url))
        first = http.get("/api/x?action=status&code=503").headers["x-upstream"]
        assert scrape(http).get("rr_pool_panic", pool="/api") == 0  # one left: no panic
        second = http.get("/api/x?action=status&code=503").headers["x-upstream"]
        assert {first, second} == {"a", "b"}
        assert scrape(http).get("rr_pool_panic", pool="/api") == 1
        assert mw.status()["pools"][0]["panic"] is True
        assert http.get("/api/x").status_code == 200  # served all the same
        clock.advance(6)
        assert scrape(http).get("rr_pool_panic", pool="/api") == 0
        assert mw.status()["pools"][0]["panic"] is False


def test_status_page_shows_panic_in_headless_chromium(tmp_path: Path, chromium: str) -> None:
    """The panic line is on the page as the script rebuilds it from the JSON, not only as
    the server first rendered it."""
    clock = ManualClock()
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, ExitStack() as stack:
        pools = {
            "/api": Pool([a.url, b.url], max_fails=1, fail_timeout=5, clock=clock),
            "/web": [a.url],
        }
        server, _ = stack.enter_context(running_proxy(pools, status_path="/status"))
        http = stack.enter_context(client(base_url=server.url))
        for _ in range(2):
            assert http.get("/api/x?action=status&code=503").status_code == 503
        status = http.get("/status.json").json()
        dom = dump_dom(server.url + "/status", tmp_path / "profile", chromium)
        check_page(dom, status)
        assert StatusTable(dom).panics == {"/api": PANIC_TEXT}


# ------------------------------------------------------------------- bugs, pinned down


def test_up_gauge_follows_an_ejection_running_out() -> None:
    clock = ManualClock()
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, ExitStack() as stack:
        pool = Pool([a.url, b.url], max_fails=1, fail_timeout=5, clock=clock)
        server, _ = stack.enter_context(
            running_proxy({"/api": pool}, metrics_path="/metrics", status_path="/status")
        )
        http = stack.enter_context(client(base_url=server.url))
        failed = http.get("/api/x?action=status&code=503").headers["x-upstream"]
        url = {"a": a.url, "b": b.url}[failed]
        assert scrape(http).get("rr_upstream_up", pool="/api", upstream=url) == 0
        clock.advance(6)  # the ejection has run out: the next request may probe it
        up_metric = scrape(http).get("rr_upstream_up", pool="/api", upstream=url)
        assert row(http, "/api", url)["eligible"] is True  # the JSON says it takes traffic
        assert up_metric == 1


def test_bytes_out_counts_the_bytes_of_an_aborted_response() -> None:
    with serve(UpstreamApp("a")) as a, ExitStack() as stack:
        server, _ = stack.enter_context(running_proxy({"/api": [a.url]}, status_path="/status"))
        http = stack.enter_context(client(base_url=server.url))
        got = received_before_abort(http, "/api/x?action=broken")
        assert got == 10  # the upstream's 10 bytes reached the client
        assert row(http, "/api", a.url)["bytes_out"] == got


def test_access_log_has_a_line_for_a_request_no_upstream_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with running_proxy({"/api": [dead_url()]}, access_log=True) as (server, _), client() as http:
        assert http.get(server.url + "/api/x").status_code == 502
        info = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == 20]
        assert len(info) == 1, info


def test_a_relayed_5xx_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, ExitStack() as stack:
        server, mw = stack.enter_context(running_proxy({"/api": [a.url, b.url]}))
        http = stack.enter_context(client(base_url=server.url))
        response = http.get("/api/x?action=status&code=503")
        assert response.status_code == 503
        url = {"a": a.url, "b": b.url}[response.headers["x-upstream"]]
        counted = {u["url"]: u["failures_by_kind"] for u in mw.status()["pools"][0]["upstreams"]}
        assert counted[url] == {"5xx": 1}
        assert len(lines_with(rr_records(caplog, logging.WARNING), url, "503")) == 1


def test_colliding_admin_paths_are_refused() -> None:
    pools = {"/api": ["http://127.0.0.1:9"]}
    for options in (
        {"metrics_path": "/status.json", "status_path": "/status"},
        {"metrics_path": "/status", "status_path": "/status"},
    ):
        try:
            RoundRobinMiddleware(host_app(), pools=pools, **options)
        except ValueError:
            continue
        raise AssertionError(f"accepted {options}")
