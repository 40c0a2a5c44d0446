"""Analytic Heston / Bates CFs, cumulants and the COS oracle against QuantLib and closed forms.

QuantLib (1.44) is the oracle's oracle: AnalyticHestonEngine with Gatheral's form and adaptive
Gauss-Lobatto at 1e-14 (the engine's (relTolerance, maxEvaluations) constructor is OptimalCV, not
Gatheral), BatesEngine's (relTolerance, maxEvaluations) constructor, which is Gatheral +
Gauss-Lobatto. Dates are whole days on Actual/360, so T = days / 360 is exactly QuantLib's year
fraction (18 days = 0.05, 360 = 1, 1080 = 3).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import mpmath
import numpy as np
import pytest
import QuantLib as ql
import torch

from spectral_core import analytic_heston as ah

S0 = 100.0
SPOT_TOL = 1e-8  # COS oracle vs QuantLib, as a fraction of spot
HESTON = ah.HESTON_DOMAIN
BATES = ah.BATES_DOMAIN
MONEYNESS = (0.7, 0.85, 1.0, 1.15, 1.3)  # strike / forward
DAYS = (18, 360, 1080)  # T = 0.05, 1, 3
RATES = ((0.10, 0.0), (-0.02, 0.08))  # (r, d) at the domain's corners
# (v0, kappa, theta_v, xi, rho); Feller 2 kappa theta_v >= xi^2 holds only in the first.
VARIANCE = {
    "feller_ok": (0.04, 1.5, 0.04, 0.3, -0.7),
    "feller_extreme": (0.005, 0.2, 0.005, 1.0, -0.95),
    "high_vol_rho_max": (0.5, 5.0, 0.5, 1.0, 0.2),
    "low_v0_fast_revert": (0.005, 5.0, 0.5, 1.0, -0.95),
    "feller_violated_rho_max": (0.5, 0.2, 0.005, 1.0, 0.2),
    "feller_violated_mild": (0.1, 2.0, 0.02, 0.8, -0.5),
    "low_vol_of_vol": (0.005, 0.2, 0.5, 0.1, 0.2),
}
JUMPS = {"crash": (1.0, -0.3, 0.3), "small_up": (0.3, 0.1, 0.01)}  # (lam, mu_j, sigma_j)
HESTON_NAMES = tuple(HESTON)
BATES_NAMES = tuple(BATES)


def quantlib_put(process: str, days: int, K: float, theta: dict[str, float]) -> float:
    today = ql.Date(2, 1, 2024)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual360()
    rates = ql.YieldTermStructureHandle(ql.FlatForward(today, theta["r"], dc, ql.Continuous))
    divs = ql.YieldTermStructureHandle(ql.FlatForward(today, theta["d"], dc, ql.Continuous))
    spot = ql.QuoteHandle(ql.SimpleQuote(S0))
    variance = [theta[k] for k in ("v0", "kappa", "theta_v", "xi", "rho")]
    engine: ql.PricingEngine
    if process == "heston":
        model = ql.HestonModel(ql.HestonProcess(rates, divs, spot, *variance))
        engine = ql.AnalyticHestonEngine(
            model,
            ql.AnalyticHestonEngine.Gatheral,
            ql.FourierIntegration.gaussLobatto(1e-14, 1e-14, 1_000_000),
        )
    else:
        jumps = [theta[k] for k in ("lam", "mu_j", "sigma_j")]
        model = ql.BatesModel(ql.BatesProcess(rates, divs, spot, *variance, *jumps))
        engine = ql.BatesEngine(model, 1e-14, 1_000_000)
    option = ql.VanillaOption(
        ql.PlainVanillaPayoff(ql.Option.Put, K), ql.EuropeanExercise(today + days)
    )
    option.setPricingEngine(engine)
    return float(option.NPV())


def contracts(
    variance: list[str], *, days: tuple[int, ...] = DAYS, jumps: list[str] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(params, days, K) over days x rates x variance sets (x jump sets) x MONEYNESS."""
    rows = []
    jump_sets = [None] if jumps is None else [JUMPS[j] for j in jumps]
    for n, (r, d), name, jump, m in itertools.product(days, RATES, variance, jump_sets, MONEYNESS):
        row = {"T": n / 360, "r": r, "d": d}
        row.update(zip(("v0", "kappa", "theta_v", "xi", "rho"), VARIANCE[name], strict=True))
        if jump is not None:
            row.update(zip(("lam", "mu_j", "sigma_j"), jump, strict=True))
        row["days"], row["m"] = n, m
        rows.append(row)
    names = HESTON_NAMES if jumps is None else BATES_NAMES
    params = {k: np.array([row[k] for row in rows]) for k in names}
    n_days = np.array([row["days"] for row in rows], dtype=np.int64)
    K = S0 * np.exp((params["r"] - params["d"]) * params["T"]) * np.array([r["m"] for r in rows])
    return params, n_days, K


