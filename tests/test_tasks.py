"""cancel_and_wait: absorbs the task's cancellation, propagates one aimed at the caller."""

from __future__ import annotations

import asyncio

import pytest

from storage.tasks import cancel_and_wait


async def _forever() -> None:
    await asyncio.sleep(3600)


async def test_cleanup_inside_an_already_cancelled_task_completes() -> None:
    """aiohttp runs cleanup in its cancelled main task: the wait must still finish."""
    done: list[str] = []

    async def main() -> None:
        background = asyncio.create_task(_forever())
        try:
            await asyncio.sleep(3600)
        finally:  # cancelled: cleanup, as aiohttp's runner does
            await cancel_and_wait(background)
            assert background.cancelled()
            done.append("cleanup finished")

    task = asyncio.create_task(main())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["cleanup finished"]


async def test_a_cancel_during_the_wait_propagates() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # slow to end
            raise

    reached: list[str] = []

    async def caller() -> None:
        background = asyncio.create_task(stubborn())
        await asyncio.sleep(0)  # let it start, so that it takes its time to end
        await cancel_and_wait(background)
        reached.append("after")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.05)
    task.cancel()  # while it waits
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached == []
