"""Heston QE kernel and conditional CF label: compiled kernels vs plain Python and numpy, the
analytic CF within 4 standard errors, the martingale correction, validation and memory caps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spectral_core.analytic_heston import heston_cf
from spectral_core.memory import MemoryCapError
from spectral_core.processes.qe import (
    CF_CHUNK,
    conditional_cf_label,
    conditional_cf_label_cuda,
    conditional_cf_label_numpy,
    heston_coefficients,
    qe_step,
    sample_log_returns,
    simulate_heston_conditional,
    simulate_heston_conditional_cuda,
    simulate_heston_conditional_numpy,
)

CAP = 1 << 31
ROOT = Path(__file__).resolve().parents[1]
NAMES = ("T", "r", "d", "v0", "kappa", "theta_v", "xi", "rho")
LOWER = np.array([0.05, -0.02, 0.0, 0.005, 0.2, 0.005, 0.1, -0.95])
UPPER = np.array([3.0, 0.10, 0.08, 0.5, 5.0, 0.5, 1.0, 0.2])

# (T, r, d, v0, kappa, theta_v, xi, rho): a typical equity set, two that violate Feller
# (2 kappa theta_v < xi^2) hard, a positive-correlation set and a short-dated one.
PARAM_SETS = {
    "typical": (1.0, 0.03, 0.01, 0.04, 1.5, 0.04, 0.5, -0.7),
    "feller_violated": (2.0, 0.02, 0.0, 0.09, 0.5, 0.04, 1.0, -0.9),
    "feller_violated_low_v": (3.0, 0.0, 0.01, 0.01, 0.2, 0.02, 1.0, -0.5),
    "rho_positive": (0.5, 0.05, 0.02, 0.2, 3.0, 0.1, 0.3, 0.2),
    "short": (0.05, 0.0, 0.0, 0.01, 2.0, 0.02, 0.8, -0.5),
}


def _theta(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return LOWER + (UPPER - LOWER) * rng.uniform(size=(n, 8))  # (n, 8)


def _normals(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _edge_theta() -> np.ndarray:
    """Random contracts plus the edges: v0 = theta_v = 0, rho = +-1, Feller violated, tiny T."""
    theta = _theta(8)
    theta[0, 3] = theta[0, 5] = 0.0  # the variance starts and stays at 0
    theta[1, 7] = 1.0
    theta[2, 7] = -1.0
    theta[3, 4:7] = (0.2, 0.01, 1.0)  # 2 kappa theta_v = 0.004 << xi^2 = 1
    theta[4, 0] = 1e-4
    theta[5, 3] = 0.0  # starts at 0, mean-reverts up
    return theta


def _plain_python(theta: np.ndarray, z: np.ndarray, correct: bool) -> np.ndarray:
    n_contracts, n_paths, n_steps = z.shape
    out = np.empty((n_contracts, n_paths, 2))
    for b in range(n_contracts):
        T, r, d, v0, kappa, theta_v, xi, rho = (float(x) for x in theta[b, :8])
        coef = heston_coefficients(T / n_steps, kappa, theta_v, xi, rho)
        for p in range(n_paths):
            v, m, s2 = v0, 0.0, 0.0
            for t in range(n_steps):
                v, dm, ds2 = qe_step(v, float(z[b, p, t]), theta_v, *coef, correct)
                m += dm
                s2 += ds2
            out[b, p] = ((r - d) * T + m, s2)
    return out


def _interval(theta: np.ndarray, width: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """[c1 - L s, c1 + L s] with the exact mean of x and s^2 = E[int v dt] (a test interval)."""
    T, r, d, v0, kappa, theta_v = (theta[:, k] for k in range(6))
    w = theta_v * T + (v0 - theta_v) * -np.expm1(-kappa * T) / kappa
    c1 = (r - d) * T - 0.5 * w
    s = np.sqrt(w) * 1.5  # room for the fat left tail of rho < 0
    return c1 - width * s, c1 + width * s


def _label_terms(ms2: np.ndarray, a: np.ndarray, b: np.ndarray, n_freq: int) -> np.ndarray:
    u = np.arange(n_freq) * math.pi / (b - a)[:, None]  # (B, N)
    y = ms2[..., 0:1] - a[:, None, None]  # (B, M, 1)
    return np.exp(1j * u[:, None, :] * y - 0.5 * u[:, None, :] ** 2 * ms2[..., 1:2])  # (B, M, N)


def _analytic_shifted(theta: np.ndarray, a: np.ndarray, b: np.ndarray, n_freq: int) -> np.ndarray:
    u = np.arange(n_freq) * math.pi / (b - a)[:, None]  # (B, N)
    cols = {name: theta[:, k : k + 1] for k, name in enumerate(NAMES)}
    return heston_cf(u, **cols) * np.exp(-1j * u * a[:, None])  # (B, N)


def _max_z(terms: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Largest |MC - target| / SE over k >= 1 and real/imag parts, per contract: (B,)."""
    terms, target = terms[..., 1:], target[:, 1:]  # F_0 = 1 has no noise
    root_m = math.sqrt(terms.shape[1])
    est = terms.mean(axis=1)
    z_re = (est.real - target.real) / (terms.real.std(axis=1) / root_m)
    z_im = (est.imag - target.imag) / (terms.imag.std(axis=1) / root_m)
    return np.maximum(np.abs(z_re), np.abs(z_im)).max(axis=1)


