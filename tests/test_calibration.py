"""Calibration (spectral_core.calibration) against an independent oracle.

The surfaces are QuantLib's: AnalyticHestonEngine (Gatheral form, adaptive Gauss-Lobatto at
1e-14) prices of known parameters, turned into Black-Scholes vols. The fitting core is driven by
the exact Heston CF written here in torch (little trap, complex128) on the same truncation rule
and COS sum as the learned network, so a fit must recover the parameters; the learned path is
exercised with a small untrained network (it sits at its Gaussian prior, a fine smooth pricer).
Dates are whole days on Actual/360, so T = days / 360 is exactly QuantLib's year fraction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import QuantLib as ql
import torch

from spectral_core import analytic
from spectral_core.calibration import (
    SurfaceError,
    _Objective,
    _sharing_cumulants,
    _surface,
    calibrate,
    calibrate_spectrum,
)
from spectral_core.config import ArchConfig, Bounds, CoreConfig, SpectrumConfig
from spectral_core.cvnn import build_model
from spectral_core.implied_vol import Kind, implied_vol
from spectral_core.pricer import Contracts, Pricer
from spectral_core.processes import get_process
from spectral_core.processes.domains import GbmDomain, HestonDomain

S0, R, D = 100.0, 0.03, 0.01
DAYS = (90, 180, 360, 540, 720)  # T = 0.25 .. 2
STD_MONEYNESS = (-1.5, -0.75, 0.0, 0.75, 1.5)  # ln(K / F) in units of sqrt(theta_v T)
TRUE = {"v0": 0.05, "kappa": 1.2, "theta_v": 0.08, "xi": 0.5, "rho": -0.6}
NAMES = tuple(TRUE)
# Exact-CF COS on the cumulant interval: at L = 16, N = 512 the series is within 1e-9 of spot
# of QuantLib on these surfaces (1e-4 vol-bp); at the network's L = 10 the tails of a skewed
# law cost ~0.4 vol-bp, which would blur the recovery.
EXACT_L, EXACT_N = 16.0, 512
HESTON = get_process("heston")
Points = dict[str, Any]  # S0, T, K, r, d, vol columns


def quantlib_surface(params: dict[str, float]) -> Points:
    """Points (S0, T, K, r, d, vol) of a Heston surface priced by QuantLib, OTM side."""
    today = ql.Date(2, 1, 2024)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual360()
    rates = ql.YieldTermStructureHandle(ql.FlatForward(today, R, dc, ql.Continuous))
    divs = ql.YieldTermStructureHandle(ql.FlatForward(today, D, dc, ql.Continuous))
    spot = ql.QuoteHandle(ql.SimpleQuote(S0))
    model = ql.HestonModel(ql.HestonProcess(rates, divs, spot, *(params[n] for n in NAMES)))
    engine = ql.AnalyticHestonEngine(model, ql.AnalyticHestonEngine.Gatheral,
                                     ql.FourierIntegration.gaussLobatto(1e-14, 1e-14, 1_000_000))
    T, K, price = [], [], []
    for days in DAYS:
        t = days / 360.0
        fwd = S0 * math.exp((R - D) * t)
        for m in STD_MONEYNESS:
            k = fwd * math.exp(m * math.sqrt(params["theta_v"] * t))
            kind = ql.Option.Call if k >= fwd else ql.Option.Put
            option = ql.VanillaOption(ql.PlainVanillaPayoff(kind, k),
                                      ql.EuropeanExercise(today + days))
            option.setPricingEngine(engine)
            T.append(t)
            K.append(k)
            price.append(option.NPV())
    t_, k_, p_ = np.array(T), np.array(K), np.array(price)
    n = t_.shape[0]
    cols = {"S0": np.full(n, S0), "T": t_, "K": k_, "r": np.full(n, R), "d": np.full(n, D)}
    call = k_ >= S0 * np.exp((R - D) * t_)
    vol = np.empty(n)
    sides: tuple[tuple[Kind, np.ndarray], ...] = (("call", call), ("put", ~call))
    for side, mask in sides:
        vol[mask], _ = implied_vol(p_[mask], **{c: v[mask] for c, v in cols.items()}, kind=side)
    return {**cols, "vol": vol}


def exact_heston_spectrum(theta: torch.Tensor) -> torch.Tensor:
    """F_k = E[exp(i u_k (x - a))] from the little-trap Heston CF, complex128, differentiable."""
    T, r, d, v0, kappa, theta_v, xi, rho = (c[:, None] for c in theta.unbind(dim=1))
    a, b = HESTON.truncation_interval(theta, L=EXACT_L, xp=torch)
    u = torch.arange(EXACT_N, dtype=torch.float64) * (math.pi / (b - a))[:, None]  # (B, N)
    iu = 1j * u
    xi2 = xi * xi
    w = u * u + iu
    beta = kappa - rho * xi * iu
    D_ = torch.sqrt(beta * beta + xi2 * w)
    rm = -xi2 * w / (beta + D_)  # beta - D without the cancellation
    y = torch.expm1(-D_ * T) / (2.0 * D_)
    ry = rm * y
    log_cf = (iu * (r - d) * T + kappa * theta_v / xi2 * (rm * T - 2.0 * torch.log1p(-ry))
              + v0 * w * y / (1.0 - ry))
    return torch.exp(log_cf - iu * a[:, None])


def exact_fit(surface: Points, **kw: Any) -> Any:
    domain = kw.pop("domain", HestonDomain())
    return calibrate_spectrum(exact_heston_spectrum, process=HESTON, domain=domain,
                              truncation_L=EXACT_L, **surface, **kw)


@pytest.fixture(scope="module")
def surface() -> Points:
    return quantlib_surface(TRUE)


@pytest.fixture(scope="module")
def learned() -> Pricer:
    """An untrained small Heston network: the Gaussian prior with the process's cumulants."""
    config = CoreConfig(process="heston", spectrum=SpectrumConfig(n_freq=32, grid=256),
                        arch=ArchConfig(width=16, depth=1))
    model = build_model(config.arch, n_freq=32, truncation_L=config.spectrum.truncation_L,
                        n_features=HESTON.n_features)
    return Pricer(model, config)


