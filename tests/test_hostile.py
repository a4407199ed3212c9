"""Hostile input: one test per row of SECURITY.md's "Hostile input and what happens" table.

Every row is exercised against the proxy under real uvicorn (httptools, as ``serve`` runs
it, with ``proxy_headers=False`` so only the middleware decides about ``X-Forwarded-*``),
over raw sockets (an HTTP client library would normalise the bytes that matter), in front
of real recording upstreams: each test checks what did, or did not, reach an upstream.
Where the table says "(or refused by the server)", uvicorn's own 400 is accepted as long
as nothing reached an upstream.

After the table: client isolation (Set-Cookie, credentials and health checks), a bounded
fuzz of path, query and header handling that drives the middleware directly as an ASGI
app, and ``max_body_size`` with a body that is never sent or still being sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from rr_middleware import Pool, RoundRobinMiddleware, Upstream
from rr_middleware.config import HealthCheck

from .proxy import HOP_BY_HOP_NAMES, host_app, running_proxy
from .raw_client import RawClient, raw_request
from .raw_upstream import RawUpstream, answer_once
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp, values

Headers = list[tuple[bytes, bytes]]

FORWARDING = {
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-proto",
    "x-real-ip",
}
# The middleware's own short, generic error bodies (uvicorn's 400 reads differently).
ERROR_BODIES = {
    400: b"400 Bad Request\n",
    413: b"413 Content Too Large\n",
    414: b"414 URI Too Long\n",
    431: b"431 Request Header Fields Too Large\n",
    502: b"502 Bad Gateway\n",
}
FRONT = [("Host", "front.example")]


# --------------------------------------------------------------------------- helpers


@dataclass
class Site:
    """The proxy in front of two pools: ``/api`` → ``api`` and ``/admin`` → ``admin``."""

    proxy: RunningServer
    api: RunningServer
    admin: RunningServer

    @property
    def api_requests(self) -> list[dict[str, Any]]:
        return self.api.app.requests  # type: ignore[no-any-return]

    def nothing_forwarded(self) -> bool:
        return not self.api.app.requests and not self.admin.app.requests

    def exchange(self, data: bytes) -> tuple[int, Headers, bytes]:
        with RawClient(self.proxy.port) as raw:
            return raw.request(data)

    def get(self, target: str, headers: list[tuple[str, str]] = FRONT) -> tuple[int, bytes]:
        status, _, body = self.exchange(raw_request("GET", target, headers))
        return status, body

    def forwarded_once(self) -> dict[str, Any]:
        """The one request the /api upstream received, checked to be for its own Host."""
        assert self.admin.app.requests == []
        assert len(self.api_requests) == 1, self.api_requests
        record = self.api_requests[0]
        assert values(record, "host") == [f"127.0.0.1:{self.api.port}"]
        return record


@pytest.fixture(scope="module")
def site_servers() -> Iterator[Site]:
    with (
        serve(UpstreamApp("api")) as api,
        serve(UpstreamApp("admin")) as admin,
        running_proxy({"/api": [api.url], "/admin": [admin.url]}) as (proxy, _),
    ):
        yield Site(proxy, api, admin)


@pytest.fixture
def site(site_servers: Site) -> Site:
    site_servers.api.app.requests.clear()
    site_servers.admin.app.requests.clear()
    return site_servers


@pytest.fixture(scope="module")
def trusted_site_servers(site_servers: Site) -> Iterator[Site]:
    """The same upstreams behind a second proxy that trusts the test client (127.0.0.1)."""
    pools = {"/api": [site_servers.api.url], "/admin": [site_servers.admin.url]}
    with running_proxy(pools, trusted_proxies="127.0.0.1") as (proxy, _):
        yield Site(proxy, site_servers.api, site_servers.admin)


@pytest.fixture
def trusted_site(trusted_site_servers: Site) -> Site:
    trusted_site_servers.api.app.requests.clear()
    trusted_site_servers.admin.app.requests.clear()
    return trusted_site_servers


def assert_refused_by_middleware(status: int, body: bytes, expected: int = 400) -> None:
    assert (status, body) == (expected, ERROR_BODIES[expected])


@contextmanager
def proxy_with(pools: dict[str, Any], **server: Any) -> Iterator[RunningServer]:
    """Like ``running_proxy``, with uvicorn options (``http="h11"``)."""
    middleware = RoundRobinMiddleware(host_app(), pools=pools)
    with serve(middleware, proxy_headers=False, **server) as running:
        yield running


# --------------------------------------------------------------------------- the table, paths


@pytest.mark.parametrize(
    "path",
    ["/api/../admin", "/api/%2e%2e/admin", "/api/%2E./x", "/api/.%2e/x", "/api/x/..%2Fy"],
)
def test_dot_dot_segments_raw_or_encoded_are_refused_and_nothing_forwarded(
    site: Site, path: str
) -> None:
    status, body = site.get(path)
    assert_refused_by_middleware(status, body)
    assert site.nothing_forwarded()  # neither /api's upstream nor /admin's


@pytest.mark.parametrize("path", ["/api/.", "/api/%2e/x"])
def test_single_dot_segments_are_refused(site: Site, path: str) -> None:
    status, body = site.get(path)
    assert_refused_by_middleware(status, body)
    assert site.nothing_forwarded()


@pytest.mark.parametrize("path", ["/api/a\\..\\b", "/api/..\\admin"])
def test_raw_backslash_paths_are_refused(site: Site, path: str) -> None:
    status, body = site.get(path)
    assert_refused_by_middleware(status, body)
    assert site.nothing_forwarded()


@pytest.mark.parametrize(
    "target",
    [b"/api/%00x", b"/api/a\x01b", b"/api/a\x7fb", b"/api/a\tb", b"/api/a b", b"/api/a\xffb"],
    ids=["encoded-nul", "ctl-01", "del", "tab", "space", "raw-0xff"],
)
def test_nul_control_bytes_and_spaces_are_refused(site: Site, target: bytes) -> None:
    status, _, body = site.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: front\r\n\r\n")
    assert status == 400, body  # the middleware's own 400, or uvicorn's
    if target == b"/api/%00x":
        assert body == ERROR_BODIES[400]  # well-formed: the middleware itself refuses it
    assert site.nothing_forwarded()


AMBIGUOUS_PATHS = {
    "dot-dot-params": "/api/..;/admin",
    "dot-params": "/api/.;/x",
    "dot-dot-encoded-semicolon": "/api/..%3b/admin",
    "encoded-dots-params": "/api/%2e%2e;x/admin",
    "double-encoded-dots": "/api/%252e%252e/admin",
    "double-encoded-slash": "/api/..%252fadmin",
    "overlong-dots": "/api/%c0%ae%c0%ae/admin",
    "overlong-slash": "/api/..%c0%afadmin",
    "overlong-3-byte-dots": "/api/%e0%80%ae%e0%80%ae/x",
    "overlong-backslash": "/api/..%c1%9cadmin",
    "iis-u-escaped-dots": "/api/%u002e%u002e/admin",
    "iis-u-escaped-division-slash": "/api/..%u2215admin",
    # review: %u0025 is "%": IIS makes "%2e%2e" (or "%u002e") of these for a later decode.
    "iis-u-escaped-percent-double-decode": "/api/%u00252e%u00252e/admin",
    "iis-u-escaped-percent-u-escape": "/api/%u0025u002e%u0025u002e/admin",
    # review: U+2025 TWO DOT LEADER and U+FE30 are ".." under NFKC, one character.
    "iis-u-two-dot-leader": "/api/%u2025/admin",
    "iis-u-vertical-two-dot-leader": "/api/%uFE30/admin",
}


@pytest.mark.parametrize("path", AMBIGUOUS_PATHS.values(), ids=AMBIGUOUS_PATHS.keys())
def test_paths_some_upstreams_read_as_dot_segments_are_refused(site: Site, path: str) -> None:
    """Tomcat and Spring drop ``;params`` before resolving dot segments, frameworks that
    decode twice see ``%252e`` as ``.``, lenient UTF-8 decoders read ``%c0%ae`` as ``.``,
    IIS reads ``%u002e`` as ``.`` and ``%u2215`` as ``/``:
    the proxy sees no dot segment in these, such an upstream does."""
    status, body = site.get(path)
    assert_refused_by_middleware(status, body)
    assert site.nothing_forwarded()


def test_refuse_ambiguous_paths_false_forwards_them_as_sent() -> None:
    with (
        serve(UpstreamApp("api")) as api,
        running_proxy({"/api": Pool([api.url], refuse_ambiguous_paths=False)}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        for path in AMBIGUOUS_PATHS.values():
            status, _, body = raw.request(raw_request("GET", path, FRONT))
            assert status == 200, (path, body)
        status, _, body = raw.request(raw_request("GET", "/api/../admin", FRONT))
        assert_refused_by_middleware(status, body)  # plain dot segments: always refused
    forwarded = [r["raw_path"] for r in api.app.requests]
    assert forwarded == [path.removeprefix("/api") for path in AMBIGUOUS_PATHS.values()]


def test_path_parameters_and_encoded_text_are_forwarded(site: Site) -> None:
    """What the ambiguous-path checks leave alone: matrix parameters, a name holding an
    encoded "%2f", UTF-8 and Latin-1 escapes."""
    for path in ("/api/items;v=1/x", "/api/a%252fb", "/api/caf%c3%a9", "/api/%e9t%e9"):
        status, body = site.get(path)
        assert status == 200, (path, body)
    assert [r["raw_path"] for r in site.api_requests] == [
        "/items;v=1/x",
        "/a%252fb",
        "/caf%c3%a9",
        "/%e9t%e9",
    ]


def test_path_and_query_over_max_url_length_get_414(site: Site) -> None:
    path = "/api/" + "p" * 4000
    query = "q=" + "x" * (8192 - len(path) - 2)  # path + query: exactly the limit
    status, body = site.get(f"{path}?{query}")
    assert status == 200, body  # at the limit: forwarded
    assert site.forwarded_once()["query"] == query
    site.api_requests.clear()

    status, body = site.get(f"{path}?{query}x")  # one byte over
    assert_refused_by_middleware(status, body, 414)
    status, body = site.get("/api/" + "p" * 8200)  # the path alone
    assert_refused_by_middleware(status, body, 414)
    assert site.nothing_forwarded()


def test_protocol_relative_path_matching_no_pool_gets_the_host_apps_answer(site: Site) -> None:
    status, headers, body = site.exchange(raw_request("GET", "//evil.example/x", FRONT))
    assert (status, body) == (404, b"Not Found")  # Starlette's own 404 from the host app
    assert b"x-upstream" not in dict(headers)
    assert site.nothing_forwarded()


def test_double_slash_under_a_pool_goes_to_the_configured_upstream(site: Site) -> None:
    status, body = site.get("/api//evil.example/x")
    assert status == 200, body
    record = site.forwarded_once()
    assert record["raw_path"] == "//evil.example/x"
    assert json.loads(body)["server"] == "api"


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/api/@evil.example", "/@evil.example"),
        ("/api/http://evil.example/x", "/http://evil.example/x"),
    ],
)
def test_authority_lookalikes_go_to_the_configured_upstream_unchanged(
    site: Site, path: str, forwarded: str
) -> None:
    status, body = site.get(path)
    assert status == 200, body
    assert site.forwarded_once()["raw_path"] == forwarded


def test_absolute_form_target_goes_to_the_configured_upstream_as_its_path(site: Site) -> None:
    request = raw_request("GET", "http://evil.example/api/x?q=1", [("Host", "evil.example")])
    status, _, body = site.exchange(request)
    assert status == 200, body
    record = site.forwarded_once()  # Host is the upstream's own, not evil.example
    assert (record["raw_path"], record["query"]) == ("/x", "q=1")


# --------------------------------------------------------------------------- the table, methods

# What a 405 says the pool takes (RFC 9110 §15.5.6): the standard methods it does not refuse.
DEFAULT_ALLOW = b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"


def allow(headers: Headers) -> list[bytes]:
    return [v for n, v in headers if n == b"allow"]


def test_trace_is_refused_with_405_and_allow_and_nothing_forwarded(site: Site) -> None:
    """TRACE through uvicorn's default parser (httptools), which delivers it: an upstream
    would echo the request back, cookies and credentials included (cross-site tracing)."""
    sent = [*FRONT, ("Cookie", "session=s3cret"), ("Authorization", "Bearer t0k3n")]
    status, headers, body = site.exchange(raw_request("TRACE", "/api/x", sent))
    assert (status, body) == (405, b"405 Method Not Allowed\n")
    assert allow(headers) == [DEFAULT_ALLOW]
    assert site.nothing_forwarded()


def test_connect_in_origin_form_is_refused_with_405(site: Site) -> None:
    """httptools refuses a CONNECT to an authority (``CONNECT host:443``) itself, with
    400, but delivers one whose target is a path; that one reaches the middleware."""
    status, headers, body = site.exchange(raw_request("CONNECT", "/api/x", FRONT))
    assert (status, body) == (405, b"405 Method Not Allowed\n")
    assert allow(headers) == [DEFAULT_ALLOW]
    assert site.nothing_forwarded()


def test_connect_to_an_authority_and_a_lower_case_trace_are_refused_under_h11() -> None:
    """uvicorn with h11 delivers what httptools does not: ``CONNECT example.com:443`` (whose
    path is then ``example.com:443``: only a ``/`` pool takes it) and method names in lower
    case, which some upstreams read as the upper-case method."""
    with (
        serve(UpstreamApp("root")) as root,
        proxy_with({"/": [root.url]}, http="h11") as proxy,
        RawClient(proxy.port) as raw,
    ):
        for method, target in (("CONNECT", "example.com:443"), ("trace", "/x")):
            status, headers, body = raw.request(raw_request(method, target, FRONT))
            assert (status, body) == (405, b"405 Method Not Allowed\n"), method
            assert allow(headers) == [DEFAULT_ALLOW]
        assert root.app.requests == []


def test_a_pool_that_does_not_refuse_a_method_forwards_it() -> None:
    """Opting in: each pool names the methods it refuses, and its 405 names the rest. A
    CONNECT a pool lets through goes upstream as an ordinary request (no tunnel)."""
    with serve(UpstreamApp("api")) as api:
        pools = {
            "/trace": Pool([api.url], refuse_methods={"CONNECT"}),
            "/connect": Pool([api.url], refuse_methods={"TRACE", "DELETE"}),
        }
        with running_proxy(pools) as (proxy, _):
            with RawClient(proxy.port) as raw:
                status, _, body = raw.request(raw_request("TRACE", "/trace/x", FRONT))
                assert status == 200, body
                status, headers, body = raw.request(raw_request("DELETE", "/connect/x", FRONT))
                assert (status, body) == (405, b"405 Method Not Allowed\n")
                assert allow(headers) == [b"GET, HEAD, POST, PUT, CONNECT, OPTIONS, PATCH"]
            with RawClient(proxy.port) as raw:
                status, _, body = raw.request(raw_request("CONNECT", "/connect/x", FRONT))
                assert status == 200, body
    assert [(r["method"], r["raw_path"]) for r in api.app.requests] == [
        ("TRACE", "/x"),
        ("CONNECT", "/x"),
    ]


# --------------------------------------------------------------------------- the table, headers


def test_header_named_in_connection_is_not_forwarded(site: Site) -> None:
    sent = [*FRONT, ("Connection", "x-secret"), ("X-Secret", "1"), ("X-Kept", "yes")]
    status, _ = site.get("/api/h", sent)
    assert status == 200
    record = site.forwarded_once()
    assert values(record, "x-secret") == []
    assert values(record, "x-kept") == ["yes"]


def test_connection_naming_x_forwarded_for_does_not_remove_the_proxys_own(site: Site) -> None:
    sent = [*FRONT, ("Connection", "x-forwarded-for"), ("X-Forwarded-For", "6.6.6.6")]
    status, _ = site.get("/api/h", sent)
    assert status == 200
    assert values(site.forwarded_once(), "x-forwarded-for") == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
    ],
)
def test_hop_by_hop_request_headers_are_not_forwarded(site: Site, name: str, value: str) -> None:
    status, _ = site.get("/api/h", [*FRONT, (name, value), ("X-Kept", "yes")])
    assert status == 200
    record = site.forwarded_once()
    assert values(record, name.lower()) == []
    assert values(record, "x-kept") == ["yes"]
    assert value not in json.dumps(record["headers"])


def test_x_forwarded_for_from_an_untrusted_client_is_replaced(site: Site) -> None:
    status, _ = site.get("/api/h", [*FRONT, ("X-Forwarded-For", "1.2.3.4")])
    assert status == 200
    assert values(site.forwarded_once(), "x-forwarded-for") == ["127.0.0.1"]


# Names as a client writes them; the upstream records them lower-cased.
OTHER_X_FORWARDED = [
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Forwarded-Client-Cert", 'Hash=abc;Subject="CN=admin"'),
    ("X-Forwarded-Server", "internal.example"),
    ("X-Forwarded-Uri", "/admin"),
]
UNDERSCORE_LOOKALIKES = [
    ("X_Forwarded_For", "6.6.6.6"),
    ("X_Real_IP", "6.6.6.6"),
    ("X_Forwarded_Proto", "https"),
    ("X_Forwarded_Host", "evil.example"),
    ("X-Forwarded_For", "6.6.6.6"),
    ("X_Forwarded_Ssl", "on"),
]


def sent_values(record: dict[str, Any]) -> list[str]:
    return [v for _, v in record["headers"]]


@pytest.mark.parametrize(("name", "value"), OTHER_X_FORWARDED)
def test_any_x_forwarded_header_from_an_untrusted_client_is_not_forwarded(
    site: Site, name: str, value: str
) -> None:
    status, _ = site.get("/api/h", [*FRONT, (name, value), ("X-Kept", "yes")])
    assert status == 200
    record = site.forwarded_once()
    assert values(record, name.lower()) == []
    assert values(record, "x-kept") == ["yes"]
    assert value not in sent_values(record)


@pytest.mark.parametrize(("name", "value"), OTHER_X_FORWARDED)
def test_any_x_forwarded_header_from_a_trusted_proxy_is_forwarded(
    trusted_site: Site, name: str, value: str
) -> None:
    status, _ = trusted_site.get("/api/h", [*FRONT, (name, value)])
    assert status == 200
    assert values(trusted_site.forwarded_once(), name.lower()) == [value]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
@pytest.mark.parametrize(("name", "value"), UNDERSCORE_LOOKALIKES)
def test_underscore_lookalikes_of_forwarding_headers_are_never_forwarded(
    site: Site, trusted_site: Site, name: str, value: str, trusted: bool
) -> None:
    """CGI and WSGI upstreams read ``X_Forwarded_For`` as ``HTTP_X_FORWARDED_FOR``: passed
    on, it would stand in for the real header, even behind a trusted proxy."""
    front = trusted_site if trusted else site
    status, _ = front.get("/api/h", [*FRONT, (name, value)])
    assert status == 200
    record = front.forwarded_once()
    assert values(record, name.lower()) == []
    assert value not in sent_values(record)
    assert values(record, "x-forwarded-for") == ["127.0.0.1"]


def test_two_host_headers_are_refused(site: Site) -> None:
    status, body = site.get("/api/h", [("Host", "front.example"), ("Host", "other.example")])
    assert_refused_by_middleware(status, body)
    assert site.nothing_forwarded()


def test_two_different_content_lengths_are_refused(site: Site) -> None:
    sent = [*FRONT, ("Content-Length", "3"), ("Content-Length", "5")]
    status, _, body = site.exchange(raw_request("POST", "/api/h", sent, b"hello"))
    assert status == 400, body  # uvicorn refuses it before the middleware sees it
    assert site.nothing_forwarded()


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_transfer_encoding_with_content_length_drops_content_length(http: str) -> None:
    """Under h11 the middleware gets the request: the client's Content-Length must not
    reach the upstream next to the body the proxy re-frames. Under httptools (llhttp)
    uvicorn refuses the request itself with 400, although this row of the table does not
    say "(or refused by the server)"; nothing may reach the upstream then."""
    sent = [*FRONT, ("Transfer-Encoding", "chunked"), ("Content-Length", "3")]
    request = raw_request("POST", "/api/h", sent, b"5\r\nhello\r\n0\r\n\r\n")
    with serve(UpstreamApp("api")) as api, proxy_with({"/api": [api.url]}, http=http) as proxy:
        with RawClient(proxy.port) as raw:
            status, _, body = raw.request(request)
        if http == "httptools":
            assert status == 400, body
            assert api.app.requests == []
            return
        assert status == 200, body
        [record] = api.app.requests
    assert record["body"] == "hello"
    framing = [(k, v) for k, v in record["headers"] if k in ("content-length", "transfer-encoding")]
    assert framing in ([("content-length", "5")], [("transfer-encoding", "chunked")]), framing


def test_request_headers_over_max_header_bytes_get_431(site: Site) -> None:
    under = [*FRONT, *((f"X-Pad-{i}", "v" * 7000) for i in range(9))]  # ~63 KB: fine
    status, _ = site.get("/api/h", under)
    assert status == 200
    site.api_requests.clear()
    over = [*FRONT, *((f"X-Pad-{i}", "v" * 8000) for i in range(9))]  # ~72 KB
    status, body = site.get("/api/h", over)
    assert_refused_by_middleware(status, body, 431)
    assert site.nothing_forwarded()


def test_expect_100_continue_is_answered_by_the_server_and_not_forwarded(site: Site) -> None:
    head = [*FRONT, ("Expect", "100-continue"), ("Content-Length", "5")]
    with RawClient(site.proxy.port) as raw:
        raw.send(raw_request("POST", "/api/h", head))
        status, _ = raw.read_head()
        assert status == 100  # before a byte of the body was sent
        assert site.nothing_forwarded()
        raw.send(b"hello")
        status, headers = raw.read_head()
        assert status == 200
        raw.read_body(headers)
    record = site.forwarded_once()
    assert record["body"] == "hello"
    assert values(record, "expect") == []


def test_non_utf8_header_values_are_forwarded_byte_for_byte(site: Site) -> None:
    sent = [*FRONT, ("X-Latin", "\xe9t\xe9"), ("X-Bytes", "\x80\xfe\xff ok"), ("X-Utf8", "é")]
    status, _ = site.get("/api/h", sent)  # latin-1 text: each character one byte
    assert status == 200
    record = site.forwarded_once()  # the upstream records header bytes as latin-1
    assert values(record, "x-latin") == ["\xe9t\xe9"]
    assert values(record, "x-bytes") == ["\x80\xfe\xff ok"]
    assert values(record, "x-utf8") == ["\xe9"]


# --------------------------------------------------------------------------- the table, bodies


def test_body_over_max_body_size_with_content_length_gets_413_unread() -> None:
    """The 413 arrives with none of the body sent: it cannot have been read. With
    ``Expect: 100-continue`` the server sends no 100 either, since nothing asked for it."""
    with (
        serve(UpstreamApp("api")) as api,
        running_proxy({"/api": Pool([api.url], max_body_size=1000)}) as (proxy, _),
    ):
        for extra in ([], [("Expect", "100-continue")]):
            head = [*FRONT, ("Content-Length", "10000000000"), *extra]
            with RawClient(proxy.port) as raw:
                raw.sock.settimeout(5)
                raw.send(raw_request("POST", "/api/upload", head))  # the head, no body
                status, headers = raw.read_head()
                assert status == 413, extra
                assert raw.read_body(headers) == ERROR_BODIES[413]
        # At the limit it is forwarded.
        with RawClient(proxy.port) as raw:
            sent = [*FRONT, ("Content-Length", "1000")]
            status, _, _ = raw.request(raw_request("POST", "/api/ok", sent, b"x" * 1000))
        assert status == 200
        assert [r["raw_path"] for r in api.app.requests] == ["/ok"]


def test_chunked_body_passing_max_body_size_gets_413_while_still_sending() -> None:
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    with (
        serve(UpstreamApp("api")) as api,
        running_proxy({"/api": Pool([api.url], max_body_size=1000)}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        raw.sock.settimeout(5)
        raw.send(raw_request("POST", "/api/upload", [*FRONT, ("Transfer-Encoding", "chunked")]))
        for _ in range(3):  # 900 bytes: still within the limit
            raw.send(chunk(b"a" * 300))
            time.sleep(0.01)
        readable, _, _ = select.select([raw.sock], [], [], 0.2)
        assert not readable, "answered before the limit was passed"
        raw.send(chunk(b"b" * 300))  # 1200 bytes: over; the final chunk is never sent
        status, headers = raw.read_head()
        assert status == 413
        assert raw.read_body(headers) == ERROR_BODIES[413]
        deadline = time.monotonic() + 5
        while api.app.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.app.active == 0
    assert api.app.requests == []  # the upstream never got a complete request


# --------------------------------------------------------------------------- the table, isolation


def test_set_cookie_for_client_a_never_reaches_client_bs_requests(site: Site) -> None:
    """Two clients on their own connections, one upstream connection reused between them
    by the proxy: A's cookies come back to A only, as separate lines, and reach the
    upstream only on A's own requests."""
    with RawClient(site.proxy.port) as a, RawClient(site.proxy.port) as b:
        status, headers, _ = a.request(raw_request("GET", "/api/?action=cookies&n=2", FRONT))
        assert status == 200
        cookies = [v for n, v in headers if n == b"set-cookie"]
        assert cookies == [b"c0=v0; Path=/api", b"c1=v1; Path=/api"]
        for _ in range(3):
            status, _, body = b.request(raw_request("GET", "/api/?action=echo", FRONT))
            assert status == 200
            record = json.loads(body)
            assert values(record, "cookie") == []
            assert b"c0=v0" not in body
            assert b"c1=v1" not in body
        sent = [*FRONT, ("Cookie", "c0=v0; c1=v1")]
        status, _, body = a.request(raw_request("GET", "/api/?action=echo", sent))
        assert values(json.loads(body), "cookie") == ["c0=v0; c1=v1"]
        status, _, body = b.request(raw_request("GET", "/api/?action=echo", FRONT))
        assert values(json.loads(body), "cookie") == []
    with RawClient(site.proxy.port) as c:
        status, _, body = c.request(raw_request("GET", "/api/?action=echo", FRONT))
        assert values(json.loads(body), "cookie") == []