# --------------------------------------------------------------------------- kernel vs references

@pytest.mark.parametrize("correct", [True, False])
def test_compiled_kernel_matches_plain_python_and_numpy(correct: bool) -> None:
    theta, z = _edge_theta(), _normals((8, 17, 6))
    kernel = simulate_heston_conditional(theta, z, martingale_correction=correct, cap_bytes=CAP)
    np.testing.assert_allclose(kernel, _plain_python(theta, z, correct), rtol=0, atol=1e-12)
    reference = simulate_heston_conditional_numpy(theta, z, martingale_correction=correct)
    np.testing.assert_allclose(kernel, reference, rtol=0, atol=1e-12)
    assert np.isfinite(kernel).all() and (kernel[..., 1] >= 0).all()


def test_uncorrected_moments_equal_the_closed_form_in_v_and_i() -> None:
    """Without correction, m and s2 are Andersen's sums: -I/2 + (rho/xi)(v_T - v0 - kappa
    theta_v T + kappa I) and (1 - rho^2) I, with I the trapezoid rule on the variance path."""
    theta, z = _theta(3, seed=4), _normals((3, 5, 7))
    out = simulate_heston_conditional(theta, z, martingale_correction=False, cap_bytes=CAP)
    for b in range(3):
        T, r, d, v0, kappa, theta_v, xi, rho = theta[b]
        coef = heston_coefficients(T / 7, kappa, theta_v, xi, rho)
        for p in range(5):
            path = [v0]
            for t in range(7):
                path.append(qe_step(path[-1], z[b, p, t], theta_v, *coef, False)[0])
            v = np.array(path)
            integral = T / 7 * (v[:-1] + v[1:]).sum() / 2
            m = (r - d) * T - integral / 2 + rho / xi * (v[-1] - v0 - kappa * theta_v * T
                                                          + kappa * integral)
            np.testing.assert_allclose(out[b, p], (m, (1 - rho * rho) * integral),
                                       rtol=1e-12, atol=1e-14)


def test_bates_theta_extra_columns_are_ignored() -> None:
    theta, z = _theta(3), _normals((3, 9, 4))
    bates = np.column_stack([theta, np.full((3, 3), 0.5)])  # lam, mu_j, sigma_j
    np.testing.assert_array_equal(simulate_heston_conditional(bates, z, cap_bytes=CAP),
                                  simulate_heston_conditional(theta, z, cap_bytes=CAP))


def test_out_is_filled_in_place_and_returned() -> None:
    theta, z = _theta(2), _normals((2, 4, 3))
    out = np.full((2, 4, 2), np.nan)
    assert simulate_heston_conditional(theta, z, cap_bytes=CAP, out=out) is out
    assert np.isfinite(out).all()
    label = np.full((2, 5), np.nan, dtype=np.complex128)
    a, b = _interval(theta)
    assert conditional_cf_label(out, a, b, n_freq=5, cap_bytes=CAP, out=label) is label
    x = np.full((2, 4), np.nan)
    assert sample_log_returns(out, _normals((1, 2, 4))[0], cap_bytes=CAP, out=x) is x


