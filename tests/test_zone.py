"""A zone shared by worker processes, seen from one process: two ``Balancer``s attached to
one zone are two workers (each takes its own worker slot and its own locks: ``flock``
locks belong to an open file, not to a process). What one decides, the other sees at its
next pick; what both count, either reads as a sum. The real multi-process runs (the
gateway's workers, uvicorn's) are in ``test_zone_processes.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from rr_middleware import Balancer, HealthCheck, Pool, RoundRobinMiddleware, Upstream
from rr_middleware.zone import FLUSH_INTERVAL, ZoneError, zone_directory

from .polling import settled

Scope = dict[str, Any]


class Answering:
    """An in-process upstream answering ``status`` (200 by default), counting requests
    and health checks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.health_status = 200
        self.requests = 0
        self.checks = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].endswith("/health"):
            self.checks += 1
            status = self.health_status
        else:
            self.requests += 1
            status = self.status
        body = self.name.encode()
        headers = [(b"content-length", b"%d" % len(body)), (b"x-upstream", body)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool_of(*apps: Answering, **options: Any) -> Pool:
    return Pool([Upstream(f"http://{a.name}.internal", app=a) for a in apps], **options)


class Worker:
    """One 'worker process': a Balancer on the zone, the middleware around it, and a
    client to it."""

    def __init__(self, pools: dict[str, Pool], zone: str) -> None:
        self.balancer = Balancer(pools, zone=zone)
        self.app = RoundRobinMiddleware(Starlette(), balancer=self.balancer)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://proxy"
        )

    async def get(self, path: str = "/api/x") -> httpx.Response:
        return await self.http.get(path)

    async def served_by(self, count: int) -> list[str]:
        return [(await self.get()).headers.get("x-upstream", "-") for _ in range(count)]


@asynccontextmanager
async def workers(
    zone: str, count: int, pools: Callable[[], dict[str, Pool]]
) -> AsyncIterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(count):
            worker = Worker(pools(), zone)
            await worker.balancer.start()
            started.append(worker)
        yield started
    finally:
        for worker in reversed(started):
            await worker.http.aclose()
            await worker.balancer.stop()


@pytest.fixture
def zone(tmp_path: Path) -> str:
    return str(tmp_path / "zone")


async def test_a_drain_in_one_worker_is_seen_by_the_others(zone: str) -> None:
    a, b = Answering("a"), Answering("b")
    async with workers(zone, 2, lambda: {"/api": pool_of(a, b)}) as (first, second):
        first.balancer["/api"].drain("http://a.internal")
        assert await second.served_by(4) == ["b"] * 4
        assert second.balancer["/api"].snapshot()[0]["drained"] is True
        second.balancer["/api"].undrain("http://a.internal")
        assert sorted(await first.served_by(4)) == ["a", "a", "b", "b"]


async def test_a_weight_set_in_one_worker_is_used_by_the_others(zone: str) -> None:
    a, b = Answering("a"), Answering("b")
    async with workers(zone, 2, lambda: {"/api": pool_of(a, b)}) as (first, second):
        first.balancer["/api"].set_weight("http://a.internal", 3)
        assert sorted(await second.served_by(8)) == ["a"] * 6 + ["b"] * 2
        assert second.balancer["/api"].snapshot()[0]["weight"] == 3


async def test_a_reload_seeds_the_next_zone_with_the_latest_state(zone: str) -> None:
    """A reload that changes the layout moves the workers to a new zone, seeded by the
    first to get there. That worker may have served nothing since another undrained an
    upstream: it seeds what the zone said last, not the drain it last loaded."""
    a, b, c = Answering("a"), Answering("b"), Answering("c")
    async with workers(zone, 2, lambda: {"/api": pool_of(a, b)}) as (first, second):
        for worker in (first, second):
            worker.balancer.zone_follows_layout = True  # as the gateway's workers do
        first.balancer["/api"].drain("http://b.internal")
        assert await second.served_by(2) == ["a", "a"]  # second has loaded the drain
        first.balancer["/api"].undrain("http://b.internal")
        first.balancer["/api"].set_weight("http://b.internal", 3)
        for worker in (second, first):  # second first: it creates and seeds the new zone
            await worker.balancer.reconfigure({"/api": pool_of(a, b, c)})
        for worker in (first, second):
            assert sorted(await worker.served_by(5)) == ["a", "b", "b", "b", "c"]


async def test_an_upstream_ejected_by_one_worker_is_skipped_by_all(zone: str) -> None:
    """Worker one meets a's 503s and ejects it (``max_fails=2``); worker two, which never
    saw a fail, sends it nothing from its next pick on: a failing upstream costs the
    deployment ``max_fails`` failures, not ``max_fails`` per worker."""
    a, b = Answering("a"), Answering("b")
    a.status = 503
    clock = Clock()
    async with workers(
        zone, 2, lambda: {"/api": pool_of(a, b, max_fails=2, fail_timeout=10, clock=clock)}
    ) as (first, second):
        while a.requests < 2:
            await first.get()
        assert first.balancer["/api"].snapshot()[0]["ejected"] is True
        before = a.requests
        assert await second.served_by(6) == ["b"] * 6
        assert a.requests == before
        assert second.balancer["/api"].snapshot()[0]["ejected"] is True


