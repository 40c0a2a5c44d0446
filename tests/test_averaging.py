"""Iterate averaging (EMA through torch's AveragedModel): served weights, resume, fingerprints."""

from __future__ import annotations

import hashlib

import torch

from spectral_core.config import CoreConfig, OptimConfig
from spectral_core.pricer import Pricer
from spectral_core.snapshot import Snapshot, served_weights
from spectral_core.trainer import Trainer
from storage.checkpoint import decode_checkpoint, encode_checkpoint
from tests.core_fixtures import tiny_config

DECAY = 0.9


def _ema_config(start: int = 5) -> CoreConfig:
    base = tiny_config()
    optim = base.optim.model_copy(update={"averaging": "ema", "ema_decay": DECAY,
                                          "averaging_start": start})
    return base.model_copy(update={"optim": optim})


def test_no_averaging_keeps_the_fingerprint_and_json() -> None:
    cfg = tiny_config()
    assert "averaging" not in cfg.to_json()["optim"]
    explicit = cfg.model_copy(update={"optim": OptimConfig(**{**cfg.optim.model_dump(),
                                                              "averaging": "none"})})
    assert explicit.fingerprint() == cfg.fingerprint()
    ema = _ema_config()
    assert ema.fingerprint() != cfg.fingerprint()
    assert ema.to_json()["optim"]["averaging"] == "ema"


def test_ema_is_the_exponential_average_of_the_raw_iterates() -> None:
    """Recomputed by hand from the raw weights after each step: a_1 = w_1, a_n = d a + (1-d) w."""
    start = 5
    with Trainer(_ema_config(start)) as tr:
        for _ in range(start):
            tr.step()
        assert int(tr.averaged.n_averaged) == 0 and tr.served_model is tr.model
        want: dict[str, torch.Tensor] | None = None
        for _ in range(6):
            tr.step()
            raw = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            want = raw if want is None else {
                k: DECAY * want[k] + (1 - DECAY) * raw[k] for k in raw}
        assert int(tr.averaged.n_averaged) == 6
        got = tr.averaged.module.state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
        assert tr.served_model is tr.averaged.module
        assert any(not torch.equal(got[k], tr.model.state_dict()[k]) for k in want)


def test_ema_resume_is_bit_exact_and_the_pricer_serves_the_average() -> None:
    cfg = _ema_config(start=4)
    n, m = 12, 13
    with Trainer(cfg) as straight:
        straight.train(steps=n + m)
        want = straight.snapshot().tensors
    with Trainer(cfg) as first:
        first.train(steps=n)
        blob = encode_checkpoint(first.snapshot())
    snap = decode_checkpoint(blob, expected_sha256=hashlib.sha256(blob).hexdigest())
    with Trainer.restore(snap) as resumed:
        resumed.train(steps=m)
        got = resumed.snapshot().tensors
        quality = resumed.quality()
    weights = [k for k in want if k.startswith(("model.", "ema."))]
    assert any(k.startswith("ema.module.") for k in weights)
    for k in weights:
        assert torch.equal(want[k], got[k]), k
    # the pricer loads the averaged weights; the report assessed them
    final = Snapshot(tensors=got, meta=snap.meta)
    served = served_weights(final)
    assert all(torch.equal(served[k], got[f"ema.module.{k}"]) for k in served)
    pricer = Pricer.from_snapshot(final)
    for k, v in pricer.model.state_dict().items():
        assert torch.equal(v.to(torch.complex64), got[f"ema.module.{k}"]), k
    assert quality.finite

