"""Header rewriting on raw ``(bytes, bytes)`` pairs, both legs, and TrustedProxies."""

from __future__ import annotations

from typing import Any

import pytest

from rr_middleware.headers import (
    HOP_BY_HOP,
    BadRequestHeaders,
    TrustedProxies,
    request_headers,
    response_headers,
)

Headers = list[tuple[bytes, bytes]]
HIDDEN = frozenset({b"date", b"server"})


def forward(
    raw: Headers,
    *,
    client: str | None = "203.0.113.7",
    scheme: str = "http",
    trusted: TrustedProxies | None = None,
    keep_host: bool = False,
    prefix: bytes = b"",
) -> Headers:
    out, has_host = request_headers(
        raw,
        client_host=client,
        scheme=scheme,
        trusted=trusted if trusted is not None else TrustedProxies(),
        keep_host=keep_host,
        prefix=prefix,
    )
    assert has_host == (b"host" in names(out))
    return out


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def names(headers: Headers) -> list[bytes]:
    return [n for n, _ in headers]


# ---------------------------------------------------------------------------- hop-by-hop


def test_hop_by_hop_request_headers_are_removed() -> None:
    raw = [
        (b"host", b"example.com"),
        (b"accept", b"*/*"),
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"websocket"),
        (b"x-custom", b"1"),
    ]
    out = forward(raw)
    assert not set(names(out)) & HOP_BY_HOP
    # End-to-end headers keep their order; the forwarding headers come after them.
    assert out[:2] == [(b"accept", b"*/*"), (b"x-custom", b"1")]


def test_host_is_left_to_the_caller_unless_preserved() -> None:
    raw = [(b"host", b"example.com"), (b"accept", b"*/*")]
    out = forward(raw)
    assert values(out, b"host") == []
    assert values(out, b"x-forwarded-host") == [b"example.com"]
    kept = forward(raw, keep_host=True)
    assert values(kept, b"host") == [b"example.com"]


def test_without_a_client_host_none_is_kept_and_the_caller_is_told() -> None:
    raw = [(b"accept", b"*/*")]  # HTTP/1.0 allows a request without Host
    out, has_host = request_headers(
        raw, client_host=None, scheme="http", trusted=TrustedProxies(), keep_host=True, prefix=b""
    )
    assert (values(out, b"host"), has_host) == ([], False)
    out, has_host = request_headers(
        [(b"host", b"h"), *raw],
        client_host=None,
        scheme="http",
        trusted=TrustedProxies(),
        keep_host=True,
        prefix=b"",
    )
    assert (values(out, b"host"), has_host) == ([b"h"], True)


def test_headers_named_by_connection_are_removed() -> None:
    raw = [
        (b"connection", b"close, X-Secret"),
        (b"x-secret", b"s"),
        (b"connection", b"x-other"),
        (b"x-other", b"o"),
        (b"x-kept", b"k"),
    ]
    out = forward(raw)
    assert values(out, b"x-secret") == []
    assert values(out, b"x-other") == []
    assert values(out, b"x-kept") == [b"k"]


@pytest.mark.parametrize(
    "connection",
    [
        b"x-forwarded-for",
        b"X-Forwarded-For, X-Forwarded-Proto, x-forwarded-host, x-forwarded-prefix",
    ],
)
def test_connection_cannot_remove_the_proxys_own_forwarding_headers(connection: bytes) -> None:
    raw = [(b"host", b"example.com"), (b"connection", connection)]
    out = forward(raw, prefix=b"/api")
    assert values(out, b"x-forwarded-for") == [b"203.0.113.7"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"example.com"]
    assert values(out, b"x-forwarded-prefix") == [b"/api"]


def test_connection_cannot_remove_the_proxys_forwarding_headers_from_a_trusted_proxy() -> None:
    raw = [(b"connection", b"x-forwarded-for"), (b"x-forwarded-for", b"198.51.100.1")]
    out = forward(raw, client="10.0.0.5", trusted=TrustedProxies("10.0.0.0/8"))
    assert values(out, b"x-forwarded-for")[-1].endswith(b"10.0.0.5")


@pytest.mark.parametrize("name", [b"content-length", b"host"])
def test_connection_cannot_remove_framing_or_host(name: bytes) -> None:
    raw = [(b"host", b"example.com"), (b"content-length", b"5"), (b"connection", name)]
    out = forward(raw, keep_host=True)
    assert values(out, b"content-length") == [b"5"]
    assert values(out, b"host") == [b"example.com"]


# ------------------------------------------------------------------------ framing and Host


@pytest.mark.parametrize("second", [b"other.example", b"example.com"])
def test_duplicate_host_is_a_bad_request(second: bytes) -> None:
    with pytest.raises(BadRequestHeaders):
        forward([(b"host", b"example.com"), (b"host", second)])