def test_recovers_quantlib_parameters(surface: Points) -> None:
    fit = exact_fit(surface)
    # The quotes carry ~1e-4 vol-bp of series error (EXACT_L, EXACT_N); the least
    # well-determined direction (kappa against theta_v over 2 years of expiries) turns that
    # into ~1e-6 relative, so 1e-4 leaves room without letting a wrong minimum through.
    for name, value in TRUE.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4), name
    assert fit.converged, fit.message
    assert fit.rmse_volbp < 1e-3
    assert np.abs(fit.residuals_volbp).max() < 1e-2
    assert fit.failures == ()
    assert fit.hit_bounds == ()
    assert fit.start != TRUE


def test_uniform_weights_recover_the_same_parameters(surface: Points) -> None:
    fit = exact_fit(surface, weights="uniform")
    assert fit.weights == "uniform"
    for name, value in TRUE.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4), name
    assert fit.rmse_volbp < 1e-3


def test_starts_from_the_given_initial_values(surface: Points) -> None:
    start = {"v0": 0.1, "kappa": 3.0, "theta_v": 0.1, "xi": 0.3, "rho": -0.2}
    fit = exact_fit(surface, initial=start)
    assert fit.start == start
    assert fit.params["rho"] == pytest.approx(TRUE["rho"], rel=1e-4)


def test_reports_a_parameter_held_at_its_bound(surface: Points) -> None:
    # the true xi = 0.5 lies above this domain's xi box: the fit must end on xi's upper bound
    narrow = HestonDomain(xi=Bounds(lower=0.1, upper=0.3))
    fit = exact_fit(surface, domain=narrow)
    assert fit.hit_bounds == ("xi",)
    assert fit.params["xi"] == pytest.approx(0.3, abs=1e-12)
    assert fit.rmse_volbp > 1.0  # the surface cannot be matched with xi <= 0.3


def test_fits_gbm_volatility() -> None:
    """Generic over the process: for GBM the only fitted parameter is sigma."""
    gbm = get_process("gbm")

    def spectrum(theta: torch.Tensor) -> torch.Tensor:
        T, r, d, sigma = theta.unbind(dim=1)
        a, b = gbm.truncation_interval(theta, L=10.0, xp=torch)
        u = torch.arange(64, dtype=torch.float64) * (math.pi / (b - a))[:, None]
        return analytic.gbm_shifted_cf(u, a, T=T, r=r, d=d, sigma=sigma)

    T = np.repeat([0.25, 1.0], 3)
    K = np.tile([90.0, 100.0, 110.0], 2)
    fit = calibrate_spectrum(spectrum, process=gbm, domain=GbmDomain(), truncation_L=10.0,
                             S0=100.0, T=T, K=K, r=np.full(6, R), d=np.full(6, D),
                             vol=np.full(6, 0.2))
    assert tuple(fit.params) == ("sigma",)
    # exact data: the last Gauss-Newton step lands ~1e-10 from 0.2, and the next would gain
    # less than FTOL of a cost that is already ~0, so the fit stops there
    assert fit.params["sigma"] == pytest.approx(0.2, abs=1e-8)
    assert fit.rmse_volbp < 1e-4


