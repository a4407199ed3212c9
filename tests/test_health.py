"""Health: passive ejection with a half-open probe, active checks, panic mode, retries,
slow start, draining and the checker's life, driven through the middleware.

Every test runs on an injected clock (``ManualClock``) and a seeded ``random.Random``: windows,
ejections and slow start move when the test advances the clock, never with real time.
Upstreams are in-process ASGI apps (``Backend``) whose behaviour the test switches, or an
``httpx.MockTransport`` in front of one (``Door``) when a failure must happen at connect
level. ``balancer["/api"].snapshot()`` shows what the pool believes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.testclient import TestClient

from rr_middleware import (
    Balancer,
    HealthCheck,
    Pool,
    PoolRuntime,
    ResponseAborted,
    RoundRobinMiddleware,
    Upstream,
)
from rr_middleware.testing import ManualClock

WAIT = 5.0  # bound on every wait for something that must happen (it happens in ms)

pytestmark = pytest.mark.usefixtures("no_asyncio_errors")


# ------------------------------------------------------------------------------ helpers


class Backend:
    """An in-process upstream whose behaviour the test switches.

    Traffic is answered ``status`` with the backend's name as body and ``x-upstream``;
    ``mode="break"`` starts a response and raises (the connection drops mid-response);
    ``mode="raise"`` raises before responding (the in-process transport answers 500).
    After ``hold()`` traffic sets ``entered`` and waits for ``release``. Health checks
    (any path ending in ``/health``) are answered ``health_status``, or never
    (``health_hang``), or raise (``health_raise``); each calls ``on_check(count)``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = f"http://{name}.internal"
        self.status = 200
        self.mode = "answer"
        self.health_status = 200
        self.health_hang = False
        self.health_raise = False
        self.hits: list[tuple[str, str, bytes]] = []  # (method, path, body) of traffic
        self.checks: list[tuple[str, list[tuple[str, str]]]] = []  # (raw path, headers)
        self.on_check: Callable[[int], None] | None = None
        self.entered: asyncio.Event | None = None
        self.release: asyncio.Event | None = None

    def hold(self) -> tuple[asyncio.Event, asyncio.Event]:
        """From now on traffic waits: returns (entered, release)."""
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        return self.entered, self.release

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if scope["path"].endswith("/health"):
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            self.checks.append((scope["raw_path"].decode("latin-1"), headers))
            if self.on_check is not None:
                self.on_check(len(self.checks))
            if self.health_raise:
                raise RuntimeError("health endpoint bug (test)")
            if self.health_hang:
                await asyncio.Event().wait()  # never set: the check must time out
            extra = [(b"location", b"/elsewhere")] if 300 <= self.health_status < 400 else []
            await _respond(send, self.health_status, extra, b"health")
            return
        self.hits.append((scope["method"], scope["path"], body))
        if self.mode == "raise":
            raise RuntimeError("upstream bug (test)")
        if self.mode == "break":
            start = [(b"content-length", b"100")]
            await send({"type": "http.response.start", "status": 200, "headers": start})
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
            raise RuntimeError("upstream drops the connection mid-response (test)")
        if self.entered is not None and self.release is not None:
            self.entered.set()
            await self.release.wait()
        await _respond(send, self.status, [(b"x-upstream", self.name.encode())], self.name.encode())


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BrokenBody(httpx.AsyncByteStream):
    """A response body that breaks after its first chunk."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"x" * 10
        raise httpx.ReadError("connection reset mid-body (test)")


class Door:
    """An ``httpx.MockTransport`` handler in front of a Backend: it refuses connections
    (``mode="refuse"``), or takes the request (MockTransport reads the whole body first)
    and drops the connection without answering (``mode="drop"``), or times out waiting
    for the answer (``mode="timeout"``), or answers 200 with a body that breaks after
    10 of 100 bytes (``mode="midbody"``), or passes the request on (``mode="open"``)."""

    def __init__(self, backend: Backend, log: list[str] | None = None) -> None:
        self.backend = backend
        self.mode = "open"
        self.refused = 0
        self.dropped: list[tuple[str, bytes]] = []  # (method, body) of dropped requests
        self.log = log if log is not None else []  # every attempt, by backend name
        self._inner = httpx.ASGITransport(app=backend)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.log.append(self.backend.name)
        if self.mode == "refuse":
            self.refused += 1
            raise httpx.ConnectError("connection refused (test)", request=request)
        if self.mode == "drop":
            self.dropped.append((request.method, request.content))
            raise httpx.RemoteProtocolError("server disconnected (test)", request=request)
        if self.mode == "timeout":
            raise httpx.ReadTimeout("no answer (test)", request=request)
        if self.mode == "midbody":
            return httpx.Response(200, headers={"content-length": "100"}, stream=_BrokenBody())
        return await self._inner.handle_async_request(request)

    def upstream(self, weight: int = 1) -> Upstream:
        return Upstream(self.backend.url, weight=weight, transport=httpx.MockTransport(self))


class Unreachable(httpx.AsyncBaseTransport):
    """Refuses every connection without touching the request body, as a real refused
    connect does (MockTransport would read the whole body before its handler runs)."""

    def __init__(self) -> None:
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.refused += 1
        raise httpx.ConnectError("connection refused (test)", request=request)


def inproc(backend: Backend, weight: int = 1) -> Upstream:
    return Upstream(backend.url, weight=weight, app=backend)


def make_pool(members: list[Upstream], clock: ManualClock, **options: Any) -> Pool:
    return Pool(members, clock=clock, random=random.Random(0), **options)


def proxy(pool: Pool) -> RoundRobinMiddleware:
    return RoundRobinMiddleware(Starlette(), pools={"/api": pool})


def row(runtime: PoolRuntime, backend: Backend) -> dict[str, Any]:
    (found,) = [r for r in runtime.snapshot() if r["url"] == backend.url]
    return found


def served(client: TestClient, count: int, path: str = "/api/x") -> list[str]:
    return [client.get(path).headers.get("x-upstream", "-") for _ in range(count)]


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")


async def aserved(client: httpx.AsyncClient, count: int, path: str = "/api/x") -> list[str]:
    return [(await client.get(path)).headers.get("x-upstream", "-") for _ in range(count)]


async def check(runtime: PoolRuntime, times: int = 1) -> None:
    assert runtime.checker is not None
    for _ in range(times):
        await runtime.checker.check_now()


def messages(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


@pytest.fixture(autouse=True)
def _middleware_log_from_info(caplog: pytest.LogCaptureFixture) -> None:
    """The middleware's log is captured from INFO (its state changes), for the tests that
    read it."""
    caplog.set_level(logging.INFO, logger="rr_middleware")


# ------------------------------------------------------------------ passive ejection


@pytest.mark.parametrize(
    "kind", ["status 503", "broken response", "connect refused", "read timeout"]
)
def test_max_fails_failures_within_fail_timeout_eject_for_fail_timeout(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    at_connect = kind in ("connect refused", "read timeout")
    pool = make_pool([door.upstream() if at_connect else inproc(a), inproc(b)], clock)

    def failures_on_a() -> int:
        return len(door.log) if at_connect else len(a.hits)

    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        if kind == "status 503":
            a.status = 503
        elif kind == "broken response":
            a.mode = "break"
        elif kind == "connect refused":
            door.mode = "refuse"
        else:
            door.mode = "timeout"

        def fail_a_until(count: int) -> list[httpx.Response]:
            responses = []
            while failures_on_a() < count:
                responses.append(client.get("/api/x"))
                assert len(responses) < 10
            return responses

        responses = fail_a_until(2)
        assert row(api, a)["ejected"] is False
        assert row(api, a)["eligible"] is True
        assert row(api, a)["failures"] == 2
        clock.advance(5)  # still inside the window opened by the first failure
        responses += fail_a_until(3)
        snap = row(api, a)
        assert snap["ejected"] is True
        assert snap["eligible"] is False
        assert snap["ejected_until"] == clock.now + 10.0
        assert row(api, b)["eligible"] is True

        # What the client saw: a's own 503s; a broken response or a refused connection of
        # a GET retried on b; a 504 for each read timeout (never retried).
        statuses = sorted({r.status_code for r in responses})
        expected = {"status 503": [200, 503], "read timeout": [200, 504]}.get(kind, [200])
        assert statuses == expected

        # Out for fail_timeout: everything goes to b, a sees nothing.
        assert served(client, 10) == ["b"] * 10
        clock.advance(9.999)
        assert served(client, 5) == ["b"] * 5
        assert failures_on_a() == 3
    assert len(messages(caplog, "ejected")) == 1


def test_failures_spread_over_more_than_fail_timeout_do_not_eject() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.status = 503
        for failure in range(1, 7):  # one failure every 6 s: never 3 in one 10 s window
            while len(a.hits) < failure:
                client.get("/api/x")
            assert row(api, a)["ejected"] is False, failure
            clock.advance(6)
        assert row(api, a)["failures"] == 6
        a.status = 200
        assert served(client, 4).count("a") == 2
        # Three failures within a few seconds do eject.
        a.status = 503
        clock.advance(30)
        for failure in range(len(a.hits) + 1, len(a.hits) + 4):
            while len(a.hits) < failure:
                client.get("/api/x")
            clock.advance(1)
        assert row(api, a)["ejected"] is True


@pytest.mark.parametrize("status", [400, 401, 404, 409, 429, 500])
def test_client_errors_and_statuses_outside_unhealthy_statuses_never_count(status: int) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.status = status
        responses = [client.get("/api/x") for _ in range(20)]
        assert [r.status_code for r in responses].count(status) == 10
        snap = row(api, a)
        assert (snap["ejected"], snap["failures"], snap["requests"]) == (False, 0, 10)
        assert served(client, 4).count("a") == 2


def test_an_upstream_that_raises_counts_when_500_is_an_unhealthy_status() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, unhealthy_statuses={500, 502, 503, 504})
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.mode = "raise"  # the in-process transport answers 500, as a server would
        statuses = [client.get("/api/x").status_code for _ in range(6)]
        assert statuses == [500, 200, 500, 200, 500, 200]
        assert row(api, a)["ejected"] is True
        assert served(client, 4) == ["b"] * 4


@pytest.mark.anyio
async def test_after_fail_timeout_exactly_one_request_probes_and_success_brings_it_back() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    async with LifespanManager(mw) as manager, client_for(manager.app) as client:
        a.status = 503
        while len(a.hits) < 3:
            await client.get("/api/x")
        assert row(api, a)["ejected"] is True

        a.status = 200
        entered, release = a.hold()
        clock.advance(10)
        probe: list[httpx.Response] = []

        async def send_probe() -> None:
            probe.append(await client.get("/api/probe"))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_probe)
                await entered.wait()
                # The probe is in flight: a is half-open, and nobody else goes there.
                snap = row(api, a)
                assert (snap["ejected"], snap["half_open"], snap["eligible"]) == (
                    False,
                    True,
                    False,
                )
                assert snap["in_flight"] == 1
                assert await aserved(client, 6) == ["b"] * 6
                release.set()
        assert probe[0].status_code == 200
        assert probe[0].headers["x-upstream"] == "a"
        assert [path for _, path, _ in a.hits].count("/probe") == 1

        snap = row(api, a)
        assert (snap["ejected"], snap["half_open"], snap["eligible"]) == (False, False, True)
        names = await aserved(client, 6)
        assert names.count("a") == names.count("b") == 3


def test_a_failed_probe_ejects_again_for_fail_timeout(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.status = 503
        while len(a.hits) < 3:
            client.get("/api/x")
        clock.advance(10)
        names = served(client, 6)
        assert names.count("a") == 1  # the one probe, answered 503 again
        snap = row(api, a)
        assert (snap["ejected"], snap["half_open"]) == (True, False)
        assert snap["ejected_until"] == clock.now + 10.0
        assert len(a.hits) == 4

        clock.advance(9.9)
        assert served(client, 6) == ["b"] * 6
        a.status = 200
        clock.advance(0.1)
        names = served(client, 6)
        assert names.count("a") >= 2  # probed, recovered, back in rotation
        assert row(api, a)["ejected"] is False
    assert len(messages(caplog, "ejected")) == 2
    assert len(messages(caplog, "recovered")) == 1


@pytest.mark.anyio
async def test_a_probe_whose_client_left_does_not_keep_the_upstream_out_forever() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    async with LifespanManager(mw) as manager, client_for(manager.app) as client:
        a.status = 503
        while len(a.hits) < 3:
            await client.get("/api/x")
        a.status = 200
        entered, _ = a.hold()
        clock.advance(10)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.get, "/api/probe")
                await entered.wait()
                tg.cancel_scope.cancel()  # the client gives up: the probe never reports
        a.entered = a.release = None
        assert await aserved(client, 4) == ["b"] * 4
        # However long the probe was allowed to take, it is over now: a may be probed again.
        clock.advance(3600)
        names = await aserved(client, 6)
        assert "a" in names, (names, row(api, a))
        assert row(api, a)["half_open"] is False


@pytest.mark.parametrize("kind", ["status 503", "connect refused"])
def test_a_pool_of_one_is_never_ejected(kind: str) -> None:
    clock = ManualClock()
    a = Backend("a")
    door = Door(a)
    pool = make_pool([door.upstream() if kind == "connect refused" else inproc(a)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        if kind == "status 503":
            a.status = 503
        else:
            door.mode = "refuse"
        statuses = [client.get("/api/x").status_code for _ in range(10)]
        assert statuses == [503 if kind == "status 503" else 502] * 10
        snap = row(api, a)
        assert (snap["ejected"], snap["eligible"], snap["failures"]) == (False, True, 10)
        assert (len(a.hits) if kind == "status 503" else door.refused) == 10


def test_max_fails_zero_turns_passive_ejection_off() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, max_fails=0)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.status = 503
        assert [client.get("/api/x").status_code for _ in range(20)].count(503) == 10
        snap = row(api, a)
        assert (snap["ejected"], snap["eligible"], snap["failures"]) == (False, True, 10)


def test_a_response_that_breaks_mid_body_counts_as_one_failed_request() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    pool = make_pool([door.upstream(), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        door.mode = "midbody"
        with pytest.raises(ResponseAborted):
            client.get("/api/x")
        snap = row(api, a)
        assert (snap["requests"], snap["failures"]) == (1, 1)


def test_a_probe_whose_response_breaks_mid_body_ejects_again() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    pool = make_pool([door.upstream(), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.status = 503
        while len(a.hits) < 3:
            client.get("/api/x")
        assert row(api, a)["ejected"] is True
        clock.advance(10)
        door.mode = "midbody"
        attempts, aborted = len(door.log), False
        while len(door.log) == attempts:  # until the probe reaches a
            try:
                client.get("/api/x")
            except ResponseAborted:
                aborted = True
        assert aborted
        assert len(door.log) == attempts + 1
        snap = row(api, a)
        assert (snap["ejected"], snap["eligible"]) == (True, False)
        assert snap["ejected_until"] == clock.now + 10.0


# ---------------------------------------------------------------------- active checks


@pytest.mark.anyio
async def test_down_after_fall_consecutive_failed_checks_up_after_rise_passes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=HealthCheck(rise=2, fall=3))
    mw = proxy(pool)
    api = mw.balancer["/api"]
    async with client_for(mw) as client:
        a.health_status = 500
        await check(api, 2)
        a.health_status = 200
        await check(api)  # a pass in between: the failures must be consecutive
        a.health_status = 500
        await check(api, 2)
        snap = row(api, a)
        assert (snap["healthy"], snap["eligible"]) == (True, True)
        assert snap["last_check"]["ok"] is False
        assert snap["last_check"]["status"] == 500
        assert snap["last_check"]["error"] == "status 500"
        assert snap["last_check"]["at"] == clock.now
        assert (await aserved(client, 4)).count("a") == 2

        clock.advance(1)
        await check(api)  # the third consecutive failure
        snap = row(api, a)
        assert (snap["healthy"], snap["eligible"], snap["ejected"]) == (False, False, False)
        assert await aserved(client, 6) == ["b"] * 6
        assert row(api, b)["healthy"] is True

        a.health_status = 200
        await check(api)
        assert row(api, a)["healthy"] is False  # one pass is not enough with rise=2
        assert await aserved(client, 4) == ["b"] * 4
        await check(api)
        snap = row(api, a)
        assert (snap["healthy"], snap["eligible"]) == (True, True)
        assert snap["last_check"]["ok"] is True
        assert (await aserved(client, 4)).count("a") == 2
    assert len(messages(caplog, "is DOWN")) == 1
    assert len(messages(caplog, "is UP")) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("fall", [1, 2])
async def test_upstreams_start_healthy_and_the_first_check_counts(fall: int) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=HealthCheck(rise=1, fall=fall))
    mw = proxy(pool)
    api = mw.balancer["/api"]
    assert [r["healthy"] for r in api.snapshot()] == [True, True]
    assert [r["last_check"] for r in api.snapshot()] == [None, None]
    a.health_status = 503
    await check(api, fall - 1)
    assert row(api, a)["healthy"] is True
    await check(api)
    assert row(api, a)["healthy"] is False
    a.health_status = 200
    await check(api)  # rise=1: the first pass brings it back
    assert row(api, a)["healthy"] is True


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "expect", "passes"),
    [
        (200, range(200, 400), True),
        (204, range(200, 400), True),
        (302, range(200, 400), True),
        (399, range(200, 400), True),
        (400, range(200, 400), False),
        (404, range(200, 400), False),
        (500, range(200, 400), False),
        (503, range(200, 400), False),
        (200, {204}, False),
        (204, {204}, True),
    ],
)
async def test_check_status_must_be_in_expect(status: int, expect: Any, passes: bool) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    health = HealthCheck(rise=1, fall=1, expect=expect)
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=health)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    a.health_status = status
    b.health_status = 204  # passes either way: b keeps the pool out of panic mode
    await check(api)
    snap = row(api, a)
    assert snap["healthy"] is passes
    assert snap["last_check"]["ok"] is passes
    assert snap["last_check"]["status"] == status
    async with client_for(mw) as client:
        assert ("a" in await aserved(client, 4)) is passes


@pytest.mark.anyio
async def test_checks_carry_host_and_user_agent_but_never_client_credentials() -> None:
    clock = ManualClock()
    a = Backend("a")
    b = Backend("b")
    pool = make_pool(
        [Upstream("http://a.internal:8080/v1", app=a), inproc(b)],
        clock,
        health_check=HealthCheck(path="/health?full=1"),
    )
    mw = proxy(pool)
    api = mw.balancer["/api"]
    async with client_for(mw) as client:
        for _ in range(2):
            response = await client.get(
                "/api/x",
                headers={"Cookie": "session=s3cret", "Authorization": "Bearer t0k3n"},
            )
            assert response.status_code == 200
    await check(api)
    assert len(a.checks) == len(b.checks) == 1
    path, headers = a.checks[0]
    assert path == "/v1/health"
    names = [name.lower() for name, _ in headers]
    values = {name.lower(): value for name, value in headers}
    assert values["host"] == "a.internal:8080"  # the upstream's own Host, as traffic has
    assert names.count("host") == 1
    assert "rr-middleware" in values["user-agent"]
    assert "cookie" not in names
    assert "authorization" not in names
    assert not any(name.startswith("x-forwarded") for name in names)
    assert dict(b.checks[0][1])["host"] == "b.internal"


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["timeout", "connect refused", "raises"])
async def test_a_check_that_times_out_or_fails_to_connect_fails(failure: str) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    health = HealthCheck(timeout=0.05, rise=1, fall=1)
    first = door.upstream() if failure == "connect refused" else inproc(a)
    pool = make_pool([first, inproc(b)], clock, health_check=health)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    if failure == "timeout":
        a.health_hang = True
    elif failure == "connect refused":
        door.mode = "refuse"
    else:
        a.health_raise = True
    with anyio.fail_after(WAIT):
        await check(api)
    snap = row(api, a)
    assert snap["healthy"] is False
    last = snap["last_check"]
    assert last["ok"] is False
    if failure == "timeout":
        assert (last["status"], last["error"]) == (0, "timeout: no answer within 0.05s")
        assert last["latency"] >= 0.04
    elif failure == "connect refused":
        assert last["status"] == 0
        assert last["error"].startswith("connect")
    else:
        assert last["status"] == 500  # the in-process transport answers a raising app 500
    assert row(api, b)["healthy"] is True
    assert row(api, b)["last_check"]["ok"] is True


# --------------------------------------------------------------- active and passive


@pytest.mark.anyio
async def test_traffic_only_when_neither_active_nor_passive_says_down() -> None:
    clock = ManualClock()
    a, b, c = Backend("a"), Backend("b"), Backend("c")
    health = HealthCheck(rise=1, fall=1)
    pool = make_pool([inproc(a), inproc(b), inproc(c)], clock, health_check=health, max_fails=1)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    async with client_for(mw) as client:
        # Passive says down, active says up: no traffic.
        a.status = 503
        while len(a.hits) < 1:
            await client.get("/api/x")
        a.status = 200
        await check(api)
        snap = row(api, a)
        assert (snap["healthy"], snap["ejected"], snap["eligible"]) == (True, True, False)
        assert "a" not in await aserved(client, 6)

        # The ejection ends but active now says down: still no traffic.
        a.health_status = 500
        await check(api)
        clock.advance(10)
        assert "a" not in await aserved(client, 6)
        assert row(api, a)["eligible"] is False

        # Both say up: traffic again.
        a.health_status = 200
        await check(api)
        names = await aserved(client, 9)
        assert names.count("a") >= 2, names
        snap = row(api, a)
        assert (snap["healthy"], snap["ejected"], snap["eligible"]) == (True, False, True)

        # Active up, a fresh passive ejection: out again.
        a.status = 503
        hits = len(a.hits)
        while len(a.hits) == hits:
            await client.get("/api/x")
        assert row(api, a)["ejected"] is True
        assert "a" not in await aserved(client, 6)


# ------------------------------------------------------------------------ on_all_down


@pytest.mark.anyio
async def test_try_all_routes_round_robin_across_all_when_every_check_fails() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=HealthCheck(rise=1, fall=1))
    mw = proxy(pool)
    api = mw.balancer["/api"]
    a.health_status = b.health_status = 500
    await check(api)
    assert [r["healthy"] for r in api.snapshot()] == [False, False]
    async with client_for(mw) as client:
        names = await aserved(client, 6)
    assert names in (["a", "b"] * 3, ["b", "a"] * 3)


def test_try_all_routes_across_all_when_every_upstream_is_ejected() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, max_fails=1)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        a.status = b.status = 503
        assert [client.get("/api/x").status_code for _ in range(2)] == [503, 503]
        assert [r["ejected"] for r in api.snapshot()] == [True, True]
        a.status = b.status = 200
        names = served(client, 6)
    assert names.count("a") == names.count("b") == 3


@pytest.mark.anyio
async def test_fail_answers_503_with_retry_after_when_every_check_fails() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    health = HealthCheck(rise=1, fall=1, interval=10.0)
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=health, on_all_down="fail")
    mw = proxy(pool)
    api = mw.balancer["/api"]
    a.health_status = b.health_status = 500
    await check(api)
    async with client_for(mw) as client:
        response = await client.get("/api/x")
        assert response.status_code == 503
        assert response.text == "503 Service Unavailable\n"
        assert response.headers["content-type"].startswith("text/plain")
        assert "x-upstream" not in response.headers
        retry_after = response.headers["retry-after"]
        assert retry_after.isdigit()
        assert 1 <= int(retry_after) <= 10
        assert (a.hits, b.hits) == ([], [])

        b.health_status = 200
        await check(api)
        assert await aserved(client, 3) == ["b"] * 3


def test_fail_answers_503_with_retry_after_when_every_upstream_is_ejected() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, max_fails=1, on_all_down="fail")
    with TestClient(proxy(pool)) as client:
        a.status = b.status = 503
        assert [client.get("/api/x").text for _ in range(2)] == ["a", "b"]  # their own 503s
        response = client.get("/api/x")
        assert response.status_code == 503
        assert response.text == "503 Service Unavailable\n"
        assert response.headers["retry-after"] == "10"
        clock.advance(3.5)
        assert client.get("/api/x").headers["retry-after"] == "7"  # ceil(6.5)
        clock.advance(6.4)
        assert client.get("/api/x").headers["retry-after"] == "1"  # never 0
        assert (len(a.hits), len(b.hits)) == (1, 1)
        a.status = b.status = 200
        clock.advance(0.1)
        assert client.get("/api/x").status_code == 200  # the half-open probe


# ---------------------------------------------------------------------------- retries


def test_a_get_is_retried_on_the_next_upstream_when_the_first_refuses() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    pool = make_pool([door.upstream(), inproc(b)], clock)
    with TestClient(proxy(pool)) as client:
        door.mode = "refuse"
        responses = [client.get("/api/x") for _ in range(6)]
    assert [(r.status_code, r.text) for r in responses] == [(200, "b")] * 6
    assert door.refused == 3  # then a was ejected
    assert len(b.hits) == 6


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("how", ["dropped after reading the body", "broken response"])
def test_a_non_idempotent_request_is_not_retried_once_sent(method: str, how: str) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    first = door.upstream() if how == "dropped after reading the body" else inproc(a)
    pool = make_pool([first, inproc(b)], clock)
    with TestClient(proxy(pool)) as client:
        door.mode = "drop"
        a.mode = "break"
        response = client.request(method, "/api/x", content=b"charge the card once")
    assert response.status_code == 502
    assert response.text == "502 Bad Gateway\n"
    if how == "dropped after reading the body":
        assert door.dropped == [(method, b"charge the card once")]
    else:
        assert a.hits == [(method, "/x", b"charge the card once")]
    assert b.hits == []


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_non_idempotent_request_is_retried_when_nothing_was_sent(method: str) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    pool = make_pool([door.upstream(), inproc(b)], clock)
    with TestClient(proxy(pool)) as client:
        door.mode = "refuse"
        response = client.request(method, "/api/x", content=b"payload")
    assert (response.status_code, response.text) == (200, "b")
    assert door.refused == 1
    assert b.hits == [(method, "/x", b"payload")]


@pytest.mark.parametrize("how", ["dropped after reading the body", "broken response"])
def test_retry_non_idempotent_retries_a_post_after_it_was_sent(how: str) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    first = door.upstream() if how == "dropped after reading the body" else inproc(a)
    pool = make_pool([first, inproc(b)], clock, retry_non_idempotent=True)
    with TestClient(proxy(pool)) as client:
        door.mode = "drop"
        a.mode = "break"
        response = client.post("/api/x", content=b"payload")
    assert (response.status_code, response.text) == (200, "b")
    assert b.hits == [("POST", "/x", b"payload")]


def test_retry_on_statuses_moves_a_get_to_the_next_upstream() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, retry_on_statuses={503})
    with TestClient(proxy(pool)) as client:
        a.status = 503
        response = client.get("/api/x")
        assert (response.status_code, response.text) == (200, "b")
        assert (len(a.hits), len(b.hits)) == (1, 1)
        # A POST answered 503 is not retried without retry_non_idempotent. It goes to b:
        # the retry took no turn of the round robin, and b's came next.
        b.status = 503
        posted = client.post("/api/x", content=b"p")
        assert (posted.status_code, posted.text) == (503, "b")
        assert [m for m, _, _ in a.hits] == ["GET"]
    # Statuses not listed are passed on.
    pool = make_pool([inproc(a), inproc(b)], ManualClock(), retry_on_statuses={503})
    with TestClient(proxy(pool)) as client:
        a.status = 502
        assert client.get("/api/x").status_code == 502


def test_retry_on_statuses_tries_each_upstream_once_then_passes_the_last_answer() -> None:
    clock = ManualClock()
    backends = [Backend(n) for n in "abc"]
    pool = make_pool(
        [inproc(x) for x in backends], clock, retry_on_statuses={503}, retries=5, max_fails=0
    )
    with TestClient(proxy(pool)) as client:
        for x in backends:
            x.status = 503
        response = client.get("/api/x")
    assert response.status_code == 503
    assert response.text in ("a", "b", "c")
    assert [len(x.hits) for x in backends] == [1, 1, 1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "chunks", "retried"),
    [
        ("sent, over the limit", [b"x" * 10] * 3, False),
        ("sent, under the limit", [b"x" * 5] * 2, True),
        ("refused, over the limit", [b"x" * 10] * 3, True),
    ],
)
async def test_a_streamed_body_over_retry_body_limit_is_not_retried_once_sent(
    case: str, chunks: list[bytes], retried: bool
) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    door = Door(a)
    door.mode = "drop"
    unreachable = Unreachable()
    if case.startswith("refused"):
        first = Upstream(a.url, transport=unreachable)
    else:
        first = door.upstream()
    pool = make_pool([first, inproc(b)], clock, retry_body_limit=16)
    mw = proxy(pool)

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    with anyio.fail_after(WAIT):
        async with client_for(mw) as client:
            # PUT is idempotent: only the body's size (and whether it was sent) decides.
            response = await client.put("/api/x", content=body())
    whole = b"".join(chunks)
    if retried:
        assert (response.status_code, response.text) == (200, "b")
        assert b.hits == [("PUT", "/x", whole)]
    else:
        assert response.status_code == 502
        assert b.hits == []
    if case.startswith("refused"):
        assert unreachable.refused == 1
    else:
        assert door.dropped == [("PUT", whole)]


@pytest.mark.parametrize("policy", ["round_robin", "least_requests", "random"])
@pytest.mark.parametrize("weights", [(1, 1, 1), (5, 1, 1)])
def test_an_upstream_already_tried_is_never_tried_again_for_one_request(
    policy: str, weights: tuple[int, ...]
) -> None:
    clock = ManualClock()
    log: list[str] = []
    doors = [Door(Backend(name), log) for name in "abc"]
    members = [door.upstream(weight) for door, weight in zip(doors, weights, strict=True)]
    pool = make_pool(members, clock, policy=policy, retries=5, max_fails=0)
    with TestClient(proxy(pool)) as client:
        for door in doors:
            door.mode = "refuse"
        for _ in range(12):
            log.clear()
            assert client.get("/api/x").status_code == 502
            assert sorted(log) == ["a", "b", "c"]  # each once: at most pool size attempts
    assert [door.refused for door in doors] == [12, 12, 12]


def test_retries_cap_the_attempts() -> None:
    clock = ManualClock()
    log: list[str] = []
    doors = [Door(Backend(name), log) for name in "abcd"]
    pool = make_pool([door.upstream() for door in doors], clock, retries=2, max_fails=0)
    with TestClient(proxy(pool)) as client:
        for door in doors:
            door.mode = "refuse"
        for _ in range(4):
            log.clear()
            assert client.get("/api/x").status_code == 502
            assert len(log) == len(set(log)) == 3


# ------------------------------------------------------------------------- slow start


def test_slow_start_ramps_an_upstream_back_after_a_half_open_recovery() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock, slow_start=10, max_fails=1)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        assert row(api, a)["effective_weight"] == 1.0  # no ramp for a fresh start
        a.status = 503
        while len(a.hits) < 1:
            client.get("/api/x")
        a.status = 200
        clock.advance(10)
        hits = len(a.hits)
        while len(a.hits) == hits:  # the half-open probe
            client.get("/api/x")
        recovered = clock.now
        snap = row(api, a)
        assert (snap["ejected"], snap["half_open"], snap["eligible"]) == (False, False, True)
        assert snap["effective_weight"] == pytest.approx(0.1)
        assert row(api, b)["effective_weight"] == 1.0

        clock.advance(1)
        names = served(client, 100)
        assert 1 <= names.count("a") <= 20, names.count("a")

        previous = 0.1
        for elapsed in (2, 3, 5, 7, 9, 9.99, 10, 11, 30):
            clock.set(recovered + elapsed)
            weight = row(api, a)["effective_weight"]
            assert weight >= previous, elapsed
            assert abs(weight - min(1.0, 0.1 + 0.9 * elapsed / 10)) <= 0.1 + 1e-9, elapsed
            previous = weight
        assert row(api, a)["effective_weight"] == 1.0
        names = served(client, 100)
        assert names.count("a") == 50


@pytest.mark.anyio
async def test_slow_start_ramps_an_upstream_back_after_its_check_comes_up() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    health = HealthCheck(rise=1, fall=1)
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=health, slow_start=10)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    a.health_status = 500
    await check(api)
    clock.advance(30)
    a.health_status = 200
    await check(api)
    assert row(api, a)["effective_weight"] == pytest.approx(0.1)
    async with client_for(mw) as client:
        clock.advance(1)
        assert (await aserved(client, 100)).count("a") <= 20
        clock.advance(4)
        assert row(api, a)["effective_weight"] == pytest.approx(0.5)
        clock.advance(5)
        assert row(api, a)["effective_weight"] == 1.0
        assert (await aserved(client, 100)).count("a") == 50


# ------------------------------------------------------------------------------ drain


def test_drain_stops_new_requests_and_undrain_restores(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        api.drain(a.url)
        snap = row(api, a)
        assert (snap["drained"], snap["eligible"]) == (True, False)
        assert served(client, 6) == ["b"] * 6
        assert a.hits == []
        api.undrain(a.url)
        assert (row(api, a)["drained"], row(api, a)["eligible"]) == (False, True)
        assert served(client, 6).count("a") == 3
    assert len(messages(caplog, "drained")) == 1


@pytest.mark.anyio
async def test_drain_lets_requests_in_flight_finish() -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], clock)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    entered, release = a.hold()
    in_flight: list[httpx.Response] = []
    async with LifespanManager(mw) as manager, client_for(manager.app) as client:

        async def slow_request() -> None:
            in_flight.append(await client.get("/api/slow"))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_request)
                await entered.wait()
                api.drain(a.url)
                assert row(api, a)["in_flight"] == 1
                assert await aserved(client, 4) == ["b"] * 4
                release.set()
        assert (in_flight[0].status_code, in_flight[0].text) == (200, "a")
        assert row(api, a)["in_flight"] == 0
        assert await aserved(client, 4) == ["b"] * 4
        api.undrain(a.url)
        assert (await aserved(client, 4)).count("a") == 2


def test_drain_of_an_unknown_url_is_a_value_error() -> None:
    pool = make_pool([inproc(Backend("a")), inproc(Backend("b"))], ManualClock())
    api = proxy(pool).balancer["/api"]
    with pytest.raises(ValueError, match="no upstream"):
        api.drain("http://nope.internal")
    with pytest.raises(ValueError, match="no upstream"):
        api.undrain("http://nope.internal")


def test_a_pool_is_a_value_that_any_number_of_apps_serve_apart() -> None:
    """A Pool only describes: two apps built with the same one each run it on their own
    (draining an upstream in one leaves the other alone), and it cannot be changed."""
    a, b = Backend("a"), Backend("b")
    pool = make_pool([inproc(a), inproc(b)], ManualClock())
    first, second = proxy(pool), proxy(pool)
    first.balancer["/api"].drain(a.url)
    assert row(first.balancer["/api"], a)["drained"] is True
    assert row(second.balancer["/api"], a)["drained"] is False
    with TestClient(second) as client:
        assert sorted(served(client, 4)) == ["a", "a", "b", "b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.timeout = 1.0  # type: ignore[misc]


def test_a_balancer_serves_one_middleware() -> None:
    balancer = Balancer({"/api": make_pool([inproc(Backend("a"))], ManualClock())})
    RoundRobinMiddleware(Starlette(), balancer=balancer)
    with pytest.raises(ValueError, match="already serves another"):
        RoundRobinMiddleware(Starlette(), balancer=balancer)
    with pytest.raises(ValueError, match="not to the middleware too"):
        RoundRobinMiddleware(Starlette(), pools={"/x": ["http://a"]}, balancer=balancer)


# ------------------------------------------------------------------ the checker's life
#
# Under TestClient the lifespan's event loop ends with the ``with`` block, so "no checks
# after shutdown" is only telling under LifespanManager, where the loop keeps running.


def destroyed_tasks(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    return [r.getMessage() for r in caplog.records if "Task was destroyed" in r.getMessage()]


def test_checks_run_under_the_test_client_lifespan_and_stop_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    a, b = Backend("a"), Backend("b")
    enough = threading.Event()
    late = threading.Event()
    stopped = False

    def on_check(count: int) -> None:
        if count >= 3:
            enough.set()
        if stopped:
            late.set()

    a.on_check = on_check
    health = HealthCheck(interval=0.05, timeout=1.0)
    pool = make_pool([inproc(a), inproc(b)], clock, health_check=health)
    mw = proxy(pool)
    api = mw.balancer["/api"]
    with TestClient(mw) as client:
        assert enough.wait(WAIT), len(a.checks)
        assert len(b.checks) >= 2
        assert row(api, a)["last_check"]["at"] == clock.now
        assert client.get("/api/x").status_code == 200
    stopped = True
    count = len(a.checks)
    assert not late.wait(0.25)
    assert len(a.checks) == count
    assert destroyed_tasks(caplog) == []


@pytest.mark.anyio
async def test_checks_run_while_the_lifespan_runs_and_none_arrive_after_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    a = Backend("a")
    enough = asyncio.Event()
    late = asyncio.Event()
    stopped = False

    def on_check(count: int) -> None:
        if count >= 3:
            enough.set()
        if stopped:
            late.set()

    a.on_check = on_check
    pool = make_pool([inproc(a)], clock, health_check=HealthCheck(interval=0.05, timeout=1.0))
    mw = proxy(pool)
    assert a.checks == []  # nothing before the lifespan
    for _round in range(2):  # a second lifespan starts the checker again
        enough.clear()
        a.checks.clear()
        async with LifespanManager(mw):
            with anyio.fail_after(WAIT):
                await enough.wait()
        stopped = True
        count = len(a.checks)
        with anyio.move_on_after(0.25):  # the loop keeps running: a leaked checker would show
            await late.wait()
        assert not late.is_set()
        assert len(a.checks) == count
        stopped = False
    assert destroyed_tasks(caplog) == []