# --------------------------------------------------------------------------- the QE step

@pytest.mark.parametrize(("v0", "xi"), [(0.04, 0.3), (0.0004, 0.9)])  # psi 0.44 and 10
def test_qe_step_matches_the_exact_conditional_mean_and_variance(v0: float, xi: float) -> None:
    T, kappa, theta_v, rho = 0.25, 1.0, 0.04, 0.0
    theta = np.array([[T, 0.0, 0.0, v0, kappa, theta_v, xi, rho]])
    z = _normals((1, 1 << 18, 1), seed=7)
    ms2 = simulate_heston_conditional(theta, z, martingale_correction=False, cap_bytes=CAP)
    k3 = 0.5 * T  # K3 = K4 = dt / 2 at rho = 0, so v1 = s2 / K4 - v0
    v1 = ms2[0, :, 1] / k3 - v0
    assert (v1 >= -1e-15).all()
    e = math.exp(-kappa * T)
    mean = theta_v + (v0 - theta_v) * e
    var = v0 * xi**2 * e * (1 - e) / kappa + theta_v * xi**2 * (1 - e) ** 2 / (2 * kappa)
    n = v1.size
    dev = v1 - v1.mean()
    assert abs(v1.mean() - mean) < 4 * v1.std() / math.sqrt(n)
    var_se = math.sqrt(max((dev**4).mean() - dev.var() ** 2, 0.0) / n)
    assert abs(dev.var() - var) < 4 * var_se
    assert (v1 == 0.0).any() == (xi > 0.5)  # only the exponential branch has mass at 0


def test_feller_violation_keeps_the_variance_valid() -> None:
    """Heavily Feller-violating parameters on a coarse grid: v >= 0, hits 0, never NaN."""
    theta_v, kappa, xi, rho, dt = 0.01, 0.2, 1.0, -0.9, 0.25
    coef = heston_coefficients(dt, kappa, theta_v, xi, rho)
    z = _normals((1, 400, 40), seed=3)[0]
    hits = 0
    for row in z:
        v = 0.01
        for zt in row:
            v, dm, ds2 = qe_step(v, float(zt), theta_v, *coef, True)
            assert v >= 0.0 and math.isfinite(dm) and ds2 >= 0.0
            hits += v == 0.0
    assert hits > 0


def test_the_correction_makes_each_step_a_martingale() -> None:
    """E[exp(m + s2/2)] = exp((r - d) dt) over one step, in both branches (4 SE)."""
    theta = np.array([[0.5, 0.03, 0.01, 0.04, 1.5, 0.04, 0.5, -0.7],
                      [0.5, 0.03, 0.01, 0.0005, 1.5, 0.04, 0.5, -0.7],
                      [0.5, 0.03, 0.01, 0.0005, 0.5, 0.04, 1.0, 0.2]])
    z = _normals((3, 1 << 17, 1), seed=11)
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    growth = np.exp(ms2[..., 0] + 0.5 * ms2[..., 1] - ((theta[:, 1] - theta[:, 2])
                                                        * theta[:, 0])[:, None])
    se = growth.std(axis=1) / math.sqrt(growth.shape[1])
    assert (np.abs(growth.mean(axis=1) - 1.0) < 4 * se).all()


def test_a_step_without_the_moment_generating_function_keeps_the_uncorrected_drift() -> None:
    # Quadratic branch with A = K2 + K4/2 >= 1/(2a), and exponential branch with A >= beta.
    e, c_v, c_theta, k0, k1, k2, k3, k4, a, k13 = heston_coefficients(0.1, 1.0, 0.04, 0.5, -0.5)
    for v in (0.04, 1e-4):  # psi = 0.57 and 3.1
        for z in (-1.0, 0.3, 2.0):
            args = (v, z, 0.04, e, c_v, c_theta, k0, k1, k2, k3, k4)
            assert qe_step(*args, a, k13, True) != qe_step(*args, a, k13, False)
            assert qe_step(*args, 1e6, k13, True) == qe_step(*args, 1e6, k13, False)


# --------------------------------------------------------------------------- the label

