"""The CUDA training and pricing path: MC, binning and FFT on the device, DLPack into torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_core.pricer import Contracts, Pricer
from spectral_core.trainer import Trainer
from tests.core_fixtures import tiny_config


def cuda_config():  # type: ignore[no-untyped-def]
    return tiny_config().model_copy(update={"device": "cuda"})


def test_cuda_training_learns_and_stays_on_the_device() -> None:
    with Trainer(cuda_config()) as tr:
        assert next(tr.model.parameters()).is_cuda
        theta = tr.sampler.sample(tr.config.train.batch_contracts)
        z = tr._stream.next()
        F, _ = tr._spectrum_targets(theta, z)
        assert F.is_cuda and F.dtype == torch.complex128  # DLPack view of the cupy FFT output
        before = tr.validate()
        tr.train(steps=150)
        after = tr.validate()
    assert after.val_loss < 0.2 * before.val_loss


def test_cuda_targets_match_cpu_targets() -> None:
    """Same contracts and normals: the device pipeline equals the CPU pipeline to rounding."""
    cfg = tiny_config()
    with Trainer(cfg) as cpu, Trainer(cuda_config()) as gpu:
        theta = cpu.sampler.sample(cfg.train.batch_contracts)
        z = cpu._stream.next()
        import cupy

        F_cpu, _ = cpu._spectrum_targets(theta, z)
        F_gpu, _ = gpu._spectrum_targets(theta, cupy.asarray(z))
    # bin sums on the GPU use atomics (order varies): agreement to float64 rounding, not bits
    assert torch.max(torch.abs(F_gpu.cpu() - F_cpu)) < 1e-10


def test_cuda_snapshot_restores_and_continues() -> None:
    cfg = cuda_config()
    with Trainer(cfg) as tr:
        tr.train(steps=10)
        snap = tr.snapshot()
        tr.train(steps=5)
        want = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
    with Trainer.restore(snap) as resumed:
        resumed.train(steps=5)
        got = {k: v.detach().cpu() for k, v in resumed.model.state_dict().items()}
    for k in want:  # atomics in the binning make GPU training reproducible to rounding only
        assert torch.allclose(want[k], got[k], rtol=1e-4, atol=1e-6), k


def test_cuda_pricer_matches_cpu_pricer() -> None:
    with Trainer(tiny_config()) as tr:
        tr.train(steps=20)
        snap = tr.snapshot()
    rng = np.random.default_rng(1)
    n = 64
    T = rng.uniform(0.1, 4.0, n)
    c = Contracts(
        X0=np.full(n, 100.0),
        K=rng.uniform(80, 120, n),
        T=T,
        r=np.full(n, 0.03),
        d=np.full(n, 0.01),
        v=rng.uniform(0.1, 0.8, n),
    )
    cpu = Pricer.from_snapshot(snap, device="cpu", reproducible=True).price(c, greeks=True)
    gpu = Pricer.from_snapshot(snap, device="cuda", reproducible=True).price(c, greeks=True)
    for key in ("put", "call", "put_delta", "call_vega"):
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-9, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("device", ["cuda"])
def test_accuracy_bench_runs_on_cuda(device: str) -> None:
    from bench.accuracy import main

    main(["--seconds", "5", "--device", device, "--contracts", "200"])
