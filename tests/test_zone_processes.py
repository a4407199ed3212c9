"""One balancer across real worker processes: ``rr-gateway`` with ``workers = 4`` (its
workers share a zone without being told), and a user's app under ``uvicorn --workers 3``
naming its zone in ``RR_MIDDLEWARE_ZONE``. The upstreams are processes of their own
(``tests/counting_upstream.py``), so they can be killed with SIGKILL and count what
reaches them. Counters reach a scrape within a flush interval (0.5 s) of being counted,
so the tests poll for them against a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .gateway_process import Gateway, children_of, run_gateway, stop_tree
from .polling import wait_for
from .servers import bind_socket

REPO = Path(__file__).resolve().parent.parent
# Real worker processes, each test a minute of CPU or so: the suite's slow part, which
# the other Python versions skip (see .ci/test-pythons).
pytestmark = pytest.mark.slow
INTERVAL = 0.4  # health check interval in these tests


class CountingUpstream:
    """``tests/counting_upstream.py`` in a process of its own, on a port it keeps across
    a kill and a restart."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = bind_socket(0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.sock.fileno() == -1:
            self.sock = bind_socket(self.port)
        fd = self.sock.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.counting_upstream", str(fd), self.name],
            pass_fds=[fd],
            cwd=REPO,
        )
        wait_for(self._answers, f"upstream {self.name} to answer", 15)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/_counts", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def counts(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/_counts", timeout=5).json()
        return result

    def kill(self) -> None:
        """SIGKILL, and the listening socket closed: nothing accepts on the port."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None
        self.sock.close()

    def stop(self) -> None:
        if self.process is not None:
            self.kill()
        self.sock.close()


@contextmanager
def counting_upstreams(*names: str) -> Iterator[list[CountingUpstream]]:
    started: list[CountingUpstream] = []
    try:
        for name in names:
            upstream = CountingUpstream(name)
            started.append(upstream)
            upstream.start()
        yield started
    finally:
        for upstream in started:
            upstream.stop()


def gateway_toml(upstreams: list[CountingUpstream], *, workers: int, extra: str = "") -> str:
    entries = ", ".join(
        f'{{ url = "{u.url}", weight = {w} }}' for u, w in upstreams_weights(upstreams)
    )
    return f"""
[server]
port = 0
workers = {workers}
log_level = "info"

[middleware]
status_path = "/_status"
metrics_path = "/metrics"

