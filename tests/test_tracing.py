"""OpenTelemetry through the proxy, as users test it: the SDK's in-memory exporter, the
host app instrumented by opentelemetry-instrumentation-fastapi, real upstreams that echo
the traceparent they got. And X-Request-ID."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from rr_middleware import Pool, RoundRobinMiddleware

from .proxy import client, running_proxy
from .servers import RunningServer, dead_url, serve
from .upstream_app import UpstreamApp, values


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A tracer provider exporting into memory, for this test only. OpenTelemetry lets a
    process set its provider once; its own test utilities reset that as done here, so the
    other tests run with none (and send no traceparent of the proxy's)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_tracer_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _reset_tracer_provider()
        provider.shutdown()


def _reset_tracer_provider() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


@pytest.fixture
def upstream() -> Iterator[RunningServer]:
    with serve(UpstreamApp("up")) as server:
        yield server


def instrumented(pools: dict[str, Any]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RoundRobinMiddleware, pools=pools)
    FastAPIInstrumentor.instrument_app(app)
    return app


def of_kind(exported: tuple[ReadableSpan, ...], kind: trace.SpanKind) -> list[ReadableSpan]:
    return [s for s in exported if s.kind == kind]


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def ids(header: str) -> str:
    """A traceparent less its flags (the SDK may add the W3C "random" flag)."""
    return header.rsplit("-", 1)[0]


def test_one_client_span_per_request_and_the_upstream_joins_the_trace(
    spans: InMemorySpanExporter, upstream: RunningServer
) -> None:
    with serve(instrumented({"/api": [upstream.url]})) as front, client() as http:
        record = http.get(f"{front.url}/api/items?x=1").json()
    exported = spans.get_finished_spans()
    (server,) = of_kind(exported, trace.SpanKind.SERVER)
    (span,) = of_kind(exported, trace.SpanKind.CLIENT)
    assert span.parent is not None
    assert span.parent.span_id == server.context.span_id
    assert span.context.trace_id == server.context.trace_id
    assert span.name == "GET"
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "url.full": f"{upstream.url}/items?x=1",
        "http.response.status_code": 200,
    }
    (sent,) = values(record, "traceparent")
    assert ids(sent) == ids(traceparent(span.context.trace_id, span.context.span_id))


def test_a_retry_is_a_sibling_span(spans: InMemorySpanExporter, upstream: RunningServer) -> None:
    pool = Pool([dead_url(), upstream.url], retries=1)
    with serve(instrumented({"/api": pool})) as front, client() as http:
        for _ in range(2):  # round robin: one of the two at least starts on the dead one
            assert http.get(f"{front.url}/api/x").status_code == 200
    exported = spans.get_finished_spans()
    servers = of_kind(exported, trace.SpanKind.SERVER)
    assert len(servers) == 2
    tries = {
        server.context.span_id: [
            dict(s.attributes or {})
            for s in of_kind(exported, trace.SpanKind.CLIENT)
            if s.parent is not None and s.parent.span_id == server.context.span_id
        ]
        for server in servers
    }
    assert sorted(len(each) for each in tries.values()) in ([1, 2], [2, 2])
    for each in tries.values():
        # The last try reached the upstream; any before it failed to connect.
        *failed, last = each
        assert last["http.response.status_code"] == 200
        assert last.get("http.request.resend_count", 0) == len(failed)
        for attributes in failed:
            assert attributes["error.type"] == "ConnectFailed"
            assert "http.response.status_code" not in attributes
    # The upstream saw, each time, the span of the try that reached it.
    reached = {ids(values(r, "traceparent")[0]) for r in upstream.app.requests}
    assert reached == {
        ids(traceparent(s.context.trace_id, s.context.span_id))
        for s in of_kind(exported, trace.SpanKind.CLIENT)
        if (s.attributes or {}).get("http.response.status_code") == 200
    }


def test_without_a_server_span_the_clients_traceparent_is_the_parent(
    spans: InMemorySpanExporter, upstream: RunningServer
) -> None:
    incoming = traceparent(0x1234, 0x5678)
    with running_proxy({"/api": [upstream.url]}) as (proxy, _), client() as http:
        record = http.get(f"{proxy.url}/api/x", headers={"traceparent": incoming}).json()
    (span,) = spans.get_finished_spans()
    assert span.context.trace_id == 0x1234
    assert span.parent is not None
    assert span.parent.span_id == 0x5678
    (sent,) = values(record, "traceparent")
    assert ids(sent) == ids(traceparent(0x1234, span.context.span_id))


def test_tracing_off(spans: InMemorySpanExporter, upstream: RunningServer) -> None:
    incoming = traceparent(0x1234, 0x5678)
    pool = Pool([upstream.url], tracing=False)
    with running_proxy({"/api": pool}) as (proxy, _), client() as http:
        record = http.get(f"{proxy.url}/api/x", headers={"traceparent": incoming}).json()
    assert spans.get_finished_spans() == ()
    assert values(record, "traceparent") == [incoming]  # passed on as any header


def test_no_provider_no_spans_and_nothing_added(upstream: RunningServer) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    with running_proxy({"/api": [upstream.url]}) as (proxy, _), client() as http:
        record = http.get(f"{proxy.url}/api/x").json()
    assert values(record, "traceparent") == []


def test_an_upstream_5xx_marks_the_span(
    spans: InMemorySpanExporter, upstream: RunningServer
) -> None:
    with running_proxy({"/api": [upstream.url]}) as (proxy, _), client() as http:
        assert http.get(f"{proxy.url}/api/x?action=status&code=503").status_code == 503
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert (span.attributes["http.response.status_code"], span.attributes["error.type"]) == (
        503,
        "503",
    )


# --------------------------------------------------------------------------- X-Request-ID


def test_request_id_made_passed_on_or_replaced(
    upstream: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rr_middleware")
    with (
        running_proxy({"/api": [upstream.url]}, request_id=True, access_log=True) as (proxy, _),
        client() as http,
    ):
        made = http.get(f"{proxy.url}/api/x")
        passed = http.get(f"{proxy.url}/api/x", headers={"x-request-id": "abc-123"})
        forged = http.get(f"{proxy.url}/api/x", headers={"x-request-id": "a b\tfake log"})
    new = made.headers["x-request-id"]
    assert len(new) == 32
    assert int(new, 16) >= 0
    assert values(made.json(), "x-request-id") == [new]
    assert passed.headers["x-request-id"] == "abc-123"
    assert values(passed.json(), "x-request-id") == ["abc-123"]
    replaced = forged.headers["x-request-id"]
    assert replaced != "a b\tfake log"
    assert len(replaced) == 32
    assert values(forged.json(), "x-request-id") == [replaced]
    log = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert [line.rsplit(" id=", 1)[1] for line in log] == [new, "abc-123", replaced]


def test_request_id_off_by_default(upstream: RunningServer) -> None:
    with running_proxy({"/api": [upstream.url]}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/api/x")
    assert "x-request-id" not in response.headers
    assert values(response.json(), "x-request-id") == []
    with pytest.raises(ValueError, match="request_id must be True or False"):
        RoundRobinMiddleware(FastAPI(), pools={"/a": ["http://10.0.0.1"]}, request_id="yes")  # type: ignore[arg-type]


WITHOUT_OPENTELEMETRY = """
import sys
sys.modules["opentelemetry"] = None  # as if the "otel" extra were not installed
from starlette.applications import Starlette
from starlette.testclient import TestClient
from rr_middleware import RoundRobinMiddleware, tracing
app = RoundRobinMiddleware(Starlette(), pools={"/api": [sys.argv[1]]})
with TestClient(app) as http:
    response = http.get("/api/x", headers={"traceparent": sys.argv[2]})
