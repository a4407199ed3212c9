"""End-to-end fidelity: real uvicorn upstreams, the proxy itself under real uvicorn.

Every test talks to the proxy over TCP (httpx, or a raw socket where httpx would
normalise what is sent or received) and checks what the upstream really received and what
the client really got. The proxy's uvicorn runs with ``proxy_headers=False`` so that the
only code deciding about ``X-Forwarded-*`` is the middleware's, not uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from rr_middleware import AiohttpTransport, Pool

from .proxy import HOP_BY_HOP_NAMES, assert_generic_error, client, running_proxy
from .raw_client import RawClient, raw_request
from .raw_upstream import RawUpstream, answer_each
from .servers import RunningServer, dead_url, serve
from .upstream_app import values

Headers = list[tuple[bytes, bytes]]

FORWARDING_NAMES = [
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-prefix",
    "x-forwarded-proto",
]


# --------------------------------------------------------------------------- helpers


def names(record: dict[str, Any]) -> list[str]:
    return sorted(k for k, _ in record["headers"])


class MiscUpstream:
    """A pure-ASGI upstream for behaviour tests/upstream_app.py does not have.

    ``/redirect`` 302 to ``/landed``; ``/hop`` a response full of hop-by-hop headers;
    ``/bytes`` response headers whose values are non-ASCII bytes;
    ``/broken-chunked`` a chunked body that dies after one chunk; ``/hang`` headers and one
    chunk, then nothing until the connection is closed (``closed`` counts those, and
    ``all_closed`` is set once ``expected_closes`` have happened); anything else a small
    200 answer.
    """

    def __init__(self, expected_closes: int = 0) -> None:
        self.paths: list[str] = []
        self.headers: list[Headers] = []
        self.lock = threading.Lock()
        self.opened = 0
        self.closed = 0
        self.expected_closes = expected_closes
        self.all_closed = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["raw_path"].decode("latin-1")
        self.paths.append(path)
        self.headers.append(list(scope["headers"]))
        while (await receive()).get("more_body", False):
            pass
        if path == "/redirect":
            headers = [(b"location", b"/landed"), (b"content-length", b"5")]
            await send({"type": "http.response.start", "status": 302, "headers": headers})
            await send({"type": "http.response.body", "body": b"moved"})
        elif path == "/hop":
            headers = [
                (b"connection", b"x-upstream-secret, keep-alive"),
                (b"keep-alive", b"timeout=5, max=100"),
                (b"proxy-authenticate", b'Basic realm="upstream"'),
                (b"proxy-connection", b"keep-alive"),
                (b"trailer", b"x-checksum"),
                (b"upgrade", b"h2c"),
                (b"x-upstream-secret", b"s3cr3t"),
                (b"x-kept", b"yes"),
                (b"content-length", b"3"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"hop"})
        elif path == "/bytes":
            headers = [
                (b"x-resp-utf8", b"caf\xc3\xa9"),
                (b"x-resp-latin", b"\xe9t\xe9"),
                (b"content-length", b"2"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"ok"})
        elif path == "/broken-chunked":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("upstream dies mid-body (test)")
        elif path == "/hang":
            with self.lock:
                self.opened += 1
            try:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"first", "more_body": True})
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:
                with self.lock:
                    self.closed += 1
                    if self.closed >= self.expected_closes:
                        self.all_closed.set()
        else:
            headers = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"ok"})


# --------------------------------------------------------------------------- routing


def test_round_robin_rotates_across_the_pool(upstreams: list[RunningServer]) -> None:
    with running_proxy({"/rr": [u.url for u in upstreams]}) as (proxy, _), client() as http:
        served = [http.get(f"{proxy.url}/rr/x").headers["x-upstream"] for _ in range(9)]
    first = served[:3]
    assert sorted(first) == ["a", "b", "c"], served
    assert served == first * 3, served


def test_longest_prefix_wins_and_segment_boundaries(upstreams: list[RunningServer]) -> None:
    a, b, _ = upstreams
    pools = {"/api": [a.url], "/api/v2": [b.url]}
    with running_proxy(pools) as (proxy, _), client() as http:

        def via(path: str) -> tuple[str, str, str]:
            response = http.get(proxy.url + path)
            assert response.status_code == 200
            record = response.json()
            return record["server"], record["raw_path"], record["query"]

        assert via("/api/v2/users?x=1") == ("b", "/users", "x=1")
        assert via("/api/v2") == ("b", "/", "")
        assert via("/api/v1/users") == ("a", "/v1/users", "")
        assert via("/api/v2x") == ("a", "/v2x", "")
        assert via("/api") == ("a", "/", "")

        # /apix is not under /api: the host app's own route answers ...
        response = http.get(f"{proxy.url}/apix")
        assert (response.status_code, response.text) == (200, "host apix")
        assert "x-upstream" not in response.headers
        # ... and its own 404 for what it does not route.
        response = http.get(f"{proxy.url}/apix/deeper")
        assert response.status_code == 404
        assert "x-upstream" not in response.headers
        # A local route of the host app still answers.
        response = http.get(f"{proxy.url}/local")
        assert (response.status_code, response.text) == (200, "host local")
    assert len(a.app.requests) == 3
    assert len(b.app.requests) == 2


def test_root_pool_catches_everything(upstreams: list[RunningServer]) -> None:
    a, _, c = upstreams
    with running_proxy({"/": [c.url], "/api": [a.url]}) as (proxy, _), client() as http:
        for path, server, raw_path, query in [
            ("/local", "c", "/local", ""),
            ("/anything/deep?q=1", "c", "/anything/deep", "q=1"),
            ("/", "c", "/", ""),
            ("/apix", "c", "/apix", ""),
            ("/api/x", "a", "/x", ""),
        ]:
            record = http.get(proxy.url + path).json()
            assert (record["server"], record["raw_path"], record["query"]) == (
                server,
                raw_path,
                query,
            ), path
            if server == "c":
                assert values(record, "x-forwarded-prefix") == [], path


# --------------------------------------------------------------------------- paths


def test_strip_prefix_and_base_path(upstreams: list[RunningServer]) -> None:
    a, b, c = upstreams
    pools = {
        "/users": Pool([f"{a.url}/v1"]),
        "/plain": Pool([f"{b.url}/"]),
        "/keep": Pool([b.url], strip_prefix=False),
        "/keepbase": Pool([f"{c.url}/v1"], strip_prefix=False),
    }
    with running_proxy(pools) as (proxy, _), client() as http:
        record = http.get(f"{proxy.url}/users/42?x=1").json()
        assert (record["server"], record["raw_path"], record["query"]) == ("a", "/v1/42", "x=1")
        assert values(record, "x-forwarded-prefix") == ["/users"]

        record = http.get(f"{proxy.url}/plain/42?x=1").json()
        assert (record["server"], record["raw_path"], record["query"]) == ("b", "/42", "x=1")
        assert values(record, "x-forwarded-prefix") == ["/plain"]
        record = http.get(f"{proxy.url}/plain").json()
        assert record["raw_path"] == "/"

        record = http.get(f"{proxy.url}/keep/42?x=1").json()
        assert (record["server"], record["raw_path"], record["query"]) == ("b", "/keep/42", "x=1")
        assert values(record, "x-forwarded-prefix") == []

        record = http.get(f"{proxy.url}/keepbase/42").json()
        assert (record["server"], record["raw_path"]) == ("c", "/v1/keepbase/42")


def test_raw_path_and_query_reach_upstream_byte_for_byte(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    path = "/a%2Fb/c%3Fd/e%25f/%7e%7E/caf%C3%A9;p=1/x+y/~!$&'()*,=@:"
    query = "a=1&a=2&a=&b=%2B+x&c&&d=%zz&%3D=%26&e=caf%c3%A9&f=a=b=c&g=%20&h=/?i&j=%"
    with running_proxy({"/raw": [a.url]}) as (proxy, _), RawClient(proxy.port) as raw:
        target = f"/raw{path}?{query}"
        status, _, body = raw.request(raw_request("GET", target, [("Host", "front")]))
    assert status == 200, body
    record = json.loads(body)
    assert record["raw_path"] == path
    assert record["query"] == query


# --------------------------------------------------------------------------- methods, bodies


def test_every_method_is_forwarded_with_its_body(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    with running_proxy({"/m": [a.url]}) as (proxy, _), client() as http:
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]:
            payload = f"body of {method}".encode()
            response = http.request(method, f"{proxy.url}/m/x?action=echo", content=payload)
            assert response.status_code == 200, method
            record = response.json()
            assert (record["method"], record["raw_path"], record["body"]) == (
                method,
                "/x",
                payload.decode(),
            )
            assert values(record, "content-length") == [str(len(payload))], method

        response = http.head(f"{proxy.url}/m/x?action=big&size=1234")
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["content-length"] == "1234"
        assert a.app.requests[-1]["method"] == "HEAD"
        assert a.app.requests[-1]["raw_path"] == "/x"


def test_large_and_chunked_uploads_arrive_intact(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    big = os.urandom(5 * 1024 * 1024)
    with running_proxy({"/up": [a.url]}) as (proxy, _), client() as http:
        response = http.post(f"{proxy.url}/up/big?action=status&code=204", content=big)
        assert response.status_code == 204
        record = a.app.requests[-1]
        assert record["body"].encode("latin-1") == big
        assert values(record, "content-length") == [str(len(big))]

        parts = [os.urandom(n) for n in (1, 1000, 65536, 300_000, 7)]

        def generate() -> Iterator[bytes]:
            yield from parts

        response = http.post(f"{proxy.url}/up/chunked?action=status&code=204", content=generate())
        assert response.status_code == 204
        record = a.app.requests[-1]
        assert record["body"].encode("latin-1") == b"".join(parts)
        framing = [k for k, _ in record["headers"] if k in ("content-length", "transfer-encoding")]
        assert len(framing) == 1, record["headers"]


# --------------------------------------------------------------------------- responses


def test_sse_events_are_relayed_one_at_a_time(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    events = [b"data: event %d\n\n" % i for i in range(5)]
    with running_proxy({"/s": [a.url]}) as (proxy, _), client() as http:
        with http.stream("GET", f"{proxy.url}/s/?action=sse&n=5") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            chunks = response.iter_raw()
            received = b""
            for i in range(len(events)):
                a.app.proceed.release()  # let the upstream send event i, and only it
                expected = b"".join(events[: i + 1])
                while len(received) < len(expected):
                    received += next(chunks)
                assert received == expected, f"after releasing event {i}"
            received += b"".join(chunks)
        assert received == b"".join(events)


def test_large_response_bodies_arrive_intact(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    size = 20 * 1024 * 1024
    with running_proxy({"/big": [a.url]}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/big/?action=big&size={size}")
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        assert len(response.content) == size
        assert response.content == b"b" * size

        size = 8 * 1024 * 1024 + 3
        response = http.get(f"{proxy.url}/big/?action=slowbody&size={size}&chunk=70000")
        assert response.status_code == 200
        assert "content-length" not in response.headers
        assert response.content == b"s" * size


def test_gzip_relayed_raw_and_no_headers_added(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    sent = [
        ("Host", "front.example"),
        ("X-Custom", "1"),
        ("X-Dup", "first"),
        ("Accept-Language", "de"),
        ("X-Dup", "second"),
    ]
    with running_proxy({"/p": [a.url]}) as (proxy, _), RawClient(proxy.port) as raw:
        status, _, body = raw.request(raw_request("GET", "/p/?action=echo", sent))
        assert status == 200
        record = json.loads(body)
        expected = sorted([n.lower() for n, _ in sent] + FORWARDING_NAMES)
        assert names(record) == expected
        assert values(record, "x-dup") == ["first", "second"]

        sent = [("Host", "front.example"), ("Accept-Encoding", "gzip")]
        status, headers, body = raw.request(raw_request("GET", "/p/?action=gzip", sent))
    assert status == 200
    found = dict(headers)
    assert found[b"content-encoding"] == b"gzip"
    assert found[b"content-length"] == str(len(body)).encode()
    assert gzip.decompress(body) == b"hello gzip " * 100
    record = a.app.requests[-1]
    assert names(record) == sorted(["host", "accept-encoding", *FORWARDING_NAMES])
    assert values(record, "accept-encoding") == ["gzip"]


# --------------------------------------------------------------------------- client isolation


def test_set_cookie_headers_relayed_separately_and_never_shared(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    with running_proxy({"/c": [a.url]}) as (proxy, _):
        with client() as first:
            response = first.get(f"{proxy.url}/c/?action=cookies&n=3")
            # Path=/ is the pool's root: /c (rewrite_cookies).
            assert response.headers.get_list("set-cookie") == [
                "c0=v0; Path=/c",
                "c1=v1; Path=/c",
                "c2=v2; Path=/c",
            ]
            # The first client's own cookies do pass through on its own requests.
            record = first.get(f"{proxy.url}/c/?action=echo").json()
            assert len(values(record, "cookie")) == 1
            assert "c1=v1" in values(record, "cookie")[0]
        with client() as second:
            record = second.get(f"{proxy.url}/c/?action=echo").json()
            assert values(record, "cookie") == []


def test_redirect_is_relayed_not_followed() -> None:
    misc = MiscUpstream()
    with (
        serve(misc) as upstream,
        running_proxy({"/r": [upstream.url]}) as (proxy, _),
        client() as http,
    ):
        response = http.get(f"{proxy.url}/r/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "/r/landed"  # under the pool (rewrite_redirects)
    assert response.content == b"moved"
    assert misc.paths == ["/redirect"]


def test_proxy_environment_variables_are_ignored(
    upstreams: list[RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = dead_url()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    a = upstreams[0]
    with running_proxy({"/e": [a.url]}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/e/x?action=echo")
    assert response.status_code == 200
    assert response.json()["raw_path"] == "/x"


# --------------------------------------------------------------------------- headers


def test_hop_by_hop_request_headers_are_removed(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    sent = [
        ("Host", "front.example"),
        ("Connection", "keep-alive, X-Secret, x-forwarded-for"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Secret", "1"),
        ("X-Kept", "yes"),
    ]
    with running_proxy({"/h": [a.url]}) as (proxy, _), RawClient(proxy.port) as raw:
        status, _, body = raw.request(raw_request("GET", "/h/?action=echo", sent))
    assert status == 200, body
    record = json.loads(body)
    received = set(names(record))
    assert not received & (HOP_BY_HOP_NAMES | {"x-secret"}), record["headers"]
    assert values(record, "x-kept") == ["yes"]
    # Naming one of the proxy's own headers in Connection does not remove it.
    assert values(record, "x-forwarded-for") == ["127.0.0.1"]


def test_hop_by_hop_response_headers_are_removed() -> None:
    misc = MiscUpstream()
    with (
        serve(misc) as upstream,
        running_proxy({"/h": [upstream.url]}) as (proxy, _),
        client() as http,
    ):
        response = http.get(f"{proxy.url}/h/hop")
    assert response.status_code == 200
    assert response.content == b"hop"
    assert response.headers["x-kept"] == "yes"
    leaked = set(response.headers.keys()) & (HOP_BY_HOP_NAMES | {"x-upstream-secret"})
    assert not leaked, response.headers


def test_non_ascii_header_bytes_are_forwarded_verbatim() -> None:
    """obs-text (bytes >= 0x80) in field values is opaque data a proxy must pass as is."""
    misc = MiscUpstream()
    sent = [("Host", "front"), ("X-Utf8", "caf\xc3\xa9")]
    with (
        serve(misc) as upstream,
        running_proxy({"/u": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        status, headers, _ = raw.request(raw_request("GET", "/u/bytes", sent))
    assert status == 200
    relayed = dict(headers)
    received = dict(misc.headers[-1])
    assert {
        "request x-utf8": received[b"x-utf8"],
        "response x-resp-utf8": relayed[b"x-resp-utf8"],
        "response x-resp-latin": relayed[b"x-resp-latin"],
    } == {
        "request x-utf8": b"caf\xc3\xa9",
        "response x-resp-utf8": b"caf\xc3\xa9",
        "response x-resp-latin": b"\xe9t\xe9",
    }


def test_non_utf8_request_header_goes_verbatim_by_default_and_is_refused_by_aiohttp() -> None:
    """The default client writes bytes as they came. The optional aiohttp client writes
    header text as UTF-8, so a value that is not UTF-8 cannot cross it byte for byte: it
    is refused with 400, never altered."""
    misc = MiscUpstream()
    sent = [("Host", "front"), ("X-Latin", "\xe9t\xe9")]
    with serve(misc) as upstream:
        with running_proxy({"/u": [upstream.url]}) as (proxy, _), RawClient(proxy.port) as raw:
            status, _, _ = raw.request(raw_request("GET", "/u/bytes", sent))
        assert status == 200
        assert dict(misc.headers[-1])[b"x-latin"] == b"\xe9t\xe9"
        count = len(misc.headers)
        pools = {"/u": Pool([upstream.url], transport=AiohttpTransport())}
        with running_proxy(pools) as (proxy, _), RawClient(proxy.port) as raw:
            status, _, body = raw.request(raw_request("GET", "/u/bytes", sent))
        assert (status, body) == (400, b"400 Bad Request\n")
        assert len(misc.headers) == count


def test_host_rewritten_unless_preserve_host(upstreams: list[RunningServer]) -> None:
    a, b, _ = upstreams
    pools = {"/h": Pool([a.url]), "/ph": Pool([b.url], preserve_host=True)}
    front = {"Host": "front.example:8443"}
    with running_proxy(pools) as (proxy, _), client() as http:
        record = http.get(f"{proxy.url}/h/?action=echo", headers=front).json()
        assert values(record, "host") == [f"127.0.0.1:{a.port}"]
        assert values(record, "x-forwarded-host") == ["front.example:8443"]

        record = http.get(f"{proxy.url}/ph/?action=echo", headers=front).json()
        assert values(record, "host") == ["front.example:8443"]
        assert values(record, "x-forwarded-host") == ["front.example:8443"]


def test_preserve_host_without_a_client_host_sends_the_upstreams(
    upstreams: list[RunningServer],
) -> None:
    """An HTTP/1.0 client may send no Host; the upstream request is HTTP/1.1, which must
    have one (RFC 9112 §3.2), so the upstream's own is sent, as without preserve_host."""
    a, b, _ = upstreams
    pools = {"/h": Pool([a.url]), "/ph": Pool([b.url], preserve_host=True)}
    with running_proxy(pools) as (proxy, _):
        for prefix, upstream in (("/ph", b), ("/h", a)):
            with RawClient(proxy.port) as raw:
                status, _, body = raw.request(
                    b"GET %s/?action=echo HTTP/1.0\r\n\r\n" % prefix.encode()
                )
            assert status == 200, body
            record = json.loads(body)
            assert record["http_version"] == "1.1"
            assert values(record, "host") == [f"127.0.0.1:{upstream.port}"]
            assert values(record, "x-forwarded-host") == []  # the client named no host


