"""Ending background tasks for good."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

#: How long a cancelled task has to end before it is cancelled again.
RECANCEL_AFTER = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again each
    :data:`RECANCEL_AFTER` seconds one has not.

    Once is not always enough: a cancellation that lands as an awaited call completes can
    be lost (``asyncio.wait_for`` on Python 3.10 and 3.11; any inner task that ends with a
    result instead of the cancellation), and a task looping around such a call — a health
    checker's interval, a discovery watch — would go on, and its owner's shutdown with it.
    Outcomes are left in the tasks (read them, or they are reported as never retrieved)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)