print(tracing.OPENTELEMETRY, app.balancer["/api"].tracer, response.json()["headers"])
assert not [n for n, m in sys.modules.items() if n.startswith("opentelemetry") and m]
"""


def test_without_opentelemetry_nothing_runs(upstream: RunningServer) -> None:
    incoming = traceparent(0x1234, 0x5678)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPENTELEMETRY, upstream.url, incoming],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False None ")
    assert f"['traceparent', '{incoming}']" in done.stdout  # passed on as any header


async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request after 2 s (a try a hedge overtakes)."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(2)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"slow"})


def test_a_hedge_is_a_sibling_span(spans: InMemorySpanExporter, upstream: RunningServer) -> None:
    with serve(slow_app) as slow:
        pool = Pool([slow.url, upstream.url], hedge_after=0.05, max_hedges=1)
        with serve(instrumented({"/api": pool})) as front, client() as http:
            for _ in range(2):  # round robin: one of the two starts on the slow one
                response = http.get(f"{front.url}/api/x")
                assert response.json()["server"] == "up"
    exported = spans.get_finished_spans()
    servers = of_kind(exported, trace.SpanKind.SERVER)
    clients = of_kind(exported, trace.SpanKind.CLIENT)
    hedged = [
        [c for c in clients if c.parent is not None and c.parent.span_id == s.context.span_id]
        for s in servers
    ]
    pairs = [tries for tries in hedged if len(tries) == 2]
    assert pairs, hedged
    assert all(len(tries) in (1, 2) for tries in hedged)
    for pair in pairs:  # a try on the slow one, and the hedge overtaking it
        ports = {(c.attributes or {})["server.port"]: dict(c.attributes or {}) for c in pair}
        assert set(ports) == {slow.port, upstream.port}
        assert ports[upstream.port]["http.response.status_code"] == 200
        assert ports[upstream.port]["http.request.resend_count"] == 1
        assert ports[slow.port]["error.type"] == "CancelledError"  # overtaken, cancelled


def test_a_mirrored_copy_is_its_own_span_not_a_resend(spans: InMemorySpanExporter) -> None:
    with serve(UpstreamApp("main")) as main, serve(UpstreamApp("shadow")) as shadow:
        pools = {"/api": Pool([main.url], mirror="shadow"), "shadow": [shadow.url]}
        with serve(instrumented(pools)) as front, client() as http:
            assert http.get(f"{front.url}/api/x").json()["server"] == "main"
            deadline = time.monotonic() + 10
            while len(of_kind(spans.get_finished_spans(), trace.SpanKind.CLIENT)) < 2:
                assert time.monotonic() < deadline, "no span for the mirrored copy"
                time.sleep(0.02)
    exported = spans.get_finished_spans()
    (server,) = of_kind(exported, trace.SpanKind.SERVER)
    clients = of_kind(exported, trace.SpanKind.CLIENT)
    assert sorted((c.attributes or {})["server.port"] for c in clients) == sorted(
        [main.port, shadow.port]
    )
    for span in clients:
        assert span.context.trace_id == server.context.trace_id
        assert "http.request.resend_count" not in (span.attributes or {})
