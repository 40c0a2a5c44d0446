"""Validated commits and quality-gated promotion: the report, the gate, the `serving` ref."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from spectral_core import analytic
from spectral_core.config import CoreConfig
from spectral_core.processes import get_process
from spectral_core.quality import assess
from spectral_core.trainer import Trainer, validation_reference
from storage.chain import VersionChain, VersionRecord
from storage.commits import BackgroundCommitter, CommitPlan
from storage.inference import InferenceClient
from storage.objectstore import MemoryStore
from storage.promotion import SERVING_REF, Decision, Promoter, PromotionPolicy, decide
from tests.core_fixtures import tiny_config

POLICY = PromotionPolicy()


def _quality(mean: float = 2.0, se: float = 0.1, **over: Any) -> dict[str, Any]:
    q: dict[str, Any] = {
        "held_out_mean_bp": mean, "held_out_se_bp": se, "finite": True, "f0_max_err": 0.0,
        "max_modulus": 1.0, "min_density_rel": -1e-4, "arbitrage_max_bp": 1.0,
    }
    q.update(over)
    return q


def _record(counter: int, quality: dict[str, Any], fingerprint: str = "f1") -> VersionRecord:
    return VersionRecord.build(
        counter=counter, parent_hash=None, blob_sha256="0" * 64, blob_size=1,
        created_at="2026-12-03T00:00:00Z", message="m", training_metrics={},
        quality_metrics=quality, config_fingerprint=fingerprint,
    )


# ---------------------------------------------------------------------------------------- decide
def test_first_valid_version_is_promoted() -> None:
    assert decide(_record(1, _quality()), None, POLICY) == Decision(
        True, "first", {"candidate": 1, "held_out_mean_bp": 2.0, "held_out_se_bp": 0.1})


@pytest.mark.parametrize(("over", "problem"), [
    ({"finite": False}, "non-finite"),
    ({"held_out_mean_bp": None}, "held-out error is not finite"),
    ({"f0_max_err": 1e-3}, "|F_0 - 1|"),
    ({"max_modulus": 1.01}, "max |F_k|"),
    ({"min_density_rel": -0.05}, "COS density"),
    ({"arbitrage_max_bp": 150.0}, "no-arbitrage"),
])
def test_invalid_versions_are_refused_naming_the_check(over: dict[str, Any], problem: str) -> None:
    d = decide(_record(2, _quality(**over)), _record(1, _quality()), POLICY)
    assert not d.promote and d.reason == "invalid"
    assert any(problem in p for p in d.detail["problems"]), d.detail


def test_a_record_without_a_report_is_refused() -> None:
    d = decide(_record(2, {"val_mean_abs_bp": 1.0}), None, POLICY)
    assert (d.promote, d.reason, d.detail["problems"]) == (False, "invalid", ["no quality report"])


def test_worse_beyond_noise_is_refused_and_within_noise_promoted() -> None:
    served = _record(1, _quality(mean=2.0, se=0.1))
    bound = 2.0 + math.hypot(0.1, 0.1)
    assert decide(_record(2, _quality(mean=1.5)), served, POLICY).reason == "better"
    within = decide(_record(2, _quality(mean=bound - 1e-9)), served, POLICY)
    assert within.promote and within.reason == "within noise"
    worse = decide(_record(2, _quality(mean=bound + 1e-9)), served, POLICY)
    assert not worse.promote and worse.reason == "worse"
    assert worse.detail["bound_bp"] == pytest.approx(bound, abs=1e-12)
    strict = PromotionPolicy(max_regression_se=0.0)
    assert not decide(_record(2, _quality(mean=2.0 + 1e-9)), served, strict).promote


def test_other_config_or_unassessed_served_is_not_compared() -> None:
    served_other = _record(1, _quality(mean=0.1), fingerprint="f0")
    assert decide(_record(2, _quality(mean=5.0)), served_other, POLICY).reason == "not comparable"
    legacy = _record(1, {"val_mean_abs_bp": 0.1})
    assert decide(_record(2, _quality(mean=5.0)), legacy, POLICY).reason == "not comparable"


def test_gate_disabled_promotes_everything() -> None:
    off = PromotionPolicy(enabled=False)
    assert decide(_record(2, _quality(finite=False)), _record(1, _quality()), off).promote


# ------------------------------------------------------------------------- the quality report
def test_report_of_the_exact_cf_is_exact_and_valid() -> None:
    """The oracle: COS on the closed-form GBM CF prices the validation puts to ~1e-12 of spot,
    has a non-negative density and no arbitrage, whatever our network does."""
    config = CoreConfig(device="cpu")
    process = get_process("gbm")
    rng = np.random.default_rng(7)
    B = 64
    domain = config.domain
    theta = np.stack([rng.uniform(domain.bounds(n).lower, domain.bounds(n).upper, B)
                      for n in domain.names], axis=1)
    th = torch.from_numpy(theta)
    a, b = process.truncation_interval(th, L=config.spectrum.truncation_L, xp=torch)
    cols = process.columns(th)
    k = torch.arange(config.spectrum.n_freq, dtype=torch.float64)
    u = k[None, :] * math.pi / (b - a)[:, None]
    F = analytic.gbm_shifted_cf(u, a, T=cols["T"], r=cols["r"], d=cols["d"], sigma=cols["sigma"])
    report = assess(F, th, config, reference=validation_reference(th, config),
                    noise_floor_bp=1.0, step=0)
    assert report.finite
    assert report.held_out_max_bp < 1e-7  # 1e-11 of spot
    assert report.f0_max_err < 1e-15 and report.max_modulus <= 1.0 + 1e-15
    assert report.min_density_rel > -1e-10
    assert report.arbitrage_max_bp < 1e-7
    assert report.held_out_se_bp >= 0 and report.held_out_contracts == B
    assert decide(_record(1, report.as_dict()), None, POLICY).promote


def test_report_of_a_nan_model_is_not_finite_and_refused() -> None:
    trainer = Trainer(tiny_config())
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(float("nan"))
    report = trainer.quality()
    assert report.finite is False
    q = report.as_dict()
    assert q["held_out_mean_bp"] is None  # strict JSON in the record
    d = decide(_record(1, q), None, POLICY)
    assert not d.promote and d.detail["problems"] == ["non-finite model output"]
    trainer.close()


def test_report_error_falls_with_training_and_quality_has_no_side_effects() -> None:
    trainer = Trainer(tiny_config())
    before = trainer.quality()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    again = trainer.quality()
    assert again == before  # pure: same weights, same report
    assert all(torch.equal(state[k], v) for k, v in trainer.model.state_dict().items())
    for _ in range(60):
        trainer.step()
    after = trainer.quality()
    assert after.step == 60
    assert after.held_out_mean_bp < before.held_out_mean_bp
    assert after.noise_floor_bp == before.noise_floor_bp > 0
    trainer.close()


# -------------------------------------------------------------------------------- the promoter
async def test_promoter_moves_serving_only_to_better_versions_and_audits_each_decision() -> None:
    chain = VersionChain(MemoryStore())
    trainer = Trainer(tiny_config())
    seen: list[tuple[int, bool]] = []
    promoter = Promoter(chain, on_decision=lambda r, d: seen.append((r.counter, d.promote)))

    async def commit(quality: dict[str, Any]) -> VersionRecord:
        return await chain.commit(trainer.snapshot(), message="m", metrics={}, quality=quality)

    r1 = await commit(_quality(mean=3.0, se=0.1))
    assert (await promoter.consider(r1)).promote
    r2 = await commit(_quality(mean=9.0, se=0.1))  # worse
    assert not (await promoter.consider(r2)).promote
    r3 = await commit(_quality(finite=False, held_out_mean_bp=None))  # diverged
    assert not (await promoter.consider(r3)).promote
    r4 = await commit(_quality(mean=2.0, se=0.1))
    assert (await promoter.consider(r4)).promote
    assert await chain.ref(SERVING_REF) == 4
    assert seen == [(1, True), (2, False), (3, False), (4, True)]
    assert (promoter.promoted, promoter.refused) == (2, 2)
    stale = await promoter.consider(r1)
    assert (stale.promote, stale.reason) == (False, "stale")

    log = [e for e in await chain.log() if e.ref == SERVING_REF]
    assert [(e.action, e.old, e.new) for e in log] == [
        ("promote", None, 1), ("promotion_refused", 1, 2), ("promotion_refused", 1, 3),
        ("promote", 1, 4)]
    assert log[0].actor == "promoter"
    assert log[1].detail["reason"] == "worse" and log[1].detail["held_out_mean_bp"] == 9.0
    assert log[2].detail["reason"] == "invalid"
    assert log[3].detail["served"] == 1 and log[3].detail["bound_bp"] > 2.0
    trainer.close()


async def test_tracking_serves_the_serving_ref_not_head() -> None:
    chain = VersionChain(MemoryStore())
    trainer = Trainer(tiny_config())
    client: InferenceClient[int] = InferenceClient(chain, loader=lambda s, r: r.counter)

    async def commit(quality: dict[str, Any]) -> VersionRecord:
        return await chain.commit(trainer.snapshot(), message="m", metrics={}, quality=quality)

    # a chain from before promotion (no reports, no serving ref) is served at HEAD, as before
    await commit({"val_mean_abs_bp": 1.0})
    await client.refresh()
    assert client.current is not None and client.current.value == 1
    # assessed versions, none promoted: keep what is served
    await commit(_quality())
    await client.refresh()
    assert client.current.value == 1
    await chain.set_ref(SERVING_REF, 2, actor="promoter", action="promote")
    await commit(_quality(mean=50.0))  # HEAD = 3, not promoted
    await client.refresh()
    assert client.current.value == 2
    fresh: InferenceClient[int] = InferenceClient(chain, loader=lambda s, r: r.counter)
    await fresh.refresh()
    assert fresh.current is not None and fresh.current.value == 2
    trainer.close()


# --------------------------------------------------------------------------- early first commit
def test_first_commit_comes_early_and_the_interval_doubles_to_every() -> None:
    now = [0.0]
    trainer = Trainer(tiny_config())
    chain = VersionChain(MemoryStore())
    committer = BackgroundCommitter(chain, CommitPlan.every_seconds(60.0, first=5.0),
                                    clock=lambda: now[0])
    committed_at = []
    try:
        for t in range(200):
            now[0] = float(t)
            if committer.maybe_commit(t, trainer.snapshot, {}, quality=lambda: {"t": now[0]}):
                committed_at.append(t)
        assert committer.wait_idle(30)
    finally:
        committer.close()
        trainer.close()
    assert committed_at == [5, 15, 35, 75, 135, 195]


def test_commit_plan_refuses_a_bad_first() -> None:
    with pytest.raises(ValueError, match="first must be > 0"):
        CommitPlan.every_seconds(60.0, first=0.0)
