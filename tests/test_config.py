"""Configuration: Upstream / Pool / pools= validation, defaults and derived fields.

Every misconfiguration must fail when the middleware is built (not on the first request),
with a ValueError that names the offending value.
"""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from rr_middleware import Pool, RoundRobinMiddleware, Upstream
from rr_middleware.config import normalize_pools, normalize_prefix


def _names(value: object) -> str:
    """A ``match=`` pattern requiring the error message to quote ``value``."""
    return re.escape(repr(value))


# --------------------------------------------------------------------------- Upstream URLs


@pytest.mark.parametrize(
    "url",
    [
        "10.0.0.1:8000",
        "localhost:8000",
        "//10.0.0.1:8000",
        "ftp://10.0.0.1",
        "ws://10.0.0.1:8000",
        "unix:///tmp/app.sock",
    ],
)
def test_url_without_http_scheme_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=r"http:// or https://") as info:
        Upstream(url)
    assert repr(url) in str(info.value)


@pytest.mark.parametrize("url", ["http://", "https://", "http:///v1", "http://:8000"])
def test_url_without_host_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=_names(url) + r" has no host"):
        Upstream(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1?x=1", "http://10.0.0.1/v1?x=1", "http://a/?"])
def test_url_with_query_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=_names(url) + r" must not have a query"):
        Upstream(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1#frag", "http://10.0.0.1/v1#", "http://a/x?#"])
def test_url_with_fragment_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=_names(url) + r" must not have a fragment"):
        Upstream(url)


@pytest.mark.parametrize(
    "url", ["http://user:secret@10.0.0.1", "http://user@10.0.0.1:8000", "https://:pw@host"]
)
def test_url_with_credentials_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match=r"must not carry credentials"):
        Upstream(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:99999", "http://[::1"])
def test_unparseable_url_is_rejected_naming_it(url: str) -> None:
    with pytest.raises(ValueError, match=_names(url)):
        Upstream(url)


@pytest.mark.parametrize("url", [b"http://10.0.0.1", None, 8000])
def test_url_must_be_a_string(url: object) -> None:
    with pytest.raises(ValueError, match=_names(url)):
        Upstream(url)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["http://exa mple.com", "http://10.0.0.1/v 1"])
def test_url_with_a_space_is_rejected(url: str) -> None:
    # A space can be neither in a Host header nor in a request target: such a URL must
    # fail at configuration time, not turn into malformed requests on the wire.
    with pytest.raises(ValueError, match=_names(url)):
        Upstream(url)


def test_url_with_non_ascii_base_path_error_names_the_url() -> None:
    url = "http://10.0.0.1/v\u00e9"
    with pytest.raises(ValueError, match=_names(url)):
        Upstream(url)


# ------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("weight", [-1, -100, 1.5, 2.0, "2", None, True, False])
def test_bad_weight_is_rejected_naming_it(weight: object) -> None:
    with pytest.raises(ValueError, match=r"weight must be an integer >= 0, got " + _names(weight)):
        Upstream("http://10.0.0.1", weight=weight)  # type: ignore[arg-type]


@pytest.mark.parametrize("weight", [0, 1, 7])
def test_good_weights_are_accepted(weight: int) -> None:
    assert Upstream("http://10.0.0.1", weight=weight).weight == weight


def test_app_and_transport_together_are_rejected() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never called")

    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    with pytest.raises(ValueError, match=r"app= or transport=, not both"):
        Upstream("http://a.internal", app=app, transport=mock)


# --------------------------------------------------------------------------- derived fields


def test_derived_fields_for_a_plain_url() -> None:
    upstream = Upstream("http://10.0.0.3:8000/v1", weight=2)
    assert upstream.scheme == "http"
    assert upstream.host == "10.0.0.3"
    assert upstream.port == 8000
    assert upstream.origin == "http://10.0.0.3:8000"
    assert upstream.host_header == b"10.0.0.3:8000"
    assert upstream.base_path == b"/v1"
    assert repr(upstream) == "Upstream('http://10.0.0.3:8000/v1', weight=2)"


