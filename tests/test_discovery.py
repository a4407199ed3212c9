"""Discovered pools: members follow a source while the app runs, applied as a diff.

The source here is a ``Discovery`` of the tests' own (the protocol users implement for a
registry of theirs): the test hands it member lists and failures through a queue, so every
change happens exactly when the test says. Upstreams are real uvicorn servers; Consul and
DNS sources have their own tests against a real agent and a real resolver.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from rr_middleware import (
    ConsulDiscovery,
    DiscoveryError,
    DNSDiscovery,
    HealthCheck,
    Pool,
    RoundRobinMiddleware,
    Upstream,
)
from rr_middleware.discovery.base import Watcher

from .chromium import dump_dom
from .leaks import no_leaks
from .polling import settled, wait_for
from .proxy import InProcessProxy, client, plain_host_app, running_proxy
from .raw_upstream import RawConnection, RawUpstream
from .servers import RunningServer, dead_url, serve

pytestmark = pytest.mark.anyio


@dataclass(eq=False)
class QueueDiscovery:
    """Yields whatever the test puts in: a list of upstreams, or an exception to raise."""

    startup_timeout: float = 5.0
    retry_initial: float = 0.01
    retry_max: float = 0.01
    queue: asyncio.Queue[list[Upstream] | Exception] = field(default_factory=asyncio.Queue)
    watches: int = 0  # how many times watch() was started
    closed: int = 0  # how many of those were closed
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> str:
        return "the test's queue"

    loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once watched

    def put(self, *urls: str | Upstream) -> None:
        self._put([u if isinstance(u, Upstream) else Upstream(u) for u in urls])

    def fail(self, message: str) -> None:
        self._put(DiscoveryError(message))

    def _put(self, item: list[Upstream] | Exception) -> None:
        """From the serving loop, or from a test thread while uvicorn serves."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is None or running is self.loop:
            self.queue.put_nowait(item)
        else:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def watch(self) -> AsyncIterator[list[Upstream]]:
        self.loop = asyncio.get_running_loop()
        self.watches += 1
        self.started.set()
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed += 1


# ----------------------------------------------------------------------- membership


async def test_members_follow_the_source(upstreams: list[RunningServer]) -> None:
    a, b, c = upstreams
    source = QueueDiscovery()
    source.put(a.url, b.url)
    async with InProcessProxy(Pool(discovery=source)) as proxy:
        assert sorted(await proxy.who(4)) == ["a", "a", "b", "b"]
        source.put(b.url, c.url)
        await settled(lambda: proxy.members() == [b.url, c.url])
        assert sorted(await proxy.who(4)) == ["b", "b", "c", "c"]


async def test_an_upstream_that_stays_keeps_its_state(upstreams: list[RunningServer]) -> None:
    a, b, c = upstreams
    source = QueueDiscovery()
    source.put(a.url, b.url)
    async with InProcessProxy(Pool(discovery=source, max_fails=1, fail_timeout=60)) as proxy:
        await proxy.who(4)
        proxy.pool.drain(a.url)
        source.put(a.url, b.url, c.url)
        await settled(lambda: len(proxy.members()) == 3)
        row = proxy.row(a.url)
        assert row["requests"] == 2  # counters carried over
        assert row["drained"] is True  # and so is what the operator did
        assert sorted(await proxy.who(4)) == ["b", "b", "c", "c"]