def test_label_kernel_matches_the_direct_formula() -> None:
    rng = np.random.default_rng(0)
    ms2 = np.empty((6, 500, 2))
    ms2[..., 0] = rng.uniform(-1.0, 1.0, (6, 500))
    ms2[..., 1] = np.array([0.0, 1e-8, 1e-5, 1e-3, 1e-2, 0.3])[:, None] * rng.uniform(size=(6, 500))
    a, b = np.full(6, -1.0), np.full(6, 1.0)
    for n_freq in (1, CF_CHUNK, CF_CHUNK + 3, 256):
        label = conditional_cf_label(ms2, a, b, n_freq=n_freq, cap_bytes=CAP)
        direct = conditional_cf_label_numpy(ms2, a, b, n_freq=n_freq)
        assert label.shape == (6, n_freq) and (label[:, 0] == 1.0).all()
        np.testing.assert_allclose(label, direct, rtol=0, atol=1e-14)


@pytest.mark.parametrize("s2", [0.0, 1e-7, 1e-5, 1e-3])
def test_label_recurrence_stays_accurate_for_single_paths_up_to_256_frequencies(s2: float) -> None:
    """One path, no averaging: the worst case of the recurrence. The phase k u_1 (m - a) alone
    carries ~ulp(k pi) ~ 1e-13 of rounding at k = 255 in any float64 formula."""
    for m in (-0.999, 0.123, 0.7, 0.999):
        ms2 = np.array([[[m, s2]]])
        a, b = np.array([-1.0]), np.array([1.0])
        label = conditional_cf_label(ms2, a, b, n_freq=256, cap_bytes=CAP)
        np.testing.assert_allclose(label, conditional_cf_label_numpy(ms2, a, b, n_freq=256),
                                   rtol=0, atol=2e-13)


@pytest.fixture(scope="module")
def heston_sets() -> tuple[np.ndarray, np.ndarray]:
    theta = np.array(list(PARAM_SETS.values()))
    return theta, _normals((len(theta), 1 << 14, 128), seed=2024)


N_FREQ = 32


def test_label_agrees_with_the_analytic_cf_within_4_standard_errors(
        heston_sets: tuple[np.ndarray, np.ndarray]) -> None:
    theta, z = heston_sets
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    a, b = _interval(theta)
    label = conditional_cf_label(ms2, a, b, n_freq=N_FREQ, cap_bytes=CAP)
    terms = _label_terms(ms2, a, b, N_FREQ)
    np.testing.assert_allclose(label, terms.mean(axis=1), rtol=0, atol=1e-13)
    z_max = _max_z(terms, _analytic_shifted(theta, a, b, N_FREQ))
    assert (z_max < 4.0).all(), dict(zip(PARAM_SETS, z_max.round(2), strict=True))


@pytest.mark.parametrize(("column", "change"), [(6, 1.2), (7, -1.0)])  # xi * 1.2, rho flipped
def test_a_wrong_parameter_fails_the_4_standard_error_test(
        heston_sets: tuple[np.ndarray, np.ndarray], column: int, change: float) -> None:
    theta, z = heston_sets
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    wrong = theta.copy()
    wrong[:, column] *= change
    a, b = _interval(theta)
    z_max = _max_z(_label_terms(ms2, a, b, N_FREQ), _analytic_shifted(wrong, a, b, N_FREQ))
    assert (z_max > 4.0).all(), dict(zip(PARAM_SETS, z_max.round(2), strict=True))


def test_plain_samples_agree_with_the_conditional_label(
        heston_sets: tuple[np.ndarray, np.ndarray]) -> None:
    """x = m + sqrt(s2) z is an exact draw given the path: its empirical CF has the same mean as
    the conditional label, with more noise (the Rao-Blackwellisation gain is checked too)."""
    theta, z = heston_sets
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    z_extra = _normals((len(theta), z.shape[1], 1), seed=5)[..., 0]
    x = sample_log_returns(ms2, z_extra, cap_bytes=CAP)
    np.testing.assert_allclose(x, ms2[..., 0] + np.sqrt(ms2[..., 1]) * z_extra, rtol=0,
                               atol=1e-15)
    a, b = _interval(theta)
    plain = np.exp(1j * (np.arange(N_FREQ) * math.pi / (b - a)[:, None])[:, None, :]
                   * (x - a[:, None])[..., None])  # (B, M, N)
    label = conditional_cf_label(ms2, a, b, n_freq=N_FREQ, cap_bytes=CAP)
    assert (_max_z(plain, label) < 4.0).all()
    conditional_var = _label_terms(ms2, a, b, N_FREQ).var(axis=1)[:, 1:]
    assert (conditional_var < plain.var(axis=1)[:, 1:]).all()


