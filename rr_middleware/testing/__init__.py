"""Testing an app that uses the middleware: fake upstreams, a clock, discovery you drive.

``FakeUpstream`` is an upstream whose behaviour a test switches while the app serves
(answers, a status, latency, refused connections, a hang, a reset, a slow drip, failing
health checks), in-process or on a real socket; ``ManualClock`` moves the pools' time;
``FakeDiscovery`` changes a pool's members; ``wait_until`` and ``settled`` wait for what
settles a moment after a response, with a deadline; ``rr_test_client`` runs an app with
the middleware inside its lifespan. The pytest fixtures are in ``rr_middleware.testing.
plugin`` (opt-in). Nothing here needs pytest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import RrTestClient, rr_test_client
    from .clock import ManualClock
    from .discovery import FakeDiscovery
    from .exchange import ReceivedRequest
    from .fake_upstream import FakeUpstream, Latency
    from .raw import RawConnection, RawRequest, RawUpstream
    from .waiting import WaitTimeout, settled, wait_until

__all__ = [
    "FakeDiscovery",
    "FakeUpstream",
    "Latency",
    "ManualClock",
    "RawConnection",
    "RawRequest",
    "RawUpstream",
    "ReceivedRequest",
    "RrTestClient",
    "WaitTimeout",
    "rr_test_client",
    "settled",
    "wait_until",
]

# Loaded on first use: pytest imports this package for its entry point (pytest_entry.py)
# in every run, and that must cost nothing to a suite that does not use the kit.
_MODULES = {
    "RrTestClient": "app",
    "rr_test_client": "app",
    "ManualClock": "clock",
    "FakeDiscovery": "discovery",
    "FakeUpstream": "fake_upstream",
    "Latency": "fake_upstream",
    "ReceivedRequest": "exchange",
    "RawConnection": "raw",
    "RawRequest": "raw",
    "RawUpstream": "raw",
    "WaitTimeout": "waiting",
    "settled": "waiting",
    "wait_until": "waiting",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