@pytest.mark.parametrize(
    ("url", "origin", "host_header"),
    [
        ("http://example.com", "http://example.com:80", b"example.com"),
        ("http://example.com:80", "http://example.com:80", b"example.com"),
        ("https://example.com", "https://example.com:443", b"example.com"),
        ("https://example.com:443/", "https://example.com:443", b"example.com"),
        ("http://example.com:8080", "http://example.com:8080", b"example.com:8080"),
        ("https://example.com:80", "https://example.com:80", b"example.com:80"),
        ("http://example.com:443", "http://example.com:443", b"example.com:443"),
        ("HTTP://Example.COM:8000", "http://example.com:8000", b"example.com:8000"),
    ],
)
def test_origin_and_host_header_default_and_explicit_ports(
    url: str, origin: str, host_header: bytes
) -> None:
    upstream = Upstream(url)
    assert upstream.origin == origin
    assert upstream.host_header == host_header


def test_ipv6_upstream_is_bracketed_in_origin_and_host() -> None:
    upstream = Upstream("http://[::1]:8000")
    assert upstream.host == "::1"
    assert upstream.port == 8000
    assert upstream.origin == "http://[::1]:8000"
    assert upstream.host_header == b"[::1]:8000"
    default_port = Upstream("http://[2001:db8::1]")
    assert default_port.origin == "http://[2001:db8::1]:80"
    assert default_port.host_header == b"[2001:db8::1]"


@pytest.mark.parametrize(
    ("url", "base_path"),
    [
        ("http://10.0.0.1", b""),
        ("http://10.0.0.1/", b""),
        ("http://10.0.0.1/v1", b"/v1"),
        ("http://10.0.0.1/v1/", b"/v1"),
        ("http://10.0.0.1/a/b%20c", b"/a/b%20c"),
    ],
)
def test_base_path(url: str, base_path: bytes) -> None:
    assert Upstream(url).base_path == base_path


# ------------------------------------------------------------------------------------ Pool


def test_pool_defaults() -> None:
    pool = Pool(["http://10.0.0.1"])
    assert pool.strip_prefix is True
    assert pool.timeout == 60.0
    assert pool.connect_timeout == 5.0
    assert pool.pool_timeout == 5.0
    assert pool.max_connections == 100
    assert pool.preserve_host is False
    assert pool.retries == 2
    assert pool.transport is None
    assert pool.refuse_methods == frozenset({"CONNECT", "TRACE"})
    assert pool.refuse_ambiguous_paths is True


@pytest.mark.parametrize("value", [None, 0, 1, "false", "no"])
def test_refuse_ambiguous_paths_must_be_a_bool(value: object) -> None:
    with pytest.raises(ValueError, match=r"refuse_ambiguous_paths must be True or False, got "):
        Pool(["http://10.0.0.1"], refuse_ambiguous_paths=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ((), frozenset()),
        ({"TRACE"}, frozenset({"TRACE"})),
        (["connect", "Trace", "PROPFIND"], frozenset({"CONNECT", "TRACE", "PROPFIND"})),
        (("M-SEARCH",), frozenset({"M-SEARCH"})),
    ],
)
def test_refuse_methods_is_stored_upper_cased(given: object, stored: frozenset[str]) -> None:
    pool = Pool(["http://10.0.0.1"], refuse_methods=given)  # type: ignore[arg-type]
    assert pool.refuse_methods == stored


@pytest.mark.parametrize("value", ["TRACE", b"TRACE", ["GET POST"], [""], ["GET", 1], None, 5])
def test_bad_refuse_methods_are_rejected_naming_the_value(value: object) -> None:
    with pytest.raises(ValueError, match=r"refuse_methods must be .*" + _names(value)):
        Pool(["http://10.0.0.1"], refuse_methods=value)  # type: ignore[arg-type]


def test_pool_accepts_url_strings_and_upstream_objects() -> None:
    b = Upstream("http://10.0.0.2:8000", weight=3)
    pool = Pool(["http://10.0.0.1:8000", b])
    assert all(isinstance(u, Upstream) for u in pool.upstreams)
    assert [u.url for u in pool.members] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert pool.members[1] is b
    assert pool.members[0].weight == 1


def test_pool_accepts_a_tuple() -> None:
    assert len(Pool(("http://10.0.0.1", "http://10.0.0.2")).members) == 2


def test_empty_pool_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"at least one upstream"):
        Pool([])


@pytest.mark.parametrize("upstreams", ["http://10.0.0.1", b"http://10.0.0.1", None, 5])
def test_pool_needs_a_list_not_a_single_url(upstreams: object) -> None:
    with pytest.raises(ValueError, match=r"list of upstream URLs"):
        Pool(upstreams)  # type: ignore[arg-type]


def test_pool_member_of_wrong_type_is_rejected_naming_it() -> None:
    with pytest.raises(ValueError, match=r"got 42"):
        Pool(["http://10.0.0.1", 42])  # type: ignore[list-item]


