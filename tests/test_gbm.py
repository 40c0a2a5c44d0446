"""GBM log-return kernels: compiled CPU kernel vs plain Python and numpy, statistics, edge cases."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from spectral_core.memory import MemoryCapError
from spectral_core.processes.gbm import (
    EULER_MIN_GROWTH,
    SCHEME_CODES,
    gbm_coefficients,
    gbm_step,
    moment_matching_shift,
    simulate_log_returns,
    simulate_log_returns_cuda,
    simulate_log_returns_numpy,
)

CAP = 1 << 30
ROOT = Path(__file__).resolve().parents[1]


def _theta(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0.02, 5.0, n), rng.uniform(-0.02, 0.10, n),
                            rng.uniform(0.0, 0.08, n), rng.uniform(0.05, 1.0, n)])  # (n, 4)


def _normals(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _plain_python(theta: np.ndarray, z: np.ndarray, scheme: str, mm: bool) -> np.ndarray:
    code = SCHEME_CODES[scheme]
    n_contracts, n_paths, n_steps = z.shape
    out = np.empty((n_contracts, n_paths))
    for b in range(n_contracts):
        T, r, d, sigma = (float(v) for v in theta[b])
        drift, vol = gbm_coefficients(T / n_steps, r, d, sigma, code)
        for m in range(n_paths):
            x = 0.0
            for t in range(n_steps):
                x = gbm_step(x, drift, vol, float(z[b, m, t]), code)
            out[b, m] = x
        if mm:
            out[b] += moment_matching_shift(out[b], r, d, T)
    return out


def _run(theta: np.ndarray, z: np.ndarray, scheme: str = "log_euler",
         mm: bool = False) -> np.ndarray:
    return simulate_log_returns(theta, z, scheme=scheme, moment_matching=mm,  # type: ignore[arg-type]
                                cap_bytes=CAP)


# --------------------------------------------------------------------------- kernel vs references

@pytest.mark.parametrize("scheme", ["log_euler", "euler"])
@pytest.mark.parametrize("mm", [False, True])
def test_compiled_kernel_matches_plain_python_and_numpy(scheme: str, mm: bool) -> None:
    theta, z = _theta(5), _normals((5, 33, 7))
    theta[0, 3] = 2.5  # large vol: the Euler floor is exercised too
    kernel = _run(theta, z, scheme, mm)
    np.testing.assert_allclose(kernel, _plain_python(theta, z, scheme, mm), rtol=0, atol=1e-12)
    reference = simulate_log_returns_numpy(theta, z, scheme=scheme,  # type: ignore[arg-type]
                                           moment_matching=mm)
    np.testing.assert_allclose(kernel, reference, rtol=0, atol=1e-12)


def test_out_is_filled_and_returned() -> None:
    theta, z = _theta(2), _normals((2, 8, 3))
    out = np.full((2, 8), np.nan)
    result = simulate_log_returns(theta, z, scheme="euler", moment_matching=False, cap_bytes=CAP,
                                  out=out)
    assert result is out and np.isfinite(out).all()


# --------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("steps", [1, 8])
def test_log_euler_mean_and_variance_match_closed_form(steps: int) -> None:
    theta = np.array([[1.5, 0.05, 0.02, 0.4], [0.1, -0.01, 0.03, 0.9], [5.0, 0.1, 0.0, 0.05]])
    x = _run(theta, _normals((3, 40_000, steps), seed=steps))
    T, r, d, sigma = theta.T
    mean, var = (r - d - 0.5 * sigma**2) * T, sigma**2 * T
    n = x.shape[1]
    assert np.all(np.abs(x.mean(axis=1) - mean) < 4 * np.sqrt(var / n))
    assert np.all(np.abs(x.var(axis=1) - var) < 4 * var * np.sqrt(2 / n))


def test_euler_converges_as_timesteps_grow() -> None:
    # Coarse Euler paths driven by the same Brownian motion as a 64-step log-Euler (exact) path.
    theta = np.array([[1.0, 0.05, 0.01, 0.3]])
    fine_steps, n_paths = 64, 20_000
    z = _normals((1, n_paths, fine_steps), seed=7)
    exact = _run(theta, z, "log_euler")[0]
    rms = []
    for steps in (1, 4, 16, 64):
        group = fine_steps // steps
        coarse = z.reshape(1, n_paths, steps, group).sum(axis=3) / math.sqrt(group)
        euler = _run(theta, np.ascontiguousarray(coarse), "euler")[0]
        rms.append(float(np.sqrt(np.mean((euler - exact) ** 2))))
    # strong order 1/2: each 4x refinement roughly halves the pathwise error
    for coarse_err, fine_err in itertools.pairwise(rms):
        assert fine_err < 0.6 * coarse_err
    assert rms[-1] < 0.02


def test_euler_single_step_matches_its_exact_expectation() -> None:
    # E[x] of one floored Euler step by quadrature differs from the exact drift: Euler's bias.
    T, r, d, sigma = 1.0, 0.05, 0.01, 0.35
    a, b = (r - d) * T, sigma * math.sqrt(T)
    z_floor = (EULER_MIN_GROWTH - 1.0 - a) / b  # below it the growth factor is floored
    body, _ = integrate.quad(lambda z: math.log1p(a + b * z) * stats.norm.pdf(z), z_floor, np.inf,
                             epsabs=1e-13, epsrel=1e-12)
    expected = body + math.log(EULER_MIN_GROWTH) * stats.norm.cdf(z_floor)
    x = _run(np.array([[T, r, d, sigma]]), _normals((1, 200_000, 1), seed=3), "euler")[0]
    se = x.std() / np.sqrt(x.size)
    assert abs(x.mean() - expected) < 4 * se
    assert abs(expected - (r - d - 0.5 * sigma**2) * T) > 10 * se  # the bias is really resolved


@pytest.mark.parametrize("scheme", ["log_euler", "euler"])
def test_moment_matching_makes_the_sample_forward_exact(scheme: str) -> None:
    theta = _theta(6, seed=4)
    x = _run(theta, _normals((6, 1000, 4)), scheme, mm=True)
    forward = np.exp((theta[:, 1] - theta[:, 2]) * theta[:, 0])
    np.testing.assert_allclose(np.exp(x).mean(axis=1), forward, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- edge cases

def test_zero_vol_gives_the_deterministic_drift_exactly() -> None:
    theta = np.array([[2.0, 0.07, 0.02, 0.0], [0.5, -0.02, 0.05, 0.0]])
    one_step = _run(theta, _normals((2, 16, 1)))
    np.testing.assert_array_equal(one_step, np.broadcast_to(
        ((theta[:, 1] - theta[:, 2]) * theta[:, 0])[:, None], (2, 16)))
    many = _run(theta, _normals((2, 16, 64)))
    np.testing.assert_allclose(many, one_step, rtol=0, atol=1e-14)


def test_tiny_maturity() -> None:
    theta = np.array([[1e-10, 0.05, 0.01, 0.5]])
    z = _normals((1, 64, 1))
    x = _run(theta, z, "log_euler")
    expected = (0.05 - 0.01 - 0.125) * 1e-10 + 0.5 * math.sqrt(1e-10) * z[:, :, 0]
    np.testing.assert_allclose(x, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(_run(theta, z, "euler"), x, rtol=0, atol=1e-9)


def test_euler_floor_keeps_paths_finite_and_is_deterministic() -> None:
    theta = np.array([[5.0, 0.0, 0.0, 1.0]])  # sigma sqrt(dt) = 2.24: growth <= 0 when z < -0.45
    z = _normals((1, 4096, 1))
    x = _run(theta, z, "euler")
    floored = z[0, :, 0] * math.sqrt(5.0) <= EULER_MIN_GROWTH - 1.0
    assert 0.2 < floored.mean() < 0.5
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(x[0, floored], math.log1p(EULER_MIN_GROWTH - 1.0))
    np.testing.assert_array_equal(_run(theta, z, "euler"), x)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("change", "match"), [
    (lambda t, z: (t[:, :3], z), r"theta must have shape \(B, 4\)"),
    (lambda t, z: (t, z[:2]), r"normals must have shape \(B=3"),
    (lambda t, z: (t.astype(np.float32), z), "theta must be float64"),
    (lambda t, z: (t, z.astype(np.float32)), "normals must be float64"),
    (lambda t, z: (t, z[:, :, ::2]), "C-contiguous"),
    (lambda t, z: (t, z[:, :0]), "non-empty"),
    (lambda t, z: (t.tolist(), z), "numpy arrays"),
])
def test_bad_shapes_and_dtypes_are_refused(change: object, match: str) -> None:
    theta, z = change(_theta(3), _normals((3, 4, 4)))  # type: ignore[operator]
    with pytest.raises(ValueError, match=match):
        _run(theta, z)
    with pytest.raises(ValueError, match=match):
        simulate_log_returns_numpy(theta, z, scheme="log_euler", moment_matching=False)


@pytest.mark.parametrize(("row", "col", "value", "match"), [
    (1, 0, 0.0, r"theta\[1, 0\] \(T\) must be > 0"),
    (2, 0, -1.0, r"theta\[2, 0\] \(T\) must be > 0"),
    (0, 3, -0.1, r"theta\[0, 3\] \(sigma\) must be >= 0"),
    (1, 1, np.nan, r"theta\[1, 1\] \(r\) must be finite"),
    (2, 2, np.inf, r"theta\[2, 2\] \(d\) must be finite"),
])
def test_bad_parameter_values_are_refused(row: int, col: int, value: float, match: str) -> None:
    theta = _theta(3)
    theta[row, col] = value
    with pytest.raises(ValueError, match=match):
        _run(theta, _normals((3, 4, 2)))


def test_bad_options_and_out_are_refused() -> None:
    theta, z = _theta(2), _normals((2, 4, 1))
    with pytest.raises(ValueError, match="scheme must be one of"):
        _run(theta, z, "milstein")
    with pytest.raises(ValueError, match="moment_matching must be a bool"):
        simulate_log_returns(theta, z, scheme="euler", moment_matching=1,  # type: ignore[arg-type]
                             cap_bytes=CAP)
    for out in (np.empty((2, 5)), np.empty((2, 4), dtype=np.float32), np.empty((4, 2)).T):
        with pytest.raises(ValueError, match="out must be a C-contiguous float64"):
            simulate_log_returns(theta, z, scheme="euler", moment_matching=False, cap_bytes=CAP,
                                 out=out)


def test_cap_is_refused() -> None:
    theta, z = _theta(4), _normals((4, 64, 1))
    with pytest.raises(MemoryCapError, match=r"memory\.paths_bytes"):
        simulate_log_returns(theta, z, scheme="log_euler", moment_matching=False,
                             cap_bytes=4 * 64 * 8 - 1)
    simulate_log_returns(theta, z, scheme="log_euler", moment_matching=False,
                         cap_bytes=4 * 64 * 8)


def test_cuda_wrapper_refuses_host_arrays() -> None:
    with pytest.raises(ValueError, match="theta must be a CUDA device array"):
        simulate_log_returns_cuda(_theta(2), _normals((2, 4, 1)), scheme="log_euler",
                                  moment_matching=False, cap_bytes=CAP)


# --------------------------------------------------------------------------- CUDA kernel source

_SIMULATOR_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from numba import config, cuda
    from spectral_core.processes.gbm import simulate_log_returns, simulate_log_returns_cuda

    rng = np.random.default_rng(5)
    theta = np.column_stack([rng.uniform(0.1, 3, 4), rng.uniform(-0.02, 0.1, 4),
                             rng.uniform(0, 0.08, 4), rng.uniform(0.05, 1.0, 4)])
    theta[0, 3] = 3.0  # large vol: the Euler floor runs on the device too
    z = rng.standard_normal((4, 16, 6))
    diffs = {}
    for scheme in ("log_euler", "euler"):
        for mm in (False, True):
            cpu = simulate_log_returns(theta, z, scheme=scheme, moment_matching=mm, cap_bytes=4096)
            dev = simulate_log_returns_cuda(cuda.to_device(theta), cuda.to_device(z),
                                            scheme=scheme, moment_matching=mm, cap_bytes=4096)
            diffs[f"{scheme}/{mm}"] = float(np.abs(dev.copy_to_host() - cpu).max())
    bad = theta.copy()
    bad[3, 3] = -0.5
    try:
        simulate_log_returns_cuda(cuda.to_device(bad), cuda.to_device(z), scheme="euler",
                                  moment_matching=False, cap_bytes=4096)
        error = ""
    except ValueError as exc:
        error = str(exc)
    print(json.dumps({"simulator": bool(config.ENABLE_CUDASIM), "diffs": diffs, "error": error}))
""")


def test_cuda_kernel_source_matches_cpu_under_the_simulator() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", _SIMULATOR_SCRIPT], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["simulator"] is True
    assert set(result["diffs"]) == {"log_euler/False", "log_euler/True", "euler/False",
                                    "euler/True"}
    assert max(result["diffs"].values()) < 1e-12
    assert "theta[3, 3] (sigma) must be >= 0" in result["error"]
