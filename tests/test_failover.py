"""Failover end to end: real uvicorn upstreams that stop, come back on the same port, answer
503 or hang up, with the proxy itself under real uvicorn.

Health changes are awaited through the middleware's own log records (a handler that wakes
the waiting test), or by polling with requests against a deadline where time has to pass
(an ejection running out); nothing sleeps. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rr_middleware import HealthCheck, Pool, PoolRuntime

from .proxy import assert_generic_error, client, running_proxy
from .raw_upstream import Handler, RawConnection, RawUpstream, answer_each
from .servers import RunningServer, dead_url, serve
from .upstream_app import UpstreamApp

# UpstreamApp has no /health route; its status action serves as one.
HEALTH_PATH = "/?action=status&code=200"
FAST_CHECKS = HealthCheck(path=HEALTH_PATH, interval=0.1, timeout=0.5, rise=2, fall=2)
HEALTH_DEADLINE = 3.0  # the longest any test waits for a health state to change


# --------------------------------------------------------------------------- helpers


class LogWatcher(logging.Handler):
    """Collects the middleware's log messages (with the time each was logged) and wakes
    tests waiting for one: health transitions are awaited as events, not polled."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, str]] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.records.append((time.monotonic(), record.getMessage()))
            self._changed.notify_all()

    def times(self, text: str) -> list[float]:
        """When each message containing ``text`` was logged."""
        with self._changed:
            return [at for at, message in self.records if text in message]

    def wait_for(self, text: str, timeout: float = HEALTH_DEADLINE, count: int = 1) -> float:
        """Wait until ``count`` messages contain ``text``; the time the last one was logged."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: len([m for _, m in self.records if text in m]) >= count, timeout
            )
            assert found, f"no log message {text!r} within {timeout}s: {self.records}"
            return [at for at, message in self.records if text in message][count - 1]


@pytest.fixture
def logs() -> Iterator[LogWatcher]:
    logger = logging.getLogger("rr_middleware")
    level = logger.level
    watcher = LogWatcher()
    logger.addHandler(watcher)
    logger.setLevel(logging.INFO)  # "client left during the request body" is INFO
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


def down(prefix: str, url: str) -> str:
    return f"pool {prefix}: upstream {url} is DOWN"


def up(prefix: str, url: str) -> str:
    return f"pool {prefix}: upstream {url} is UP"


def row(runtime: PoolRuntime, url: str) -> dict[str, Any]:
    """The snapshot row of one upstream of ``pool``."""
    rows = [r for r in runtime.snapshot() if r["url"] == url]
    assert len(rows) == 1, runtime.snapshot()
    return rows[0]


def served_by(http: httpx.Client, url: str) -> str:
    """GET ``url`` through the proxy; it must succeed. The name of the upstream that answered."""
    response = http.get(url)
    assert response.status_code == 200, (response.status_code, response.text)
    return response.headers["x-upstream"]


def traffic(app: UpstreamApp) -> list[str]:
    """The raw paths of the requests ``app`` received, leaving out health checks."""
    return [r["raw_path"] for r in app.requests if r["query"] != HEALTH_PATH.partition("?")[2]]


def stop_all(servers: list[RunningServer]) -> None:
    """Stop several uvicorn servers at once (each notices ``should_exit`` on its next tick)."""
    for server in servers:
        server.server.should_exit = True
    for server in servers:
        server.stop()


class Switchable:
    """Wraps an upstream app. ``arrived`` is set as each request comes in (before its
    body); while ``gate`` is set, requests wait for that event first; while ``status`` is
    set, requests are answered with it (and recorded in ``forced``)."""

    def __init__(self, app: UpstreamApp) -> None:
        self.app = app
        self.arrived = threading.Event()
        self.gate: threading.Event | None = None
        self.status: int | None = None
        self.forced: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.arrived.set()
        gate = self.gate
        if gate is not None:
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 5)
        status = self.status
        if status is None:
            await self.app(scope, receive, send)
            return
        self.forced.append(scope["raw_path"].decode("latin-1"))
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"x-upstream", self.app.name.encode()), (b"content-length", b"6")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"forced"})


def hang_up(reset: bool) -> Handler:
    """Reads a whole request (head and body) and closes the connection without answering:
    with a FIN, or with a RST if ``reset``."""

    async def handle(connection: RawConnection) -> None:
        try:
            await connection.read_request()
        finally:
            await connection.close(reset=reset)

    return handle


# --------------------------------------------------------------------------- tests


def test_stopping_one_of_three_upstreams_mid_traffic_loses_no_request(
    upstreams: list[RunningServer],
) -> None:
    """Three workers send 300 GETs; when the 100th starts, b is stopped. No GET fails (a
    refused connection is retried on the next upstream); once b is gone, a and c share the
    load evenly and b is ejected. Requests from the 200th on wait until the stop is done,
    so a third of the traffic certainly runs after it."""
    a, b, c = upstreams
    pool = Pool([u.url for u in upstreams])
    total, workers = 300, 3
    stop_now, stopped = threading.Event(), threading.Event()
    numbers = itertools.count()
    results: list[tuple[float, int, str]] = []  # request start, status, upstream name
    errors: list[BaseException] = []

    with running_proxy({"/lb": pool}) as (proxy, mw):
        runtime = mw.balancer["/lb"]

        def work() -> None:
            try:
                with client() as http:
                    while (i := next(numbers)) < total:
                        if i == total // 3:
                            stop_now.set()
                        if i >= 2 * total // 3:
                            assert stopped.wait(timeout=30)
                        start = time.monotonic()
                        response = http.get(f"{proxy.url}/lb/{i}")
                        name = response.headers.get("x-upstream", "")
                        results.append((start, response.status_code, name))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop_now.set()

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for thread in threads:
            thread.start()
        try:
            assert stop_now.wait(timeout=30)
            b.stop()
            stop_done = time.monotonic()
        finally:
            stopped.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not errors, errors
        snapshot = {r["url"]: r for r in runtime.snapshot()}

    assert len(results) == total
    assert Counter(status for _, status, _ in results) == {200: total}
    before = Counter(name for _, _, name in results[: total // 4])
    assert set(before) == {"a", "b", "c"}, before
    after = Counter(name for start, _, name in results if start > stop_done)
    assert sum(after.values()) >= total // 3, after
    assert set(after) == {"a", "c"}, after
    assert abs(after["a"] - after["c"]) <= sum(after.values()) // 5, after
    assert snapshot[b.url]["ejected"] is True
    assert snapshot[b.url]["failures"] >= 3
    assert snapshot[a.url]["failures"] == snapshot[c.url]["failures"] == 0


def test_health_checks_take_a_stopped_upstream_out_and_back_on_the_same_port(
    upstreams: list[RunningServer], logs: LogWatcher
) -> None:
    """b stops: after ``fall`` failed checks it is DOWN and gets no more requests. A new
    server on b's port passes ``rise`` checks and b is back in the rotation. Passive
    ejection is off (``max_fails=0``) so only the active checks decide."""
    a, b, c = upstreams
    check = FAST_CHECKS
    pool = Pool([u.url for u in upstreams], health_check=check, max_fails=0)
    # From a state change to its log line: up to one check already under way, then
    # rise/fall more checks at interval * (1 ± jitter), plus scheduling slack.
    fall_bound = (check.fall + 1) * check.interval * (1 + check.jitter) + 1.0
    rise_bound = (check.rise + 1) * check.interval * (1 + check.jitter) + 1.0

    with running_proxy({"/hc": pool}) as (proxy, mw), client() as http:
        runtime = mw.balancer["/hc"]
        url = f"{proxy.url}/hc/traffic"
        assert Counter(served_by(http, url) for _ in range(6)) == {"a": 2, "b": 2, "c": 2}

        b.stop()
        stop_done = time.monotonic()
        # Traffic goes on while b is failing its checks; every GET still succeeds.
        deadline = stop_done + HEALTH_DEADLINE
        while not logs.times(down("/hc", b.url)) and time.monotonic() < deadline:
            assert served_by(http, url) in ("a", "b", "c")
        went_down = logs.wait_for(down("/hc", b.url), timeout=0)
        assert went_down - stop_done < fall_bound
        state = row(runtime, b.url)
        assert state["healthy"] is False
        assert state["eligible"] is False
        assert state["last_check"]["ok"] is False
        assert state["last_check"]["status"] == 0  # refused: no status came
        attempts = (state["requests"], state["failures"])

        served = [served_by(http, url) for _ in range(20)]
        assert Counter(served) == {"a": 10, "c": 10}, served
        state = row(runtime, b.url)
        assert (state["requests"], state["failures"]) == attempts  # b was never tried

        restarting = time.monotonic()
        with serve(UpstreamApp("b"), port=b.port) as b2:
            back = logs.wait_for(up("/hc", b.url))
            assert back - restarting < rise_bound
            state = row(runtime, b.url)
            assert state["healthy"] is True
            assert state["eligible"] is True
            assert len(b2.app.requests) >= check.rise  # the checks that brought it back
            assert traffic(b2.app) == []

            served = [served_by(http, url) for _ in range(9)]
            assert Counter(served) == {"a": 3, "b": 3, "c": 3}, served
            assert traffic(b2.app) == ["/traffic"] * 3
            assert len(logs.times(down("/hc", b.url))) == 1
            assert logs.times(down("/hc", a.url)) == logs.times(down("/hc", c.url)) == []


def test_on_all_down_try_all_attempts_every_upstream_and_fail_answers_503_at_once(
    upstreams: list[RunningServer], logs: LogWatcher
) -> None:
    """Every upstream stopped and every check failed. ``/try`` (default ``try_all``, panic
    mode) still attempts each upstream, so the client gets 502 (nothing listens), not 503;
    ``/fail`` (``on_all_down="fail"``) answers 503 with Retry-After at once, trying none.
    One upstream back on its port brings both pools back."""
    a = upstreams[0]
    urls = [u.url for u in upstreams]
    pools = {
        "/try": Pool(urls, health_check=FAST_CHECKS),
        "/fail": Pool(urls, health_check=FAST_CHECKS, on_all_down="fail"),
    }
    with running_proxy(pools) as (proxy, mw), client() as http:
        runtimes = mw.balancer.pools
        for prefix in pools:
            assert served_by(http, f"{proxy.url}{prefix}/x") == "a"

        stop_all(upstreams)
        for prefix in pools:
            for url in urls:
                logs.wait_for(down(prefix, url))
        for runtime in runtimes.values():
            assert all(r["healthy"] is False and not r["eligible"] for r in runtime.snapshot())

        failures = {prefix: [r["failures"] for r in p.snapshot()] for prefix, p in runtimes.items()}
        response = http.get(f"{proxy.url}/try/x")
        assert_generic_error(response, 502, urls)
        assert "retry-after" not in response.headers
        tried = [r["failures"] for r in runtimes["/try"].snapshot()]
        assert tried == [n + 1 for n in failures["/try"]]  # each upstream attempted once

        started = time.monotonic()
        response = http.get(f"{proxy.url}/fail/x")
        elapsed = time.monotonic() - started
        assert_generic_error(response, 503, urls)
        assert response.headers["retry-after"] == "1"  # ceil(check interval), at least 1
        assert elapsed < 0.5
        assert [r["failures"] for r in runtimes["/fail"].snapshot()] == failures["/fail"]

        with serve(UpstreamApp("a"), port=a.port):
            for prefix in pools:
                logs.wait_for(up(prefix, a.url))
            for prefix in pools:
                response = http.get(f"{proxy.url}{prefix}/x")
                assert response.status_code == 200
                assert response.headers["x-upstream"] == "a"
                assert "retry-after" not in response.headers


def test_ejected_upstream_restarted_on_its_port_is_probed_after_fail_timeout(
    upstreams: list[RunningServer],
) -> None:
    """x stops; one refused connection ejects it (``max_fails=1``) and the request is
    retried on y. x comes back on the same port, but until ``fail_timeout`` has run out
    every request goes to y; then one request probes x, succeeds, and x is back."""
    x, y = upstreams[0], upstreams[1]
    pool = Pool([x.url, y.url], max_fails=1, fail_timeout=0.5)
    with running_proxy({"/h": pool}) as (proxy, mw), client() as http:
        runtime = mw.balancer["/h"]
        url = f"{proxy.url}/h/p"
        assert sorted(served_by(http, url) for _ in range(2)) == ["a", "b"]

        x.stop()
        assert [served_by(http, url) for _ in range(2)] == ["b", "b"]
        state = row(runtime, x.url)
        assert state["ejected"] is True
        assert state["failures"] == 1
        ejected_until = state["ejected_until"]
        assert ejected_until is not None

        with serve(UpstreamApp("a"), port=x.port) as x2:
            served: list[tuple[float, str]] = []
            deadline = ejected_until + HEALTH_DEADLINE
            while time.monotonic() < deadline:
                name = served_by(http, url)
                served.append((time.monotonic(), name))
                if name == "a":
                    break
            probed_at, name = served[-1]
            assert name == "a", "x never came back"
            assert all(n == "b" for _, n in served[:-1])
            assert probed_at >= ejected_until  # the ejection held for fail_timeout
            assert probed_at - ejected_until < 1.0
            assert traffic(x2.app) == ["/p"]
            state = row(runtime, x.url)
            assert state["ejected"] is False
            assert state["half_open"] is False
            assert state["eligible"] is True

            served_after = [served_by(http, url) for _ in range(6)]
            assert Counter(served_after) == {"a": 3, "b": 3}, served_after


def test_half_open_probe_answered_503_ejects_again_then_a_good_probe_restores(
    upstreams: list[RunningServer],
) -> None:
    """x answers 503 (an unhealthy status): that request is relayed as 503 (no status
    retries by default) and ejects x. The half-open probe after ``fail_timeout`` also gets
    503, so x is out for another ``fail_timeout``; the next probe gets 200 and x is back."""
    y = upstreams[1]
    x_app = Switchable(UpstreamApp("x"))
    with serve(x_app) as x:
        pool = Pool([x.url, y.url], max_fails=1, fail_timeout=0.5)
        with running_proxy({"/h": pool}) as (proxy, mw), client() as http:
            runtime = mw.balancer["/h"]
            url = f"{proxy.url}/h/p"

            def until_x_answers(deadline: float) -> httpx.Response:
                """GET until x answers (all y's answers are 200), within the deadline."""
                while time.monotonic() < deadline:
                    response = http.get(url)
                    if response.headers["x-upstream"] == "x":
                        return response
                    assert response.status_code == 200
                raise AssertionError("x was never probed")

            x_app.status = 503
            response = until_x_answers(time.monotonic() + 5)
            assert response.status_code == 503
            state = row(runtime, x.url)
            assert state["ejected"] is True
            first_until = state["ejected_until"]

            response = until_x_answers(first_until + HEALTH_DEADLINE)
            probed_at = time.monotonic()
            assert response.status_code == 503
            assert probed_at >= first_until
            state = row(runtime, x.url)
            assert state["ejected"] is True
            assert state["half_open"] is False
            assert state["ejected_until"] > first_until  # out for another fail_timeout
            second_until = state["ejected_until"]
            assert len(x_app.forced) == 2

            # x is well again. Its next probe is held at x, so the test sees that while
            # it is under way no other request goes to x; released, it restores x.
            x_app.status = None
            x_app.arrived.clear()
            gate = x_app.gate = threading.Event()
            deadline = second_until + HEALTH_DEADLINE
            answers: list[httpx.Response] = []

            def poll() -> None:
                with client() as poller:
                    while not x_app.arrived.is_set() and time.monotonic() < deadline:
                        answers.append(poller.get(url))

            poller = threading.Thread(target=poll)
            poller.start()
            try:
                assert x_app.arrived.wait(timeout=deadline - time.monotonic())
                state = row(runtime, x.url)
                assert state["half_open"] is True
                assert state["eligible"] is False
                assert [served_by(http, url) for _ in range(4)] == ["b"] * 4
            finally:
                x_app.gate = None
                gate.set()
                poller.join(timeout=10)
            probe = answers[-1]
            assert (probe.status_code, probe.headers["x-upstream"]) == (200, "x")
            assert all(r.status_code == 200 for r in answers)
            assert all(r.headers["x-upstream"] == "b" for r in answers[:-1])
            assert time.monotonic() >= second_until
            state = row(runtime, x.url)
            assert state["ejected"] is False
            assert state["half_open"] is False
            assert Counter(served_by(http, url) for _ in range(4)) == {"x": 2, "b": 2}


def test_half_open_probe_abandoned_by_its_client_does_not_keep_the_upstream_out(
    upstreams: list[RunningServer], logs: LogWatcher
) -> None:
    """The one request probing a half-open x is a POST whose client leaves mid-upload, so
    the probe has no outcome. Right after, x still gets no second probe; once the probe
    has had far more than all its time, a request probes x again and x is back. The
    pool's clock is injected, so the ejection and the probe's time pass at once."""
    y = upstreams[1]
    x_app = Switchable(UpstreamApp("x"))
    now = [1000.0]
    with serve(x_app) as x:
        pool = Pool(
            [x.url, y.url],
            max_fails=1,
            fail_timeout=10.0,
            clock=lambda: now[0],
            request_buffer_size=0,  # the upload reaches x with its first bytes
        )
        with running_proxy({"/h": pool}) as (proxy, mw), client() as http:
            runtime = mw.balancer["/h"]
            url = f"{proxy.url}/h/p"
            x_app.status = 503
            response = http.get(url)  # a fresh rotation starts with x
            assert (response.status_code, response.headers["x-upstream"]) == (503, "x")
            assert row(runtime, x.url)["ejected"] is True
            assert [served_by(http, url) for _ in range(2)] == ["b", "b"]

            x_app.status = None
            x_app.arrived.clear()
            now[0] += 10.0  # fail_timeout has passed: the next request probes x
            head = b"POST /h/upload HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
                raw.sendall(head + b"5\r\nhello\r\n")
                assert x_app.arrived.wait(timeout=5)  # the probe reached x
            logs.wait_for("client left during the request body")
            state = row(runtime, x.url)
            assert state["half_open"] is True
            assert state["eligible"] is False
            assert [served_by(http, url) for _ in range(4)] == ["b"] * 4

            now[0] += 3600.0
            served = [served_by(http, url) for _ in range(4)]
            assert "x" in served, "x stays out after its probe was abandoned"
            state = row(runtime, x.url)
            assert state["half_open"] is False
            assert state["eligible"] is True


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_post_is_not_retried_once_sent_but_get_is(
    upstreams: list[RunningServer], reset: bool
) -> None:
    """An upstream that reads the whole request and hangs up without answering: a POST it
    took gets 502 and never reaches the healthy upstream (it may have acted on it); a GET
    it took is retried there and succeeds. ``max_fails=0`` keeps it in the rotation."""
    good = upstreams[0]
    with RawUpstream(hang_up(reset)) as hang:
        pool = Pool([hang.url, good.url], max_fails=0)
        with running_proxy({"/p": pool}) as (proxy, _), client() as http:
            lost = 0
            for i in range(4):
                body = f"post-{i}"
                response = http.post(f"{proxy.url}/p/post?action=echo", content=body)
                at_good = [r for r in good.app.requests if r["body"] == body]
                if any(r.body == body.encode() for r in hang.requests):
                    assert_generic_error(response, 502, [hang.url, good.url])
                    assert at_good == []
                    lost += 1
                else:
                    assert response.status_code == 200
                    assert response.json()["body"] == body
                    assert len(at_good) == 1
            assert lost == 2  # the two upstreams alternate
            assert [r.method for r in hang.requests] == [b"POST"] * 2

            for i in range(4):
                response = http.get(f"{proxy.url}/p/get-{i}")
                assert response.status_code == 200
                assert response.headers["x-upstream"] == "a"
            gets = [r.target.decode() for r in hang.requests if r.method == b"GET"]
            assert len(gets) >= 2, hang.requests  # sent there first, then retried
            assert all(target in [r["raw_path"] for r in good.app.requests] for target in gets)


#: An upstream's own 503, with its page and its Retry-After.
MAINTENANCE_PAGE = b"down for maintenance"
MAINTENANCE_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 30\r\n"
    b"content-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
    % (len(MAINTENANCE_PAGE), MAINTENANCE_PAGE)
)


