"""Trainer: a short run learns, snapshots resume bit-exactly (also in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectral_core.config import CoreConfig, OptimConfig, TrainConfig
from spectral_core.memory import MemoryCapError
from spectral_core.schedule import PlateauState, lr_at
from spectral_core.trainer import Trainer
from storage.checkpoint import decode_checkpoint, encode_checkpoint
from tests.core_fixtures import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_short_run_validation_error_falls() -> None:
    with Trainer(tiny_config()) as tr:
        before = tr.validate()
        tr.train(steps=150)
        after = tr.validate()
    assert after.val_loss < 0.2 * before.val_loss
    assert after.mean_abs_bp < before.mean_abs_bp


def test_step_metrics_are_reported() -> None:
    with Trainer(tiny_config()) as tr:
        m = tr.step()
    assert m.step == 1
    assert m.loss > 0 and m.grad_norm > 0 and m.lr > 0
    assert m.samples_per_s > 0 and m.steps_per_s > 0
    assert 0.0 <= m.truncated_mass < 1e-6  # L = 10 standard deviations


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine", "plateau"])
def test_resume_is_bit_exact(optimizer: str, schedule: str) -> None:
    base = tiny_config()
    optim = OptimConfig(optimizer=optimizer, schedule=schedule, lr=1e-3, warmup_steps=3)
    cfg = base.model_copy(update={"optim": optim})
    n, m = 12, 13  # crosses a validation (every 10) so plateau state is exercised
    with Trainer(cfg) as straight:
        straight.train(steps=n + m)
        want = _params(straight)
    with Trainer(cfg) as first:
        first.train(steps=n)
        blob = encode_checkpoint(first.snapshot())
    import hashlib

    snap = decode_checkpoint(blob, expected_sha256=hashlib.sha256(blob).hexdigest())
    with Trainer.restore(snap) as resumed:
        assert snap.meta["validation"] is not None  # n crosses a validation
        assert resumed.snapshot().meta == snap.meta  # the metadata round-trips too
        resumed.train(steps=m)
        got = _params(resumed)
        assert resumed.global_step == n + m
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


_RESUME_SCRIPT = """
import hashlib, json, sys
import torch
from spectral_core.trainer import Trainer
from storage.checkpoint import decode_checkpoint
blob = open(sys.argv[1], "rb").read()
snap = decode_checkpoint(blob, expected_sha256=hashlib.sha256(blob).hexdigest())
with Trainer.restore(snap) as tr:
    tr.train(steps=int(sys.argv[2]))
    torch.save({k: v for k, v in tr.model.state_dict().items()}, sys.argv[3])
"""


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path: Path) -> None:
    cfg = tiny_config()
    n, m = 7, 9
    with Trainer(cfg) as straight:
        straight.train(steps=n + m)
        want = _params(straight)
    with Trainer(cfg) as first:
        first.train(steps=n)
        (tmp_path / "ckpt").write_bytes(encode_checkpoint(first.snapshot()))
    out = tmp_path / "params.pt"
    subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, str(tmp_path / "ckpt"), str(m), str(out)],
        check=True,
        cwd=REPO,
    )
    got = torch.load(out, weights_only=True)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_restore_refuses_a_tampered_config() -> None:
    with Trainer(tiny_config()) as tr:
        snap = tr.snapshot()
    meta = json.loads(json.dumps(snap.meta))
    meta["config"]["arch"]["width"] = 17
    with pytest.raises(ValueError, match="fingerprint"):
        Trainer.restore(type(snap)(tensors=snap.tensors, meta=meta))


def test_early_stopping_stops() -> None:
    cfg = tiny_config(early_stopping_patience=1)
    cfg = cfg.model_copy(update={"optim": OptimConfig(lr=1e-9, schedule="constant")})
    with Trainer(cfg) as tr:
        tr.train(steps=1000)
        # with a frozen learning rate the loss cannot improve after the first evaluations
        assert tr.should_stop
        assert tr.global_step < 1000


def test_normals_cap_is_refused_at_construction() -> None:
    cfg = tiny_config()
    cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"normals_bytes": 1024})})
    with pytest.raises(MemoryCapError, match="normals_bytes"):
        Trainer(cfg)


def test_train_needs_a_budget() -> None:
    with Trainer(tiny_config()) as tr, pytest.raises(ValueError, match="budget"):
        tr.train()


def test_schedules_are_pure_functions_of_step() -> None:
    cfg = OptimConfig(lr=1e-2, warmup_steps=10, total_steps=110, min_lr=1e-4, restart_cycles=0)
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 9) == pytest.approx(1e-2)
    assert lr_at(cfg, 60) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert lr_at(cfg, 110) == pytest.approx(1e-4)
    assert lr_at(cfg, 10_000) == pytest.approx(1e-4)
    const = OptimConfig(lr=5e-3, schedule="constant")
    assert lr_at(const, 12345) == 5e-3
    with pytest.raises(ValueError):
        lr_at(cfg, -1)


def test_warm_restarts_follow_decaying_longer_cycles() -> None:
    cfg = OptimConfig(
        lr=1e-2, warmup_steps=10, total_steps=110, min_lr=1e-6, restart_decay=0.1,
        restart_growth=2.0, restart_cycles=5,
    )  # fmt: skip
    assert lr_at(cfg, 109) < 1e-5  # the end of the first anneal
    # cycle 1: steps 110..329 (220 steps) from 1e-3; cycle 2: 330..769 (440 steps) from 1e-4
    assert lr_at(cfg, 110) == pytest.approx(1e-3)
    assert lr_at(cfg, 110 + 110) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(cfg, 330) == pytest.approx(1e-4)
    assert lr_at(cfg, 330 + 220) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    # cycle 4 would peak at 1e-6 = min_lr: flat from there on
    assert lr_at(cfg, 10**7) == 1e-6
    assert max(lr_at(cfg, s) for s in range(110, 3000)) <= 1e-3
    once = cfg.model_copy(update={"restart_cycles": 1})
    assert lr_at(once, 110) == pytest.approx(1e-3)
    assert lr_at(once, 330) == lr_at(once, 10**6) == 1e-6  # one restart, then flat


def test_plateau_decays_after_patience() -> None:
    cfg = OptimConfig(schedule="plateau", plateau_patience=2, plateau_factor=0.5)
    st = PlateauState()
    for loss in (1.0, 0.5, 0.6, 0.7):
        st.observe(cfg, loss)
    assert st.scale == 0.5
    assert PlateauState.from_json(st.to_json()) == st


def test_bad_training_config_is_refused() -> None:
    with pytest.raises(ValueError):
        TrainConfig(batch_contracts=0)
    with pytest.raises(ValueError, match="power of two"):
        CoreConfig.model_validate({"sim": {"paths_per_contract": 1000}})


def test_divergence_guard_rolls_back_to_the_best_validation() -> None:
    with Trainer(tiny_config()) as tr:
        tr.train(steps=30)  # three validations: a best state exists
        best_params = {k: v.clone() for k, v in tr._best[0].items() if k.startswith("model.")}
        tr.guard_scale = 1e12  # an absurd learning rate: the next steps blow the model up
        tr.train(steps=10)
        assert tr.divergences == 1
        assert tr.guard_scale == 0.5e12
        now = {f"model.{k}": v for k, v in tr.model.state_dict().items()}
        for k, v in best_params.items():
            assert torch.equal(now[k], v), k
        snap = tr.snapshot()
    with Trainer.restore(snap) as again:
        assert again.divergences == 1 and again.guard_scale == 0.5e12
        assert again._best is not None
