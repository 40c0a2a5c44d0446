"""TensorBoard scalars (storage/tensorboard.py) and the training worker's live writer, read back
by TensorBoard's own EventAccumulator. The `store tensorboard-log` command: test_store_cli.py."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config.settings import CommitPlan, Settings, TrainingSettings
from server.metrics import Metrics
from server.worker import TB_ERROR_OVER_FLOOR, TB_PROMOTED_VERSION, TrainingWorker
from storage.chain import VersionChain
from storage.localstore import LocalStore
from storage.tensorboard import ScalarWriter
from tests.core_fixtures import tiny_config


def _read(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def test_scalar_writer_round_trip(tmp_path: Path) -> None:
    with ScalarWriter(tmp_path / "tb") as w:
        assert w.path is not None and w.path.parent == tmp_path / "tb"
        assert w.scalars(3, {"a/x": 1.5, "a/n": 2, "a/none": None, "a/flag": True}) == 2
        assert w.scalars(7, {"a/x": math.nan}, walltime=1_700_000_000.0) == 1
    assert w.closed
    assert w.scalars(9, {"a/x": 1.0}) == 0  # after close: ignored, no error
    w.close()  # idempotent
    acc = _read(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == {"a/x", "a/n"}
    (first, second) = acc.Scalars("a/x")
    assert (first.step, first.value) == (3, 1.5)
    assert second.step == 7 and math.isnan(second.value) and second.wall_time == 1_700_000_000.0
    assert [(e.step, e.value) for e in acc.Scalars("a/n")] == [(3, 2.0)]


async def test_worker_writes_live_scalars_and_closes_on_stop(tmp_path: Path) -> None:
    settings = Settings(
        training=TrainingSettings(
            device="cpu",
            max_steps=40,
            commit=CommitPlan(kind="never"),
            tensorboard_dir=tmp_path / "tb",
            tensorboard_every_steps=5,
        ),
        core=tiny_config(),  # validation every 10 steps
    )
    worker = TrainingWorker(
        settings,
        VersionChain(LocalStore(tmp_path / "store")),
        Metrics(CollectorRegistry()).for_model("bs"),
    )
    await worker.start()
    deadline = asyncio.get_running_loop().time() + 60
    while worker.state != "finished":
        assert worker.state != "error", worker.error
        assert asyncio.get_running_loop().time() < deadline, "training did not finish"
        await asyncio.sleep(0.05)
    # the hooks promotion and quality checks call (from the event loop thread)
    worker.record_promotion(1)
    worker.record_error_over_floor(1.25, step=30)
    writer = worker.tensorboard
    assert writer is not None and not writer.closed
    await worker.stop()
    assert writer.closed
    worker.record_promotion(2)  # after stop: a no-op, never an error

    acc = _read(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/samples_per_s",
        "train/steps_per_s",
        "train/grad_norm",
        "quality/val_loss",
        "quality/val_mean_abs_bp",
        "quality/val_max_abs_bp",
        TB_PROMOTED_VERSION,
        TB_ERROR_OVER_FLOOR,
    } <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(math.isfinite(e.value) and e.value > 0 for e in loss)
    assert all(e.value > 0 for e in acc.Scalars("train/samples_per_s"))
    lr = tiny_config().optim.lr  # TensorBoard stores float32
    assert all(0 < e.value <= lr * (1 + 1e-6) for e in acc.Scalars("train/lr"))
    val = acc.Scalars("quality/val_mean_abs_bp")
    assert [e.step for e in val] == [10, 20, 30, 40]
    last = worker.last_validation
    assert last is not None and val[-1].value == pytest.approx(last.mean_abs_bp, rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars(TB_PROMOTED_VERSION)] == [(40, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars(TB_ERROR_OVER_FLOOR)] == [(30, 1.25)]


async def test_worker_without_tensorboard_dir_writes_nothing(tmp_path: Path) -> None:
    settings = Settings(training=TrainingSettings(device="cpu"), core=tiny_config())
    worker = TrainingWorker(
        settings,
        VersionChain(LocalStore(tmp_path / "store")),
        Metrics(CollectorRegistry()).for_model("bs"),
    )
    worker.record_promotion(1)  # off: a no-op
    assert worker.tensorboard is None
