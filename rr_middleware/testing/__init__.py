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

from .app import RrTestClient, rr_test_client
from .clock import ManualClock
from .discovery import FakeDiscovery
from .fake_upstream import FakeUpstream, Latency, ReceivedRequest
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