@pytest.mark.parametrize(("first", "second"), [(b"5", b"6"), (b"5", b"05"), (b"5", b"5, 5")])
def test_conflicting_content_length_is_a_bad_request(first: bytes, second: bytes) -> None:
    with pytest.raises(BadRequestHeaders):
        forward([(b"content-length", first), (b"content-length", second)])


def test_repeated_identical_content_length_is_sent_once() -> None:
    out = forward([(b"content-length", b"5"), (b"content-length", b"5")])
    assert values(out, b"content-length") == [b"5"]


@pytest.mark.parametrize(
    "raw",
    [
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        [(b"content-length", b"5"), (b"transfer-encoding", b"gzip, chunked")],
    ],
)
def test_transfer_encoding_with_content_length_drops_the_length(raw: Headers) -> None:
    out = forward(raw)
    assert values(out, b"content-length") == []
    assert values(out, b"transfer-encoding") == []


def test_plain_content_length_is_forwarded() -> None:
    out = forward([(b"content-length", b"42")])
    assert values(out, b"content-length") == [b"42"]


def test_expect_is_not_forwarded() -> None:
    out = forward([(b"expect", b"100-continue"), (b"content-length", b"3")])
    assert values(out, b"expect") == []
    assert values(out, b"content-length") == [b"3"]


def test_repeated_cookie_headers_are_kept_separately_in_order() -> None:
    raw = [
        (b"cookie", b"a=1"),
        (b"x-between", b"x"),
        (b"cookie", b"b=2"),
        (b"cookie", b"c=3; d=4"),
    ]
    out = forward(raw)
    assert values(out, b"cookie") == [b"a=1", b"b=2", b"c=3; d=4"]
    assert out[:4] == raw


def test_header_values_pass_through_byte_for_byte() -> None:
    raw = [(b"x-odd", b"  spaced\xff\xfe value  "), (b"authorization", b"Bearer abc")]
    out = forward(raw)
    assert out[:2] == raw


# --------------------------------------------------------------------------- forwarding


SPOOFED: Headers = [
    (b"host", b"example.com"),
    (b"x-forwarded-for", b"6.6.6.6"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"evil.example"),
    (b"x-forwarded-port", b"443"),
    (b"x-forwarded-prefix", b"/evil"),
    (b"forwarded", b"for=6.6.6.6;proto=https"),
    (b"x-real-ip", b"6.6.6.6"),
    (b"accept", b"*/*"),
]


def test_forwarding_headers_from_an_untrusted_client_are_replaced() -> None:
    out = forward(SPOOFED, prefix=b"/api")
    assert out == [
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"example.com"),
        (b"x-forwarded-prefix", b"/api"),
    ]


def test_untrusted_client_outside_the_trusted_network() -> None:
    out = forward(SPOOFED, client="11.0.0.1", trusted=TrustedProxies("10.0.0.0/8"))
    assert values(out, b"x-forwarded-for") == [b"11.0.0.1"]
    assert values(out, b"forwarded") == []
    assert values(out, b"x-real-ip") == []
    assert values(out, b"x-forwarded-port") == []


def test_forwarding_headers_from_a_trusted_network_are_kept_and_extended() -> None:
    out = forward(SPOOFED, client="10.1.2.3", trusted=TrustedProxies("10.0.0.0/8"), prefix=b"/api")
    assert values(out, b"x-forwarded-for") == [b"6.6.6.6, 10.1.2.3"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"evil.example"]
    assert values(out, b"x-forwarded-prefix") == [b"/evil/api"]
    assert values(out, b"forwarded") == [b"for=6.6.6.6;proto=https"]
    assert values(out, b"x-real-ip") == [b"6.6.6.6"]
    assert values(out, b"x-forwarded-port") == [b"443"]


# The rest of the X-Forwarded-* family: frameworks read these too (Rack and Django read
# X-Forwarded-Ssl and -Scheme, Envoy sets -Client-Cert, Traefik -Server and -Uri).
OTHER_FORWARDED: Headers = [
    (b"x-forwarded-ssl", b"on"),
    (b"x-forwarded-scheme", b"https"),
    (b"x-forwarded-client-cert", b'Hash=abc;Subject="CN=admin"'),
    (b"x-forwarded-server", b"internal.example"),
    (b"x-forwarded-uri", b"/admin"),
    (b"x-forwarded-anything-new", b"1"),
]
# Read as X-Forwarded-For, X-Real-IP, ... by CGI and WSGI servers (HTTP_X_FORWARDED_FOR).
LOOKALIKES: Headers = [
    (b"x_forwarded_for", b"6.6.6.6"),
    (b"x_real_ip", b"6.6.6.6"),
    (b"x_forwarded_proto", b"https"),
    (b"x_forwarded_host", b"evil.example"),
    (b"x-forwarded_for", b"6.6.6.6"),
    (b"x_forwarded-port", b"443"),
    (b"x-real_ip", b"6.6.6.6"),
    (b"x_forwarded_ssl", b"on"),
    (b"x-forwarded-client_cert", b"Hash=abc"),
]