# --------------------------------------------------------------------------- the martingale

def _forward_bias(theta: np.ndarray, z: np.ndarray,
                  correct: bool) -> tuple[np.ndarray, np.ndarray]:
    ms2 = simulate_heston_conditional(theta, z, martingale_correction=correct, cap_bytes=CAP)
    growth = np.exp(ms2[..., 0] + 0.5 * ms2[..., 1]
                    - ((theta[:, 1] - theta[:, 2]) * theta[:, 0])[:, None])  # (B, M)
    return growth.mean(axis=1) - 1.0, growth.std(axis=1) / math.sqrt(growth.shape[1])


def test_forward_is_matched_within_4_standard_errors(
        heston_sets: tuple[np.ndarray, np.ndarray]) -> None:
    theta, z = heston_sets
    bias, se = _forward_bias(theta, z, True)
    assert (np.abs(bias) < 4 * se).all(), (bias / se).round(2)


def test_correction_removes_the_forward_bias_of_a_coarse_grid() -> None:
    """Two steps over T = 3 and 0.5 (measured: uncorrected 39 and 15 SE off, corrected < 1)."""
    theta = np.array([[3.0, 0.0, 0.0, 0.5, 5.0, 0.5, 1.0, 0.2],
                      [0.5, 0.05, 0.02, 0.2, 3.0, 0.1, 0.3, 0.2]])
    z = _normals((2, 1 << 16, 2), seed=3)
    corrected, se_c = _forward_bias(theta, z, True)
    plain, se_p = _forward_bias(theta, z, False)
    assert (np.abs(corrected) < 4 * se_c).all()
    assert (np.abs(plain) > 4 * se_p).all()
    assert (np.abs(corrected) < np.abs(plain)).all()


# --------------------------------------------------------------------------- validation and caps

@pytest.mark.parametrize(("col", "value", "rule"), [
    (0, 0.0, "> 0"), (0, math.nan, "finite"), (1, math.inf, "finite"), (3, -1e-9, ">= 0"),
    (4, 0.0, "> 0"), (5, -0.1, ">= 0"), (6, 0.0, "> 0"), (7, 1.0000001, r"in \[-1, 1\]"),
    (7, -1.5, r"in \[-1, 1\]"),
])
def test_bad_theta_names_the_field(col: int, value: float, rule: str) -> None:
    theta = _theta(3)
    theta[2, col] = value
    match = rf"theta\[2, {col}\] \({NAMES[col]}\) must be {rule}"
    with pytest.raises(ValueError, match=match):
        simulate_heston_conditional(theta, _normals((3, 4, 2)), cap_bytes=CAP)
    with pytest.raises(ValueError, match=match):
        simulate_heston_conditional_numpy(theta, _normals((3, 4, 2)))


def test_bad_shapes_and_options_are_refused() -> None:
    theta, z = _theta(2), _normals((2, 4, 3))
    with pytest.raises(ValueError, match=r"theta must have shape \(B, >= 8\)"):
        simulate_heston_conditional(theta[:, :7], z, cap_bytes=CAP)
    with pytest.raises(ValueError, match="normals must have shape"):
        simulate_heston_conditional(theta, z[:1], cap_bytes=CAP)
    with pytest.raises(ValueError, match="normals must be C-contiguous"):
        simulate_heston_conditional(theta, np.asfortranarray(z), cap_bytes=CAP)
    with pytest.raises(ValueError, match="normals must be float64"):
        simulate_heston_conditional(theta, z.astype(np.float32), cap_bytes=CAP)
    with pytest.raises(ValueError, match="martingale_correction must be a bool"):
        simulate_heston_conditional(theta, z, martingale_correction=1,  # type: ignore[arg-type]
                                    cap_bytes=CAP)
    for out in (np.empty((2, 4, 3)), np.empty((2, 4, 2), dtype=np.float32)):
        with pytest.raises(ValueError, match="out must be a writeable C-contiguous float64"):
            simulate_heston_conditional(theta, z, cap_bytes=CAP, out=out)


