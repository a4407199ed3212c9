"""A real app with a login, to put behind a prefix: the upstream of the browser test
(tests/test_login_flow.py, which also takes the docs' picture).

It knows nothing of the proxy: it redirects with absolute URLs of its own address and
with root-relative paths, and sets its session cookie on ``Path=/``. The host app has a
route of its own that shows which cookies reach it.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from rr_middleware import RoundRobinMiddleware

STYLE = (
    "<style>body{font:16px system-ui,sans-serif;margin:2em;color:#222}"
    "h1{font-size:1.4em}code{background:#eee;padding:0 .3em}"
    ".ok{color:#0a0}.bad{color:#c00}</style>"
)


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def root(request: Request) -> Response:
        # An absolute URL of the upstream's own address, as many apps build them.
        return RedirectResponse(f"http://{request.headers['host']}/login", status_code=307)

    @app.get("/login")
    async def login_form() -> Response:
        # action="login": relative, so the browser posts under the prefix it is at. The
        # page submits itself, standing for a user typing a name.
        return HTMLResponse(
            f"<!doctype html><title>Log in</title>{STYLE}<body onload='document.forms[0].submit()'>"
            "<h1>Log in</h1><form method=post action=login>"
            "<input name=user value=alice><button>Log in</button></form>"
        )

    @app.post("/login")
    async def login(request: Request) -> Response:
        # The form's body by hand: python-multipart, which Form() needs, is not required.
        user = parse_qs((await request.body()).decode()).get("user", ["?"])[0]
        response = RedirectResponse("/home", status_code=303)  # root-relative
        response.set_cookie("session", f"user-{user}", path="/", httponly=True)
        return response

    @app.get("/home")
    async def home(request: Request) -> Response:
        session = request.cookies.get("session")
        who = html.escape(session or "nobody")
        return HTMLResponse(
            f"<!doctype html><title>Home</title>{STYLE}<body>"
            f"<h1>Welcome, <span id=user>{who}</span></h1>"
            f"<p>Page: <code id=page></code></p>"
            "<p>Cookies the host app's own route got: <code id=host>…</code></p>"
            "<script>document.getElementById('page').textContent=location.pathname;"
            "fetch('/host/cookies').then(r=>r.json()).then(j=>{"
            "const e=document.getElementById('host');"
            "e.textContent=JSON.stringify(j.cookies);"
            "e.className=Object.keys(j.cookies).length?'bad':'ok'})</script>"
        )

    return app


def host_app(upstream_url: str) -> FastAPI:
    """The host: its own ``/host/cookies``, and the upstream app at ``/users``."""
    app = FastAPI()
    app.add_middleware(RoundRobinMiddleware, pools={"/users": [upstream_url]})

    @app.get("/host/cookies")
    async def cookies(request: Request) -> Response:
        return JSONResponse({"cookies": dict(request.cookies)})

    return app
