"""cancel_and_wait: how the health checker, discovery watch, mirror copies, hedge losers
and the reloader's tasks are ended, also when a cancellation is lost."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from rr_middleware.tasks import RECANCEL_AFTER, cancel_and_wait

pytestmark = pytest.mark.anyio


async def loses(cancellations: int, ended: list[str]) -> None:
    """Goes on after its first ``cancellations`` cancellations, as a loop around a call
    that lost one does (asyncio.wait_for on Python 3.10 and 3.11)."""
    lost = 0
    try:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                lost += 1
                if lost > cancellations:
                    raise
    finally:
        ended.append(f"after {lost}")


async def test_a_task_that_lost_cancellations_is_cancelled_until_it_ends() -> None:
    ended: list[str] = []
    task = asyncio.ensure_future(loses(2, ended))
    await asyncio.sleep(0)
    task.cancel()  # what stopping did before: one cancellation, then a wait
    done, _ = await asyncio.wait((task,), timeout=RECANCEL_AFTER * 2)
    assert not done  # lost: it goes on
    with anyio.fail_after(RECANCEL_AFTER * 20):
        await cancel_and_wait((task,))
    assert task.cancelled()
    assert ended == ["after 3"]


async def test_ended_tasks_are_left_with_their_outcomes() -> None:
    async def fails() -> None:
        raise ValueError("kept")

    failed = asyncio.ensure_future(fails())
    finished = asyncio.ensure_future(asyncio.sleep(0, "result"))
    await asyncio.wait((failed, finished))
    with anyio.fail_after(1):
        await cancel_and_wait((failed, finished))
    assert isinstance(failed.exception(), ValueError)
    assert finished.result() == "result"


async def test_every_task_ends_each_at_its_own_pace() -> None:
    ended: list[str] = []
    tasks = [asyncio.ensure_future(loses(n, ended)) for n in (0, 1, 3)]
    await asyncio.sleep(0)
    with anyio.fail_after(RECANCEL_AFTER * 40):
        await cancel_and_wait(tasks)
    assert all(task.cancelled() for task in tasks)
    assert sorted(ended) == ["after 1", "after 2", "after 4"]