def test_bad_label_inputs_are_refused() -> None:
    ms2 = simulate_heston_conditional(_theta(2), _normals((2, 4, 3)), cap_bytes=CAP)
    a, b = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match=r"ms2 must have shape \(B, M, 2\)"):
        conditional_cf_label(ms2[..., :1], a, b, n_freq=4, cap_bytes=CAP)
    with pytest.raises(ValueError, match="n_freq must be an integer >= 1"):
        conditional_cf_label(ms2, a, b, n_freq=0, cap_bytes=CAP)
    with pytest.raises(ValueError, match=r"b must be > a, got a=0.0 b=0.0 \(contract 1\)"):
        conditional_cf_label(ms2, a, np.array([1.0, 0.0]), n_freq=4, cap_bytes=CAP)
    with pytest.raises(ValueError, match="a must be finite, got nan"):
        conditional_cf_label(ms2, np.array([0.0, np.nan]), b, n_freq=4, cap_bytes=CAP)
    with pytest.raises(ValueError, match=r"a must be a float64 numpy array of shape \(2,\)"):
        conditional_cf_label(ms2, np.zeros(3), b, n_freq=4, cap_bytes=CAP)
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous complex128"):
        conditional_cf_label(ms2, a, b, n_freq=4, cap_bytes=CAP, out=np.empty((2, 4)))
    with pytest.raises(ValueError, match=r"z_extra must be float64 of shape \(2, 4\)"):
        sample_log_returns(ms2, np.zeros((2, 5)), cap_bytes=CAP)


def test_memory_caps_refuse_before_allocating() -> None:
    theta, z = _theta(4), _normals((4, 64, 2))
    need = 4 * 64 * 2 * 8
    with pytest.raises(MemoryCapError, match=r"memory\.paths_bytes"):
        simulate_heston_conditional(theta, z, cap_bytes=need - 1)
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=need)
    a, b = _interval(theta)
    with pytest.raises(MemoryCapError, match=r"memory\.spectrum_bytes"):
        conditional_cf_label(ms2, a, b, n_freq=8, cap_bytes=4 * 8 * 16 - 1)
    conditional_cf_label(ms2, a, b, n_freq=8, cap_bytes=4 * 8 * 16)
    with pytest.raises(MemoryCapError, match=r"memory\.paths_bytes"):
        sample_log_returns(ms2, z[..., 0].copy(), cap_bytes=4 * 64 * 8 - 1)


def test_cuda_wrappers_refuse_host_arrays() -> None:
    theta, z = _theta(2), _normals((2, 4, 1))
    with pytest.raises(ValueError, match="theta must be a CUDA device array"):
        simulate_heston_conditional_cuda(theta, z, cap_bytes=CAP)
    ms2 = simulate_heston_conditional(theta, z, cap_bytes=CAP)
    with pytest.raises(ValueError, match="ms2 must be a CUDA device array"):
        conditional_cf_label_cuda(ms2, np.zeros(2), np.ones(2), n_freq=4, cap_bytes=CAP)


# --------------------------------------------------------------------------- CUDA kernel source

_SIMULATOR_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from numba import config, cuda
    from spectral_core.processes import qe

    rng = np.random.default_rng(5)
    lo = np.array([0.05, -0.02, 0.0, 0.005, 0.2, 0.005, 0.1, -0.95])
    hi = np.array([3.0, 0.10, 0.08, 0.5, 5.0, 0.5, 1.0, 0.2])
    theta = lo + (hi - lo) * rng.uniform(size=(2, 8))
    theta[1, 3:7] = (0.001, 0.2, 0.01, 1.0)  # Feller violated: the exponential branch runs
    z = rng.standard_normal((2, 12, 4))
    diffs = {}
    for correct in (True, False):
        cpu = qe.simulate_heston_conditional(theta, z, martingale_correction=correct,
                                             cap_bytes=4096)
        dev = qe.simulate_heston_conditional_cuda(cuda.to_device(theta), cuda.to_device(z),
                                                  martingale_correction=correct, cap_bytes=4096)
        diffs[f"paths/{correct}"] = float(np.abs(dev.copy_to_host() - cpu).max())
    a = cpu[..., 0].min(axis=1) - 1.0
    b = cpu[..., 0].max(axis=1) + 1.0
    n_freq = qe.CF_CHUNK + 3  # two chunks, the second one partial
    label = qe.conditional_cf_label(cpu, a, b, n_freq=n_freq, cap_bytes=4096)
    d_label = qe.conditional_cf_label_cuda(cuda.to_device(cpu), cuda.to_device(a),
                                           cuda.to_device(b), n_freq=n_freq, cap_bytes=4096)
    diffs["label"] = float(np.abs(d_label.copy_to_host() - label).max())
    z_extra = rng.standard_normal((2, 12))
    x = qe.sample_log_returns(cpu, z_extra, cap_bytes=4096)
    d_x = qe.sample_log_returns_cuda(cuda.to_device(cpu), cuda.to_device(z_extra), cap_bytes=4096)
    diffs["sample"] = float(np.abs(d_x.copy_to_host() - x).max())
    errors = []
    bad = theta.copy()
    bad[1, 6] = 0.0
    try:
        qe.simulate_heston_conditional_cuda(cuda.to_device(bad), cuda.to_device(z),
                                            cap_bytes=4096)
    except ValueError as exc:
        errors.append(str(exc))
    try:
        qe.conditional_cf_label_cuda(cuda.to_device(cpu), cuda.to_device(a), cuda.to_device(a),
                                     n_freq=4, cap_bytes=4096)
    except ValueError as exc:
        errors.append(str(exc))
    print(json.dumps({"simulator": bool(config.ENABLE_CUDASIM), "diffs": diffs,
                      "errors": errors}))
""")


def test_cuda_kernel_source_matches_cpu_under_the_simulator() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", _SIMULATOR_SCRIPT], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["simulator"] is True
    assert set(result["diffs"]) == {"paths/True", "paths/False", "label", "sample"}
    assert max(result["diffs"].values()) < 1e-12, result["diffs"]
    assert len(result["errors"]) == 2
    assert "theta[1, 6] (xi) must be > 0" in result["errors"][0]
    assert "b must be > a" in result["errors"][1]


# The simulator runs kernels as Python, so it cannot catch what numba's CUDA target will not
# type (it types min(int, int) as min(iterable), for one). NVVM alone compiles to PTX without a
# GPU; the current-device query is stubbed in a subprocess so no cached overload leaks out.
_PTX_SCRIPT = textwrap.dedent("""
    import json
    import types
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as exc:
        print(json.dumps({"skip": f"no NVVM to compile CUDA kernels: {exc}"}))
        raise SystemExit(0)
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from numba import cuda, types as t
    from spectral_core.processes import qe

    f1, f2, f3 = t.float64[::1], t.float64[:, ::1], t.float64[:, :, ::1]
    kernels = {"_heston_kernel_cuda": (f2, f3, t.boolean, f3),
               "_label_kernel_cuda": (f3, f1, f1, t.complex128[:, ::1]),
               "_sample_kernel_cuda": (f3, f2, f2),
               "_check_theta_kernel_cuda": (f2, t.int32[::1]),
               "_check_interval_kernel_cuda": (f1, f1, t.int32[::1])}
    sizes = {name: len(cuda.compile_ptx(getattr(qe, name).py_func, sig, cc=(9, 0))[0])
             for name, sig in kernels.items()}
    from spectral_core.processes import gbm
    gbm_kernels = {"_paths_kernel_cuda": (f2, f3, t.int64, f2),
                   "_moment_match_kernel_cuda": (f2, f2),
                   "_check_theta_kernel_cuda": (f2, t.int32[::1])}
    sizes.update({f"gbm.{name}": len(cuda.compile_ptx(getattr(gbm, name).py_func, sig,
                                                      cc=(9, 0))[0])
                  for name, sig in gbm_kernels.items()})
    print(json.dumps({"ptx_chars": sizes}))
""")


def test_cuda_kernels_compile_to_ptx() -> None:
    """Every Heston and GBM CUDA kernel compiles for sm_90 (the gbm moment-match kernel did not
    while it used max(x, y))."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", _PTX_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert len(result["ptx_chars"]) == 8 and min(result["ptx_chars"].values()) > 1000