# --------------------------------------------------------------------------- the table, upstreams


BROKEN_RESPONSES = {
    "short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
    "chunked-cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "bad-chunk-size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "two-content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "te-and-cl": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    "bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nBroken header line\r\nContent-Length: 2\r\n\r\nok",
    "truncated-head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "no-head": b"",
}


@pytest.mark.parametrize("response", BROKEN_RESPONSES.values(), ids=BROKEN_RESPONSES.keys())
def test_broken_upstream_response_gives_502_or_an_aborted_connection(response: bytes) -> None:
    with (
        RawUpstream(answer_once(response)) as upstream,
        running_proxy({"/api": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        raw.sock.settimeout(5)
        try:
            status, _, body = raw.request(raw_request("GET", "/api/x", FRONT))
        except ConnectionError:
            pass  # aborted: the client sees an incomplete response, never a complete one
        else:
            assert_refused_by_middleware(status, body, 502)  # generic: no address, no cause
        assert len(upstream.requests) == 1
        assert upstream.requests[0].head.startswith(b"GET /x HTTP/1.1\r\n")


# --------------------------------------------------------------------------- credentials


class HealthRecorder:
    """An upstream recording the headers of traffic and of ``/health`` checks; ``enough``
    is set once ``wanted`` checks have arrived."""

    def __init__(self) -> None:
        self.traffic: list[dict[str, str]] = []
        self.checks: list[list[tuple[str, str]]] = []
        self.wanted: int | None = None
        self.enough = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if scope["raw_path"] == b"/health":
            self.checks.append(headers)
            if self.wanted is not None and len(self.checks) >= self.wanted:
                self.enough.set()
        else:
            self.traffic.append(dict(headers))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_client_credentials_reach_the_serving_upstream_but_never_health_checks() -> None:
    recorder = HealthRecorder()
    with serve(recorder) as upstream:
        pool = Pool([upstream.url], health_check=HealthCheck(interval=0.05))
        with running_proxy({"/api": pool}) as (proxy, _):
            secrets = [("Authorization", "Bearer t0k3n"), ("Cookie", "session=s3cret")]
            with RawClient(proxy.port) as raw:
                for _ in range(3):
                    status, _, _ = raw.request(raw_request("GET", "/api/x", [*FRONT, *secrets]))
                    assert status == 200
            recorder.wanted = len(recorder.checks) + 3  # checks made after the traffic
            assert recorder.enough.wait(5), len(recorder.checks)
    assert len(recorder.traffic) == 3
    for seen in recorder.traffic:  # credentials do go to the upstream serving the request
        assert (seen["authorization"], seen["cookie"]) == ("Bearer t0k3n", "session=s3cret")
    assert len(recorder.checks) >= 4
    for check in recorder.checks:
        assert sorted(name for name, _ in check) == ["host", "user-agent"], check
        assert dict(check)["host"] == f"127.0.0.1:{upstream.port}"
        assert "t0k3n" not in repr(check)
        assert "s3cret" not in repr(check)


# --------------------------------------------------------------------------- fuzz


@dataclass(frozen=True)
class Member:
    name: str
    prefix: str
    host: str
    port: int
    base_path: bytes
    in_process: bool

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.base_path.decode()}"

    @property
    def host_header(self) -> str:
        return self.host if self.port == 80 else f"{self.host}:{self.port}"


FUZZ_MEMBERS = [
    Member("api-a", "/api", "api-a.internal", 8001, b"/base", in_process=True),
    Member("api-m", "/api", "api-m.internal", 8002, b"", in_process=False),
    Member("v2-a", "/api/v2", "v2-a.internal", 9000, b"/v2base/deep", in_process=True),
    Member("v2-m", "/api/v2", "v2-m.internal", 9001, b"/m", in_process=False),
    Member("static-m", "/static", "static.internal", 80, b"/s", in_process=False),
]
FUZZ_PREFIXES = sorted({m.prefix for m in FUZZ_MEMBERS}, key=lambda p: -p.count("/"))
FUZZ_CLIENT = ("203.0.113.9", 1234)


@dataclass
class Hit:
    """What one upstream (or the host app, as ``"host"``) received."""

    name: str
    host: str | None
    port: int | None
    raw_path: bytes
    query: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


class FuzzRecorder:
    """An in-process upstream (or the host app) recording every request it gets."""

    def __init__(self, name: str, hits: list[Hit], status: int = 200) -> None:
        self.name = name
        self.hits = hits
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body", False):
            pass
        host, port = scope.get("server") or (None, None)
        port = port or 80  # httpx leaves the scheme's default port out
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        self.hits.append(
            Hit(self.name, host, port, scope["raw_path"], scope["query_string"], headers)
        )
        answer = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": self.status, "headers": answer})
        await send({"type": "http.response.body", "body": b"ok"})


def mock_upstream(name: str, hits: list[Hit]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        path, _, query = request.url.raw_path.partition(b"?")
        headers = [
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw
        ]
        port = request.url.port or 80  # httpx leaves the scheme's default port out
        hits.append(Hit(name, request.url.host, port, path, query, headers))
        return httpx.Response(200, content=b"ok")

    return httpx.MockTransport(handler)


def fuzz_middleware(hits: list[Hit]) -> RoundRobinMiddleware:
    pools: dict[str, list[Upstream]] = {}
    for m in FUZZ_MEMBERS:
        if m.in_process:
            upstream = Upstream(m.url, app=FuzzRecorder(m.name, hits))
        else:
            upstream = Upstream(m.url, transport=mock_upstream(m.name, hits))
        pools.setdefault(m.prefix, []).append(upstream)
    return RoundRobinMiddleware(FuzzRecorder("host", hits, status=404), pools=pools)


def expected_match(raw_path: bytes) -> tuple[str, int] | None:
    """The longest configured prefix whose segments equal the path's first segments,
    percent-decoded; and the length of the raw text it matched."""
    if not raw_path.startswith(b"/"):
        return None
    segments = raw_path[1:].split(b"/")
    for prefix in FUZZ_PREFIXES:
        wanted = prefix[1:].encode().split(b"/")
        if len(segments) >= len(wanted) and all(
            unquote_to_bytes(s) == w for s, w in zip(segments, wanted, strict=False)
        ):
            return prefix, len(b"/" + b"/".join(segments[: len(wanted)]))
    return None


def dot_segment(path: bytes) -> bool:
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    return any(s in (b".", b"..") for s in decoded.split(b"/"))


def read_as_dot_segment_by_some(path: bytes) -> bool:
    """SECURITY.md's ambiguous paths: decoded once or more, a dot segment with ";params",
    or overlong UTF-8; decoded twice or more, any dot segment."""
    levels = [unquote_to_bytes(path)]
    while (again := unquote_to_bytes(levels[-1])) != levels[-1]:
        levels.append(again)
    for depth, text in enumerate(levels, start=1):
        for segment in text.replace(b"\\", b"/").split(b"/"):
            name, params, _ = segment.partition(b";")
            if name in (b".", b"..") and (params or depth > 1):
                return True
        if OVERLONG.search(text):
            return True
    return False


OVERLONG = re.compile(
    rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]|\xf0[\x80-\x8f][\x80-\xbf]{2}"
)


def must_refuse(raw_path: bytes) -> bool:
    """Dot segments, raw or encoded or with backslashes, NUL and ambiguous paths
    (SECURITY.md); and any raw backslash at all (routing.py: some upstreams read it as
    "/")."""
    return (
        dot_segment(raw_path)
        or b"\\" in raw_path
        or b"%00" in raw_path
        or read_as_dot_segment_by_some(raw_path)
    )


def forwarding_name(name: str) -> bool:
    """Any X-Forwarded-* name, or a look-alike with "_" for "-" (SECURITY.md): never
    forwarded from the fuzz's client, which is not a trusted proxy."""
    dashed = name.replace("_", "-")
    return dashed in FORWARDING or dashed.startswith("x-forwarded-")


def expected_headers(sent: list[tuple[str, str]], prefix: str, member: Member) -> list[Any]:
    named: set[str] = set()
    for name, value in sent:
        if name == "connection":
            named |= {t.strip().lower() for t in value.split(",")}
    named -= HOP_BY_HOP_NAMES
    special = HOP_BY_HOP_NAMES | FORWARDING | {"host", "content-length", "expect"}
    kept = [
        (n, v) for n, v in sent if n not in special and n not in named and not forwarding_name(n)
    ]
    hosts = [v for n, v in sent if n == "host"]
    added = [("x-forwarded-for", FUZZ_CLIENT[0]), ("x-forwarded-proto", "http")]
    added += [("x-forwarded-host", h) for h in hosts]
    added.append(("x-forwarded-prefix", prefix))
    return [*kept, *added, ("host", member.host_header)]


POOL_STARTS = ["/api", "/api/v2", "/static", "/%61pi", "/api/%76%32", "/%61PI/v%32", "/api/"]
DECOY_STARTS = ["/apix", "/api/v2x", "/api%2Fv2", "/API", "//api", "/static%2F", "/", ""]
SEGMENT_TOKENS = [
    ".", ".", "..", "%", *"0123456789abcdefABCDEF", "@", ":", "\\", *"xyzXYZ", "/",
    "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "%00", "api", "v2", "static",
    ";", "%3b", "%25", "%252e", "%252f", "%c0%ae", "%c0", "%ae", "%e0%80", "%c3%a9",
]  # fmt: skip
QUERY_ALPHABET = "abcXYZ019=&%./?:@+,;-_~!$'()*[]"
HEADER_NAMES = [
    "host", "cookie", "authorization", "accept", "x-a", "x-b", "user-agent", "expect",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-prefix",
    "forwarded", "x-real-ip", "keep-alive", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-connection", "x-forwarded-ssl", "x-forwarded-client-cert",
    "x_forwarded_for", "x_real_ip", "x-forwarded_proto", "x_request_id", "x-forwarded",
]  # fmt: skip
HEADER_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
CONNECTION_TOKENS = [*HEADER_NAMES, "close", "X-A", "Cookie", " X-B ", "Host"]
segments = st.lists(st.sampled_from(SEGMENT_TOKENS), max_size=4).map("".join)
raw_paths = st.builds(
    lambda start, glue, rest: (start + glue + "".join("/" + s for s in rest)).encode(),
    st.one_of(st.sampled_from(POOL_STARTS), st.sampled_from(DECOY_STARTS)),
    st.one_of(st.just(""), st.sampled_from(["x", ".", "%2e", "%2F", "\\", "%", "%0"])),
    st.lists(segments, max_size=5),
)
queries = st.text(st.sampled_from(QUERY_ALPHABET), max_size=16).map(str.encode)
header_lists = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(HEADER_NAMES), HEADER_VALUE),
        st.tuples(
            st.just("connection"),
            st.lists(st.sampled_from(CONNECTION_TOKENS), max_size=3).map(",".join),
        ),
    ),
    max_size=6,
)


