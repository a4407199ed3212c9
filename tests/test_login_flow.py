"""A browser logs in to a real app behind a prefix: headless Chromium follows the
redirects and keeps the cookie, with the proxy mapping both under ``/users``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .chromium import run_chromium
from .login_app import host_app, upstream_app
from .servers import serve

DOCS = Path(__file__).resolve().parent.parent / "docs"
WINDOW_SIZE = (900, 170)


@pytest.mark.slow
def test_login_flow_in_headless_chromium(tmp_path: Path, chromium: str) -> None:
    """/users/ → (absolute redirect to the upstream's own address) /users/login → the form
    posts → (root-relative redirect, Path=/ cookie) /users/home, where the upstream gets
    the session; the host app's own route gets no cookie. With UPDATE_DOCS=1 the picture
    replaces docs/app-front-login.png."""
    with serve(upstream_app()) as upstream, serve(host_app(upstream.url)) as front:
        arguments = ["--virtual-time-budget=5000", "--dump-dom", front.url + "/users/"]
        page = run_chromium(arguments, tmp_path / "profile-dom", chromium)
        picture = tmp_path / "login.png"
        run_chromium(
            [
                "--virtual-time-budget=5000",
                "--hide-scrollbars",
                f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
                f"--screenshot={picture}",
                front.url + "/users/",
            ],
            tmp_path / "profile-picture",
            chromium,
        )
    assert re.search(r'<span id="user">user-alice</span>', page), page
    assert '<code id="page">/users/home</code>' in page, page
    assert '<code id="host" class="ok">{}</code>' in page, page  # no cookie for the host
    assert upstream.url.split("//")[1] not in page
    data = picture.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("UPDATE_DOCS") == "1":
        shutil.copyfile(picture, DOCS / "app-front-login.png")