def test_pool_member_with_bad_url_names_the_url() -> None:
    with pytest.raises(ValueError, match=_names("10.0.0.9:80")):
        Pool(["http://10.0.0.1", "10.0.0.9:80"])


def test_duplicate_upstream_in_one_pool_is_rejected() -> None:
    with pytest.raises(ValueError, match=_names("http://10.0.0.1:80/") + r" appears twice"):
        Pool(["http://10.0.0.1", "http://10.0.0.1:80/"])


def test_same_host_with_different_base_paths_is_not_a_duplicate() -> None:
    pool = Pool(["http://10.0.0.1/v1", "http://10.0.0.1/v2"])
    assert [u.base_path for u in pool.members] == [b"/v1", b"/v2"]


@pytest.mark.parametrize("name", ["timeout", "connect_timeout", "pool_timeout"])
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan"), float("inf")])
def test_non_positive_or_non_finite_timeouts_are_rejected(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be a positive number of seconds"):
        Pool(["http://10.0.0.1"], **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["timeout", "connect_timeout", "pool_timeout"])
@pytest.mark.parametrize("value", ["5", None, True])
def test_non_numeric_timeouts_are_rejected_naming_the_value(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be .*got " + _names(value)):
        Pool(["http://10.0.0.1"], **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["timeout", "connect_timeout", "pool_timeout"])
def test_small_positive_timeouts_are_accepted(name: str) -> None:
    pool = Pool(["http://10.0.0.1"], **{name: 0.001})  # type: ignore[arg-type]
    assert getattr(pool, name) == 0.001


@pytest.mark.parametrize("retries", [-1, 1.5, "2", True, None])
def test_bad_retries_are_rejected_naming_the_value(retries: object) -> None:
    with pytest.raises(
        ValueError, match=r"retries must be an integer >= 0, got " + _names(retries)
    ):
        Pool(["http://10.0.0.1"], retries=retries)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_max_connections_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match=r"max_connections must be an integer >= 1, got "):
        Pool(["http://10.0.0.1"], max_connections=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- prefixes


@pytest.mark.parametrize(
    ("prefix", "normal"),
    [
        ("/", "/"),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/api/v1/", "/api/v1"),
        ("/a-b_c.d~", "/a-b_c.d~"),
    ],
)
def test_prefix_normalisation(prefix: str, normal: str) -> None:
    assert normalize_prefix(prefix) == normal


@pytest.mark.parametrize("prefix", ["api", "", "api/", "*", "http://x/api"])
def test_prefix_without_leading_slash_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match=_names(prefix) + r" must be a path starting with '/'"):
        normalize_prefix(prefix)


@pytest.mark.parametrize(
    "prefix",
    ["/api?x=1", "/api?", "/a%20b", "/%61pi", "/api#x", "/a b", "/a\\b", "/\u00e9", "/a\tb"],
)
def test_prefix_with_query_escape_or_odd_character_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match=_names(prefix) + r" must be a plain ASCII path"):
        normalize_prefix(prefix)


@pytest.mark.parametrize("prefix", ["/a/../b", "/..", "/./a", "/a/.", "/api/..", "/a//b"])
def test_prefix_with_dot_or_empty_segment_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match=_names(prefix) + r" has an empty or dot segment"):
        normalize_prefix(prefix)


def test_double_slash_prefix_is_not_silently_a_catch_all() -> None:
    # "/a//b" is refused for its empty segment; "//" (a typo) must not quietly become "/",
    # which would send every request of the host app to the pool.
    with pytest.raises(ValueError, match=_names("//")):
        normalize_prefix("//")


@pytest.mark.parametrize("prefix", [None, b"/api", 1])
def test_prefix_must_be_a_string(prefix: object) -> None:
    with pytest.raises(ValueError, match=_names(prefix)):
        normalize_prefix(prefix)


# ------------------------------------------------------------------------ pools= argument


def test_shorthand_list_of_urls_becomes_a_pool_with_defaults() -> None:
    pools = normalize_pools({"/api/": ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]})
    assert list(pools) == ["/api"]
    pool = pools["/api"]
    assert isinstance(pool, Pool)
    assert [u.origin for u in pool.members] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert pool.strip_prefix is True
    assert pool.retries == 2


def test_pool_objects_are_kept_as_given() -> None:
    pool = Pool(["http://10.0.0.1"], timeout=3.0)
    assert normalize_pools({"/api": pool})["/api"] is pool