@pytest.mark.parametrize(("name", "value"), OTHER_FORWARDED)
def test_any_x_forwarded_header_from_an_untrusted_client_is_dropped(
    name: bytes, value: bytes
) -> None:
    out = forward([(b"accept", b"*/*"), (name, value)], trusted=TrustedProxies("10.0.0.0/8"))
    assert values(out, name) == []
    assert out[0] == (b"accept", b"*/*")


@pytest.mark.parametrize(("name", "value"), OTHER_FORWARDED)
def test_any_x_forwarded_header_from_a_trusted_proxy_is_kept(name: bytes, value: bytes) -> None:
    out = forward([(name, value)], client="10.0.0.1", trusted=TrustedProxies("10.0.0.0/8"))
    assert values(out, name) == [value]


@pytest.mark.parametrize("client", ["203.0.113.7", "10.0.0.1"], ids=["untrusted", "trusted"])
@pytest.mark.parametrize(("name", "value"), LOOKALIKES)
def test_underscore_lookalikes_of_forwarding_headers_are_dropped_from_everyone(
    name: bytes, value: bytes, client: str
) -> None:
    out = forward([(name, value)], client=client, trusted=TrustedProxies("10.0.0.0/8"))
    assert values(out, name) == []
    # And they do not feed the real ones either.
    assert values(out, b"x-forwarded-for") == [client.encode()]
    assert values(out, b"x-forwarded-proto") == [b"http"]


@pytest.mark.parametrize(
    "name", [b"x_request_id", b"x_custom", b"x-forwarded", b"x_forwarded", b"y_forwarded_for"]
)
def test_other_names_with_underscores_are_kept(name: bytes) -> None:
    out = forward([(name, b"v")])
    assert values(out, name) == [b"v"]


def test_repeated_x_forwarded_for_from_a_trusted_proxy_is_one_chain() -> None:
    raw = [(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3")]
    out = forward(raw, client="10.0.0.1", trusted=TrustedProxies(["10.0.0.0/8"]))
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.1"]


def test_star_trusts_every_client() -> None:
    out = forward(SPOOFED, client="198.51.100.9", trusted=TrustedProxies("*"))
    assert values(out, b"x-forwarded-for") == [b"6.6.6.6, 198.51.100.9"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    # Even a client with no address (or a unix socket name).
    out = forward(SPOOFED, client=None, trusted=TrustedProxies(["*"]))
    assert values(out, b"x-forwarded-for") == [b"6.6.6.6"]
    out = forward(SPOOFED, client="testclient", trusted=TrustedProxies("*"))
    assert values(out, b"x-forwarded-for") == [b"6.6.6.6, testclient"]


def test_trusted_proxy_without_forwarding_headers_gets_ours() -> None:
    out = forward(
        [(b"host", b"example.com")],
        client="10.0.0.1",
        scheme="https",
        trusted=TrustedProxies("10.0.0.0/8"),
        prefix=b"/api",
    )
    assert out == [
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"example.com"),
        (b"x-forwarded-prefix", b"/api"),
    ]


@pytest.mark.parametrize(
    ("incoming", "prefix", "expected"),
    [
        (b"/outer", b"/api", b"/outer/api"),
        (b"/outer/", b"/api", b"/outer/api"),
        (b"/outer", b"", b"/outer"),
        (b"/", b"/api", b"/api"),
    ],
)
def test_x_forwarded_prefix_is_combined_for_a_trusted_proxy(
    incoming: bytes, prefix: bytes, expected: bytes
) -> None:
    raw = [(b"x-forwarded-prefix", incoming)]
    out = forward(raw, client="10.0.0.1", trusted=TrustedProxies("10.0.0.0/8"), prefix=prefix)
    assert values(out, b"x-forwarded-prefix") == [expected]


def test_no_prefix_no_prefix_header() -> None:
    out = forward([(b"host", b"h")], prefix=b"")
    assert values(out, b"x-forwarded-prefix") == []


def test_client_without_address_gets_no_x_forwarded_for() -> None:
    out = forward([(b"host", b"h")], client=None)
    assert values(out, b"x-forwarded-for") == []
    assert values(out, b"x-forwarded-proto") == [b"http"]


def test_no_host_no_x_forwarded_host() -> None:
    out = forward([(b"accept", b"*/*")])
    assert values(out, b"x-forwarded-host") == []


def test_forwarding_headers_appear_exactly_once() -> None:
    out = forward(SPOOFED, client="10.0.0.1", trusted=TrustedProxies("*"), prefix=b"/p")
    for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
        assert len(values(out, name)) == 1, name
    assert len(values(out, b"x-forwarded-prefix")) == 1


# ----------------------------------------------------------------------------- responses


def test_response_hop_by_hop_and_hidden_headers_are_removed() -> None:
    raw = [
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Server", b"upstream/1.0"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"x-sum"),
        (b"Content-Type", b"text/plain"),
    ]
    assert response_headers(raw, HIDDEN) == [(b"content-type", b"text/plain")]


def test_response_headers_named_by_connection_are_removed() -> None:
    raw = [
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"secret"),
        (b"connection", b"x-debug"),
        (b"x-debug", b"1"),
        (b"X-Public", b"ok"),
    ]
    assert response_headers(raw, HIDDEN) == [(b"x-public", b"ok")]


def test_response_header_names_are_lower_cased_values_untouched() -> None:
    raw = [(b"Content-Type", b"Text/HTML; Charset=UTF-8"), (b"X-MiXeD", b"VaLuE")]
    assert response_headers(raw, HIDDEN) == [
        (b"content-type", b"Text/HTML; Charset=UTF-8"),
        (b"x-mixed", b"VaLuE"),
    ]


def test_response_repeated_set_cookie_kept_in_order() -> None:
    raw = [(b"Set-Cookie", b"a=1"), (b"X", b"y"), (b"set-cookie", b"b=2"), (b"SET-COOKIE", b"c")]
    out = response_headers(raw, HIDDEN)
    assert values(out, b"set-cookie") == [b"a=1", b"b=2", b"c"]


def test_response_hidden_set_is_configurable() -> None:
    raw = [(b"Date", b"d"), (b"Server", b"s"), (b"X-Powered-By", b"php")]
    assert response_headers(raw, frozenset()) == [
        (b"date", b"d"),
        (b"server", b"s"),
        (b"x-powered-by", b"php"),
    ]
    assert response_headers(raw, frozenset({b"x-powered-by"})) == [
        (b"date", b"d"),
        (b"server", b"s"),
    ]


def test_response_content_length_and_encoding_are_kept() -> None:
    raw = [(b"Content-Length", b"10"), (b"Content-Encoding", b"gzip")]
    assert response_headers(raw, HIDDEN) == [
        (b"content-length", b"10"),
        (b"content-encoding", b"gzip"),
    ]


# ------------------------------------------------------------------------- TrustedProxies


@pytest.mark.parametrize(
    "spec", [["not-an-ip"], ["10.0.0.0/33"], ["10.0.0.1", "bogus"], "10.0.0.1, nope", ["256.0.0.1"]]
)
def test_invalid_trusted_proxy_entry_is_a_value_error_naming_it(spec: Any) -> None:
    with pytest.raises(
        ValueError, match=r"trusted_proxies: '(not-an-ip|10\.0\.0\.0/33|bogus|nope|256\.0\.0\.1)'"
    ):
        TrustedProxies(spec)


def test_trusted_proxies_membership() -> None:
    trusted = TrustedProxies("10.0.0.0/8, 192.168.1.1,::1, 2001:db8::/32")
    assert trusted
    assert "10.255.0.1" in trusted
    assert "192.168.1.1" in trusted
    assert "192.168.1.2" not in trusted
    assert "::1" in trusted
    assert "2001:db8::5" in trusted
    assert "11.0.0.1" not in trusted
    assert "testclient" not in trusted
    assert "/run/app.sock" not in trusted
    assert None not in trusted


def test_empty_trusted_proxies_trust_nobody() -> None:
    for spec in ((), [], "", " , "):
        trusted = TrustedProxies(spec)
        assert not trusted
        assert "127.0.0.1" not in trusted


def test_star_trusts_everything() -> None:
    trusted = TrustedProxies(["*"])
    assert trusted
    assert "8.8.8.8" in trusted
    assert "testclient" in trusted


def test_trusted_proxies_cache_is_bounded_and_stays_correct() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    for i in range(10_000):
        assert f"11.{i // 65536}.{i // 256 % 256}.{i % 256}" not in trusted
    assert len(trusted._cache) <= 4096
    # Addresses seen after the cache filled up are still judged correctly.
    assert "10.200.0.1" in trusted
    assert "11.200.0.1" not in trusted
    assert "garbage" not in trusted
    assert len(trusted._cache) <= 4096