async def test_one_server_listed_twice_is_one_member(
    upstreams: list[RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = upstreams
    twice = a.url.replace("127.0.0.1", "localhost"), a.url.replace("127.0.0.1", "LOCALHOST")
    source = QueueDiscovery()
    source.put(*twice, b.url)
    async with InProcessProxy(Pool(discovery=source)) as proxy:
        assert proxy.members() == [twice[0], b.url]
        await proxy.who(2)
        state = proxy.pool.members[0]
        source.put(*twice, b.url)  # the same list again: nothing churns
        source.put(twice[1], b.url, c.url)
        await settled(lambda: len(proxy.members()) == 3)
        assert proxy.pool.members[0] is state
        assert proxy.row(twice[0])["requests"] == 1
    assert "listed twice by discovery; using it once" in caplog.text


async def test_a_new_weight_is_taken_without_losing_state(upstreams: list[RunningServer]) -> None:
    a, b, _ = upstreams
    source = QueueDiscovery()
    source.put(a.url, b.url)
    async with InProcessProxy(Pool(discovery=source)) as proxy:
        await proxy.who(2)
        source.put(Upstream(a.url, weight=3), b.url)
        await settled(lambda: proxy.row(a.url)["weight"] == 3)
        assert proxy.row(a.url)["requests"] == 1
        picks = await proxy.who(8)
        assert (picks.count("a"), picks.count("b")) == (6, 2)


def test_a_removed_upstream_finishes_what_is_in_flight(upstreams: list[RunningServer]) -> None:
    # Served by uvicorn: the response streams to a real client while membership changes.
    a, b, _ = upstreams
    source = QueueDiscovery()
    source.put(a.url)
    pool = Pool(discovery=source)
    middleware = RoundRobinMiddleware(plain_host_app(), pools={"/api": pool})
    with (
        serve(middleware) as proxy,
        client(base_url=proxy.url) as http,
        http.stream("GET", "/api/s?action=stream&n=3&size=4&wait=1") as stream,
    ):
        assert stream.status_code == 200
        source.put(b.url)
        runtime = middleware.balancer["/api"]
        wait_for(lambda: [row["url"] for row in runtime.snapshot()] == [b.url], "b to replace a")
        assert http.get("/api/x").headers["x-upstream"] == "b"
        for _ in range(3):
            a.app.proceed.release()
        assert stream.read() == b"AAAABBBBCCCC"


async def test_a_request_on_an_upstream_that_leaves_is_retried_on_the_others(
    upstreams: list[RunningServer],
) -> None:
    b = upstreams[1]
    received, drop = threading.Event(), threading.Event()

    async def drop_when_told(connection: RawConnection) -> None:
        """Reads one request, then closes the connection without an answer when the test
        says so (a deploy taking the instance down mid-request)."""
        if await connection.read_head() is not None:
            received.set()
            await asyncio.to_thread(drop.wait, 10)

    source = QueueDiscovery()
    with RawUpstream(drop_when_told) as leaving:
        source.put(leaving.url, b.url)
        try:
            async with InProcessProxy(Pool(discovery=source, retries=1, max_fails=0)) as proxy:
                request = asyncio.ensure_future(proxy.http.get("/api/x"))
                await asyncio.get_running_loop().run_in_executor(None, received.wait, 10)
                source.put(b.url)  # the instance is deregistered while serving the request
                await settled(lambda: proxy.members() == [b.url])
                drop.set()  # ... and goes away without answering
                response = await request
                assert (response.status_code, response.headers["x-upstream"]) == (200, "b")
        finally:
            drop.set()  # on any outcome: the handler stops waiting, the upstream can stop


async def test_an_empty_answer_is_a_503_with_retry_after(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    source = QueueDiscovery()
    source.put()
    async with InProcessProxy(Pool(discovery=source)) as proxy:
        response = await proxy.http.get("/api/x")
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert (await proxy.http.get("/")).text == "host"  # the host app is untouched
        source.put(a.url)
        await settled(lambda: proxy.members() == [a.url])
        assert await proxy.who(1) == ["a"]
        source.put()
        await settled(lambda: proxy.members() == [])
        assert (await proxy.http.get("/api/x")).status_code == 503


async def test_startup_waits_for_the_first_members(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]

    @dataclass
    class SlowSource(QueueDiscovery):
        async def watch(self) -> AsyncIterator[list[Upstream]]:
            # A real round trip before the first answer, as a registry takes.
            async with httpx.AsyncClient() as client:
                await client.get(a.url + "/registry")
            yield [Upstream(a.url)]
            await asyncio.Event().wait()

    async with InProcessProxy(Pool(discovery=SlowSource())) as proxy:
        # No waiting here: the lifespan's startup only completed once members arrived.
        assert await proxy.who(1) == ["a"]


async def test_a_registry_down_at_startup_does_not_stop_the_app(
    upstreams: list[RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    a = upstreams[0]
    source = QueueDiscovery(startup_timeout=0.2)
    source.fail("registry unreachable: connection refused")
    with caplog.at_level(logging.WARNING, logger="rr_middleware"):
        async with InProcessProxy(Pool(discovery=source)) as proxy:
            assert (await proxy.http.get("/")).text == "host"
            assert (await proxy.http.get("/api/x")).status_code == 503
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1
            assert "pool /api: no upstreams from the test's queue within 0.2s" in errors[0]
            assert "registry unreachable" in errors[0]
            assert "answers 503" in errors[0]
            messages = [r.getMessage() for r in caplog.records]
            failures = [m for m in messages if "failed (registry unreachable" in m]
            assert failures, "the watcher logs the failure"
            # Nothing was ever listed: there is nothing to keep.
            assert all("no upstreams yet (the pool answers 503)" in m for m in failures)
            assert "keeping the upstreams" not in caplog.text
            source.put(a.url)  # the watcher kept retrying; the registry is back
            await settled(lambda: proxy.members() == [a.url])
            assert await proxy.who(1) == ["a"]


async def test_a_failing_registry_keeps_the_last_good_members(
    upstreams: list[RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = upstreams
    source = QueueDiscovery()
    source.put(a.url, b.url)
    with caplog.at_level(logging.WARNING, logger="rr_middleware"):
        async with InProcessProxy(Pool(discovery=source)) as proxy:
            source.started.clear()
            source.fail("consul answered 500: No cluster leader")
            await settled(lambda: source.watches == 2)  # failed, and watching again
            assert source.closed == 1
            assert proxy.members() == [a.url, b.url]
            assert sorted(await proxy.who(2)) == ["a", "b"]
            assert "keeping the upstreams it last returned" in caplog.text
            assert "No cluster leader" in caplog.text
            status = proxy.middleware.status()["pools"][0]["discovery"]
            assert "No cluster leader" in status["error"]
            source.put(c.url)
            await settled(lambda: proxy.members() == [c.url])
            assert proxy.middleware.status()["pools"][0]["discovery"]["error"] is None
            assert "answers again" in caplog.text


async def test_shutdown_stops_discovery_cleanly(upstreams: list[RunningServer]) -> None:
    source = QueueDiscovery()
    source.put(upstreams[0].url)
    with no_leaks() as leaks:
        async with InProcessProxy(Pool(discovery=source)) as proxy:
            await proxy.who(1)
            tasks = len(asyncio.all_tasks())
        assert len(asyncio.all_tasks()) < tasks
        assert source.closed == source.watches == 1
    assert leaks == []


async def test_without_a_lifespan_a_discovered_pool_is_empty() -> None:
    source = QueueDiscovery()
    middleware = RoundRobinMiddleware(plain_host_app(), pools={"/api": Pool(discovery=source)})
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
        assert (await http.get("/api/x")).status_code == 503
    assert source.watches == 0


async def test_two_middlewares_share_nothing_but_the_source_config(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    source = DNSDiscovery("localhost", port=a.port, family="ipv4", interval=0.05)
    async with InProcessProxy(Pool(discovery=source)) as first:
        async with InProcessProxy(Pool(discovery=source)) as second:
            assert await first.who(1) == await second.who(1) == ["a"]
        # The second one's shutdown closed its own watch and client, not the first's.
        updates = first.middleware.status()["pools"][0]["discovery"]["updates"]
        assert await first.who(1) == ["a"]
        assert first.middleware.status()["pools"][0]["discovery"]["error"] is None
        assert updates == 1


class SwallowsOneCancellation:
    """A source whose watch loses the first cancellation, as ``asyncio.wait_for`` does on
    Python 3.10 when it lands as the awaited call completes."""

    startup_timeout = 5.0
    retry_initial = 0.01
    retry_max = 0.01

    def describe(self) -> str:
        return "a source that swallows a cancellation"

    async def watch(self) -> AsyncIterator[list[Upstream]]:
        swallowed = False
        while True:
            yield [Upstream("http://a.internal")]
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True


async def test_stopping_ends_a_watch_that_lost_a_cancellation() -> None:
    """The pool's shutdown ends its discovery even when the source's watch lost the
    first cancellation (it hung the shutdown until the lifespan's timeout)."""
    watcher = Watcher("/api", SwallowsOneCancellation(), lambda upstreams: None)
    watcher.start()
    assert await watcher.wait_first(5)
    with anyio.fail_after(2):
        await watcher.stop()
    assert not watcher.running


# --------------------------------------------------------------------- with health rules


async def test_newcomers_are_checked_at_once_and_leavers_no_more(
    upstreams: list[RunningServer],
) -> None:
    a, b, _ = upstreams
    dead = dead_url()
    source = QueueDiscovery()
    source.put(a.url)
    check = HealthCheck(path="/health", interval=60, fall=1, rise=1, timeout=1)
    async with InProcessProxy(Pool(discovery=source, health_check=check)) as proxy:
        await settled(lambda: proxy.row(a.url)["last_check"] is not None)
        source.put(a.url, b.url, dead)
        await settled(lambda: len(proxy.members()) == 3)
        # An interval of 60 s: only checking newcomers on arrival finds the dead one now.
        await settled(lambda: proxy.row(dead)["healthy"] is False)
        assert proxy.row(b.url)["healthy"] is True
        assert sorted(await proxy.who(4)) == ["a", "a", "b", "b"]
        checks_of_a = sum(1 for r in a.app.requests if r["raw_path"] == "/health")
        source.put(b.url)
        await settled(lambda: proxy.members() == [b.url])
        assert proxy.pool.checker is not None
        await proxy.pool.checker.check_now()
        assert sum(1 for r in a.app.requests if r["raw_path"] == "/health") == checks_of_a


async def test_newcomers_ramp_up_with_slow_start(upstreams: list[RunningServer]) -> None:
    a, b, _ = upstreams
    now = [1000.0]
    source = QueueDiscovery()
    source.put(Upstream(a.url, weight=10))
    pool = Pool(discovery=source, slow_start=30, clock=lambda: now[0])
    async with InProcessProxy(pool) as proxy:
        assert proxy.row(a.url)["effective_weight"] == 10  # the first members: full weight
        source.put(Upstream(a.url, weight=10), Upstream(b.url, weight=10))
        await settled(lambda: len(proxy.members()) == 2)
        assert proxy.row(b.url)["effective_weight"] == 1
        now[0] += 30
        assert proxy.row(b.url)["effective_weight"] == 10


# ------------------------------------------------------------------------------- DNS


async def test_dns_discovery_through_the_system_resolver(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    pool = Pool(discovery=DNSDiscovery("localhost", port=a.port, family="ipv4"))
    async with InProcessProxy(pool) as proxy:
        assert proxy.members() == [f"http://127.0.0.1:{a.port}"]
        assert await proxy.who(1) == ["a"]


async def test_dns_name_that_does_not_exist_is_an_empty_pool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # .invalid never resolves (RFC 6761): an empty pool, not a failure, and said so.
    source = DNSDiscovery("no-such-backend.invalid", port=8000, startup_timeout=5)
    with caplog.at_level(logging.WARNING, logger="rr_middleware"):
        async with InProcessProxy(Pool(discovery=source)):
            pass
    assert (
        "pool /api: dns name 'no-such-backend.invalid' port 8000 lists no upstreams; "
        "answering 503 until some arrive" in caplog.text
    )
    async with InProcessProxy(Pool(discovery=source)) as proxy:
        assert proxy.members() == []
        status = proxy.middleware.status()["pools"][0]["discovery"]
        assert (status["error"], status["updates"]) == (None, 1)
        assert (await proxy.http.get("/api/x")).status_code == 503


# ------------------------------------------------------------------------ configuration


def test_a_pool_takes_upstreams_or_discovery() -> None:
    with pytest.raises(ValueError, match=r"upstreams or discovery=, not both"):
        Pool(["http://10.0.0.1"], discovery=DNSDiscovery("backend"))
    with pytest.raises(ValueError, match=r"at least one upstream \(or discovery=\)"):
        Pool()
    with pytest.raises(ValueError, match=r"discovery must be a ConsulDiscovery, a DNSDiscovery"):
        Pool(discovery="consul://users")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"service": ""}, "consul service name must be a non-empty string"),
        ({"address": "127.0.0.1:8500"}, r"consul address must be http\(s\)://host"),
        ({"wait": 0}, "consul wait must be > 0 and at most 600 seconds"),
        ({"wait": 601}, "consul wait must be > 0 and at most 600 seconds"),
        ({"tag": ""}, "consul tag must be a non-empty string"),
        ({"passing_only": "yes"}, "consul passing_only must be true or false"),
        ({"min_interval": -1}, "consul min_interval must be >= 0 seconds"),
        ({"address": "http://user:pw@consul:8500"}, "must not carry credentials; give token="),
    ],
)
def test_bad_consul_options_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConsulDiscovery(**{"service": "users", **options})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": ""}, "dns name must be a non-empty string"),
        ({"port": 0}, r"dns port must be 1..65535 \(or None for SRV\)"),
        ({"scheme": "ftp"}, "dns scheme must be 'http' or 'https'"),
        ({"family": "ipv5"}, "dns family must be 'any', 'ipv4' or 'ipv6'"),
        ({"interval": 0}, "dns interval must be > 0 seconds"),
        ({"nameservers": "10.0.0.2"}, "dns nameservers must be a list of addresses"),
        ({"nameservers": ["dns.example"]}, "must be an IP address"),
        ({"nameservers": ["10.0.0.2:0"]}, "has a bad port"),
    ],
)
def test_bad_dns_options_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DNSDiscovery(**{"name": "backend", **options})


def test_dns_nameservers_take_ports_and_ipv6() -> None:
    source = DNSDiscovery("backend", nameservers=["10.0.0.2", "127.0.0.1:8600", "[::1]:5353"])
    assert source.describe() == (
        "dns name 'backend' port 8000 via 10.0.0.2, 127.0.0.1:8600, [::1]:5353"
    )


def test_status_page_shows_an_empty_discovered_pool(
    chromium: str, upstreams: list[RunningServer], tmp_path: Path
) -> None:
    missing = Pool(discovery=DNSDiscovery("no-such-backend.invalid", port=8000))
    pools = {"/api": [upstreams[0].url], "/users": missing}
    with running_proxy(pools, status_path="/status") as (server, _):
        # The page's own script has rebuilt the table from the JSON by the time it is dumped.
        page = dump_dom(server.url + "/status", tmp_path / "profile", chromium)
    assert "no upstreams from dns name 'no-such-backend.invalid' port 8000" in page
    assert upstreams[0].url in page
