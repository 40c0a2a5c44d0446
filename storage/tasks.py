"""asyncio task helpers shared by the storage clients and the server."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait for it to end; its CancelledError is expected and absorbed, but
    ours is not (if the caller itself is cancelled while it waits, that propagates).

    Only a cancellation that arrives during the wait counts: aiohttp runs the cleanup of a
    server stopped by a signal inside its cancelled main task, and that earlier, already
    delivered cancellation must not abort the cleanup (the final commit, the executor)."""
    if task is None:
        return
    me = asyncio.current_task()
    before = me.cancelling() if me is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if me is not None and me.cancelling() > before:
            raise