def max_error_vs_quantlib(
    process: str, params: dict[str, np.ndarray], days: np.ndarray, K: np.ndarray
) -> float:
    puts = ah.cos_oracle_put(process, S0=S0, K=K, params=params)
    ref = np.array(
        [
            quantlib_put(
                process, int(days[i]), float(K[i]), {k: float(v[i]) for k, v in params.items()}
            )
            for i in range(K.shape[0])
        ]
    )
    return float(np.max(np.abs(puts - ref)) / S0)


def sample(domain: dict[str, tuple[float, float]], n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(lo, hi, n) for k, (lo, hi) in domain.items()}


def cumulants_by_differences(
    log_cf: Any, params: dict[str, np.ndarray], h: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """c1, c2 from ln phi(h) = i c1 h - c2 h^2 / 2 - i c3 h^3 / 6 + ..., Richardson on h, h/2
    (error O(h^4)): Im(ln phi(h)) / h -> c1 and -2 Re(ln phi(h)) / h^2 -> c2."""

    def first(s: float) -> np.ndarray:
        return log_cf(s, **params).imag / s

    def second(s: float) -> np.ndarray:
        return -2.0 * log_cf(s, **params).real / (s * s)

    c1 = (4.0 * first(h / 2) - first(h)) / 3.0
    c2 = (4.0 * second(h / 2) - second(h)) / 3.0
    return c1, c2


def jump_exponent(u: Any, *, T: Any, lam: Any, mu_j: Any, sigma_j: Any) -> np.ndarray:
    """ln of the compensated jump factor with numpy's complex expm1. The module keeps exp(z) - 1,
    which every backend has, and it rounds to ~1e-16 absolute: harmless in a CF, but the h^-2 of
    the differences below would amplify it past their tolerance."""
    u = np.asarray(u, dtype=np.complex128)
    lam_t, s2 = lam * T, sigma_j * sigma_j
    return lam_t * np.expm1(1j * u * mu_j - 0.5 * s2 * u * u) - 1j * u * lam_t * np.expm1(
        mu_j + 0.5 * s2
    )


def bates_log_cf(u: Any, **p: Any) -> np.ndarray:
    jumps = {k: p.pop(k) for k in ("lam", "mu_j", "sigma_j")}
    return ah.heston_log_cf(u, **p) + jump_exponent(u, T=p["T"], **jumps)


def test_heston_cos_matches_quantlib_over_grid() -> None:
    params, days, K = contracts(list(VARIANCE))
    assert max_error_vs_quantlib("heston", params, days, K) <= SPOT_TOL


def test_bates_cos_matches_quantlib_over_grid() -> None:
    params, days, K = contracts(list(VARIANCE), jumps=list(JUMPS))
    assert max_error_vs_quantlib("bates", params, days, K) <= SPOT_TOL


def test_short_expiry_T_005_matches_quantlib() -> None:
    params, days, K = contracts(list(VARIANCE), days=(18,))
    assert params["T"][0] == 0.05
    assert max_error_vs_quantlib("heston", params, days, K) <= SPOT_TOL


def test_feller_violated_matches_quantlib() -> None:
    names = ["feller_extreme", "feller_violated_rho_max", "feller_violated_mild"]
    params, days, K = contracts(names)
    assert np.all(2 * params["kappa"] * params["theta_v"] < params["xi"] ** 2)
    assert max_error_vs_quantlib("heston", params, days, K) <= SPOT_TOL


def test_rho_at_upper_bound_matches_quantlib() -> None:
    params, days, K = contracts(["high_vol_rho_max", "feller_violated_rho_max"])
    assert np.all(params["rho"] == HESTON["rho"][1])
    assert max_error_vs_quantlib("heston", params, days, K) <= SPOT_TOL


def test_sharpest_corner_needs_and_gets_a_wide_interval_and_many_terms() -> None:
    """T = 3, Feller violated 500-fold, rho = -0.95: the left tail is exponential (moment
    explosion at p ~ -0.5), so the interval reaches ~-60 (300 sd) and N ~ 2^17."""
    params, days, K = contracts(["feller_extreme"], days=(1080,))
    a, b = ah.oracle_interval("heston", params=params)
    n = ah.oracle_n_terms("heston", params=params, S0=S0, K=K, a=a, b=b)
    assert np.all(a < -50.0) and np.all(n >= 2**16)
    assert max_error_vs_quantlib("heston", params, days, K) <= SPOT_TOL


def test_bates_cos_matches_quantlib_at_short_expiry_with_crash_jumps() -> None:
    params, days, K = contracts(list(VARIANCE), days=(18,), jumps=["crash"])
    assert max_error_vs_quantlib("bates", params, days, K) <= SPOT_TOL


def test_calls_by_parity_match_quantlib_calls() -> None:
    params, days, K = contracts(["feller_ok", "feller_extreme"], days=(360,))
    calls = ah.cos_oracle_call("heston", S0=S0, K=K, params=params)
    puts = np.array(
        [
            quantlib_put(
                "heston", int(days[i]), float(K[i]), {k: float(v[i]) for k, v in params.items()}
            )
            for i in range(K.shape[0])
        ]
    )
    T, r, d = params["T"], params["r"], params["d"]
    ql_calls = puts + S0 * np.exp(-d * T) - K * np.exp(-r * T)
    assert np.max(np.abs(calls - ql_calls)) / S0 <= SPOT_TOL


def test_fang_oosterlee_reference_calls() -> None:
    """Fang & Oosterlee (2008) Heston reference: S0 = K = 100, r = d = 0. Their T = 10 value is
    met to 2e-10; their T = 1 value, 5.785155450, sits 1.56e-8 above the 5.7851554343762 on
    which QuantLib's Gauss-Lobatto, Gauss-Kronrod and 192-point Gauss-Laguerre engines and COS
    at N = 65536 all agree to 1e-13, so it is held to 2e-8 (and to QuantLib to 1e-10)."""
    theta = dict(kappa=1.5768, xi=0.5751, theta_v=0.0398, v0=0.0175, rho=-0.5711, r=0.0, d=0.0)
    params = {k: np.full(2, v) for k, v in theta.items()}
    params["T"] = np.array([1.0, 10.0])
    calls = ah.cos_oracle_call("heston", S0=S0, K=np.full(2, 100.0), params=params)
    assert abs(calls[1] - 22.318945791) <= 1e-9
    assert abs(calls[0] - 5.785155450) <= 2e-8
    ql_put = quantlib_put("heston", 360, 100.0, {**theta, "T": 1.0})
    assert abs(calls[0] - ql_put) <= 1e-10  # parity: call = put at r = d = 0, K = S0
    assert np.all(np.abs(calls - np.array([5.785155450, 22.318945791])) <= SPOT_TOL * S0)


def test_oracle_on_strike_matrix_equals_column_by_column() -> None:
    params, _, K = contracts(["feller_ok", "high_vol_rho_max"], days=(360,))
    matrix = np.stack([K, 1.1 * K], axis=1)  # (B, 2)
    both = ah.cos_oracle_put("heston", S0=S0, K=matrix, params=params)
    assert both.shape == matrix.shape
    for j in range(2):
        col = ah.cos_oracle_put("heston", S0=S0, K=matrix[:, j].copy(), params=params)
        np.testing.assert_allclose(both[:, j], col, rtol=0, atol=1e-10 * S0)


def test_cf_at_zero_is_exactly_one() -> None:
    p = sample(BATES, 200, seed=1)
    h = {k: p[k] for k in HESTON_NAMES}
    assert np.all(ah.heston_cf(np.zeros(200), **h) == 1.0)
    assert np.all(ah.bates_cf(np.zeros(200), **p) == 1.0)


def test_cf_modulus_is_at_most_one_even_for_large_u_and_long_T() -> None:
    p = sample(BATES, 300, seed=2)
    p["T"][:50] = 50.0  # far beyond the domain: the little trap keeps e^{-DT} bounded
    col = {k: v[:, None] for k, v in p.items()}
    u = np.concatenate([[0.0], np.geomspace(1e-6, 1e7, 200)])[None, :]  # (1, U)
    heston = ah.heston_cf(u, **{k: col[k] for k in HESTON_NAMES})  # (B, U)
    bates = ah.bates_cf(u, **col)
    for phi in (heston, bates):
        assert phi.shape == (300, 201) and phi.dtype == np.complex128
        assert np.all(np.isfinite(phi))
        assert np.all(np.abs(phi) <= 1.0 + 1e-15)


def test_martingale_phi_minus_i_is_the_forward_growth() -> None:
    p = sample(BATES, 300, seed=3)
    growth = np.exp((p["r"] - p["d"]) * p["T"])
    heston = ah.heston_cf(-1j, **{k: p[k] for k in HESTON_NAMES})
    np.testing.assert_allclose(heston, growth, rtol=1e-14, atol=0)
    np.testing.assert_allclose(ah.bates_cf(-1j, **p), growth, rtol=1e-14, atol=0)


def test_cf_is_hermitian() -> None:
    p = {k: v[:, None] for k, v in sample(HESTON, 50, seed=4).items()}
    u = np.linspace(0.1, 200.0, 64)[None, :]
    np.testing.assert_allclose(ah.heston_cf(-u, **p), np.conj(ah.heston_cf(u, **p)), atol=1e-15)


def test_bates_with_zero_intensity_is_heston() -> None:
    p = sample(BATES, 100, seed=5)
    p["lam"] = np.zeros(100)
    h = {k: p[k] for k in HESTON_NAMES}
    u = np.linspace(-300.0, 300.0, 101)[None, :]
    col = {k: v[:, None] for k, v in p.items()}
    hcol = {k: v[:, None] for k, v in h.items()}
    np.testing.assert_allclose(ah.bates_cf(u, **col), ah.heston_cf(u, **hcol), rtol=0, atol=1e-15)
    for got, want in zip(
        ah.bates_cumulants(**p, xp=np), ah.heston_cumulants(**h, xp=np), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    K = S0 * np.exp((p["r"] - p["d"]) * p["T"])
    np.testing.assert_allclose(
        ah.cos_oracle_put("bates", S0=S0, K=K, params=p),
        ah.cos_oracle_put("heston", S0=S0, K=K, params=h),
        rtol=0,
        atol=1e-15 * S0,
    )


def test_bates_cf_is_heston_cf_times_jump_cf() -> None:
    p = {k: v[:, None] for k, v in sample(BATES, 100, seed=12).items()}
    u = np.linspace(-300.0, 300.0, 61)[None, :]
    jumps = {k: p[k] for k in ("T", "lam", "mu_j", "sigma_j")}
    product = ah.heston_cf(u, **{k: p[k] for k in HESTON_NAMES}) * ah.jump_cf(u, **jumps, xp=np)
    np.testing.assert_allclose(ah.bates_cf(u, **p), product, rtol=0, atol=1e-15)
    exponent = jump_exponent(u, **jumps)
    np.testing.assert_allclose(ah.jump_cf(u, **jumps, xp=np), np.exp(exponent), atol=1e-15)


def test_jump_cf_compensation_keeps_the_martingale() -> None:
    p = sample({k: BATES[k] for k in ("T", "lam", "mu_j", "sigma_j")}, 100, seed=6)
    np.testing.assert_allclose(ah.jump_cf(-1j, **p, xp=np), 1.0, rtol=0, atol=1e-15)
    uncompensated = ah.jump_cf_uncompensated(-1j, **p, xp=np)
    mean_jump = np.exp(p["lam"] * p["T"] * np.expm1(p["mu_j"] + 0.5 * p["sigma_j"] ** 2))
    np.testing.assert_allclose(uncompensated, mean_jump, rtol=1e-14)


def test_jump_cf_under_torch_matches_numpy() -> None:
    p = sample({k: BATES[k] for k in ("T", "lam", "mu_j", "sigma_j")}, 64, seed=7)
    u = np.linspace(0.0, 400.0, 33)[None, :]  # (1, N)
    want = ah.jump_cf(u, **{k: v[:, None] for k, v in p.items()}, xp=np)
    tp = {k: torch.tensor(v[:, None], requires_grad=True) for k, v in p.items()}
    got = ah.jump_cf(torch.tensor(u), **tp, xp=torch)  # (B, N)
    assert got.dtype == torch.complex128 and got.shape == (64, 33)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-15)
    unc = ah.jump_cf_uncompensated(torch.tensor(u, dtype=torch.complex128), **tp, xp=torch)
    want_unc = ah.jump_cf_uncompensated(u, **{k: v[:, None] for k, v in p.items()}, xp=np)
    np.testing.assert_allclose(unc.detach().numpy(), want_unc, rtol=0, atol=1e-15)
    got.real.sum().backward()  # differentiable in the parameters
    for t in tp.values():
        assert t.grad is not None and bool(torch.isfinite(t.grad).all())
    at_minus_i = ah.jump_cf(torch.tensor(-1j), **tp, xp=torch)
    np.testing.assert_allclose(at_minus_i.detach().numpy(), 1.0, atol=1e-15)


def test_heston_cumulants_equal_derivatives_of_the_log_cf() -> None:
    p = sample(HESTON, 400, seed=9)
    c1, c2 = ah.heston_cumulants(**p, xp=np)
    d1, d2 = cumulants_by_differences(ah.heston_log_cf, p)
    np.testing.assert_allclose(c1, d1, rtol=0, atol=1e-11)
    np.testing.assert_allclose(c2, d2, rtol=1e-9)


def test_bates_cumulants_equal_derivatives_of_the_log_cf() -> None:
    p = sample(BATES, 400, seed=10)
    c1, c2 = ah.bates_cumulants(**p, xp=np)
    d1, d2 = cumulants_by_differences(bates_log_cf, p)
    np.testing.assert_allclose(c1, d1, rtol=0, atol=1e-11)
    np.testing.assert_allclose(c2, d2, rtol=1e-9)


def _c2_mpmath(T: float, kappa: float, v0: float, th: float, xi: float, rho: float) -> float:
    """Var(x) from the CIR moments (divided by xi^2), unrearranged, at 50 digits: checks the
    module's series / expm1 rearrangement; the derivation itself is checked against the CF."""
    mpmath.mp.dps = 50
    T, k, v0, th, xi, rho = (mpmath.mpf(x) for x in (T, kappa, v0, th, xi, rho))
    z = k * T
    e = mpmath.exp(-z)
    mean_i = th * T + (v0 - th) * (1 - e) / k
    var_v = v0 * (e - e * e) / k + th * (1 - e) ** 2 / (2 * k)
    cov = v0 * e * (T - (1 - e) / k) / k + th * (1 - mpmath.exp(-2 * z) - 2 * z * e) / (2 * k**2)
    var_i = (
        v0 * (1 - mpmath.exp(-2 * z) - 2 * z * e) / k**3
        + th * (z - mpmath.mpf(5) / 2 + 2 * e + 2 * z * e + mpmath.exp(-2 * z) / 2) / k**3
    )
    a = rho * k - xi / 2
    return float((1 - rho**2) * mean_i + a * a * var_i + 2 * a * rho * cov + rho**2 * var_v)


@pytest.mark.parametrize("kappa", [1e-9, 1e-5, 1e-3, 0.3, 0.999999, 1.000001, 2.0, 5.0, 40.0])
def test_c2_is_accurate_and_positive_for_every_kappa_T(kappa: float) -> None:
    """kappa T spans the series / closed-form switch at 1 and the cancellation-prone small end."""
    for v0, th, xi, rho in [
        (0.04, 0.02, 0.5, -0.7),
        (0.005, 0.5, 1.0, 0.2),
        (0.5, 0.005, 0.1, -0.95),
    ]:
        _, c2 = ah.heston_cumulants(
            T=1.0, r=0.0, d=0.0, v0=v0, kappa=kappa, theta_v=th, xi=xi, rho=rho, xp=np
        )
        assert c2 > 0
        assert c2 == pytest.approx(_c2_mpmath(1.0, kappa, v0, th, xi, rho), rel=1e-14)


def test_cumulants_torch_equal_numpy_and_differentiate() -> None:
    p = sample(BATES, 200, seed=11)
    want = ah.bates_cumulants(**p, xp=np)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    got = ah.bates_cumulants(**tp, xp=torch)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-14, atol=1e-16)
    heston = {k: p[k] for k in HESTON_NAMES}
    for g, w in zip(
        ah.heston_cumulants(**{k: torch.tensor(v) for k, v in heston.items()}, xp=torch),
        ah.heston_cumulants(**heston, xp=np),
        strict=True,
    ):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-14, atol=1e-16)
    got[1].sum().backward()
    h = 1e-6
    for name in ("kappa", "v0", "xi", "rho", "T"):
        up, down = dict(p), dict(p)
        up[name], down[name] = p[name] + h, p[name] - h
        fd = (ah.bates_cumulants(**up, xp=np)[1] - ah.bates_cumulants(**down, xp=np)[1]) / (2 * h)
        grad = tp[name].grad
        assert grad is not None
        np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-6, atol=1e-9)