SPOOFED = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-For", "198.51.100.1"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Real-IP", "203.0.113.7"),
    ("Forwarded", "for=203.0.113.7"),
]


def test_forwarding_headers_from_untrusted_client_are_replaced(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    with running_proxy({"/f": [a.url]}) as (proxy, _), client() as http:
        headers = [("Host", "front.example"), *SPOOFED]
        record = http.get(f"{proxy.url}/f/?action=echo", headers=headers).json()
    assert values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert values(record, "x-forwarded-proto") == ["http"]
    assert values(record, "x-forwarded-host") == ["front.example"]
    assert values(record, "x-real-ip") == []
    assert values(record, "forwarded") == []


def test_forwarding_headers_from_trusted_proxy_are_extended(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    trusted = ["127.0.0.1"]
    with running_proxy({"/f": [a.url]}, trusted_proxies=trusted) as (proxy, _), client() as http:
        headers = [("Host", "front.example"), *SPOOFED]
        record = http.get(f"{proxy.url}/f/?action=echo", headers=headers).json()
    assert values(record, "x-forwarded-for") == ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
    assert values(record, "x-forwarded-proto") == ["https"]
    assert values(record, "x-forwarded-host") == ["evil.example"]


def test_204_304_and_head_carry_no_body(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    host = [("Host", "front")]
    with running_proxy({"/n": [a.url]}) as (proxy, _), RawClient(proxy.port) as raw:
        # Each next response is read straight after the previous header block: a body
        # sent by mistake would be found where the next status line should be.
        raw.send(raw_request("GET", "/n/?action=status&code=204", host))
        status, headers = raw.read_head()
        assert status == 204
        assert b"transfer-encoding" not in dict(headers)

        raw.send(raw_request("GET", "/n/?action=status&code=304", host))
        status, headers = raw.read_head()
        assert status == 304
        assert b"transfer-encoding" not in dict(headers)

        raw.send(raw_request("HEAD", "/n/?action=big&size=1234", host))
        status, headers = raw.read_head()
        assert status == 200
        assert dict(headers)[b"content-length"] == b"1234"

        raw.send(raw_request("HEAD", "/n/?action=slowbody&size=5000", host))
        status, headers = raw.read_head()
        assert status == 200

        status, _, body = raw.request(raw_request("GET", "/n/?action=status&code=200", host))
        assert (status, body) == (200, b"status body")
        assert raw.buffer == b""


def test_304_with_content_length_relayed_without_breaking_the_connection() -> None:
    """RFC 9110 §8.6 lets a 304 carry the Content-Length the 200 would have had; the
    client must get the 304 with no body, and its keep-alive connection must survive."""
    answer = b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n'
    conditional = [("Host", "front"), ("If-None-Match", '"v1"')]
    with (
        RawUpstream(answer_each(lambda request: answer)) as upstream,
        running_proxy({"/n": [upstream.url]}) as (proxy, _),
        RawClient(proxy.port) as raw,
    ):
        for attempt in range(2):
            raw.send(raw_request("GET", "/n/x", conditional))
            status, headers = raw.read_head()
            assert status == 304, f"request {attempt}"
            assert dict(headers)[b"etag"] == b'"v1"'
            assert b"content-length" not in dict(headers)  # README: not passed on
    assert len(upstream.requests) == 2


# --------------------------------------------------------------------------- failures


def test_dead_upstream_is_skipped(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    with running_proxy({"/d": [dead_url(), a.url]}) as (proxy, _), client() as http:
        for i in range(6):
            response = http.get(f"{proxy.url}/d/{i}?action=echo")
            assert response.status_code == 200
            assert response.json()["raw_path"] == f"/{i}"
        for i in range(4):
            response = http.post(f"{proxy.url}/d/{i}?action=echo", content=b"post %d" % i)
            assert response.status_code == 200
            assert response.json()["body"] == f"post {i}"
        for i in range(4):
            parts = [b"chunk-%d-" % i, os.urandom(100_000)]
            response = http.post(f"{proxy.url}/d/c?action=status&code=204", content=iter(parts))
            assert response.status_code == 204
            assert a.app.requests[-1]["body"].encode("latin-1") == b"".join(parts)
    assert len(a.app.requests) == 14


def test_all_dead_gives_short_generic_502() -> None:
    dead = [dead_url(), dead_url()]
    with running_proxy({"/d": dead}) as (proxy, _), client() as http:
        response = http.get(f"{proxy.url}/d/x")
    assert_generic_error(response, 502, dead)


def test_slow_upstream_gives_504(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    with running_proxy({"/t": Pool([a.url], timeout=0.5)}) as (proxy, _), client() as http:
        started = time.monotonic()
        response = http.get(f"{proxy.url}/t/?action=sleep&s=2")
        elapsed = time.monotonic() - started
    assert_generic_error(response, 504, [a.url])
    assert elapsed < 1.8


def test_upstream_silent_mid_body_aborts_after_timeout(upstreams: list[RunningServer]) -> None:
    a = upstreams[0]
    with running_proxy({"/t": Pool([a.url], timeout=0.5)}) as (proxy, _), client() as http:
        try:
            target = f"{proxy.url}/t/?action=stream&n=2&size=5&wait=1"
            with http.stream("GET", target) as response:
                assert response.status_code == 200
                a.app.proceed.release()  # the first chunk only; then the upstream is silent
                chunks = response.iter_raw()
                assert next(chunks) == b"AAAAA"
                with pytest.raises(httpx.RemoteProtocolError):
                    b"".join(chunks)
        finally:
            a.app.proceed.release()  # let the upstream handler finish


def test_upstream_dying_mid_body_aborts_the_client_response(
    upstreams: list[RunningServer],
) -> None:
    a = upstreams[0]
    misc = MiscUpstream()
    with serve(misc) as broken:
        pools = {"/b": [a.url], "/bc": [broken.url]}
        with running_proxy(pools) as (proxy, _):
            # Content-Length framed upstream body that stops short.
            with client() as http, pytest.raises(httpx.RemoteProtocolError):
                http.get(f"{proxy.url}/b/?action=broken")
            # Chunked upstream body that stops without its last chunk.
            with client() as http, pytest.raises(httpx.RemoteProtocolError):
                http.get(f"{proxy.url}/bc/broken-chunked")
            # The proxy still serves afterwards.
            with client() as http:
                assert http.get(f"{proxy.url}/b/?action=echo").status_code == 200


# --------------------------------------------------------------------------- client disconnects


@pytest.mark.slow
async def test_aborted_downloads_do_not_exhaust_the_pool() -> None:
    total, concurrency = 1000, 16
    misc = MiscUpstream(expected_closes=total)
    with serve(misc) as upstream:
        pools = {"/dl": Pool([upstream.url], max_connections=concurrency, pool_timeout=2)}
        with running_proxy(pools) as (proxy, middleware):
            headers_seen = 0
            limiter = anyio.Semaphore(concurrency)

            async def abort_one() -> None:
                nonlocal headers_seen
                async with limiter:
                    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                    try:
                        writer.write(b"GET /dl/hang HTTP/1.1\r\nHost: front\r\n\r\n")
                        head = await reader.readuntil(b"\r\n\r\n")
                        assert head.startswith(b"HTTP/1.1 200 "), head
                        headers_seen += 1
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()

            started = time.monotonic()
            with anyio.fail_after(15):
                async with anyio.create_task_group() as group:
                    for _ in range(total):
                        group.start_soon(abort_one)
            assert headers_seen == total
            # Every upstream exchange must be closed once its client has gone.
            closed = await anyio.to_thread.run_sync(misc.all_closed.wait, 5)
            assert closed, f"upstream streams still open: {misc.opened - misc.closed}"
            assert time.monotonic() - started < 20

            async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                before = time.monotonic()
                response = await http.get(f"{proxy.url}/dl/quick")
                assert response.status_code == 200
                assert response.content == b"ok"
                assert time.monotonic() - before < 1.0
            assert middleware.transport.open_connections <= 2  # type: ignore[attr-defined]
