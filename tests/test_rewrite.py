"""Redirects and cookies under a stripped prefix: the rules as a table (``rewrite.py`` on
raw header pairs), then a real upstream app behind the middleware."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from rr_middleware import Pool, Upstream
from rr_middleware.rewrite import ResponseRewriter

from .proxy import client, running_proxy
from .servers import RunningServer, serve

MEMBERS = [
    SimpleNamespace(upstream=Upstream("http://10.0.0.3:8000/v1")),
    SimpleNamespace(upstream=Upstream("http://10.0.0.4:8000/v1")),
    SimpleNamespace(upstream=Upstream("https://api.internal")),
]
FRONT_HOST = b"front.example"


def rewrite(
    name: str,
    value: str,
    *,
    raw_path: bytes = b"/users/x",
    path: bytes = b"/x",
    answered: int = 0,
    members: list[Any] = MEMBERS,
    redirects: bool = True,
    cookies: bool = True,
) -> str:
    """The value of header ``name`` once rewritten, for a request ``raw_path`` forwarded
    as ``path`` to ``members[answered]``."""
    scope = {"type": "http", "raw_path": raw_path, "path": "", "headers": [(b"host", FRONT_HOST)]}
    headers = [(b"content-type", b"text/plain"), (name.encode(), value.encode("latin-1"))]
    rewriter = ResponseRewriter(redirects, cookies)
    rewriter.rewrite(headers, members, members[answered].upstream, scope, path)  # type: ignore[arg-type]
    assert headers[0] == (b"content-type", b"text/plain")
    return headers[1][1].decode("latin-1")


# A pool at /users (prefix stripped) whose upstreams are at base path /v1.
STRIPPED_WITH_BASE = [
    # relative to the upstream: under its base path, or anywhere else on it
    ("/v1/login", "/users/login"),
    ("/v1", "/users"),
    ("/v1/", "/users/"),
    ("/login", "/users/login"),
    ("/", "/users/"),
    ("/v1x/a", "/users/v1x/a"),  # /v1x is not under /v1
    # query and fragment kept byte for byte
    ("/v1/login?next=/v1/a%2Fb&x=1#top", "/users/login?next=/v1/a%2Fb&x=1#top"),
    ("/v1?x", "/users?x"),
    # absolute, to each member: the path mapped, the internal address dropped
    ("http://10.0.0.3:8000/v1/login", "/users/login"),
    ("http://10.0.0.4:8000/v1/home?x=1#f", "/users/home?x=1#f"),
    ("HTTP://10.0.0.3:8000/v1/x", "/users/x"),
    ("http://10.0.0.3:8000", "/users/"),
    ("http://10.0.0.3:8000?q=1", "/users/?q=1"),
    ("https://api.internal/x", "/users/x"),  # that member has no base path
    ("https://api.internal:443/x", "/users/x"),
    ("https://API.Internal/x", "/users/x"),
    ("//10.0.0.3:8000/v1/x", "/users/x"),
    # absolute, to the host the client named: path mapped, scheme and host kept
    ("http://front.example/v1/home", "http://front.example/users/home"),
    ("https://front.example/v1/home?a=b", "https://front.example/users/home?a=b"),
    # already under the client's prefix (the upstream read X-Forwarded-Prefix)
    ("/users/home", "/users/home"),
    # elsewhere: untouched
    ("http://10.0.0.3:9999/v1/x", "http://10.0.0.3:9999/v1/x"),
    ("http://10.0.0.5:8000/v1/x", "http://10.0.0.5:8000/v1/x"),
    ("https://10.0.0.3:8000/v1/x", "/users/x"),  # a member's host and port, either scheme
    ("https://evil.example/v1/x", "https://evil.example/v1/x"),
    ("//evil.example/v1/x", "//evil.example/v1/x"),
    ("http://user@10.0.0.3:8000/v1/x", "http://user@10.0.0.3:8000/v1/x"),
    ("http://api.internal:8443/x", "http://api.internal:8443/x"),
    ("mailto:ops@example.com", "mailto:ops@example.com"),
    ("ftp://10.0.0.3:8000/v1/x", "ftp://10.0.0.3:8000/v1/x"),
    # relative references resolve against the client's URL as they are
    ("next", "next"),
    ("../up", "../up"),
    ("?page=2", "?page=2"),
    ("#frag", "#frag"),
]


@pytest.mark.parametrize(("location", "expected"), STRIPPED_WITH_BASE)
@pytest.mark.parametrize("name", ["location", "content-location"])
def test_location_under_a_stripped_prefix_with_a_base_path(
    name: str, location: str, expected: str
) -> None:
    assert rewrite(name, location) == expected


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v1/login", "/login"),
        ("/login", "/login"),
        ("/v1", "/"),
        ("http://10.0.0.3:8000/v1/login?x=1", "/login?x=1"),
        ("http://front.example/v1/a", "http://front.example/a"),
        ("https://evil.example/v1/x", "https://evil.example/v1/x"),
    ],
)
def test_location_with_a_base_path_and_nothing_stripped(location: str, expected: str) -> None:
    # strip_prefix=False: the upstream gets the client's whole path (after its base).
    assert rewrite("location", location, raw_path=b"/users/x", path=b"/users/x") == expected


NO_BASE = [SimpleNamespace(upstream=Upstream("http://10.0.0.3:8000"))]


@pytest.mark.parametrize(
    ("raw_path", "path", "location", "expected"),
    [
        (b"/users/x", b"/x", "/login", "/users/login"),
        (b"/users/x", b"/x", "/", "/users/"),
        (b"/users", b"", "/home", "/users/home"),
        (b"/users/x", b"/x", "http://10.0.0.3:8000/home", "/users/home"),
        (b"/a/b/c", b"/c", "/home", "/a/b/home"),  # a prefix of two segments
        # a "/" pool, or a prefix not stripped: paths map to themselves, member URLs to paths
        (b"/x", b"/x", "/login", "/login"),
        (b"/x", b"/x", "http://10.0.0.3:8000/login?a", "/login?a"),
    ],
)
def test_location_without_a_base_path(
    raw_path: bytes, path: bytes, location: str, expected: str
) -> None:
    assert rewrite("location", location, raw_path=raw_path, path=path, members=NO_BASE) == expected


@pytest.mark.parametrize(
    ("refresh", "expected"),
    [
        ("5; url=/v1/login", "5; url=/users/login"),
        ("0;URL='http://10.0.0.3:8000/v1/a?b'", "0;URL='/users/a?b'"),
        ('3, url="/v1/x"', '3, url="/users/x"'),
        ("5; url=https://evil.example/v1/", "5; url=https://evil.example/v1/"),
        ("5", "5"),
        ("soon", "soon"),
    ],
)
def test_refresh(refresh: str, expected: str) -> None:
    assert rewrite("refresh", refresh) == expected


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("s=1; Path=/", "s=1; Path=/users"),
        ("s=1; Path=/v1", "s=1; Path=/users"),
        ("s=1; Path=/v1/x; HttpOnly", "s=1; Path=/users/x; HttpOnly"),
        ("s=1; Path=/v1/x/", "s=1; Path=/users/x/"),
        ("s=1; path=/other", "s=1; path=/users/other"),
        ("s=1; Path=/users/a", "s=1; Path=/users/a"),
        ("s=1; Domain=10.0.0.3; Path=/", "s=1; Path=/users"),
        ("s=1; domain=.API.internal; Secure", "s=1; Secure"),
        ("s=1; Domain=example.com; Path=/v1", "s=1; Domain=example.com; Path=/users"),
        ("s=1; Max-Age=60", "s=1; Max-Age=60"),  # no Path: its default is the client's
        ("s=a=b; Path=/v1; SameSite=Lax", "s=a=b; Path=/users; SameSite=Lax"),
        ("path=/v1", "path=/v1"),  # a cookie named "path", not the attribute
    ],
)
def test_set_cookie(cookie: str, expected: str) -> None:
    assert rewrite("set-cookie", cookie) == expected


def test_set_cookie_with_a_base_path_and_nothing_stripped() -> None:
    assert rewrite("set-cookie", "s=1; Path=/v1/x", path=b"/users/x") == "s=1; Path=/x"
    assert rewrite("set-cookie", "s=1; Path=/", path=b"/users/x") == "s=1; Path=/"


def test_the_switches() -> None:
    assert rewrite("location", "/v1/a", redirects=False) == "/v1/a"
    assert rewrite("refresh", "1; url=/v1/a", redirects=False) == "1; url=/v1/a"
    assert rewrite("set-cookie", "s=1; Path=/", redirects=False) == "s=1; Path=/users"
    assert rewrite("set-cookie", "s=1; Path=/", cookies=False) == "s=1; Path=/"
    assert rewrite("location", "/v1/a", cookies=False) == "/users/a"


def test_pool_options_are_validated() -> None:
    pool = Pool(["http://10.0.0.1"])
    assert (pool.rewrite_redirects, pool.rewrite_cookies) == (True, True)
    for name in ("rewrite_redirects", "rewrite_cookies"):
        with pytest.raises(ValueError, match=rf"{name} must be True or False, got 'no'"):
            Pool(["http://10.0.0.1"], **{name: "no"})


# --------------------------------------------------------------------------- a real upstream


def login_app() -> Starlette:
    """An app at base path /v1 that knows nothing of the proxy: it redirects with
    relative and absolute URLs of its own and sets a cookie on ``Path=/``."""

    def absolute(request: Request, path: str) -> str:
        return f"http://{request.headers['host']}/v1{path}"

    async def login(request: Request) -> Response:
        response = RedirectResponse("/v1/home", status_code=303)
        response.set_cookie("session", "s3cret", path="/", httponly=True)
        return response

    async def elsewhere(request: Request) -> Response:
        return RedirectResponse(absolute(request, "/home?from=abs"), status_code=302)

    async def home(request: Request) -> Response:
        return JSONResponse({"session": request.cookies.get("session")})

    async def outside(request: Request) -> Response:
        return RedirectResponse("https://example.org/x", status_code=302)

    routes = [
        Route("/login", login, methods=["POST"]),
        Route("/elsewhere", elsewhere),
        Route("/home", home),
        Route("/outside", outside),
    ]
    return Starlette(routes=[Mount("/v1", routes=routes)])


@pytest.fixture(scope="module")
def app_upstream() -> Iterator[RunningServer]:
    with serve(login_app()) as server:
        yield server


def test_login_flow_behind_a_stripped_prefix(app_upstream: RunningServer) -> None:
    base = app_upstream.url + "/v1"
    with running_proxy({"/users": [base]}) as (proxy, _), client() as http:
        response = http.post(f"{proxy.url}/users/login")
        assert response.status_code == 303
        assert response.headers["location"] == "/users/home"
        cookie = response.headers["set-cookie"]
        assert cookie == "session=s3cret; HttpOnly; Path=/users; SameSite=lax"
        response = http.get(f"{proxy.url}/users/elsewhere")
        assert response.headers["location"] == "/users/home?from=abs"  # no internal address
        assert http.get(f"{proxy.url}/users/outside").headers["location"] == "https://example.org/x"
        # The browser's side: the cookie goes back under /users, never to the host's routes.
        home = http.get(f"{proxy.url}/users/home")
        assert home.json() == {"session": "s3cret"}
        local = http.build_request("GET", f"{proxy.url}/local")
        assert "cookie" not in local.headers
        assert http.get(f"{proxy.url}/local").text == "host local"


def test_rewriting_turned_off(app_upstream: RunningServer) -> None:
    pool = Pool([app_upstream.url + "/v1"], rewrite_redirects=False, rewrite_cookies=False)
    with running_proxy({"/users": pool}) as (proxy, _), client() as http:
        response = http.post(f"{proxy.url}/users/login")
        assert response.headers["location"] == "/v1/home"
        assert "Path=/;" in response.headers["set-cookie"]
        response = http.get(f"{proxy.url}/users/elsewhere")
        assert response.headers["location"] == f"{app_upstream.url}/v1/home?from=abs"


def test_many_set_cookie_lines_each_rewritten() -> None:
    async def cookies(request: Request) -> Response:
        response = PlainTextResponse("ok")
        for i in range(3):
            response.set_cookie(f"c{i}", str(i), path="/")
        return response

    with (
        serve(Starlette(routes=[Route("/c", cookies)])) as upstream,
        running_proxy({"/api": [upstream.url]}) as (proxy, _),
        client() as http,
    ):
        response = http.get(f"{proxy.url}/api/c")
    assert response.headers.get_list("set-cookie") == [
        f"c{i}={i}; Path=/api; SameSite=lax" for i in range(3)
    ]