def test_fewer_points_than_parameters_raise(surface: Points) -> None:
    few = {k: v[:4] for k, v in surface.items()}
    with pytest.raises(SurfaceError, match="4 points cannot determine 5 parameters"):
        exact_fit(few)


def test_expiry_outside_the_domain_names_the_point_and_field(
        surface: Points) -> None:
    bad = dict(surface, T=surface["T"].copy())
    bad["T"][3] = 4.0  # the domain ends at T = 3
    with pytest.raises(ValueError, match=r"points\[3\]\.T = 4\.0 is outside the trained") as exc:
        exact_fit(bad)
    assert isinstance(exc.value, SurfaceError)
    assert (exc.value.field, exc.value.index) == ("T", 3)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("vol", 0.0, r"points\[2\]\.vol = 0\.0 must be > 0"),
    ("K", math.nan, r"points\[2\]\.K = nan is not finite"),
    ("r", 0.5, r"points\[2\]\.r = 0\.5 is outside the trained domain"),
])
def test_invalid_quote_names_the_point(surface: Points, field: str,
                                       value: float, message: str) -> None:
    bad = dict(surface, **{field: surface[field].copy()})
    bad[field][2] = value
    with pytest.raises(SurfaceError, match=message):
        exact_fit(bad)


def test_initial_values_are_checked(surface: Points) -> None:
    with pytest.raises(ValueError, match="unknown parameter 'sigma'"):
        exact_fit(surface, initial={"sigma": 0.2})
    with pytest.raises(ValueError, match=r"initial xi = 2\.0 is outside the trained domain"):
        exact_fit(surface, initial={"xi": 2.0})


def test_learned_fit_is_deterministic(learned: Pricer, surface: Points) -> None:
    first = calibrate(learned, **surface, max_iterations=30)
    second = calibrate(learned, **surface, max_iterations=30)
    assert first.params == second.params  # == on floats: bit for bit
    assert first.residuals_volbp.tobytes() == second.residuals_volbp.tobytes()
    assert first.model_price.tobytes() == second.model_price.tobytes()
    assert (first.nfev, first.njev, first.cost) == (second.nfev, second.njev, second.cost)


def test_learned_prices_are_the_pricers(learned: Pricer, surface: Points) -> None:
    """The calibration's own pass (shared cumulants, batched module) prices as Pricer.price."""
    fit = calibrate(learned, **surface, max_iterations=10)
    n = surface["T"].shape[0]
    cols = {"X0": surface["S0"], "K": surface["K"], "T": surface["T"], "r": surface["r"],
            "d": surface["d"], **{p: np.full(n, v) for p, v in fit.params.items()}}
    served = learned.price(Contracts.from_columns(cols, fields=learned.contract_fields))
    expected = np.where(np.array(fit.kind) == "call", served["call"], served["put"])
    # Pricer.price runs the float32 fast copy of the network, the fit the complex64 module
    np.testing.assert_allclose(fit.model_price, expected, rtol=0, atol=1e-5 * S0)
    assert fit.nfev <= 10


@pytest.mark.parametrize("which", ["exact", "learned"])
def test_row_jacobian_is_the_full_jacobian(which: str, learned: Pricer,
                                           surface: Points) -> None:
    """One backward pass of the summed residuals over per-point parameter copies gives the
    whole Jacobian only because row i depends on row i alone: check against jacrev."""
    domain = learned.config.domain
    lower = np.array([domain.bounds(p).lower for p in NAMES])
    upper = np.array([domain.bounds(p).upper for p in NAMES])
    if which == "exact":
        spectrum, process, L = exact_heston_spectrum, HESTON, EXACT_L
    else:
        process = _sharing_cumulants(HESTON)

        def spectrum(theta: torch.Tensor) -> torch.Tensor:
            features = process.features(theta, domain, check=False)
            return learned.model(features).to(torch.complex128)

        L = learned.config.spectrum.truncation_L
    few = {k: v[::3] for k, v in surface.items()}  # 9 points: jacrev is slow, not the check
    objective = _Objective(spectrum, process, L, _surface(domain, **few), NAMES, lower, upper,
                           "vega")
    x = np.array([0.2, 0.4, 0.3, 0.5, 0.6])
    objective.residuals(x)
    rows = objective.jacobian(x)
    n = few["T"].shape[0]
    full = torch.func.jacrev(lambda v: objective.evaluate(v.expand(n, len(NAMES)))[1])(
        torch.from_numpy(x)).numpy()
    # complex64 module: jacrev's batched backward rounds its float32 products in another order
    tol = 1e-12 if which == "exact" else 1e-5
    np.testing.assert_allclose(rows, full, rtol=tol, atol=tol * np.abs(full).max())