def test_middleware_exposes_normalised_pools() -> None:
    mw = RoundRobinMiddleware(
        Starlette(), pools={"/api/": ["http://10.0.0.1"], "/": Pool(["http://10.0.0.2"])}
    )
    assert set(mw.balancer) == {"/api", "/"}
    assert all(isinstance(runtime.pool, Pool) for runtime in mw.balancer.pools.values())


@pytest.mark.parametrize(
    ("first", "second"), [("/api", "/api/"), ("/api/", "/api"), ("/api/v1", "/api/v1/")]
)
def test_duplicate_prefixes_are_rejected(first: str, second: str) -> None:
    with pytest.raises(ValueError, match=r"duplicate pool prefix " + _names(second)):
        normalize_pools({first: ["http://10.0.0.1"], second: ["http://10.0.0.2"]})


def test_empty_pool_in_pools_names_the_prefix() -> None:
    with pytest.raises(ValueError, match=r"pool '/api': a pool needs at least one upstream"):
        normalize_pools({"/api": []})


def test_bad_upstream_in_pools_names_prefix_and_url() -> None:
    with pytest.raises(ValueError, match=r"pool '/api': .*'localhost:8000'"):
        normalize_pools({"/api": ["localhost:8000"]})


def test_bad_prefix_in_pools_names_it() -> None:
    with pytest.raises(ValueError, match=_names("api/")):
        normalize_pools({"api/": ["http://10.0.0.1"]})
    # "api" is a pool name (for routes); with no route naming it, the middleware says so.
    with pytest.raises(ValueError, match=r"'api' is a name, but no route or mirror names.*'/api'"):
        RoundRobinMiddleware(Starlette(), pools={"api": ["http://10.0.0.1"]})


@pytest.mark.parametrize("pools", [{}, [], None, "http://10.0.0.1", [("/api", ["http://a"])]])
def test_pools_must_be_a_non_empty_mapping(pools: object) -> None:
    with pytest.raises(ValueError, match=r"pools must"):
        normalize_pools(pools)


def test_one_pool_value_for_two_prefixes_runs_as_two_pools() -> None:
    """A Pool is a value: under two prefixes it is two pools, each with its own state."""
    pool = Pool(["http://10.0.0.1", "http://10.0.0.2"])
    mw = RoundRobinMiddleware(Starlette(), pools={"/a": pool, "/b": pool})
    mw.balancer["/a"].drain("http://10.0.0.1")
    assert [r["drained"] for r in mw.balancer["/a"].snapshot()] == [True, False]
    assert [r["drained"] for r in mw.balancer["/b"].snapshot()] == [False, False]


def test_middleware_constructor_raises_the_config_error() -> None:
    with pytest.raises(ValueError, match=r"pool '/api': a pool needs at least one upstream"):
        RoundRobinMiddleware(Starlette(), pools={"/api": []})


@pytest.mark.parametrize("value", [0, -1])
def test_middleware_rejects_bad_max_url_length(value: int) -> None:
    with pytest.raises(ValueError, match=rf"max_url_length must be >= 1, got {value}"):
        RoundRobinMiddleware(Starlette(), pools={"/api": ["http://10.0.0.1"]}, max_url_length=value)


def test_middleware_rejects_a_transport_of_the_wrong_type() -> None:
    with pytest.raises(ValueError, match=r"transport must be an httpx.AsyncBaseTransport"):
        RoundRobinMiddleware(
            Starlette(),
            pools={"/api": ["http://10.0.0.1"]},
            transport="aiohttp",  # type: ignore[arg-type]
        )


def test_middleware_rejects_a_pool_transport_of_the_wrong_type() -> None:
    pool = Pool(["http://10.0.0.1"], transport=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"transport must be an httpx.AsyncBaseTransport"):
        RoundRobinMiddleware(Starlette(), pools={"/api": pool})


def test_middleware_rejects_bad_trusted_proxies() -> None:
    with pytest.raises(ValueError, match=_names("not-an-ip")):
        RoundRobinMiddleware(
            Starlette(), pools={"/api": ["http://10.0.0.1"]}, trusted_proxies=["not-an-ip"]
        )


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "64k"])
def test_bad_max_header_bytes_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match=r"max_header_bytes must be an integer >= 1, got "):
        RoundRobinMiddleware(
            PlainTextResponse("app"),
            pools={"/api": ["http://10.0.0.1"]},
            max_header_bytes=value,  # type: ignore[arg-type]
        )
