"""[server] gc_freeze: the start-up heap is frozen once a model serves."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from storage.localstore import LocalStore
from tests.server_fixtures import commit_model, make_settings, start_client, until


async def test_the_heap_is_frozen_once_a_model_serves(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    gc.unfreeze()
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    client = await start_client(aiohttp_client, store=store,
                                settings=make_settings(poll_interval_s=0.05))  # the default: on

    async def frozen() -> bool:
        return gc.get_freeze_count() > 0

    await until(frozen, what="gc.freeze after the first model load")
    assert (await client.get("/readyz")).status == 200
    gc.unfreeze()
    off = await start_client(aiohttp_client, store=store,
                             settings=make_settings(poll_interval_s=0.05, gc_freeze=False))
    assert (await off.get("/readyz")).status == 200
    await asyncio.sleep(0.6)  # past the freezer's poll
    assert gc.get_freeze_count() == 0
