"""One named model served in-process, for the benchmarks that go through the app over loopback
HTTP (bench.inference --book, bench.calibration's service path)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from config.settings import (
    ModelSettings,
    NamedModelSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    TrainingSettings,
)
from server.app import create_app
from spectral_core.config import CoreConfig
from spectral_core.snapshot import Snapshot
from storage.chain import VersionChain
from storage.localstore import LocalStore
from storage.prefixed import model_store
from storage.promotion import SERVING_REF


@contextlib.asynccontextmanager
async def serve_snapshot(
    store_dir: Path, snapshot: Snapshot, *, model: str, server: ServerSettings,
    quality: Mapping[str, Any] | None = None, message: str = "bench",
) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    """`snapshot` committed as version 1 of named model `model` on a fresh local store at
    `store_dir` and promoted (the `serving` ref), then the app (training off, `server`
    settings) on 127.0.0.1 and a client session, once that model serves."""
    config = CoreConfig.model_validate(snapshot.meta["config"])
    chain = VersionChain(model_store(LocalStore(store_dir), model))
    record = await chain.commit(snapshot, message=message, quality=quality)
    await chain.set_ref(SERVING_REF, record.counter, actor="bench", action="promote")
    settings = Settings(
        server=server,
        store=StoreSettings(url=f"file://{store_dir}"),
        training=TrainingSettings(enabled=False),
        model=ModelSettings(poll_interval_s=1.0),
        models={model: NamedModelSettings(core=config, training=False)},
    )
    app_server = TestServer(create_app(settings), host="127.0.0.1")
    await app_server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            while True:  # the model loads (numba warm-up) in the background
                async with session.get(app_server.make_url(f"/v1/models/{model}")) as resp:
                    if (await resp.json())["live"] is not None:
                        break
                await asyncio.sleep(0.5)
            yield app_server, session
    finally:
        await app_server.close()
