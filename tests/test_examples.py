"""The examples run as documented."""

from __future__ import annotations

import asyncio
import re

import pytest

from examples import run_demo


def test_make_demo_shows_the_rotation_and_the_local_route(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert asyncio.run(run_demo.main()) == 0
    out = capsys.readouterr().out
    answered = re.findall(r"#\d+\s+-> (backend-\d)", out)
    assert answered == ["backend-1", "backend-2", "backend-3"] * 4
    assert "saw /v1/42 (X-Forwarded-Prefix: /users)" in out
    assert "GET /hello         -> 200 {'hello': 'from the host app'}" in out
    assert "all servers stopped." in out