def test_an_answer_retried_for_its_status_reaches_the_client_when_no_later_try_answers(
    logs: LogWatcher,
) -> None:
    """``retry_on_statuses``: an upstream's 503 is retried on the next upstreams, which
    hang up or refuse the connection. The client gets that 503 as the upstream sent it
    (its Retry-After, its page), not a 502 of the proxy's. A 503 whose body is still on
    its way is not waited for: the next try goes at once, and with no later answer the
    client gets the 502; nor is one over 64 KiB held through the tries."""
    page, busy_answer = MAINTENANCE_PAGE, MAINTENANCE_ANSWER

    async def slow_page(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 20\r\n\r\n")
        await connection.hold()  # the page never comes

    big = b"x" * (64 * 1024 + 1)
    big_answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (
        len(big),
        big,
    )
    with (
        RawUpstream(answer_each(lambda _: busy_answer)) as busy,
        RawUpstream(hang_up(False)) as hang,
        RawUpstream(slow_page) as slow,
        RawUpstream(answer_each(lambda _: big_answer)) as large,
    ):
        dead = dead_url()
        options: dict[str, Any] = {"retries": 2, "retry_on_statuses": {503}, "max_fails": 0}
        pools = {
            "/p": Pool([busy.url, hang.url, dead], **options),
            "/slow": Pool([slow.url, hang.url], timeout=30, **options),
            "/large": Pool([large.url, dead], **{**options, "retries": 1}),
        }
        with running_proxy(pools) as (proxy, _), client() as http:
            for i in range(6):
                response = http.get(f"{proxy.url}/p/x{i}")
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "30"
                assert response.content == page
            assert len(busy.requests) == 6
            logs.wait_for(f"relaying the 503 of {busy.url}")

            # (Each pool's first request goes to its first upstream: the one whose answer
            # is not kept. A second would start at the next one, the retry's turn not
            # having been taken.)
            started = time.monotonic()
            assert_generic_error(http.get(f"{proxy.url}/slow/x"), 502, [slow.url])
            assert time.monotonic() - started < 5  # not the read timeout's 30 s

            assert_generic_error(http.get(f"{proxy.url}/large/x"), 502, [large.url])
            assert len(large.requests) == 1  # it answered, and its answer was not kept


def test_a_kept_answer_does_not_charge_the_later_tries_time_to_its_upstream() -> None:
    """An upstream that answers 503 at once, whose answer is kept and relayed
    after the next upstream timed out: its total-latency histogram (``p50``/``p99`` of
    the status page, the Prometheus histogram) must show the few milliseconds it took,
    not the other upstream's ``timeout``."""
    busy_answer = MAINTENANCE_ANSWER

    async def silent(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.hold()

    with (
        RawUpstream(answer_each(lambda _: busy_answer)) as busy,
        RawUpstream(silent) as quiet,
    ):
        pool = Pool(
            [busy.url, quiet.url], retries=1, retry_on_statuses={503}, max_fails=0, timeout=1.0
        )
        with running_proxy({"/p": pool}) as (proxy, mw), client() as http:
            statuses = [http.get(f"{proxy.url}/p/x{i}").status_code for i in range(2)]
            assert 503 in statuses, statuses  # busy asked first, its answer kept
            rows = {row["url"]: row for row in mw.status()["pools"][0]["upstreams"]}
            # busy answered within milliseconds; the 1 s was the quiet upstream's.
            assert rows[busy.url]["p99"] <= 0.25, rows[busy.url]
