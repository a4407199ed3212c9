"""Tracing: an OpenTelemetry client span per upstream attempt, and ``X-Request-ID``.

OpenTelemetry is optional (``pip install 'rr-middleware[otel]'``). Without it, nothing
here runs. With it, every attempt on an upstream (a retry or a hedge is a sibling span of
the first try, under the same parent) gets a ``CLIENT`` span following the HTTP client semantic
conventions (``http.request.method``, ``server.address``, ``server.port``, ``url.full``,
``http.request.resend_count`` on a retry, ``http.response.status_code``, ``error.type``),
from the send until the response is closed, and the upstream gets its ``traceparent``
(and ``tracestate``) from the propagator in place of the client's. The parent is the
current span (the host app's server span, with ``opentelemetry-instrumentation-fastapi``),
or else the context the client's own ``traceparent`` carries, so a trace crosses the proxy
even when the host app is not instrumented. Until a ``TracerProvider`` is configured
(the SDK's), a request costs a clock read: the provider is looked for at most once a
second until one is set.

``X-Request-ID`` (``RoundRobinMiddleware(request_id=True)``): a client's value is passed
on when it is 1 to 200 visible ASCII characters, else replaced by a fresh one (32 hex
digits), so a log line cannot be forged through it; the upstream and the client's
response both carry it, and the access log names it.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextvars import Token

    from starlette.types import Scope

    from .members import Member
    from .transport.base import UpstreamRequest, UpstreamResponse

try:
    from opentelemetry import propagate, trace

    OPENTELEMETRY = True
except ImportError:  # pragma: no cover - the "otel" extra is not installed
    OPENTELEMETRY = False

__all__ = ["OPENTELEMETRY", "REQUEST_ID", "TRACED", "AttemptTracer", "request_id", "tracer"]

REQUEST_ID = b"x-request-id"
_REQUEST_ID_VALUE = re.compile(rb"[\x21-\x7e]{1,200}")
_PROPAGATED = frozenset({b"traceparent", b"tracestate"})


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's ``X-Request-ID``: the client's, if well-formed, else a fresh one put
    in ``headers`` (the upstream request's) in its place."""
    found = [value for name, value in headers if name == REQUEST_ID]
    if len(found) == 1 and _REQUEST_ID_VALUE.fullmatch(found[0]):
        return found[0]
    value = uuid.uuid4().hex.encode("ascii")
    headers[:] = [(n, v) for n, v in headers if n != REQUEST_ID]
    headers.append((REQUEST_ID, value))
    return value


class _Traced:
    """One traced request: its pool's tracer, its scope (the client's traceparent) and
    its sends so far."""

    __slots__ = ("scope", "sends", "tracer")

    def __init__(self, tracer: AttemptTracer, scope: Scope) -> None:
        self.tracer = tracer
        self.scope = scope
        self.sends = 0


#: The request being forwarded, while it is traced. A context variable, so that the tries
#: a request starts in tasks of their own (hedges) are traced as its siblings too.
TRACED: ContextVar[_Traced | None] = ContextVar("rr_middleware_traced", default=None)


class AttemptTracer:
    """Client spans for one pool's attempts: ``begin(scope)`` when a request starts
    (nothing unless a tracer provider is configured), then ``send`` for each try."""

    __slots__ = ("_configured", "_next_check", "_tracer")

    def __init__(self) -> None:
        from . import __version__

        self._tracer: Any = trace.get_tracer("rr_middleware", __version__)
        self._configured = False
        self._next_check = 0.0

    def active(self) -> bool:
        """Whether a tracer provider is configured (the SDK's), so spans would record.
        OpenTelemetry sets a process's provider once: seen once, it stays. Until then it
        is looked for at most once a second, so an unconfigured process pays a clock read
        per request, not the lookup."""
        if self._configured:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + 1.0
        provider = trace.get_tracer_provider()
        self._configured = not isinstance(provider, trace.ProxyTracerProvider)
        return self._configured

    def begin(self, scope: Scope) -> Token[_Traced | None] | None:
        """Trace the request of ``scope`` from here (if spans would record); give the
        token back to ``end``. (``active``'s test is repeated here: this runs for every
        request of a traced pool, and nearly always says "not configured, not yet time
        to look" at the cost of a clock read, not of a call.)"""
        if not self._configured and time.monotonic() < self._next_check:
            return None
        return TRACED.set(_Traced(self, scope)) if self.active() else None

    @staticmethod
    def end(token: Token[_Traced | None]) -> None:
        TRACED.reset(token)

    async def send(self, member: Member, request: UpstreamRequest) -> UpstreamResponse:
        """``member``'s transport sending ``request``, in a client span whose context the
        upstream gets (call it when ``TRACED`` holds the request)."""
        traced = TRACED.get()
        if traced is None:
            return await member.transport.send(request)
        resends = 0
        if traced.tracer is self:  # not a copy to another pool (a mirror's, in its task)
            resends = traced.sends
            traced.sends += 1
        upstream = member.upstream
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = propagate.extract(_carrier(traced.scope["headers"]))
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "server.address": upstream.host,
            "server.port": upstream.port,
            "url.full": upstream.origin + request.target.decode("latin-1"),
        }
        if resends:
            attributes["http.request.resend_count"] = resends
        span = self._tracer.start_span(
            request.method, context=parent, kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span, parent))
        request.headers = [
            *((n, v) for n, v in request.headers if n not in _PROPAGATED),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()),
        ]
        try:
            response = await member.transport.send(request)
        except BaseException as exc:
            _end(span, type(exc).__name__)
            raise
        span.set_attribute("http.response.status_code", response.status)
        return _TracedResponse(response, span)


def _carrier(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {n.decode("latin-1"): v.decode("latin-1") for n, v in headers if n in _PROPAGATED}


def _end(span: Any, error: str | None) -> None:
    if error is not None:
        span.set_attribute("error.type", error)
        span.set_status(trace.StatusCode.ERROR)
    span.end()


class _TracedResponse:
    """The upstream's response; its span ends when it is closed (or its body fails)."""

    __slots__ = ("_response", "_span", "headers", "status")

    def __init__(self, response: UpstreamResponse, span: Any) -> None:
        self._response = response
        self._span: Any = span
        self.status = response.status
        self.headers = response.headers
        if response.status >= 500:
            span.set_attribute("error.type", str(response.status))
            span.set_status(trace.StatusCode.ERROR)

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except BaseException as exc:
            if self._span is not None:
                _end(self._span, type(exc).__name__)
                self._span = None
            raise

    def body_complete(self) -> bool:
        return self._response.body_complete()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            if self._span is not None:
                self._span.end()
                self._span = None


def tracer() -> AttemptTracer | None:
    """An ``AttemptTracer``, or None without OpenTelemetry."""
    return AttemptTracer() if OPENTELEMETRY else None
