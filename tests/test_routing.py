"""PrefixRouter matching and the path filters (dot segments, unsafe bytes, ambiguous paths)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rr_middleware.routing import (
    PrefixRouter,
    has_dot_segment,
    is_ambiguous_path,
    is_plain_path,
    is_unsafe_path,
)


@pytest.fixture
def api() -> PrefixRouter[str]:
    return PrefixRouter({"/api": "api"})


# ------------------------------------------------------------------------ segment boundaries


@pytest.mark.parametrize(
    ("path", "end"),
    [
        (b"/api", 4),
        (b"/api/", 4),
        (b"/api/x", 4),
        (b"/api/x/y/z", 4),
        (b"/api//x", 4),
    ],
)
def test_prefix_matches_on_segment_boundaries(
    api: PrefixRouter[str], path: bytes, end: int
) -> None:
    assert api.match(path) == (end, "api")
    # The rest of the path after the prefix is what gets forwarded.
    assert path[end:] == path[4:]


@pytest.mark.parametrize(
    "path", [b"/apix", b"/apix/y", b"/ap", b"/", b"/a/api", b"/API", b"/other/api", b"//api"]
)
def test_prefix_does_not_match_across_a_segment(api: PrefixRouter[str], path: bytes) -> None:
    assert api.match(path) is None


def test_empty_path_matches_nothing(api: PrefixRouter[str]) -> None:
    assert api.match(b"") is None


# --------------------------------------------------------------------------- longest prefix


@pytest.fixture
def nested() -> PrefixRouter[str]:
    return PrefixRouter(
        {"/api": "api", "/api/v2": "v2", "/api/v2/admin": "admin", "/static": "static"}
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/api", (4, "api")),
        (b"/api/v1/x", (4, "api")),
        (b"/api/v2", (7, "v2")),
        (b"/api/v2/", (7, "v2")),
        (b"/api/v2/users", (7, "v2")),
        (b"/api/v2x", (4, "api")),
        (b"/api/v2/admin", (13, "admin")),
        (b"/api/v2/admin/x/y", (13, "admin")),
        (b"/api/v2/administrator", (7, "v2")),
        (b"/static/app.js", (7, "static")),
        (b"/staticx", None),
        (b"/v2", None),
    ],
)
def test_longest_prefix_wins(
    nested: PrefixRouter[str], path: bytes, expected: tuple[int, str] | None
) -> None:
    assert nested.match(path) == expected


def test_nested_prefix_wins_whatever_the_insertion_order() -> None:
    router = PrefixRouter({"/api/v2/admin": "admin", "/api/v2": "v2", "/api": "api"})
    assert router.match(b"/api/v2/admin/x") == (13, "admin")
    assert router.match(b"/api/v2/x") == (7, "v2")
    assert router.match(b"/api/x") == (4, "api")


def test_deep_prefix_only() -> None:
    router = PrefixRouter({"/a/b/c": "abc"})
    assert router.match(b"/a/b/c/d") == (6, "abc")
    assert router.match(b"/a/b") is None
    assert router.match(b"/a/b/cd") is None


# ------------------------------------------------------------------------------ root pool


def test_root_catches_everything_not_under_a_longer_prefix() -> None:
    router = PrefixRouter({"/": "root", "/api": "api"})
    assert router.match(b"/") == (0, "root")
    assert router.match(b"/anything/else") == (0, "root")
    assert router.match(b"/apix") == (0, "root")
    assert router.match(b"/api/x") == (4, "api")
    assert router.match(b"/api") == (4, "api")


def test_root_alone() -> None:
    router = PrefixRouter({"/": "root"})
    assert router.match(b"/") == (0, "root")
    assert router.match(b"/x/y/z") == (0, "root")
    assert router.match(b"/%2e%2e") == (0, "root")


# --------------------------------------------------------------------------- percent-encoding


@pytest.mark.parametrize(
    ("path", "end"),
    [
        (b"/%61pi/x", 6),
        (b"/%61pi", 6),
        (b"/%61%70%69/x", 10),
        (b"/ap%69/", 6),
        (b"/ap%69", 6),
    ],
)
def test_segments_compare_percent_decoded(api: PrefixRouter[str], path: bytes, end: int) -> None:
    assert api.match(path) == (end, "api")


def test_percent_decoded_match_of_a_nested_prefix(nested: PrefixRouter[str]) -> None:
    assert nested.match(b"/api/%76%32/x") == (11, "v2")
    assert nested.match(b"/%61pi/v2/x") == (9, "v2")
    assert nested.match(b"/api/%76%33/x") == (4, "api")


def test_percent_escapes_are_case_insensitive_but_segments_are_not(
    api: PrefixRouter[str],
) -> None:
    assert api.match(b"/%61pi") == (6, "api")
    assert api.match(b"/%41pi") is None  # "Api" is not "api"


@pytest.mark.parametrize(
    "path", [b"/api%2Fx", b"/api%2fx", b"/api%2Fx/y", b"/api%2F", b"/%61pi%2Fx"]
)
def test_encoded_slash_never_splits_a_segment(api: PrefixRouter[str], path: bytes) -> None:
    assert api.match(path) is None


def test_encoded_slash_does_not_reach_a_nested_prefix(nested: PrefixRouter[str]) -> None:
    # "/api/v2%2Fadmin" is /api followed by the single segment "v2/admin".
    assert nested.match(b"/api/v2%2Fadmin") == (4, "api")
    assert nested.match(b"/api%2Fv2/x") is None


def test_encoded_slash_falls_back_to_root() -> None:
    router = PrefixRouter({"/": "root", "/api": "api"})
    assert router.match(b"/api%2Fx") == (0, "root")


# ------------------------------------------------------------------------------------ scale


def test_ten_thousand_prefixes() -> None:
    routes: dict[str, int] = {f"/svc{i}": i for i in range(10_000)}
    routes.update({f"/svc{i}/v2": -i for i in range(0, 10_000, 7)})
    router = PrefixRouter(routes)
    assert router.match(b"/svc0") == (5, 0)
    assert router.match(b"/svc9999/x") == (8, 9999)
    assert router.match(b"/svc1234/v2/x") == (8, 1234)  # 1234 % 7 != 0: no /v2 pool
    assert router.match(b"/svc1239/v2/x") == (11, -1239)  # 1239 % 7 == 0
    assert router.match(b"/svc10000/x") is None
    assert router.match(b"/svc99") == (6, 99)
    assert router.match(b"/%73vc42/x") == (8, 42)
    assert router.match(b"/nope") is None


# ----------------------------------------------------------------------------- dot segments


@pytest.mark.parametrize(
    "path",
    [
        b"/api/../admin",
        b"/api/..",
        b"/..",
        b"/api/./x",
        b"/api/.",
        b"/./api",
        b"/api/%2e%2e/admin",
        b"/api/%2E%2E/admin",
        b"/api/%2E./admin",
        b"/api/.%2e/admin",
        b"/api/%2e/x",
        b"/api/..%2Fadmin",
        b"/api/..%2fadmin",
        b"/api/x%2F..%2Fadmin",
        b"/api/..\\admin",
        b"/api\\..\\admin",
        b"/api/%5c..%5cadmin",
        b"/api/..%5Cadmin",
        b"/api/%2e%2e%5cadmin",
    ],
)
def test_dot_segments_are_detected(path: bytes) -> None:
    assert has_dot_segment(path)


@pytest.mark.parametrize(
    "path",
    [
        b"/",
        b"/api/x",
        b"/file..txt",
        b"/a.b/c",
        b"/api/...",
        b"/api/..x",
        b"/api/x..",
        b"/.well-known/acme",
        b"/api/%2e%2e%2e",
        b"/api/%2ex",
        b"/api/%252e%252e/x",
        b"/api/v1.2/x",
    ],
)
def test_no_false_positive_dot_segments(path: bytes) -> None:
    assert not has_dot_segment(path)


# ------------------------------------------------------------------------------ unsafe paths


@pytest.mark.parametrize(
    "path",
    [
        b"",
        b"api/x",
        b"*",
        b"http://evil/x",
        b"/a\x00b",
        b"/a%00b",
        b"/a\x01b",
        b"/a\x1fb",
        b"/a\x7fb",
        b"/a\rb",
        b"/a\nb",
        b"/a\tb",
        b"/a b",
        b"/a\\b",
        b"\\api",
    ],
)
def test_unsafe_paths(path: bytes) -> None:
    assert is_unsafe_path(path)


@pytest.mark.parametrize(
    "path",
    [b"/", b"/api/x", b"/a%20b", b"/a%2Fb", b"/a%5C", b"/caf%C3%A9", b"/a;b=c", b"/~user/x"],
)
def test_safe_paths(path: bytes) -> None:
    assert not is_unsafe_path(path)


# --------------------------------------------------------------------------- ambiguous paths

AMBIGUOUS = [
    # A dot segment with path parameters: Tomcat and Spring drop ";..." first.
    b"/api/..;/admin",
    b"/api/..;jsessionid=x/admin",
    b"/api/.;/x",
    b"/api/x/..;",
    b"/api/..%3b/admin",
    b"/api/..%3B/admin",
    b"/api/%2e%2e;/admin",
    b"/api/%2e%2e%3bx/admin",
    b"/api/x%2f..;%2fadmin",
    # Dot segments once decoded twice (or more).
    b"/api/%252e%252e/admin",
    b"/api/%252E%252E/admin",
    b"/api/.%252e/admin",
    b"/api/..%252fadmin",
    b"/api/x%252f..%252fadmin",
    b"/api/..%255cadmin",
    b"/api/%252e",
    b"/api/%25252e%25252e/admin",
    b"/api/..%253b/admin",
    # Overlong UTF-8 for ".", "/" and "\\" (and any other overlong form).
    b"/api/%c0%ae%c0%ae/admin",
    b"/api/%C0%AE%C0%AE/admin",
    b"/api/..%c0%afadmin",
    b"/api/%e0%80%ae%e0%80%ae/x",
    b"/api/..%c1%9cadmin",
    b"/api/%c1%81",
    b"/api/%f0%80%80%ae",
    b"/api/%25c0%25ae%25c0%25ae/admin",
    # IIS's %u escapes of ".", "/", "\\" and their lookalikes, at any depth.
    b"/api/%u002e%u002e/admin",
    b"/api/%U002E%U002E/admin",
    b"/api/.%u002e/admin",
    b"/api/..%u002fadmin",
    b"/api/..%u005cadmin",
    b"/api/..%u2215admin",
    b"/api/%uff0e%uff0e/admin",
    b"/api/%u2024%u2024/admin",
    b"/api/%25u002e%25u002e/admin",
    b"/api/x%u2215%u002e%u002e%u2215admin",
    # The same lookalikes as UTF-8.
    b"/api/%EF%BC%8E%EF%BC%8E/admin",
    b"/api/..%ef%bc%8fadmin",
    b"/api/%e2%80%a5/admin",
    b"/api/%25ef%25bc%258e%25ef%25bc%258e/admin",
    # review: "%" as %u0025 building an escape for a later decode; NFKC ".." in one char.
    b"/api/%u00252e%u00252e/admin",
    b"/api/..%u00252fadmin",
    b"/api/%u0025u002e%u0025u002e/admin",
    b"/api/%u2025/admin",
    b"/api/%uFE30/admin",
    b"/api/%uFF052e%uFF052e/admin",  # fullwidth "%" (NFKC, best fit)
]


@pytest.mark.parametrize("path", AMBIGUOUS)
def test_ambiguous_paths_are_detected(path: bytes) -> None:
    assert is_ambiguous_path(path)
    assert not has_dot_segment(path)  # not refused without the ambiguous-path checks


@pytest.mark.parametrize(
    "path",
    [
        b"/",
        b"/api/x",
        b"/api/items;v=1/x",
        b"/api/a;b/c;d=e",
        b"/api/a%3bb",
        b"/api/...;x",
        b"/api/..x;y",
        b"/api/;/x",
        b"/api/a%252fb",  # a name holding "%2f": decoded twice it is a slash, not a dot segment
        b"/api/100%25",
        b"/api/%2525",
        b"/api/caf%c3%a9",  # UTF-8
        b"/api/%e2%82%ac",
        b"/api/%f0%9f%98%80",
        b"/api/%e9t%e9",  # Latin-1
        b"/api/%c0",
        b"/api/%ff%fe",
        b"/api/%zz%2",
        b"/api/%u00e9t%u00e9",  # IIS's é
        b"/api/x%ef%bc%8ey",  # a name holding a fullwidth full stop
        b"/api/%e3%80%82",  # the ideographic full stop: no lookalike
        b"/api/100%uptime",  # no %u escape: "pt" is not hex
        b"/api/%u002ex",  # ".x": no dot segment
        b"/api/%u002e%u002e%u002e",  # "...": a name
    ],
)
def test_no_false_positive_ambiguous_paths(path: bytes) -> None:
    assert not is_ambiguous_path(path)


segment_text = st.text(st.characters(codec="ascii", exclude_characters="%;/\\?#"), max_size=8)


@given(st.lists(segment_text, max_size=6))
def test_paths_without_percent_or_semicolon_are_never_ambiguous(segments: list[str]) -> None:
    assert not is_ambiguous_path(("/" + "/".join(segments)).encode())


def encode(text: bytes, times: int) -> bytes:
    """Percent-encode every byte ``times`` times (the second and later time, only "%")."""
    once = b"".join(b"%%%02x" % byte for byte in text)
    for _ in range(times - 1):
        once = once.replace(b"%", b"%25")
    return once


# Bytes that matter to some filter, and ordinary ones.
_PATH_BYTES = b"/.%;\\:@-_~!$&'()*+,=aZ09 #?\x00\x7f\xc0\xae2eEfF"


@given(
    st.binary(max_size=16).map(lambda raw: bytes(_PATH_BYTES[b % len(_PATH_BYTES)] for b in raw))
)
def test_a_plain_path_is_one_no_filter_refuses(path: bytes) -> None:
    """``is_plain_path`` is the shortcut the middleware takes before the filters: it may
    say no to a path they let through, never yes to one they refuse."""
    for candidate in (path, b"/" + path):
        if is_plain_path(candidate):
            assert not is_unsafe_path(candidate)
            assert not has_dot_segment(candidate)
            assert not is_ambiguous_path(candidate)


@pytest.mark.parametrize(
    ("path", "plain"),
    [
        (b"/api/hello", True),
        (b"/api/app.min.js", True),
        (b"/api/users/42:rename@x", True),
        (b"/", True),
        (b"/api/.env", False),
        (b"/api/../admin", False),
        (b"/api%2e%2e/admin", False),
        (b"/api/..;/admin", False),
        (b"api/hello", False),
        (b"/api/h\xc3\xa9", False),
    ],
)
def test_ordinary_paths_are_plain(path: bytes, plain: bool) -> None:
    assert is_plain_path(path) is plain


@given(
    dots=st.sampled_from([b".", b".."]),
    times=st.integers(2, 4),
    head=segment_text,
    tail=segment_text,
)
def test_dot_segments_encoded_twice_or_more_are_ambiguous(
    dots: bytes, times: int, head: str, tail: str
) -> None:
    for separator in (b"/", encode(b"/", times), encode(b"\\", times)):
        path = (
            b"/api/" + head.encode() + separator + encode(dots, times) + separator + tail.encode()
        )
        assert is_ambiguous_path(path), path


@given(dots=st.sampled_from([b".", b".."]), params=segment_text, times=st.integers(0, 3))
def test_dot_segments_with_parameters_are_ambiguous(dots: bytes, params: str, times: int) -> None:
    semicolon = encode(b";", times) if times else b";"
    assert is_ambiguous_path(b"/api/" + dots + semicolon + params.encode() + b"/admin")


@given(char=st.sampled_from([0x2E, 0x2F, 0x5C]), length=st.sampled_from([2, 3, 4]))
def test_overlong_utf8_of_dot_and_slashes_is_ambiguous(char: int, length: int) -> None:
    if length == 2:  # 110xxxxx 10xxxxxx with the value in 7 bits
        raw = bytes([0xC0 | char >> 6, 0x80 | char & 0x3F])
    elif length == 3:
        raw = bytes([0xE0, 0x80 | char >> 6, 0x80 | char & 0x3F])
    else:
        raw = bytes([0xF0, 0x80, 0x80 | char >> 6, 0x80 | char & 0x3F])
    assert is_ambiguous_path(b"/api/" + encode(raw, 1) + b"x")


def test_dot_segments_are_refused_under_a_pool_and_untouched_elsewhere() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from rr_middleware import Pool, RoundRobinMiddleware, Upstream

    async def files(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host app saw " + request.scope["raw_path"].decode())

    async def upstream(scope: object, receive: object, send: object) -> None:
        raise AssertionError("a dot-segment path reached the upstream")

    app = Starlette(routes=[Route("/files/{rest:path}", files)])
    app.add_middleware(
        RoundRobinMiddleware, pools={"/api": Pool([Upstream("http://up.internal", app=upstream)])}
    )
    with TestClient(app) as client:
        for path in ("/api/%2e%2e/admin", "/api/x/.%2E/y", "/api/a/..%2Fb", "/api/%2e"):
            assert client.get(path).status_code == 400, path
        outside = client.get("/files/a/%2e%2e/b")
        assert outside.status_code == 200
        assert outside.text == "host app saw /files/a/%2e%2e/b"
