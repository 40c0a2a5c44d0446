"""Truncation rule, frequencies and the binned-FFT CF estimator (numpy backend)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectral_core import analytic as an
from spectral_core.memory import MemoryCapError
from spectral_core.spectrum import (
    empirical_cf,
    estimate_spectrum,
    frequencies,
    spectrum_workspace_bytes,
    truncation_interval,
)

N_FREQ, GRID, L = 64, 1024, 10.0
CAP = 2**30


def _params(n: int, seed: int) -> tuple[np.ndarray, ...]:
    """(T, r, d, sigma) drawn from the default training domain."""
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.02, 5.0, n),
        rng.uniform(-0.02, 0.10, n),
        rng.uniform(0.0, 0.08, n),
        rng.uniform(0.05, 1.0, n),
    )


def _gbm_samples(T: np.ndarray, r: np.ndarray, d: np.ndarray, sigma: np.ndarray, m: int,
                 seed: int) -> np.ndarray:
    """Exact samples of x = ln(S_T/S0) under GBM: (B, M) float64."""
    z = np.random.default_rng(seed).standard_normal((T.shape[0], m))
    mean = (r - d - 0.5 * sigma**2) * T
    return mean[:, None] + (sigma * np.sqrt(T))[:, None] * z


def _theta() -> np.ndarray:
    """theta_k = u_k h = 2 pi k / G, the phase step of one grid cell at frequency k."""
    return 2.0 * math.pi * np.arange(N_FREQ) / GRID


def _kernel() -> np.ndarray:
    return np.sinc(np.arange(N_FREQ) / GRID) ** 2  # sinc^2(theta_k / 2)


def test_truncation_interval_rule() -> None:
    T, r, d, sigma = _params(16, 0)
    a, b = truncation_interval(T, r, d, sigma, L=L, xp=np)
    m, s = (r - d) * T, sigma * np.sqrt(T)
    np.testing.assert_allclose(a, m - L * s, rtol=1e-15)
    np.testing.assert_allclose(b, m + L * s, rtol=1e-15)
    assert a.shape == b.shape == (16,)


def test_truncation_interval_and_frequencies_under_torch_match_numpy() -> None:
    T, r, d, sigma = _params(8, 1)
    a, b = truncation_interval(T, r, d, sigma, L=L, xp=np)
    tt = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (T, r, d, sigma)]
    at, bt = truncation_interval(*tt, L=L, xp=torch)
    np.testing.assert_allclose(at.detach().numpy(), a, rtol=1e-15)
    np.testing.assert_allclose(bt.detach().numpy(), b, rtol=1e-15)
    (grad_sigma,) = torch.autograd.grad(bt.sum(), (tt[3],))
    np.testing.assert_allclose(grad_sigma.numpy(), L * np.sqrt(T), rtol=1e-14)
    ut = frequencies(at, bt, n_freq=N_FREQ, xp=torch)
    assert ut.dtype == torch.float64
    np.testing.assert_allclose(ut.detach().numpy(), frequencies(a, b, n_freq=N_FREQ, xp=np))


def test_frequencies() -> None:
    a = np.array([-1.0, 0.5])
    b = np.array([1.0, 0.75])
    u = frequencies(a, b, n_freq=5, xp=np)
    assert u.shape == (2, 5) and u.dtype == np.float64
    np.testing.assert_allclose(u[:, 1] * (b - a), math.pi, rtol=1e-15)
    np.testing.assert_allclose(u, np.arange(5)[None, :] * u[:, 1:2], rtol=1e-15)
    assert (u[:, 0] == 0).all()


def test_estimate_shapes_dtype_and_unit_dc_term() -> None:
    T, r, d, sigma = _params(3, 2)
    x = _gbm_samples(T, r, d, sigma, 1000, 3)
    a, b = truncation_interval(T, r, d, sigma, L=L, xp=np)
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    assert est.F.shape == (3, N_FREQ) and est.F.dtype == np.complex128
    assert est.truncated_mass.shape == (3,) and est.truncated_mass.dtype == np.float64
    assert (est.F[:, 0] == 1.0).all()
    assert (est.truncated_mass == 0.0).all()


def test_samples_on_nodes_give_the_empirical_cf_over_the_kernel_exactly() -> None:
    """All samples on grid nodes (f = 0): the deposit is exact, so F = F_emp / sinc^2 exactly.

    This is also the worst case of the kernel correction: |F - F_emp| = (1/sinc^2 - 1)|F_emp|.
    """
    rng = np.random.default_rng(4)
    a = np.array([-0.3, 1.0, -2.0])
    b = np.array([0.5, 1.2, 3.0])
    step = 2 * (b - a) / GRID
    nodes = rng.integers(0, GRID // 2 + 1, size=(3, 500))
    x = a[:, None] + nodes * step[:, None]
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    emp = empirical_cf(x, frequencies(a, b, n_freq=N_FREQ, xp=np), a, xp=np)
    want = emp / _kernel()[None, :]
    want[:, 0] = 1.0
    np.testing.assert_allclose(est.F, want, rtol=0, atol=1e-12)


def test_samples_at_cell_midpoints_split_evenly() -> None:
    """f = 1/2: the deposit is cos(theta/2) e^{i u (x - a)}, so F = F_emp cos(theta/2) / sinc^2."""
    rng = np.random.default_rng(5)
    a, b = np.array([-1.0, 0.0]), np.array([1.0, 0.1])
    step = 2 * (b - a) / GRID
    cells = rng.integers(0, GRID // 2, size=(2, 300))
    x = a[:, None] + (cells + 0.5) * step[:, None]
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    emp = empirical_cf(x, frequencies(a, b, n_freq=N_FREQ, xp=np), a, xp=np)
    want = emp * np.cos(_theta() / 2)[None, :] / _kernel()[None, :]
    want[:, 0] = 1.0
    np.testing.assert_allclose(est.F, want, rtol=0, atol=1e-12)


def test_single_sample_per_contract_matches_the_linear_deposit_formula() -> None:
    """One sample per contract at a random cell fraction: checks the flattened (contract, node)
    indexing and the weights against [(1 - f) e^{i theta j} + f e^{i theta (j + 1)}] / sinc^2."""
    rng = np.random.default_rng(6)
    n = 200
    a = rng.uniform(-3, 0, n)
    b = a + rng.uniform(0.01, 5, n)
    x = rng.uniform(a, b)[:, None]  # (n, 1)
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    t = (x[:, 0] - a) / (2 * (b - a) / GRID)
    j, f = np.floor(t), t - np.floor(t)
    theta = _theta()[None, :]
    deposit = (1 - f)[:, None] * np.exp(1j * theta * j[:, None])
    deposit += f[:, None] * np.exp(1j * theta * (j + 1)[:, None])
    want = deposit / _kernel()[None, :]
    want[:, 0] = 1.0
    np.testing.assert_allclose(est.F, want, rtol=0, atol=1e-11)


def test_estimator_matches_direct_empirical_cf_within_the_binning_bound() -> None:
    """Residual after the sinc^2 division, per sample: theta^2 (1/6 - f(1-f)) / 2 + O(theta^4),
    mean zero for cell fractions f ~ U(0,1) and variance theta^4 / (4 * 180). Over M samples the
    complex residual has RMS theta^2 / (2 sqrt(180 M)); at G = 1024, N = 64, M = 8192 that is
    1.6e-8 at k = 1 and 6.2e-5 at k = 63. Asserted at 5 RMS (|complex normal| > 5 RMS has
    probability e^-25) and never above the worst case 1/sinc^2 - 1."""
    T, r, d, sigma = _params(8, 7)
    m = 8192
    x = _gbm_samples(T, r, d, sigma, m, 8)
    a, b = truncation_interval(T, r, d, sigma, L=L, xp=np)
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    emp = empirical_cf(x, frequencies(a, b, n_freq=N_FREQ, xp=np), a, xp=np)
    err = np.abs(est.F - emp)  # (B, N)
    theta = _theta()
    rms = theta**2 / (2 * math.sqrt(180 * m))
    assert err[:, 0].max() <= 1e-15
    assert (err[:, 1:] <= 5 * rms[None, 1:]).all(), (err / np.maximum(rms, 1e-300)).max()
    assert (err <= 1 / _kernel()[None, :] - 1 + 1e-15).all()
    # at k = N - 1 the binning residual is ~1% (RMS) of the CF's own Monte-Carlo noise 1/sqrt(2M)
    assert err.max() < 0.02 / math.sqrt(2 * m)


def test_estimator_matches_analytic_gbm_cf_within_four_standard_errors() -> None:
    T, r, d, sigma = _params(4, 9)
    m = 16384
    x = _gbm_samples(T, r, d, sigma, m, 10)
    a, b = truncation_interval(T, r, d, sigma, L=L, xp=np)
    u = frequencies(a, b, n_freq=N_FREQ, xp=np)
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    exact = an.gbm_shifted_cf(u, a, T=T, r=r, d=d, sigma=sigma)
    phase = u[:, :, None] * (x - a[:, None])[:, None, :]  # (B, N, M)
    se_re = np.cos(phase).std(axis=2, ddof=1) / math.sqrt(m)
    se_im = np.sin(phase).std(axis=2, ddof=1) / math.sqrt(m)
    binning = 5 * _theta() ** 2 / (2 * math.sqrt(180 * m))  # bound from the test above
    k = slice(1, None)
    assert (np.abs(est.F.real - exact.real)[:, k] <= 4 * se_re[:, k] + binning[k]).all()
    assert (np.abs(est.F.imag - exact.imag)[:, k] <= 4 * se_im[:, k] + binning[k]).all()
    np.testing.assert_allclose(exact[:, 0], 1.0)
    # the test has power: a 2% wrong volatility is rejected at the low frequencies
    wrong = an.gbm_shifted_cf(u, a, T=T, r=r, d=d, sigma=sigma * 1.02)
    assert (np.abs(est.F.real - wrong.real)[:, 1:4] > 4 * se_re[:, 1:4]).any()


def test_samples_outside_the_interval_are_dropped_and_counted() -> None:
    a, b = np.array([-1.0, -0.5]), np.array([1.0, 0.5])
    rng = np.random.default_rng(11)
    inside = rng.uniform(-0.5, 0.5, size=(2, 96))
    inside[0, :2] = [-1.0, 1.0]  # the end points belong to the interval
    outside = np.array([[-1.5, 2.0, np.inf, -np.inf], [0.51, -0.51, 7.0, 1e300]])
    x = np.concatenate([inside, outside], axis=1)
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    np.testing.assert_array_equal(est.truncated_mass, [4 / 100, 4 / 100])
    kept = estimate_spectrum(inside, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=CAP, xp=np)
    np.testing.assert_allclose(est.F, kept.F, rtol=0, atol=1e-15)
    assert (est.F[:, 0] == 1.0).all()


def test_a_contract_with_no_sample_inside_is_refused() -> None:
    x = np.array([[0.0, 0.1], [5.0, 6.0]])
    with pytest.raises(ValueError, match="contract 1"):
        estimate_spectrum(x, np.array([-1.0, -1.0]), np.array([1.0, 1.0]), n_freq=4, grid=16,
                          cap_bytes=CAP, xp=np)


def test_memory_cap_is_checked_before_allocating() -> None:
    x = np.zeros((4, 256))
    a, b = np.full(4, -1.0), np.full(4, 1.0)
    need = spectrum_workspace_bytes(batch=4, samples=256, grid=GRID, n_freq=N_FREQ)
    with pytest.raises(MemoryCapError, match=r"memory\.spectrum_bytes"):
        estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=need - 1, xp=np)
    est = estimate_spectrum(x, a, b, n_freq=N_FREQ, grid=GRID, cap_bytes=need, xp=np)
    assert est.F.shape == (4, N_FREQ)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": np.zeros(8)}, "x must be 2-D"),
        ({"x": np.zeros((2, 8), dtype=np.float32)}, "float64"),
        ({"x": np.full((2, 8), np.nan)}, "NaN"),
        ({"x": np.zeros((2, 0))}, "at least one sample"),
        ({"a": np.zeros(3), "b": np.ones(3)}, "match x"),
        ({"b": np.array([1.0, -2.0])}, "b must be > a"),
        ({"a": np.array([np.nan, 0.0])}, "a must be finite"),
        ({"grid": 100}, "grid"),
        ({"grid": 129}, "grid"),
        ({"n_freq": 0}, "n_freq"),
    ],
)
def test_bad_inputs_raise_naming_the_field(change: dict[str, object], message: str) -> None:
    kw: dict[str, object] = {
        "x": np.zeros((2, 8)),
        "a": np.array([-1.0, -1.0]),
        "b": np.array([1.0, 1.0]),
        "n_freq": N_FREQ,
        "grid": 256,
    }
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        estimate_spectrum(kw.pop("x"), kw.pop("a"), kw.pop("b"), cap_bytes=CAP, xp=np, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("T", 0.0, "T must be > 0"), ("sigma", -0.1, "sigma must be > 0"),
     ("r", math.inf, "r must be finite")],
)
def test_truncation_interval_validation(field: str, value: float, message: str) -> None:
    cols = dict(zip(("T", "r", "d", "sigma"), _params(3, 12), strict=True))
    cols[field] = cols[field].copy()
    cols[field][1] = value
    with pytest.raises(ValueError, match=message):
        truncation_interval(cols["T"], cols["r"], cols["d"], cols["sigma"], L=L, xp=np)
    with pytest.raises(ValueError, match="L must be"):
        truncation_interval(*_params(3, 12), L=0.0, xp=np)
    with pytest.raises(ValueError, match="shape of T"):
        T, r, d, sigma = _params(3, 12)
        truncation_interval(T, r[:2], d, sigma, L=L, xp=np)