def test_cumulants_need_no_kappa_and_handle_it_at_zero() -> None:
    c1, c2 = ah.heston_cumulants(
        T=2.0, r=0.01, d=0.0, v0=0.04, kappa=0.0, theta_v=0.3, xi=0.5, rho=-0.5, xp=np
    )
    # kappa = 0: v is a martingale, E[I] = v0 T, and c2 exceeds its (1 - rho^2) E[I] part.
    assert c1 == pytest.approx(0.01 * 2.0 - 0.5 * 0.04 * 2.0, rel=1e-15)
    assert c2 > (1 - 0.25) * 0.08


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("xi", 0.0, "xi must be > 0, got 0.0"),
        ("rho", 1.5, "rho must be in \\[-1, 1\\], got 1.5"),
        ("v0", -0.1, "v0 must be >= 0, got -0.1"),
        ("T", math.nan, "T must be finite, got nan"),
    ],
)
def test_bad_heston_parameters_are_named(name: str, value: float, match: str) -> None:
    p: dict[str, Any] = {k: np.array([0.5 * (lo + hi)]) for k, (lo, hi) in HESTON.items()}
    p[name] = np.array([value])
    with pytest.raises(ValueError, match=match):
        ah.heston_cf(np.array([1.0]), **p)


def test_bad_jump_parameters_are_named_under_torch() -> None:
    with pytest.raises(ValueError, match=re.escape("lam must be >= 0, got -1.0")):
        ah.jump_cf(
            torch.ones(3),
            T=1.0,
            lam=torch.tensor(-1.0, dtype=torch.float64),
            mu_j=0.0,
            sigma_j=0.1,
            xp=torch,
        )
    with pytest.raises(ValueError, match="sigma_j must be a float64 tensor"):
        ah.jump_cf(torch.ones(3), T=1.0, lam=0.1, mu_j=0.0, sigma_j=torch.tensor(0.1), xp=torch)


def test_oracle_rejects_bad_inputs() -> None:
    p = {k: np.array([0.5 * (lo + hi)]) for k, (lo, hi) in HESTON.items()}
    with pytest.raises(ValueError, match="process must be one of"):
        ah.cos_oracle_put("gbm", S0=S0, K=np.array([100.0]), params=p)
    with pytest.raises(ValueError, match="missing \\['lam', 'mu_j', 'sigma_j'\\]"):
        ah.cos_oracle_put("bates", S0=S0, K=np.array([100.0]), params=p)
    with pytest.raises(ValueError, match=re.escape("K must be finite and > 0, got -1.0")):
        ah.cos_oracle_put("heston", S0=S0, K=np.array([-1.0]), params=p)
    with pytest.raises(ValueError, match=re.escape("T must be > 0, got 0.0")):
        ah.cos_oracle_put("heston", S0=S0, K=np.array([100.0]), params={**p, "T": np.zeros(1)})
    with pytest.raises(ValueError, match="L must be finite and > 0"):
        ah.cos_oracle_put("heston", S0=S0, K=np.array([100.0]), params=p, L=-1.0)