[pools."/api"]
upstreams = [{entries}]
{extra}
"""


def upstreams_weights(upstreams: list[CountingUpstream]) -> list[tuple[CountingUpstream, int]]:
    """The first upstream weighs 2, the others 1."""
    return [(u, 2 if index == 0 else 1) for index, u in enumerate(upstreams)]


def status(url: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{url}/_status.json", timeout=5).json()
    return result


def wait_for_workers(url: str, count: int) -> None:
    """Until ``count`` workers are attached to the zone (the gateway answers once one is)."""
    wait_for(lambda: (status(url)["zone"] or {}).get("workers") == count, f"{count} workers", 30)


def requests_by_upstream(url: str) -> dict[str, int]:
    return {row["url"]: row["requests"] for row in status(url)["pools"][0]["upstreams"]}


def counted_once(url: str, total: int) -> dict[str, int]:
    """The requests per upstream once the scrape counts ``total`` (each worker's counts
    reach it within a flush interval); fails past ``total``: nothing counted twice."""

    def reached() -> dict[str, int] | None:
        counts = requests_by_upstream(url)
        assert sum(counts.values()) <= total, counts
        return counts if sum(counts.values()) == total else None

    result: dict[str, int] = wait_for(reached, f"{total} requests in a scrape", 10)
    return result


def fresh_gets(url: str, count: int, clients: int = 8) -> None:
    """``count`` GETs, each on a new connection (so the workers share them), from
    ``clients`` threads at a time."""

    def one(_: int) -> int:
        with httpx.Client(timeout=10) as client:
            return client.get(f"{url}/api/x").status_code

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, range(count)))
    assert statuses == [200] * count, Counter(statuses)


def metric_samples(text: str, name: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            samples[labels] = float(value)
    return samples


@pytest.fixture
def gateway_4(tmp_path: Path) -> Iterator[tuple[Gateway, list[CountingUpstream]]]:
    with counting_upstreams("a", "b", "c") as upstreams:
        config = gateway_toml(upstreams, workers=4)
        with run_gateway(tmp_path, config) as gateway:
            wait_for_workers(gateway.url, 4)
            yield gateway, upstreams


def test_four_workers_count_every_request_once(
    gateway_4: tuple[Gateway, list[CountingUpstream]],
) -> None:
    """1,000 requests on fresh connections through 4 workers: the scrape of any worker
    counts every one of them once, split as the weights say (2:1:1), and the upstreams
    agree."""
    gateway, upstreams = gateway_4
    fresh_gets(gateway.url, 1000)
    counted = counted_once(gateway.url, 1000)
    at_upstreams = {u.url: u.counts()["requests"] for u in upstreams}
    assert counted == at_upstreams
    a, b, c = (counted[u.url] for u in upstreams)
    # Each worker's smooth weighted rotation is exact; four of them interleave.
    assert abs(a - 500) <= 8, counted
    assert abs(b - 250) <= 8, counted
    assert abs(c - 250) <= 8, counted
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    total = sum(metric_samples(metrics, "rr_upstream_requests_total").values())
    assert total == 1000


@pytest.mark.parametrize("workers", [1, 4])
def test_health_probes_come_once_per_interval_whatever_the_workers(
    tmp_path: Path, workers: int
) -> None:
    """With 4 workers the upstreams get the probes of one: about one per interval."""
    check = f'[pools."/api".health_check]\npath = "/health"\ninterval = {INTERVAL}\n'
    with counting_upstreams("a", "b") as upstreams:
        config = gateway_toml(upstreams, workers=workers, extra=check)
        with run_gateway(tmp_path, config) as gateway:
            if workers > 1:
                wait_for_workers(gateway.url, workers)
            first = upstreams[0].counts()
            window = 8 * INTERVAL
            deadline = time.monotonic() + window
            wait_for(lambda: time.monotonic() >= deadline, "the measuring window", window + 5)
            last = upstreams[0].counts()
    probes = last["checks"] - first["checks"]
    expected = window / INTERVAL
    assert 0.7 * expected <= probes <= 1.3 * expected + 1, (probes, expected)


def test_an_upstream_killed_under_load_is_ejected_once_for_all_workers(tmp_path: Path) -> None:
    """b is killed (SIGKILL) while requests go through 4 workers: it costs the deployment
    ``max_fails`` failed attempts (each retried elsewhere: no client sees an error), not
    ``max_fails`` per worker; restarted on its port, it is back in every worker's
    rotation after ``fail_timeout`` (its half-open probe) and takes its share again."""
    passive = "max_fails = 3\nfail_timeout = 3.0\n"
    with counting_upstreams("a", "b", "c") as upstreams:
        config = gateway_toml(upstreams, workers=4, extra=passive)
        with run_gateway(tmp_path, config) as gateway:
            wait_for_workers(gateway.url, 4)
            fresh_gets(gateway.url, 40)
            b = upstreams[1]
            b.kill()
            # One at a time: each request in flight to b as it dies would fail once more
            # before the ejection, whatever the number of workers.
            fresh_gets(gateway.url, 120, clients=1)  # all succeed: retries on a and c
            metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
            on_b = f'upstream="{b.url}"'
            failures = metric_samples(metrics, "rr_upstream_failures_total")
            failed_b = sum(v for labels, v in failures.items() if on_b in labels)
            ejections = metric_samples(metrics, "rr_upstream_ejections_total")
            ejected_b = sum(v for labels, v in ejections.items() if on_b in labels)
            # max_fails failures eject b once for the deployment (per worker: 4 ejections,
            # 12 failures); past fail_timeout (a slow machine) each half-open probe that
            # fails costs one more failure and ejects it again.
            assert ejected_b >= 1, ejections
            assert failed_b == 3 + (ejected_b - 1), (failures, ejections)
            b.start()

            def probed() -> bool:
                fresh_gets(gateway.url, 1)  # requests go on; one of them probes b
                return bool(b.counts()["requests"])

            wait_for(probed, "b's half-open probe, once fail_timeout is over", 15)
            before = b.counts()["requests"]
            fresh_gets(gateway.url, 200)
            share = (b.counts()["requests"] - before) / 200
    assert 0.2 <= share <= 0.3, share  # weight 1 of 4


def test_killing_the_prober_moves_the_probes_to_another_worker(tmp_path: Path) -> None:
    check = f'[pools."/api".health_check]\npath = "/health"\ninterval = {INTERVAL}\n'
    with counting_upstreams("a", "b") as upstreams:
        config = gateway_toml(upstreams, workers=4, extra=check)
        with run_gateway(tmp_path, config) as gateway:
            wait_for_workers(gateway.url, 4)
            prober = wait_for(
                lambda: status(gateway.url)["zone"]["prober_pid"], "a worker to probe", 10
            )
            assert prober in children_of(gateway.process.pid)
            os.kill(prober, signal.SIGKILL)
            killed_at = time.monotonic()
            a = upstreams[0]
            wait_for(
                lambda: any(t > killed_at for t in a.counts()["check_times"]),
                "probes from another worker",
                10 * INTERVAL,
            )
            times = a.counts()["check_times"]
            before = max(t for t in times if t <= killed_at)
            after = min(t for t in times if t > killed_at)
            new_prober = status(gateway.url)["zone"]["prober_pid"]
    assert after - before <= 2 * INTERVAL * 1.1 + 0.3, after - before
    assert new_prober not in (0, prober)


def test_no_counter_goes_back_while_a_worker_is_killed_and_restarted(tmp_path: Path) -> None:
    """20 scrapes while traffic flows; after the fifth, a worker is killed with SIGKILL
    (uvicorn starts another, which takes the dead one's slot): every counter of every
    scrape is at least what it was in the scrape before."""
    with counting_upstreams("a", "b") as upstreams:
        config = gateway_toml(upstreams, workers=4)
        with run_gateway(tmp_path, config) as gateway:
            wait_for_workers(gateway.url, 4)
            previous: dict[str, float] = {}
            victim = children_of(gateway.process.pid)[-1]
            for scrape in range(20):
                fresh_gets(gateway.url, 20)
                if scrape == 5:
                    os.kill(victim, signal.SIGKILL)
                if scrape == 10:
                    wait_for_workers(gateway.url, 4)  # the replacement is in
                text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
                samples = {
                    labels: value
                    for name in ("rr_upstream_requests_total", "rr_upstream_bytes_total")
                    for labels, value in metric_samples(text, name).items()
                }
                for labels, value in previous.items():
                    assert samples.get(labels, 0) >= value, (scrape, labels, value, samples)
                previous = samples
            assert victim not in children_of(gateway.process.pid)
    assert sum(v for k, v in previous.items() if "code=" in k) >= 300


def test_a_stale_region_is_rebuilt_and_logged(tmp_path: Path) -> None:
    """A process attached to the gateway's zone is killed (SIGKILL: no clean-up); the
    gateway then starting on that zone finds the region nobody is attached to, rebuilds
    it, and says so. (The gateway names its zone after its pools' layout too, so a region
    built for other pools is never in its way.)"""
    zone = str(tmp_path / "zone")
    with counting_upstreams("a", "b") as upstreams:
        config = gateway_toml(upstreams, workers=2).replace(
            "[middleware]\n", f"[middleware]\nzone = {json.dumps(zone)}\n"
        )
        holder_config = tmp_path / "holder.toml"
        holder_config.write_text(config)
        script = (
            "import asyncio\n"
            "from rr_middleware.gateway import create_app\n"
            "async def main():\n"
            "    app = create_app()\n"
            "    await app.balancer.start()\n"
            "    print('attached', flush=True)\n"
            "    await asyncio.Event().wait()\n"
            "asyncio.run(main())\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "RR_GATEWAY_CONFIG": str(holder_config)},
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == b"attached"
        finally:
            holder.kill()
            holder.wait(timeout=10)
            if holder.stdout is not None:
                holder.stdout.close()
        assert list(tmp_path.glob("zone-*/state"))
        with run_gateway(tmp_path, config) as gateway:
            wait_for_workers(gateway.url, 2)
            fresh_gets(gateway.url, 10)
            counted = counted_once(gateway.url, 10)
            log = gateway.output()
    assert "a region left by an earlier run was rebuilt, not trusted" in log
    assert sorted(counted.values()) in ([3, 7], [4, 6], [5, 5], [6, 4])


@contextmanager
def uvicorn_workers(
    tmp_path: Path, upstreams: list[CountingUpstream], workers: int
) -> Iterator[str]:
    sock = bind_socket(0)
    port = sock.getsockname()[1]
    log = tmp_path / "uvicorn.log"
    env = {
        **os.environ,
        "ZONE_APP_UPSTREAMS": ",".join(u.url for u in upstreams),
        "RR_MIDDLEWARE_ZONE": str(tmp_path / "app-zone"),
    }
    sock.close()  # uvicorn binds it again (SO_REUSEADDR): workers share its socket
    with ExitStack() as stack, log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.zone_app:app",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--log-level",
                "info",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        stack.callback(stop_tree, process)
        url = f"http://127.0.0.1:{port}"

        def workers_up() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                zone = httpx.get(f"{url}/status", timeout=1).json()["zone"]
            except (httpx.TransportError, json.JSONDecodeError):
                return False
            return bool(zone) and zone["workers"] == workers

        wait_for(workers_up, "uvicorn's workers", 30)
        yield url


def test_a_user_app_under_uvicorn_workers_is_one_balancer(tmp_path: Path) -> None:
    """``uvicorn --workers 3`` on an app whose balancer names a zone (through
    ``RR_MIDDLEWARE_ZONE``): 600 requests counted once in all; a drain through the
    balancer's API, asked of whichever worker takes the request, stops every worker
    sending to that upstream."""
    with counting_upstreams("a", "b") as upstreams, uvicorn_workers(tmp_path, upstreams, 3) as url:
        a, b = upstreams
        fresh_gets(url, 600)

        def counted() -> dict[str, int] | None:
            rows = httpx.get(f"{url}/status", timeout=5).json()["pools"][0]["upstreams"]
            result = {row["url"]: row["requests"] for row in rows}
            return result if sum(result.values()) >= 600 else None

        totals = wait_for(counted, "the counts of all three workers", 10)
        assert sum(totals.values()) == 600
        assert abs(totals[a.url] - 300) <= 3, totals  # three rotations, interleaved
        assert httpx.post(f"{url}/drain", params={"url": b.url}, timeout=5).status_code == 200
        before = b.counts()["requests"]
        fresh_gets(url, 150)
        assert b.counts()["requests"] == before


def test_the_gateway_names_its_workers_zone_itself(
    gateway_4: tuple[Gateway, list[CountingUpstream]],
) -> None:
    gateway, _ = gateway_4
    zone = status(gateway.url)["zone"]
    # After the file and address, then the pools' layout (a reload may change it).
    assert re.fullmatch(r"rr-gateway-[0-9a-f]{16}-[0-9a-f]{12}", zone["name"])
    assert 0 <= zone["worker"] < 4


@pytest.fixture(autouse=True)
def _no_zone_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RR_MIDDLEWARE_ZONE", raising=False)
