"""The process library seen from the trainer and the pricer: configs, features, training,
resume, checkpoints and domain refusals for heston and bates; GBM configs keep their JSON."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from spectral_core.config import CoreConfig, GbmDomain, HestonDomain, SimConfig
from spectral_core.memory import MemoryCapError
from spectral_core.pricer import Contracts, DomainError, Pricer
from spectral_core.processes import get_process
from spectral_core.processes.base import ProcessMismatch
from spectral_core.trainer import Trainer
from storage.checkpoint import decode_checkpoint, encode_checkpoint
from tests.core_fixtures import tiny_config

# A GBM config as every release before the process library wrote it into checkpoints.
LEGACY_GBM_SIM = {"moment_matching": False, "normals": "qmc", "paths_per_contract": 256,
                  "scheme": "log_euler", "seed": 0, "timesteps": 1}


def tiny_process_config(process: str, **sim: object) -> CoreConfig:
    base = tiny_config()
    return CoreConfig(process=process, sim=SimConfig(paths_per_contract=256, timesteps=8, **sim),
                      spectrum=base.spectrum, arch=base.arch, optim=base.optim, train=base.train)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ----------------------------------------------------------------------------- configs


def test_a_legacy_gbm_config_reads_back_with_the_same_json_and_fingerprint() -> None:
    new = CoreConfig()
    legacy = json.loads(new.canonical_json())
    assert "process" not in legacy and legacy["sim"] == LEGACY_GBM_SIM
    again = CoreConfig.model_validate(legacy)
    assert again == new and again.process == "gbm"
    body = {k: v for k, v in legacy.items() if k != "device"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert again.fingerprint() == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("process", ["heston", "bates"])
def test_process_configs_round_trip_and_name_their_process(process: str) -> None:
    cfg = CoreConfig(process=process)
    assert cfg.sim.scheme == "qe" and cfg.sim.timesteps > 1
    body = json.loads(cfg.canonical_json())
    assert body["process"] == process
    assert CoreConfig.model_validate(body) == cfg
    assert cfg.fingerprint() != CoreConfig().fingerprint()
    assert tuple(body["domain"]) == tuple(sorted(get_process(process).names))


def test_a_domain_of_another_process_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs"):
        CoreConfig(process="heston", domain=GbmDomain())
    with pytest.raises(ValidationError, match="kappa"):
        CoreConfig(process="gbm", domain={"T": {"lower": 0.1, "upper": 1.0}, "kappa": {}})


def test_schemes_belong_to_their_process() -> None:
    with pytest.raises(ValidationError, match="qe"):
        CoreConfig(sim=SimConfig(scheme="qe"))
    with pytest.raises(ValidationError, match="must be 'qe'"):
        CoreConfig(process="heston", sim=SimConfig(scheme="euler"))
    with pytest.raises(ValidationError, match="heston and bates only"):
        CoreConfig(sim=SimConfig(label="binned"))


def test_domain_bounds_are_checked_per_parameter() -> None:
    with pytest.raises(ValidationError, match=r"rho.lower must be > -1.0"):
        HestonDomain(rho={"lower": -1.0, "upper": 0.0})
    with pytest.raises(ValidationError, match=r"xi.lower must be > 0.0"):
        HestonDomain(xi={"lower": 0.0, "upper": 1.0})


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("process", ["heston", "bates"])
def test_features_span_the_unit_box_and_are_finite(process: str) -> None:
    proc = get_process(process)
    dom = CoreConfig(process=process).domain
    rng = np.random.default_rng(3)
    theta = rng.uniform(dom.lower(), dom.upper(), (500, len(proc.names)))
    f = proc.features(torch.from_numpy(theta), dom)
    assert f.shape == (500, proc.n_features)
    assert bool(torch.isfinite(f).all())
    assert float(f.abs().max()) <= 1.0 + 1e-9


def test_gbm_features_are_the_historical_ones() -> None:
    from spectral_core.cvnn import theta_features

    dom = GbmDomain()
    theta = torch.tensor([[1.0, 0.01, 0.02, 0.2], [0.02, -0.02, 0.08, 1.0]], dtype=torch.float64)
    assert torch.equal(get_process("gbm").features(theta, dom), theta_features(theta, dom))


# ----------------------------------------------------------------------------- training


def test_a_short_heston_run_lowers_the_validation_error() -> None:
    with Trainer(tiny_process_config("heston")) as tr:
        before = tr.validate()
        tr.train(steps=120)
        after = tr.validate()
    assert after.val_loss < 0.3 * before.val_loss
    assert after.mean_abs_bp < before.mean_abs_bp


@pytest.mark.parametrize("process", ["heston", "bates"])
def test_resume_is_bit_exact(process: str) -> None:
    cfg = tiny_process_config(process)
    n, m = 12, 9  # crosses a validation (every 10)
    with Trainer(cfg) as straight:
        straight.train(steps=n + m)
        want = _params(straight)
        want_meta = straight.snapshot().meta
    with Trainer(cfg) as first:
        first.train(steps=n)
        blob = encode_checkpoint(first.snapshot())
    snap = decode_checkpoint(blob, expected_sha256=hashlib.sha256(blob).hexdigest())
    with Trainer.restore(snap, process=process) as resumed:
        resumed.train(steps=m)
        got = _params(resumed)
        got_meta = resumed.snapshot().meta
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert got_meta == want_meta


def test_the_binned_label_trains_too() -> None:
    cfg = tiny_process_config("heston", label="binned")
    with Trainer(cfg) as tr:
        before = tr.validate()
        tr.train(steps=60)
        assert tr.validate().val_loss < before.val_loss


def test_the_normals_cap_covers_the_variance_paths() -> None:
    cfg = tiny_process_config("heston")
    cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"normals_bytes": 1000})})
    with pytest.raises(MemoryCapError, match=r"memory\.normals_bytes"):
        Trainer(cfg)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def heston_snapshot():  # type: ignore[no-untyped-def]
    with Trainer(tiny_process_config("heston")) as tr:
        tr.train(steps=30)
        return tr.snapshot()


def test_a_checkpoint_of_one_process_is_refused_as_another(heston_snapshot) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProcessMismatch, match="'heston' model cannot be used as 'gbm'"):
        Pricer.from_snapshot(heston_snapshot, process="gbm")
    with pytest.raises(ProcessMismatch, match="'heston' model cannot be used as 'bates'"):
        Trainer.restore(heston_snapshot, process="bates")
    assert Pricer.from_snapshot(heston_snapshot, process="heston").process.name == "heston"


def _heston_contracts(n: int = 4, **override: float) -> dict[str, np.ndarray]:
    cols = {"X0": 100.0, "K": 95.0, "T": 1.0, "r": 0.02, "d": 0.01, "v0": 0.04, "kappa": 1.5,
            "theta_v": 0.05, "xi": 0.5, "rho": -0.6}
    cols.update(override)
    return {k: np.full(n, v) for k, v in cols.items()}


@pytest.mark.parametrize(("field", "value", "bounds"), [
    ("v0", 0.9, r"\[0.005, 0.5\]"), ("rho", 0.5, r"\[-0.95, 0.2\]"), ("T", 4.0, r"\[0.05, 3.0\]"),
])
def test_domain_refusals_name_the_field_and_bounds(heston_snapshot, field: str, value: float,  # type: ignore[no-untyped-def]
                                                   bounds: str) -> None:
    pricer = Pricer.from_snapshot(heston_snapshot)
    cols = _heston_contracts()
    cols[field][2] = value
    with pytest.raises(DomainError, match=rf"contracts\[2\]\.{field} = {value} .*{bounds}"):
        pricer.price(Contracts(**cols))


def test_a_gbm_batch_given_to_a_heston_model_names_the_missing_field(heston_snapshot) -> None:  # type: ignore[no-untyped-def]
    pricer = Pricer.from_snapshot(heston_snapshot)
    cols = {k: np.full(2, 0.2) for k in ("T", "r", "d", "v")}
    with pytest.raises(ValueError, match="missing contract field 'v0'"):
        pricer.price(Contracts(X0=[100.0] * 2, K=[100.0] * 2, **cols))


def test_heston_greeks_are_the_derivatives_of_the_price(heston_snapshot) -> None:  # type: ignore[no-untyped-def]
    pricer = Pricer.from_snapshot(heston_snapshot, reproducible=True)
    cols = _heston_contracts(1)
    res = pricer.price(Contracts(**cols), greeks=True)
    assert set(pricer.greek_names) == {"delta", "gamma", "d_v0", "d_kappa", "d_theta_v", "d_xi",
                                       "d_rho", "theta", "rho"}
    for greek, field, sign in (("d_v0", "v0", 1), ("d_xi", "xi", 1), ("d_rho", "rho", 1),
                               ("d_kappa", "kappa", 1), ("rho", "r", 1), ("theta", "T", -1),
                               ("delta", "X0", 1)):
        h = 1e-5 * max(1.0, abs(float(cols[field][0])))
        up, down = dict(cols), dict(cols)
        up[field] = cols[field] + h
        down[field] = cols[field] - h
        price = {k: pricer.price(Contracts(**c))["put"] for k, c in (("up", up), ("down", down))}
        fd = (price["up"] - price["down"]) / (2 * h)
        np.testing.assert_allclose(res[f"put_{greek}"], sign * fd, rtol=1e-5, atol=1e-7,
                                   err_msg=greek)
    assert res["put_gamma"][0] > 0
