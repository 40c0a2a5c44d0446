"""A real, small trained model and app helpers for the pricing-API tests.

The model is trained once per test session (about two seconds): a tiny CVNN trained for 60 steps
(snapshot A) and on to 100 steps (snapshot B), so a test can commit two genuinely different
versions. Apps run on a LocalStore in the test's tmp_path with training disabled.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from config.settings import (
    ROOT_MODEL,
    JobsSettings,
    ModelSettings,
    NamedModelSettings,
    ServerSettings,
    Settings,
    TrainingSettings,
)
from server.app import create_app
from spectral_core.config import CoreConfig
from spectral_core.snapshot import Snapshot
from spectral_core.trainer import Trainer
from storage.chain import VersionChain, VersionRecord
from storage.objectstore import ObjectStore
from storage.prefixed import PrefixedStore, model_prefix
from tests.core_fixtures import tiny_config, tiny_heston_config

Client = TestClient[web.Request, web.Application]

NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
VDT = datetime(2024, 6, 28, 16, 0, tzinfo=UTC)
SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"


Trained = tuple[tuple[Snapshot, dict[str, Any]], ...]


def _train_snapshots(config: CoreConfig, chunks: tuple[int, ...]) -> Trained:
    """(snapshot, metrics) after each chunk of training steps, one trainer throughout."""
    out = []
    with Trainer(config) as trainer:
        for steps in chunks:
            last = trainer.train(steps=steps)
            assert last is not None
            out.append((trainer.snapshot(), {"step": last.step, "loss": last.loss}))
    return tuple(out)


@functools.cache
def trained_snapshots() -> Trained:
    """(snapshot, metrics) after 60 and after 100 training steps of the tiny config."""
    return _train_snapshots(tiny_config(), (60, 40))


@functools.cache
def trained_heston_snapshots() -> Trained:
    """(snapshot, metrics) of the tiny config on the Heston process after 30 and 40 steps."""
    return _train_snapshots(tiny_heston_config(), (30, 10))


def model_chain(store: ObjectStore, model: str = ROOT_MODEL) -> VersionChain:
    """The chain of named model `model` on `store` (the root for bs)."""
    return VersionChain(store if model == ROOT_MODEL else PrefixedStore(store, model_prefix(model)))


async def commit_model(store: ObjectStore, *, which: int = 0, model: str = ROOT_MODEL
                       ) -> VersionRecord:
    """Commit snapshot `which` of the tiny GBM to `model`'s chain, or of the tiny Heston model
    when `model` is "heston"."""
    snapshots = trained_heston_snapshots() if model == "heston" else trained_snapshots()
    snapshot, metrics = snapshots[which]
    return await model_chain(store, model).commit(
        snapshot, message="tiny test model, step {step} loss {loss}", metrics=metrics
    )


HESTON = NamedModelSettings(core=tiny_heston_config(), training=False)


def make_settings(
    *, jobs_file: Path | None = None, poll_interval_s: float = 5.0,
    models: dict[str, NamedModelSettings] | None = None, **server: Any
) -> Settings:
    return Settings(
        server=ServerSettings(**server),
        training=TrainingSettings(enabled=False),
        model=ModelSettings(poll_interval_s=poll_interval_s),
        jobs=JobsSettings(config_file=jobs_file),
        models=models or {},
    )


def market_body(asof: datetime, **extra: Any) -> dict[str, Any]:
    """SPX inside the model's domain; MEME with a 150% vol (outside it)."""
    return {
        "data_asof": asof.isoformat(),
        "spots": {"SPX": 100.0, "MEME": 20.0},
        "zero_curves": {
            "USD-OIS": {"tenors": [0.25, 1.0, 2.0, 5.0], "rates": [0.03, 0.035, 0.04, 0.04]}
        },
        "dividend_curves": {
            "SPX": {"tenors": [0.5, 2.0], "rates": [0.012, 0.018]},
            "MEME": {"tenors": [1.0], "rates": [0.0]},
        },
        "vol_surfaces": {
            "SPX": {
                "expiries": [0.25, 1.0, 2.0],
                "strikes": [80.0, 100.0, 120.0],
                "vols": [[0.28, 0.22, 0.19], [0.26, 0.21, 0.19], [0.25, 0.21, 0.2]],
            },
            "MEME": {"expiries": [1.0], "strikes": [20.0], "vols": [[1.5]]},
        },
        **extra,
    }


async def start_client(
    aiohttp_client: Callable[..., Any],
    *,
    store: ObjectStore,
    settings: Settings | None = None,
    clock: Callable[[], datetime] = lambda: NOW,
    wait_ready: bool = True,
    prepare: Callable[[web.Application], None] | None = None,
) -> Client:
    app = create_app(
        settings or make_settings(), store=store, clock=clock, registry=CollectorRegistry()
    )
    if prepare is not None:
        prepare(app)  # before start-up: the app is frozen once it runs
    client: Client = await aiohttp_client(app)
    if wait_ready:
        for _ in range(300):
            resp = await client.get("/readyz")
            if resp.status == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"app never became ready: {await resp.text()}")
    return client


async def put_market_data(
    client: Client, *, namespace: str = "eod", val_datetime: datetime = VDT, body: dict[str, Any]
) -> dict[str, Any]:
    vdt = val_datetime.isoformat().replace("+00:00", "Z")
    resp = await client.put(f"/v1/marketdata/{namespace}/{vdt}", json=body)
    assert resp.status == 201, await resp.text()
    out: dict[str, Any] = await resp.json()
    return out


@functools.cache
def openapi_spec() -> dict[str, Any]:
    with SPEC_PATH.open() as fh:
        loaded: dict[str, Any] = yaml.safe_load(fh)
    return loaded


def check_schema(body: Any, schema_name: str) -> None:
    """Validate a response body against a component schema of openapi.yaml."""
    spec = openapi_spec()
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(root).validate(body)


def loads(raw: bytes) -> Any:
    return json.loads(raw)


async def until(
    pred: Callable[[], Awaitable[bool]], *, what: str, timeout: float = 60.0,
    interval: float = 0.05,
) -> None:
    """Poll the async predicate every `interval` s until it holds; AssertionError naming `what`
    after `timeout` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
