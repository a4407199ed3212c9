from __future__ import annotations

import gc
import logging
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from .chromium import CHROMIUM, chromium_installed
from .consul_agent import ConsulAgent, find_consul, start_agent
from .leaks import LeakLog
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp

CONSUL_LOG_START = pytest.StashKey[int]()


@pytest.fixture
def upstreams() -> Iterator[list[RunningServer]]:
    """Three real uvicorn upstreams named a, b, c on ephemeral 127.0.0.1 ports."""
    with serve(UpstreamApp("a")) as a, serve(UpstreamApp("b")) as b, serve(UpstreamApp("c")) as c:
        yield [a, b, c]


@pytest.fixture(params=["uvicorn", "granian"])
def server(request: pytest.FixtureRequest) -> str:
    """The ASGI server under rr-gateway (``[server] server``): each test that asks for it
    runs under both."""
    name: str = request.param
    if name == "granian":
        pytest.importorskip("granian")
    return name


@pytest.fixture
def leak_log() -> Iterator[LeakLog]:
    """Where leaks and crashes are logged (asyncio, rr_middleware, uvicorn), as text; see
    ``tests.leaks.leaks``."""
    handler = LeakLog()
    handler.watch()
    try:
        yield handler
    finally:
        handler.unwatch()


@pytest.fixture
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After the test, its garbage collected: no "Task exception was never retrieved", no
    "Task was destroyed but it is pending", nor any other warning or error the event loops
    (the servers', the proxy's, the test's) reported through the asyncio logger. A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("no_asyncio_errors")``."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    gc.collect()
    records = caplog.get_records("call") + caplog.records  # the test's, and after collection
    problems = [
        r.getMessage() for r in records if r.name == "asyncio" and r.levelno >= logging.WARNING
    ]
    assert not problems, problems
    assert not any("Task was destroyed" in r.getMessage() for r in records)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def chromium() -> str:
    """Headless Chromium's path (tests/chromium.py); skip without it, except on CI
    (CI=true), where that is a failure."""
    if chromium_installed():
        return CHROMIUM
    reason = f"headless Chromium is not installed at {CHROMIUM} (make system-deps installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """One real ``consul agent -dev`` on 127.0.0.1 for the session (see tests/consul_agent.py).

    Services a test registers and leaves behind are deregistered after that test, so tests
    may share names; a module- or session-scoped fixture's registrations are its own to undo.
    Without a consul binary the test skips, or fails when CI=true.
    """
    binary = find_consul()
    if binary is None:
        message = "consul agent not available: run .ci/install-consul or set CONSUL_BIN"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    agent = start_agent(binary, Path(tmp_path_factory.mktemp("consul")))
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(autouse=True)
def _consul_cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    """For tests using ``consul``: deregister what the test left, mark where its log starts."""
    if "consul" not in request.fixturenames:
        yield
        return
    agent: ConsulAgent = request.getfixturevalue("consul")
    before = set(agent.registered)
    request.node.stash[CONSUL_LOG_START] = agent.log_size()
    yield
    for service_id in agent.registered - before:
        agent.deregister(service_id)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used the agent shows the agent's log written during it."""
    report = yield
    start = item.stash.get(CONSUL_LOG_START, None)
    if report.failed and start is not None and "consul" in getattr(item, "funcargs", {}):
        agent: ConsulAgent = item.funcargs["consul"]  # type: ignore[attr-defined]
        report.sections.append(("consul agent log", agent.log_tail(start)))
    return report