async def test_one_half_open_probe_across_all_workers(zone: str) -> None:
    """Once the ejection runs out, exactly one request in the whole deployment probes the
    upstream; while it is out (here: the probe's client never reports), no other worker
    sends it anything; its success brings the upstream back for everyone."""
    a, b = Answering("a"), Answering("b")
    a.status = 503
    clock = Clock()
    async with workers(
        zone, 2, lambda: {"/api": pool_of(a, b, max_fails=1, fail_timeout=10, clock=clock)}
    ) as (first, second):
        while a.requests < 1:
            await first.get()
        runtime = first.balancer["/api"]
        clock.now += 10
        # The first worker claims the probe by picking a (as a request would), and its
        # outcome never comes: the second worker must not probe a as well.
        member = runtime.pick([runtime.members[1]])
        assert member is runtime.members[0]
        assert await second.served_by(4) == ["b"] * 4
        a.status = 200
        clock.now += 3600  # the probe had all its time: another may probe now
        assert "a" in await second.served_by(4)
        assert first.balancer["/api"].snapshot()[0]["half_open"] is False
        assert sorted(await first.served_by(4)) == ["a", "a", "b", "b"]


async def test_counters_are_summed_and_never_go_back_when_a_worker_leaves(zone: str) -> None:
    """Each worker counts its own; either reads the sum. A worker that leaves leaves its
    counts, and the one that takes its slot next carries on from them."""
    a, b = Answering("a"), Answering("b")

    def total(worker: Worker) -> int:
        return sum(row["requests"] for row in worker.balancer["/api"].snapshot())

    async with workers(zone, 2, lambda: {"/api": pool_of(a, b)}) as (first, second):
        await first.served_by(6)
        await second.served_by(4)
        # A worker's counts reach the others at its next flush (every FLUSH_INTERVAL).
        await settled(lambda: total(first) == 10, FLUSH_INTERVAL * 4)
        assert total(second) == 10
        await second.http.aclose()
        await second.balancer.stop()  # that worker ends
        assert total(first) == 10
        replacement = Worker({"/api": pool_of(a, b)}, zone)
        await replacement.balancer.start()
        try:
            assert replacement.balancer.zone is not None
            assert replacement.balancer.zone.slot == 1  # the slot the other left
            assert total(replacement) == 10
            await replacement.served_by(5)
            await settled(lambda: total(first) == 15, FLUSH_INTERVAL * 4)
            assert total(replacement) == 15
            metrics = replacement.balancer.status()["pools"][0]["upstreams"]
            assert sum(row["responses"].get("2xx", 0) for row in metrics) == 15
        finally:
            await replacement.http.aclose()
            await replacement.balancer.stop()


async def test_one_process_probes_and_another_takes_over_when_it_leaves(zone: str) -> None:
    """The first worker to ask leads the checks; the other's ask fails while it lives.
    The leader's results are every worker's (health, check counts); when it leaves, the
    other's next ask (its checker asks every interval) makes it the prober."""
    a, b = Answering("a"), Answering("b")
    check = HealthCheck(path="/health", interval=60, rise=1, fall=1)
    async with workers(zone, 2, lambda: {"/api": pool_of(a, b, health_check=check)}) as pair:
        leader, follower = pair
        assert leader.balancer.zone is not None
        assert follower.balancer.zone is not None
        assert leader.balancer.zone.lead() is True
        assert follower.balancer.zone.lead() is False
        a.health_status = 503
        checker = leader.balancer["/api"].checker
        assert checker is not None
        await checker.check_now()
        row = follower.balancer.status()["pools"][0]["upstreams"][0]
        assert row["healthy"] is False
        assert row["checks"]["fail"] == 1
        assert await follower.served_by(2) == ["b", "b"]
        await leader.http.aclose()
        await leader.balancer.stop()
        assert follower.balancer.zone.lead() is True


async def test_a_region_left_by_an_earlier_run_is_rebuilt_and_said_so(
    zone: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A region nobody is attached to comes from a run that ended without cleaning up
    (killed): it is never trusted, whatever it holds."""
    directory = zone_directory(zone)
    directory.mkdir(parents=True)
    (directory / "state").write_bytes(b"\xff" * 4096)
    a, b = Answering("a"), Answering("b")
    with caplog.at_level(logging.WARNING, logger="rr_middleware"):
        async with workers(zone, 1, lambda: {"/api": pool_of(a, b)}) as (only,):
            assert sorted(await only.served_by(4)) == ["a", "a", "b", "b"]
            assert [row["requests"] for row in only.balancer["/api"].snapshot()] == [2, 2]
    assert "a region left by an earlier run was rebuilt" in caplog.text


async def test_a_zone_in_use_with_other_pools_is_refused(zone: str) -> None:
    a, b = Answering("a"), Answering("b")
    async with workers(zone, 1, lambda: {"/api": pool_of(a, b)}):
        other = Balancer({"/api": pool_of(a)}, zone=zone)
        with pytest.raises(ZoneError, match="in use by a deployment with other pools"):
            await other.start()
        await other.stop()


async def test_the_zone_is_removed_by_the_last_worker_out(zone: str) -> None:
    a = Answering("a")
    async with workers(zone, 2, lambda: {"/api": pool_of(a)}):
        assert (zone_directory(zone) / "state").exists()
    assert not zone_directory(zone).exists()