def test_fuzz_paths_queries_and_headers_reach_only_configured_upstreams_as_documented() -> None:
    """Whenever an upstream is reached: (a) it is a configured one, at its configured host
    and port (in-process apps and ``httpx.MockTransport`` upstreams both report it);
    (b) the forwarded raw path is its base path followed by the client's raw path minus
    the matched prefix; (c) that prefix is the longest one matching on segment boundaries,
    percent-decoded; (d) no forwarded path has a dot segment. Also: the query arrives byte
    for byte, the headers exactly as documented, and what must be refused is refused."""
    hits: list[Hit] = []
    middleware = fuzz_middleware(hits)
    members = {m.name: m for m in FUZZ_MEMBERS}
    loop = asyncio.new_event_loop()

    async def call(scope: dict[str, Any]) -> int:
        sent: list[Message] = []
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays: wait until cancelled
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)

        await asyncio.wait_for(middleware(scope, receive, send), 5)
        assert sent[0]["type"] == "http.response.start"
        assert not sent[-1].get("more_body", False)
        return int(sent[0]["status"])

    @settings(max_examples=150, deadline=None)
    @given(raw_path=raw_paths, query=queries, headers=header_lists)
    def check(raw_path: bytes, query: bytes, headers: list[tuple[str, str]]) -> None:
        hits.clear()
        scope = {
            "type": "http",
            "method": "GET",
            "path": unquote_to_bytes(raw_path).decode("latin-1"),
            "raw_path": raw_path,
            "query_string": query,
            "headers": [(n.encode(), v.encode()) for n, v in headers],
            "client": FUZZ_CLIENT,
            "scheme": "http",
            "http_version": "1.1",
            "server": ("proxy", 80),
            "root_path": "",
        }
        status = loop.run_until_complete(call(scope))
        upstream_hits = [h for h in hits if h.name != "host"]
        for hit in upstream_hits:  # whatever happens, only configured upstreams
            member = members[hit.name]
            assert (hit.host, hit.port) == (member.host, member.port), hit
            assert not dot_segment(hit.raw_path), hit
        match = expected_match(raw_path)
        if not raw_path.startswith(b"/"):  # no server sends this; it must go nowhere
            assert upstream_hits == [], (raw_path, hits)
            assert status in (400, 404), (raw_path, status)
            return
        if match is None:
            assert status == 404, (raw_path, status)
            assert [h.name for h in hits] == ["host"], (raw_path, hits)
            assert hits[0].raw_path == raw_path
            return
        prefix, end = match
        if must_refuse(raw_path) or [n for n, _ in headers].count("host") > 1:
            assert (status, hits) == (400, []), raw_path
            return
        assert status == 200, (raw_path, status)
        assert len(hits) == 1, hits
        hit = hits[0]
        member = members[hit.name]
        assert member.prefix == prefix, (raw_path, hit)  # the longest prefix on segments
        assert hit.raw_path.startswith(member.base_path), hit
        rest = raw_path[end:]
        assert hit.raw_path[len(member.base_path) :] == rest or (
            member.base_path + rest == b"" and hit.raw_path == b"/"
        ), (raw_path, hit)
        assert hit.query == query, (query, hit)
        assert hit.headers == expected_headers(headers, prefix, member), (headers, hit)

    try:
        check()
    finally:
        loop.run_until_complete(middleware.shutdown())
        loop.close()
