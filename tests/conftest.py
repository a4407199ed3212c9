from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import RunningServer, serve
from .upstream_app import UpstreamApp


@pytest.fixture
def upstreams() -> Iterator[list[RunningServer]]:
    """Three real uvicorn upstreams named a, b, c on ephemeral 127.0.0.1 ports."""
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, serve(UpstreamApp("c")) as c:
        yield [a, b, c]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
