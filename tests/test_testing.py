"""The testing kit (``rr_middleware.testing``): every behaviour of ``FakeUpstream`` in both
modes, in-process and on a socket, seen through the middleware as a user's test sees it;
the clock, the discovery source, the waits."""

from __future__ import annotations

import asyncio
import doctest
import importlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from rr_middleware import Balancer, HealthCheck, Pool, ResponseAborted, RoundRobinMiddleware
from rr_middleware.testing import (
    FakeDiscovery,
    FakeUpstream,
    ManualClock,
    RawConnection,
    RawUpstream,
    RrTestClient,
    WaitTimeout,
    rr_test_client,
    settled,
    wait_until,
)
from rr_middleware.testing.raw import answer_once

MODES = ["in-process", "socket"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fakes(mode: str) -> Iterator[list[FakeUpstream]]:
    """Two fakes, a and b, in the mode under test."""
    a, b = FakeUpstream("a"), FakeUpstream("b")
    if mode == "in-process":
        yield [a, b]
    else:
        with a.serve(), b.serve():
            yield [a, b]


def client(*fakes: FakeUpstream, **options: Any) -> Any:
    return rr_test_client({"/api": Pool([f.upstream() for f in fakes], **options)})


def in_background(function: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``function`` on a thread; its result lands in the dict under "result"."""
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        out["result"] = function()
        out["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# ------------------------------------------------------------------------ answering


def test_it_echoes_what_it_received_and_records_it(fakes: list[FakeUpstream]) -> None:
    a, b = fakes
    with client(a, b) as http:
        first = http.post("/api/items/%7E1?page=2&x=%20", content=b"hello", headers={"x-t": "1"})
        second = http.get("/api/other")
    assert first.status_code == 200
    assert first.headers["x-upstream"] == "a"
    echo = first.json()
    assert echo["upstream"] == "a"
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/items/%7E1", "page=2&x=%20")
    assert echo["body"] == "hello"
    assert ["x-t", "1"] in echo["headers"]
    assert second.json()["upstream"] == "b"
    (received,) = a.requests
    assert (received.method, received.path, received.body) == ("POST", "/items/%7E1", b"hello")
    assert received.header("X-T") == "1"
    assert received.header("x-forwarded-prefix") == "/api"
    assert (a.request_count, b.request_count, a.probe_count) == (1, 1, 0)
    a.clear()
    assert a.request_count == 0


def test_a_fixed_status(fakes: list[FakeUpstream]) -> None:
    a, _ = fakes
    a.answer(418)
    with client(a) as http:
        assert http.get("/api/x").status_code == 418
        a.answer()
        assert http.get("/api/x").status_code == 200
    with pytest.raises(ValueError, match="999"):
        a.answer(999)


def test_head_and_bodiless_statuses_have_no_body(fakes: list[FakeUpstream]) -> None:
    a, _ = fakes
    with client(a) as http:
        length = len(http.get("/api/x").content)
        head = http.head("/api/x")
        assert (head.status_code, head.content) == (200, b"")
        assert int(head.headers["content-length"]) == length + 1  # its echo says "HEAD"
        a.answer(204)
        assert [(r.status_code, r.content) for r in (http.get("/api/x"), http.get("/api/y"))] == [
            (204, b""),
            (204, b""),
        ]  # twice: the connection stays usable
        with pytest.raises(ValueError, match="final"):
            a.answer(101)


def test_latency_fixed_or_drawn(fakes: list[FakeUpstream]) -> None:
    a, _ = fakes
    draws = iter([0.8, 0.2])

    with client(a, timeout=0.5, retries=0) as http:
        a.set_latency(0.8)
        assert http.get("/api/x").status_code == 504  # slower than the pool's timeout
        a.set_latency(lambda: next(draws))  # drawn per request
        assert http.get("/api/x").status_code == 504
        started = time.monotonic()
        assert http.get("/api/x").status_code == 200
        assert time.monotonic() - started >= 0.2
        a.set_latency(0)
        assert http.get("/api/x").status_code == 200
    with pytest.raises(ValueError, match="latency"):
        a.set_latency(-1)


def test_refused_connections_fail_over_and_come_back(fakes: list[FakeUpstream]) -> None:
    a, b = fakes
    b.refuse_connections()
    assert b.refusing
    with client(a, b, max_fails=0) as http:
        served = [http.get("/api/x").headers["x-upstream"] for _ in range(4)]
        assert served == ["a"] * 4
        assert b.request_count == 0  # nothing reached it
        b.answer()
        assert not b.refusing
        assert {http.get("/api/x").headers["x-upstream"] for _ in range(4)} == {"a", "b"}


def test_refusing_on_a_socket_closes_the_port_and_keeps_it() -> None:
    a = FakeUpstream("a")
    with a.serve():
        port = int(a.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            wait_until(lambda: a.open_connections == 1)  # accepted, not in the backlog
            a.refuse_connections()
            assert held.recv(1) == b""  # an open connection is closed, as by a server going down
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(OSError, match="in use"):  # nothing else can take the port meanwhile
            socket.create_server(("127.0.0.1", port))
        a.restore()
        assert a.url.endswith(f":{port}")
        assert httpx.get(a.url + "/x").json()["upstream"] == "a"


def test_a_fake_that_refuses_before_it_serves_refuses_at_once() -> None:
    a = FakeUpstream("a").refuse_connections()
    with a.serve(), pytest.raises(httpx.ConnectError):
        httpx.get(a.url)


def test_hang_holds_the_request_until_the_proxy_gives_up(fakes: list[FakeUpstream]) -> None:
    a, _ = fakes
    a.hang()
    with client(a, timeout=1.0, retries=0) as http:
        thread, out = in_background(lambda: http.get("/api/x"))
        # The proxy counts the request in flight before the fake has its head: wait for both.
        wait_until(lambda: http.pool("/api").snapshot()[0]["in_flight"] == a.request_count == 1)
        if a.url.startswith("http://127.0.0.1"):
            assert a.open_connections == 1
        thread.join(timeout=30)
        assert out["result"].status_code == 504
        assert out["elapsed"] >= 0.9
        http.wait_idle()
        wait_until(lambda: a.open_connections == 0)  # the proxy dropped it, the fake saw it


def test_stop_reading_holds_the_upload(fakes: list[FakeUpstream]) -> None:
    a, _ = fakes
    a.stop_reading_body()

    def upload() -> Any:
        return (b"x" * 65536 for _ in range(64))  # 4 MiB, more than the buffers hold

    with client(a, timeout=1.0, retries=0) as http:
        thread, out = in_background(lambda: http.post("/api/x", content=upload()))
        # The proxy counts the request in flight before the fake has its head: wait for both.
        wait_until(lambda: http.pool("/api").snapshot()[0]["in_flight"] == a.request_count == 1)
        assert a.requests[0].body == b""  # never read
        thread.join(timeout=60)
        assert out["result"].status_code in (502, 504)
        http.wait_idle()


def test_a_reset_mid_body_is_a_broken_exchange(mode: str, fakes: list[FakeUpstream]) -> None:
    a, b = fakes
    a.reset_mid_body()
    with client(a, b, max_fails=0) as http:
        if mode == "in-process":
            # The in-process transport takes the whole answer before passing any of it
            # on, so the break comes before the client sees a byte: a GET is retried.
            assert http.get("/api/x").headers["x-upstream"] == "b"
        else:
            # On a socket the head has reached the client when the body breaks: the
            # response is cut off (TestClient raises what the app raised).
            with pytest.raises(ResponseAborted):
                http.get("/api/x")
    assert a.request_count == 1


def test_drip_sends_the_body_slowly_and_whole(mode: str, fakes: list[FakeUpstream]) -> None:
    a, _ = fakes
    with client(a) as http:
        whole = http.get("/api/x").json()
        a.drip(chunks=4, interval=0.1)
        started = time.monotonic()
        dripped = http.get("/api/x")
        assert time.monotonic() - started >= 0.3
        assert dripped.json().keys() == whole.keys()
        assert int(dripped.headers["content-length"]) == len(dripped.content)
    a.drip(chunks=4, interval=0.5)
    with client(a, timeout=0.2, retries=0) as slow:  # each part later than the timeout
        if mode == "in-process":
            assert slow.get("/api/x").status_code == 504
        else:
            with pytest.raises(ResponseAborted):
                slow.get("/api/x")


def test_on_a_socket_the_drip_goes_on_the_wire_part_by_part() -> None:
    a = FakeUpstream("a").drip(chunks=3, interval=0.3)
    with a.serve(), httpx.stream("GET", a.url + "/x") as response:
        parts = [(time.monotonic(), part) for part in response.iter_raw()]
    arrivals = [at for at, _ in parts]
    assert json.loads(b"".join(part for _, part in parts))["path"] == "/x"
    assert len(arrivals) >= 2
    assert arrivals[-1] - arrivals[0] >= 0.3


def test_failing_health_checks_only(fakes: list[FakeUpstream]) -> None:
    a, b = fakes
    checks = HealthCheck(interval=3600, rise=1, fall=1, timeout=2.0)
    with client(a, b, health_check=checks) as http:
        wait_until(lambda: a.probe_count >= 1 and b.probe_count >= 1)  # the startup round
        a.fail_health_checks()
        assert http.get("/api/x").status_code == 200  # traffic unchanged...
        http.check_health("/api")  # ...until a round of checks sees it
        assert [r["healthy"] for r in http.pool("/api").snapshot()] == [False, True]
        assert {http.get("/api/x").headers["x-upstream"] for _ in range(4)} == {"b"}
        a.pass_health_checks()
        http.check_health("/api")
        assert [r["healthy"] for r in http.pool("/api").snapshot()] == [True, True]
    assert a.probes[-1].path == "/health"
    assert all(
        p.header(
            "user-agent",
        ).startswith("rr-middleware-health")
        for p in a.probes
    )


# ------------------------------------------------------------------------ counting


def test_counts_are_exact_under_concurrency(fakes: list[FakeUpstream]) -> None:
    a, b = fakes
    with client(a, b) as http, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: http.get(f"/api/{i}").status_code, range(200)))
        http.wait_idle()
        rows = http.pool("/api").snapshot()
    assert statuses == [200] * 200
    assert (a.request_count, b.request_count) == (100, 100)
    assert sorted(r.path for r in a.requests + b.requests) == sorted(f"/{i}" for i in range(200))
    assert [r["requests"] for r in rows] == [100, 100]


async def test_counts_are_exact_on_one_loop() -> None:
    fakes = [FakeUpstream("a"), FakeUpstream("b"), FakeUpstream("c")]
    balancer = Balancer({"/api": Pool([f.upstream() for f in fakes])})
    app = RoundRobinMiddleware(lambda *_: None, balancer=balancer)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        responses = await asyncio.gather(*(http.get(f"/api/{i}") for i in range(300)))
    assert {r.status_code for r in responses} == {200}
    assert [f.request_count for f in fakes] == [100, 100, 100]
    await balancer.stop()


# ------------------------------------------------------------------------ the socket


def test_serve_starts_on_an_ephemeral_port_and_always_stops() -> None:
    a = FakeUpstream("a")
    assert a.url == "http://a.test"
    urls = []

    def serve_and_fail() -> None:
        with a.serve():
            urls.append(a.url)
            assert httpx.get(a.url + "/x").json()["path"] == "/x"
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        serve_and_fail()
    (url,) = urls
    assert url.startswith("http://127.0.0.1:")
    assert a.url == "http://a.test"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


async def test_serve_on_the_running_loop() -> None:
    a = FakeUpstream("a")
    async with a.serve():
        async with httpx.AsyncClient() as http:
            assert (await http.get(a.url + "/y?z=1")).json()["query"] == "z=1"
        with pytest.raises(RuntimeError, match="already serving"):
            a.serve().__enter__()
    assert a.open_connections == 0
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(a.url.replace("a.test", "127.0.0.1:1"))


async def test_refusing_and_listening_again_on_the_running_loop() -> None:
    a = FakeUpstream("a")
    async with a.serve(), httpx.AsyncClient() as http:
        a.refuse_connections()
        with pytest.raises(httpx.ConnectError):
            await http.get(a.url)
        a.answer()
        assert (await http.get(a.url + "/back")).json()["path"] == "/back"


def test_as_a_plain_asgi_app() -> None:
    a = FakeUpstream("a")
    with rr_test_client({"/api": Pool([a.upstream()])}, app=None) as http:
        assert isinstance(http, RrTestClient)
    from rr_middleware import Upstream

    with rr_test_client({"/api": [Upstream(a.url, app=a)]}) as http:
        assert http.get("/api/q").json()["path"] == "/q"


def test_describe_tells_the_behaviour() -> None:
    a = FakeUpstream("a").answer(503).set_latency(0.5).fail_health_checks(500)
    assert a.describe() == "answers 503, latency 0.5, fails health checks (500)"
    assert a.restore().describe() == "answers 200"
    with pytest.raises(ValueError, match="URL"):
        FakeUpstream("not a host")


# ------------------------------------------------------------------------ clock, discovery


def test_the_manual_clock_runs_an_ejection_out() -> None:
    clock = ManualClock()
    a, b = FakeUpstream("a"), FakeUpstream("b")
    b.answer(503)
    with client(a, b, clock=clock, max_fails=1, fail_timeout=10.0) as http:
        assert [http.get("/api/x").status_code for _ in range(2)] == [200, 503]
        assert [r["ejected"] for r in http.pool("/api").snapshot()] == [False, True]
        b.answer()
        clock.advance(9.9)
        assert {http.get("/api/x").headers["x-upstream"] for _ in range(3)} == {"a"}
        clock.advance(0.1)
        assert {http.get("/api/x").headers["x-upstream"] for _ in range(4)} == {"a", "b"}
    assert clock() == clock.now == 1010.0
    clock.set(2000)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="forward"):
        clock.set(1999)


def test_fake_discovery_changes_the_members() -> None:
    a, b = FakeUpstream("a"), FakeUpstream("b")
    discovery = FakeDiscovery([a])
    with rr_test_client({"/api": Pool(discovery=discovery)}) as http:
        assert http.get("/api/x").headers["x-upstream"] == "a"
        discovery.set([a, b])
        wait_until(lambda: len(http.pool("/api").members) == 2)
        assert {http.get("/api/x").headers["x-upstream"] for _ in range(4)} == {"a", "b"}
        discovery.fail()
        wait_until(lambda: http.pool("/api").discovery_status()["error"])  # type: ignore[index]
        assert len(http.pool("/api").members) == 2  # the last good list is kept
        discovery.set([b])
        wait_until(lambda: len(http.pool("/api").members) == 1)
        assert {http.get("/api/x").headers["x-upstream"] for _ in range(3)} == {"b"}
    assert discovery.version == 4


# ------------------------------------------------------------------------ waiting


def test_wait_until_fails_naming_what_it_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="the moon"):
        wait_until(lambda: False, 0.05, what="the moon")
    assert time.monotonic() - started < 2


async def test_settled_lets_the_loop_run() -> None:
    done = asyncio.get_running_loop().call_later(0.02, lambda: None)
    flag: list[int] = []
    asyncio.get_running_loop().call_later(0.01, flag.append, 1)
    assert await settled(lambda: flag) == [1]
    done.cancel()
    with pytest.raises(WaitTimeout):
        await settled(lambda: False, 0.02)


@pytest.mark.slow  # a fresh interpreter importing Starlette and httpx: seconds on a busy machine
def test_the_kit_imports_without_pytest() -> None:
    """``rr_middleware.testing`` needs nothing a test runner brings."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'pluggy'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import rr_middleware.testing as t\n"
        "a = t.FakeUpstream('a')\n"
        "with t.rr_test_client({'/api': [a.upstream()]}) as c:\n"
        "    assert c.get('/api/x').json()['upstream'] == 'a'\n"
        "assert 'pytest' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


@pytest.mark.parametrize(
    "module", ["app", "clock", "discovery", "fake_upstream", "waiting"], ids=str
)
def test_the_docstring_examples_hold(module: str) -> None:
    imported = importlib.import_module(f"rr_middleware.testing.{module}")
    failed, tried = doctest.testmod(imported, optionflags=doctest.ELLIPSIS)
    assert tried
    assert failed == 0


async def test_the_raw_upstream_on_the_running_loop() -> None:
    answer = answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    async with RawUpstream(answer) as up, httpx.AsyncClient() as http:
        assert (await http.get(up.url + "/raw")).text == "ok"
        up.refuse()
        with pytest.raises(httpx.ConnectError):
            await http.get(up.url)
        up.listen()
        assert (await http.get(up.url)).text == "ok"
    assert [r.target for r in up.requests] == [b"/raw", b"/"]
    assert up.accepted == up.ended == 2


def test_the_raw_upstream_fails_the_block_when_a_handler_raised() -> None:
    async def broken(connection: RawConnection) -> None:
        raise RuntimeError("handler bug")

    def run() -> None:
        with RawUpstream(broken) as up, socket.create_connection(("127.0.0.1", up.port)) as c:
            c.recv(1)  # the handler has run and the connection closed

    with pytest.raises(AssertionError, match="handler bug"):
        run()
