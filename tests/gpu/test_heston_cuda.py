"""The Heston CUDA kernels against the CPU kernels on the same normals; device-only hand-off."""

from __future__ import annotations

import numpy as np
import pytest

from spectral_core.processes.qe import (
    CF_CHUNK,
    conditional_cf_label,
    conditional_cf_label_cuda,
    sample_log_returns,
    sample_log_returns_cuda,
    simulate_heston_conditional,
    simulate_heston_conditional_cuda,
)

CAP = 1 << 30
LOWER = np.array([0.05, -0.02, 0.0, 0.005, 0.2, 0.005, 0.1, -0.95])
UPPER = np.array([3.0, 0.10, 0.08, 0.5, 5.0, 0.5, 1.0, 0.2])


def _inputs(n: int = 16, m: int = 1000, steps: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    theta = LOWER + (UPPER - LOWER) * rng.uniform(size=(n, 8))
    theta[0, 3:7] = (0.001, 0.2, 0.01, 1.0)  # Feller violated: the exponential branch runs
    theta[1, 7] = -1.0
    theta[2, 3] = theta[2, 5] = 0.0
    return theta, rng.standard_normal((n, m, steps))


def _interval(ms2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, s = ms2[..., 0].mean(axis=1), np.sqrt(ms2[..., 1].mean(axis=1) + 1e-4)
    return mean - 12 * s, mean + 12 * s


@pytest.mark.parametrize("correct", [True, False])
def test_cuda_paths_match_the_cpu_kernel(correct: bool) -> None:
    from numba import cuda

    theta, z = _inputs()
    cpu = simulate_heston_conditional(theta, z, martingale_correction=correct, cap_bytes=CAP)
    dev = simulate_heston_conditional_cuda(cuda.to_device(theta), cuda.to_device(z),
                                           martingale_correction=correct, cap_bytes=CAP)
    np.testing.assert_allclose(dev.copy_to_host(), cpu, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_freq", [1, CF_CHUNK, 100, 256])
def test_cuda_label_matches_the_cpu_kernel(n_freq: int) -> None:
    from numba import cuda

    theta, z = _inputs()
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    a, b = _interval(ms2)
    cpu = conditional_cf_label(ms2, a, b, n_freq=n_freq, cap_bytes=CAP)
    dev = conditional_cf_label_cuda(cuda.to_device(ms2), cuda.to_device(a), cuda.to_device(b),
                                    n_freq=n_freq, cap_bytes=CAP)
    host = dev.copy_to_host()
    assert host.dtype == np.complex128 and (host[:, 0] == 1.0).all()
    np.testing.assert_allclose(host, cpu, rtol=0, atol=1e-12)


def test_cupy_pipeline_stays_on_the_device_and_fills_out() -> None:
    import cupy as cp

    theta, z = _inputs()
    ms2_host = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    a, b = _interval(ms2_host)
    ms2 = cp.full(ms2_host.shape, cp.nan)
    assert simulate_heston_conditional_cuda(cp.asarray(theta), cp.asarray(z), cap_bytes=CAP,
                                            out=ms2) is ms2
    label = cp.zeros((theta.shape[0], 64), dtype=cp.complex128)
    assert conditional_cf_label_cuda(ms2, cp.asarray(a), cp.asarray(b), n_freq=64,
                                     cap_bytes=CAP, out=label) is label
    np.testing.assert_allclose(cp.asnumpy(label),
                               conditional_cf_label(ms2_host, a, b, n_freq=64, cap_bytes=CAP),
                               rtol=0, atol=1e-12)
    z_extra = np.random.default_rng(3).standard_normal(ms2_host.shape[:2])
    x = sample_log_returns_cuda(ms2, cp.asarray(z_extra), cap_bytes=CAP)
    np.testing.assert_allclose(cp.asnumpy(cp.asarray(x)),
                               sample_log_returns(ms2_host, z_extra, cap_bytes=CAP),
                               rtol=0, atol=1e-12)


def test_cuda_wrappers_refuse_host_arrays_and_name_bad_values() -> None:
    from numba import cuda

    theta, z = _inputs(n=2, m=8, steps=2)
    with pytest.raises(ValueError, match="normals must be a CUDA device array"):
        simulate_heston_conditional_cuda(cuda.to_device(theta), z, cap_bytes=CAP)
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    with pytest.raises(ValueError, match="a must be a CUDA device array"):
        conditional_cf_label_cuda(cuda.to_device(ms2), np.zeros(2), np.ones(2), n_freq=4,
                                  cap_bytes=CAP)
    with pytest.raises(ValueError, match="z_extra must be a CUDA device array"):
        sample_log_returns_cuda(cuda.to_device(ms2), np.zeros((2, 8)), cap_bytes=CAP)
    bad = theta.copy()
    bad[1, 7] = 1.5
    with pytest.raises(ValueError, match=r"theta\[1, 7\] \(rho\) must be in \[-1, 1\]"):
        simulate_heston_conditional_cuda(cuda.to_device(bad), cuda.to_device(z), cap_bytes=CAP)
    with pytest.raises(ValueError, match="b must be > a"):
        conditional_cf_label_cuda(cuda.to_device(ms2), cuda.to_device(np.ones(2)),
                                  cuda.to_device(np.ones(2)), n_freq=4, cap_bytes=CAP)


def test_jump_cf_and_cumulants_under_cupy_match_numpy() -> None:
    import cupy

    from spectral_core import analytic_heston as ah

    rng = np.random.default_rng(8)
    box = ah.BATES_DOMAIN
    p = {k: rng.uniform(lo, hi, 32) for k, (lo, hi) in box.items()}
    u = np.linspace(0.0, 400.0, 17)[None, :]
    jp = {k: p[k][:, None] for k in ("T", "lam", "mu_j", "sigma_j")}
    got = ah.jump_cf(cupy.asarray(u), **{k: cupy.asarray(v) for k, v in jp.items()}, xp=cupy)
    np.testing.assert_allclose(cupy.asnumpy(got), ah.jump_cf(u, **jp, xp=np), atol=1e-15)
    c_gpu = ah.bates_cumulants(**{k: cupy.asarray(v) for k, v in p.items()}, xp=cupy)
    for g, c in zip(c_gpu, ah.bates_cumulants(**p, xp=np), strict=True):
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-13)


@pytest.mark.parametrize("process", ["heston", "bates"])
def test_training_labels_on_cuda_equal_the_cpu_labels(process: str) -> None:
    import cupy

    from spectral_core.config import CoreConfig, SimConfig
    from spectral_core.processes import get_process

    cfg = CoreConfig(process=process, sim=SimConfig(paths_per_contract=64, timesteps=8))
    proc = get_process(process)
    rng = np.random.default_rng(4)
    dom = cfg.domain
    theta = rng.uniform(dom.lower(), dom.upper(), (32, len(proc.names)))
    z = rng.standard_normal((32, 64, 8))
    cpu, _ = proc.mc_labels(theta, z, cfg, xp=np, on_cuda=False)
    dev, _ = proc.mc_labels(cupy.asarray(theta), cupy.asarray(z), cfg, xp=cupy, on_cuda=True)
    np.testing.assert_allclose(cupy.asnumpy(dev), cpu, atol=1e-12)
