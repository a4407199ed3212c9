"""Mirroring (``rr_middleware.mirroring``): the mirror pool gets byte-identical copies of
the mirrored fraction; a mirror that hangs or refuses costs the client nothing. Through
the middleware under uvicorn to real uvicorn upstreams."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rr_middleware import Pool, RoundRobinMiddleware
from rr_middleware.errors import FieldError

from .polling import wait_for
from .proxy import client, host_app, running_proxy
from .raw_client import RawClient, raw_request
from .servers import RunningServer, dead_url, serve
from .upstream_app import UpstreamApp

pytestmark = pytest.mark.usefixtures("no_asyncio_errors")


@pytest.fixture
def pair() -> Iterator[tuple[RunningServer, RunningServer]]:
    """The primary upstream and the mirror's."""
    with serve(UpstreamApp("primary")) as primary, serve(UpstreamApp("mirror")) as mirror:
        yield primary, mirror


def without_host(record: dict[str, Any]) -> dict[str, Any]:
    headers = [pair for pair in record["headers"] if pair[0] != "host"]
    return {**record, "headers": headers, "server": None}


@pytest.mark.slow
def test_the_mirror_gets_identical_copies_of_the_fraction(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    primary, mirror = pair
    pools = {
        "/api": Pool([primary.url], mirror="shadow", mirror_fraction=0.1),
        "shadow": Pool([mirror.url]),
    }
    total = 5000
    with running_proxy(pools) as (proxy, middleware), RawClient(proxy.port) as raw:
        for start in range(0, total, 250):
            batch = b"".join(
                raw_request(
                    "POST",
                    f"/api/items/{i}?action=status&code=201&n={i}",
                    [
                        ("Host", "proxy"),
                        ("X-Request", str(i)),
                        ("Content-Type", "application/octet-stream"),
                        ("Content-Length", "6"),
                    ],
                    b"b%05d" % i,
                )
                for i in range(start, start + 250)
            )
            raw.send(batch)
            for _ in range(250):
                status, headers = raw.read_head()
                raw.read_body(headers)
                assert status == 201
        copies = wait_for(
            lambda: (s := middleware.status()["pools"][0]["mirror"])["in_flight"] == 0 and s,
            "the copies to finish",
        )
    assert abs(copies["sent"] / total - 0.1) <= 0.02, copies
    assert copies["answered"] == copies["sent"] == len(mirror.app.requests)
    assert copies["dropped"] == copies["failed"] == copies["skipped"] == 0
    by_request = {values(r)[0]: r for r in primary.app.requests}
    for record in mirror.app.requests:
        original = by_request[values(record)[0]]
        assert without_host(record) == without_host(original)
        assert record["method"] == "POST"
        assert record["body"].startswith("b")


def values(record: dict[str, Any]) -> list[str]:
    return [v for k, v in record["headers"] if k == "x-request"]


class Hanging:
    """An upstream that never answers until the test ends."""

    def __init__(self) -> None:
        self.arrived = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.arrived += 1
        await asyncio.sleep(3600)


def latencies(url: str, count: int) -> list[float]:
    times = []
    with client() as http:
        for _ in range(count):
            started = time.perf_counter()
            response = http.get(f"{url}/api/x?action=status&code=200")
            times.append(time.perf_counter() - started)
            assert response.status_code == 200
    return times


@pytest.mark.slow
def test_a_hanging_mirror_does_not_slow_the_client() -> None:
    """Side by side, 200 sequential GETs each: without a mirror, and with one that never
    answers (every request copied, 20 copies at most in flight). The p99 with it stays
    within noise of the p99 without; the copies past 20 are dropped and counted."""
    hanging = Hanging()
    with serve(UpstreamApp("primary")) as primary, serve(hanging) as mirror:
        plain = {"/api": Pool([primary.url])}
        mirrored = {
            "/api": Pool([primary.url], mirror="shadow", mirror_max_in_flight=20),
            "shadow": Pool([mirror.url], timeout=3600),
        }
        with running_proxy(plain) as (proxy, _):
            latencies(proxy.url, 20)  # warm
            without = latencies(proxy.url, 200)
        with running_proxy(mirrored) as (proxy, middleware):
            latencies(proxy.url, 20)
            with_mirror = latencies(proxy.url, 200)
            status = middleware.status()["pools"][0]["mirror"]
    p99 = statistics.quantiles(without, n=100)[98]
    p99_mirrored = statistics.quantiles(with_mirror, n=100)[98]
    assert p99_mirrored <= max(3 * p99, p99 + 0.05), (p99, p99_mirrored)
    assert status["in_flight"] == 20
    assert status["sent"] == 20
    assert status["dropped"] == 200
    assert hanging.arrived == 20


def test_a_refusing_mirror_causes_no_client_error(upstreams: list[RunningServer]) -> None:
    pools = {
        "/api": Pool([upstreams[0].url], mirror="shadow"),
        "shadow": Pool([dead_url()], retries=0),
    }
    with running_proxy(pools) as (proxy, middleware), client() as http:
        for _ in range(20):
            response = http.post(f"{proxy.url}/api/x", content=b"payload")
            assert response.status_code == 200
            assert response.json()["body"] == "payload"
        status = wait_for(
            lambda: (s := middleware.status()["pools"][0]["mirror"])["in_flight"] == 0 and s,
            "the copies to fail",
        )
    assert status["failed"] == status["sent"] == 20
    assert status["answered"] == 0


def test_a_body_over_the_limit_is_not_copied(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    primary, mirror = pair
    pools = {
        "/api": Pool([primary.url], mirror="shadow", mirror_body_limit=10),
        "shadow": Pool([mirror.url]),
    }
    with running_proxy(pools) as (proxy, middleware), client() as http:
        assert http.post(f"{proxy.url}/api/x", content=b"x" * 11).status_code == 200
        assert http.post(f"{proxy.url}/api/x", content=b"x" * 10).status_code == 200
        status = wait_for(
            lambda: (s := middleware.status()["pools"][0]["mirror"])["in_flight"] == 0 and s,
            "the copy to finish",
        )
    assert (status["skipped"], status["sent"]) == (1, 1)
    assert [r["body"] for r in mirror.app.requests] == ["x" * 10]


def test_mirror_options_are_validated() -> None:
    for options, field in [
        ({"mirror": ""}, "mirror"),
        ({"mirror_fraction": 0}, "mirror_fraction"),
        ({"mirror_fraction": 1.5}, "mirror_fraction"),
        ({"mirror_body_limit": -1}, "mirror_body_limit"),
        ({"mirror_max_in_flight": 0}, "mirror_max_in_flight"),
    ]:
        with pytest.raises(FieldError) as caught:
            Pool(["http://10.0.0.1:8000"], **options)
        assert caught.value.field == field
    with pytest.raises(FieldError, match="'nowhere' is not another pool"):
        RoundRobinMiddleware(
            host_app(), pools={"/api": Pool(["http://10.0.0.1:8000"], mirror="nowhere")}
        )


def test_traffic_counts_in_prometheus(upstreams: list[RunningServer]) -> None:
    """The affinity, mirror and route counts are metrics too."""
    from rr_middleware import Route

    pools = {
        "/api": Pool([upstreams[0].url], mirror="shadow", policy="hash", hash_on="query:u"),
        "shadow": Pool([upstreams[1].url]),
        "canary": Pool([upstreams[2].url]),
    }
    routes = [Route("/api", pool="canary", headers={"x-canary": "1"})]
    with (
        running_proxy(pools, routes=routes, metrics_path="/metrics") as (proxy, middleware),
        client() as http,
    ):
        assert http.get(f"{proxy.url}/api/x", params={"u": "1"}).status_code == 200
        assert http.get(f"{proxy.url}/api/x").status_code == 200
        assert http.get(f"{proxy.url}/api/x", headers={"x-canary": "1"}).status_code == 200
        wait_for(lambda: middleware.status()["pools"][0]["mirror"]["answered"] == 2, "the copies")
        text = http.get(f"{proxy.url}/metrics").text
    assert 'rr_pool_affinity_total{event="keyed",pool="/api"} 1.0' in text
    assert 'rr_pool_affinity_total{event="unkeyed",pool="/api"} 1.0' in text
    assert 'rr_mirror_requests_total{mirror="shadow",outcome="answered",pool="/api"} 2.0' in text
    assert 'rr_route_requests_total{pool="canary",prefix="/api",route="0"} 1.0' in text


def test_the_status_page_shows_the_traffic_counts(
    upstreams: list[RunningServer], tmp_path: Any, chromium: str
) -> None:
    """One line per pool with its affinity and mirror counts: as the server renders the
    page, and as its script rebuilds it from the JSON (in headless Chromium)."""
    from .chromium import dump_dom

    pools = {
        "/api": Pool([upstreams[0].url], mirror="shadow", policy="hash", hash_on="query:u"),
        "shadow": Pool([upstreams[1].url]),
    }
    with (
        running_proxy(pools, status_path="/status") as (proxy, middleware),
        client() as http,
    ):
        assert http.get(f"{proxy.url}/api/x", params={"u": "1"}).status_code == 200
        assert http.get(f"{proxy.url}/api/x").status_code == 200
        wait_for(lambda: middleware.status()["pools"][0]["mirror"]["answered"] == 2, "the copies")
        line = (
            "affinity: 1 keyed, 1 unkeyed, 0 spilled, 0 sticky kept, 0 cookies set; "
            "mirror to shadow: 2 sent, 2 answered, 0 failed, 0 dropped, 0 skipped"
        )
        assert line in http.get(f"{proxy.url}/status").text
        dom = dump_dom(f"{proxy.url}/status", tmp_path / "profile", chromium)
    assert 'id="updated">Updated ' in dom  # the script ran, and rebuilt the rows
    assert re.search(r'<tr class="traffic"><td>/api</td><td colspan="9">' + re.escape(line), dom)
