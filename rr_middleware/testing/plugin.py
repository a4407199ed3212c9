"""The kit's pytest fixtures: ``fake_upstreams``, ``rr_clock``, ``rr_app``.

Opt-in, so that installing rr-middleware adds no fixture to anyone's suite unasked. Any
one of these turns them on::

    # pyproject.toml (or rr_middleware_fixtures = true under [pytest] in pytest.ini)
    [tool.pytest.ini_options]
    rr_middleware_fixtures = true

    pytest -p rr_middleware.testing.plugin          # on the command line or in addopts

    pytest_plugins = ["rr_middleware.testing.plugin"]   # in the rootdir's conftest.py

(The ini option is read by the small module the ``pytest11`` entry point loads,
``rr_middleware.testing.pytest_entry``, which imports none of the kit unless asked.)
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.types import ASGIApp

from ..config import PoolsArg
from ..runtime import Balancer
from .app import RrTestClient, rr_test_client
from .clock import ManualClock
from .fake_upstream import FakeUpstream

__all__ = ["FakeUpstreams", "RrApp", "fake_upstreams", "rr_app", "rr_clock"]

#: ``fake_upstreams(n, serve=False, health_path="/health")``
FakeUpstreams = Callable[..., list[FakeUpstream]]
#: ``rr_app(pools, app=None, balancer=None, **middleware_options)``
RrApp = Callable[..., RrTestClient]


@pytest.fixture
def fake_upstreams() -> Iterator[FakeUpstreams]:
    """A factory of ``FakeUpstream``s named a, b, c, ... (each call goes on where the
    last stopped): ``a, b = fake_upstreams(2)`` in-process, ``fake_upstreams(2,
    serve=True)`` on sockets, stopped when the test ends."""
    names = iter(_names())
    with contextlib.ExitStack() as stack:

        def make(n: int = 2, *, serve: bool = False, health_path: str = "/health") -> list[Any]:
            fakes = [FakeUpstream(next(names), health_path=health_path) for _ in range(n)]
            if serve:
                for fake in fakes:
                    stack.enter_context(fake.serve())
            return fakes

        yield make


@pytest.fixture
def rr_clock() -> ManualClock:
    """A ``ManualClock`` for ``Pool(clock=rr_clock)``: ``rr_clock.advance(10)``."""
    return ManualClock()


@pytest.fixture
def rr_app() -> Iterator[RrApp]:
    """A factory: ``client = rr_app({"/api": Pool([...])}, app=my_app)`` adds the
    middleware to ``app`` (by default an empty FastAPI app) and returns an
    ``RrTestClient`` inside the app's lifespan, which ends with the test."""
    with contextlib.ExitStack() as stack:

        def make(
            pools: PoolsArg | None = None,
            *,
            app: ASGIApp | None = None,
            balancer: Balancer | None = None,
            **middleware_options: Any,
        ) -> RrTestClient:
            return stack.enter_context(
                rr_test_client(pools, app=app, balancer=balancer, **middleware_options)
            )

        yield make


def _names() -> Iterator[str]:
    yield from string.ascii_lowercase
    for first in string.ascii_lowercase:
        for second in string.ascii_lowercase:
            yield first + second
