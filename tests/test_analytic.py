"""Closed forms against QuantLib's analytic European engine, parity, finite differences, limits."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import QuantLib as ql
import torch
from scipy import integrate, stats

from spectral_core import analytic as an

TODAY = ql.Date(15, 1, 2025)
DAY_COUNT = ql.Actual365Fixed()
GREEK_NAMES = ("delta", "gamma", "vega", "theta", "rho")


@pytest.fixture(autouse=True)
def _evaluation_date() -> Iterator[None]:
    previous = ql.Settings.instance().evaluationDate
    ql.Settings.instance().evaluationDate = TODAY
    yield
    ql.Settings.instance().evaluationDate = previous


def quantlib(
    payoff: str, *, S0: float, K: float, days: int, r: float, d: float, sigma: float
) -> dict[str, float]:
    """Price and greeks from AnalyticEuropeanEngine; T = days / 365 (Actual365Fixed)."""
    rates = ql.YieldTermStructureHandle(ql.FlatForward(TODAY, r, DAY_COUNT, ql.Continuous))
    divs = ql.YieldTermStructureHandle(ql.FlatForward(TODAY, d, DAY_COUNT, ql.Continuous))
    vol = ql.BlackVolTermStructureHandle(
        ql.BlackConstantVol(TODAY, ql.NullCalendar(), sigma, DAY_COUNT)
    )
    process = ql.BlackScholesMertonProcess(ql.QuoteHandle(ql.SimpleQuote(S0)), divs, rates, vol)
    kind = ql.Option.Put if payoff.endswith("put") else ql.Option.Call
    if payoff in ("put", "call"):
        pay = ql.PlainVanillaPayoff(kind, K)
    else:
        pay = ql.CashOrNothingPayoff(kind, K, 1.0)
    option = ql.VanillaOption(pay, ql.EuropeanExercise(TODAY + days))
    option.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    return {
        "price": option.NPV(),
        "delta": option.delta(),
        "gamma": option.gamma(),
        "vega": option.vega(),
        "theta": option.theta(),
        "rho": option.rho(),
    }


def _cases() -> list[tuple[float, float, int, float, float, float]]:
    """(S0, K, days, r, d, sigma): a random spread plus named corners of the default domain."""
    rng = np.random.default_rng(20250115)
    cases = []
    for _ in range(60):
        S0 = float(rng.uniform(20.0, 200.0))
        cases.append(
            (
                S0,
                S0 * math.exp(float(rng.uniform(-1.0, 1.0))),
                int(rng.integers(7, 1826)),
                float(rng.uniform(-0.02, 0.10)),
                float(rng.uniform(0.0, 0.08)),
                float(rng.uniform(0.05, 1.0)),
            )
        )
    cases += [
        (100.0, 100.0, 365, 0.05, 0.02, 0.2),  # at the money
        (100.0, 40.0, 365, 0.03, 0.0, 0.2),  # deep OTM put / deep ITM call
        (100.0, 250.0, 365, 0.03, 0.0, 0.2),  # deep ITM put / deep OTM call
        (100.0, 105.0, 1, 0.10, 0.08, 0.05),  # one day, lowest vol
        (100.0, 90.0, 1825, -0.02, 0.08, 1.0),  # five years, highest vol, negative rate
    ]
    return cases


def _tolerance(payoff: str, name: str, S0: float, K: float, T: float) -> float:
    """Absolute floor of each quantity's natural scale (1e-13 of it) for values near zero."""
    unit = S0 if payoff in ("put", "call") else 1.0
    scale = {
        "price": unit,
        "delta": unit / S0,
        "gamma": unit / S0**2,
        "vega": unit,
        "theta": unit,
        "rho": max(K, S0) * T if payoff in ("put", "call") else T,
    }[name]
    return 1e-13 * scale


@pytest.mark.parametrize("payoff", an.PAYOFFS)
def test_prices_and_greeks_match_quantlib(payoff: str) -> None:
    for S0, K, days, r, d, sigma in _cases():
        T = days / 365.0
        ref = quantlib(payoff, S0=S0, K=K, days=days, r=r, d=d, sigma=sigma)
        ours = {"price": an.bs_price(payoff=payoff, S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)}
        greeks = an.bs_greeks(payoff=payoff, S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)
        ours.update(greeks._asdict())
        for name, value in ours.items():
            tol = 1e-10 * abs(ref[name]) + _tolerance(payoff, name, S0, K, T)
            assert abs(float(value) - ref[name]) <= tol, (payoff, name, S0, K, T, r, d, sigma)


def test_put_call_parity_to_rounding() -> None:
    rng = np.random.default_rng(1)
    n = 10_000
    S0 = rng.uniform(20, 200, n)
    K = S0 * np.exp(rng.uniform(-1, 1, n))
    T, r = rng.uniform(0.02, 5, n), rng.uniform(-0.02, 0.10, n)
    d, sigma = rng.uniform(0, 0.08, n), rng.uniform(0.05, 1.0, n)
    kw = dict(S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)
    parity = S0 * np.exp(-d * T) - K * np.exp(-r * T)
    gap = (an.bs_call(**kw) - an.bs_put(**kw) - parity) / S0
    assert np.max(np.abs(gap)) <= 1e-14
    digitals = an.bs_digital_call(**kw) + an.bs_digital_put(**kw)
    np.testing.assert_allclose(digitals, np.exp(-r * T), rtol=0, atol=4.5e-16)  # 2 ulp


@pytest.mark.parametrize("payoff", an.PAYOFFS)
def test_greeks_match_central_differences(payoff: str) -> None:
    base = dict(S0=100.0, K=95.0, T=0.75, r=0.03, d=0.01, sigma=0.25)

    def price(**over: float) -> float:
        return float(an.bs_price(payoff=payoff, **{**base, **over}))

    def central(name: str, h: float) -> float:
        x = base[name]
        return (price(**{name: x + h}) - price(**{name: x - h})) / (2 * h)

    g = an.bs_greeks(payoff=payoff, **base)
    hs = 1e-2
    gamma_fd = (price(S0=100 + hs) - 2 * price() + price(S0=100 - hs)) / hs**2
    expected = {
        "delta": central("S0", 1e-4),
        "gamma": gamma_fd,
        "vega": central("sigma", 1e-5),
        "theta": -central("T", 1e-6),
        "rho": central("r", 1e-6),
    }
    for name in GREEK_NAMES:
        got = float(getattr(g, name))
        assert got == pytest.approx(expected[name], rel=1e-6, abs=1e-9), (payoff, name)


def test_zero_vol_limit_is_discounted_forward_intrinsic() -> None:
    S0, T, r, d = 100.0, 2.0, 0.04, 0.01
    fwd = S0 * math.exp((r - d) * T)
    df = math.exp(-r * T)
    for K in (80.0, fwd, 130.0):
        kw = dict(S0=S0, K=K, T=T, r=r, d=d, sigma=0.0)
        assert float(an.bs_put(**kw)) == pytest.approx(df * max(K - fwd, 0.0), abs=1e-12)
        assert float(an.bs_call(**kw)) == pytest.approx(df * max(fwd - K, 0.0), abs=1e-12)
        # the sigma -> 0 limit is continuous: a tiny vol gives the same price
        tiny = an.bs_put(**{**kw, "sigma": 1e-12})
        assert float(tiny) == pytest.approx(float(an.bs_put(**kw)), abs=1e-9)
    assert float(an.bs_digital_call(S0=S0, K=80.0, T=T, r=r, d=d, sigma=0.0)) == pytest.approx(df)
    assert float(an.bs_digital_put(S0=S0, K=80.0, T=T, r=r, d=d, sigma=0.0)) == 0.0
    # exactly at the forward the digital is worth half, the limit of N(-sigma sqrt(T) / 2)
    atm = an.bs_digital_call(S0=S0, K=fwd * (1 + 1e-15), T=T, r=r, d=d, sigma=0.0)
    assert float(atm) in (0.0, pytest.approx(0.5 * df))


def test_expiry_limit_is_intrinsic() -> None:
    for K in (90.0, 100.0, 110.0):
        kw = dict(S0=100.0, K=K, r=0.05, d=0.02, sigma=0.3)
        assert float(an.bs_put(T=0.0, **kw)) == max(K - 100.0, 0.0)
        assert float(an.bs_call(T=0.0, **kw)) == max(100.0 - K, 0.0)
        # at T = 1e-12 only the time value S0 sigma sqrt(T) / sqrt(2 pi) at the money is left
        near = float(an.bs_put(T=1e-12, **kw))
        bound = 100.0 * 0.3 * 1e-6 / math.sqrt(2 * math.pi)
        assert near == pytest.approx(max(K - 100.0, 0.0), abs=bound * (1 + 1e-6) + 1e-10)


def test_deep_in_and_out_of_the_money() -> None:
    kw = dict(S0=100.0, T=0.5, r=0.03, d=0.01, sigma=0.2)
    # 8.6 standard deviations out: the N(-d) forms keep full relative accuracy (no cancellation)
    deep_otm_put = float(an.bs_put(K=30.0, **kw))
    mean, sd = (0.03 - 0.01 - 0.02) * 0.5, 0.2 * math.sqrt(0.5)
    top = math.log(0.3)
    ref, _ = integrate.quad(
        lambda x: (30.0 - 100.0 * math.exp(x)) * stats.norm.pdf(x, mean, sd),
        top - 4 * sd, top, epsabs=0.0, epsrel=1e-13, limit=200,
    )
    assert deep_otm_put == pytest.approx(math.exp(-0.03 * 0.5) * ref, rel=1e-9)
    deep_itm_put = float(an.bs_put(K=300.0, **kw))
    forward_value = 300.0 * math.exp(-0.03 * 0.5) - 100.0 * math.exp(-0.01 * 0.5)
    assert deep_itm_put == pytest.approx(forward_value, rel=1e-14)
    g = an.bs_greeks(payoff="put", K=300.0, **kw)
    assert float(g.delta) == pytest.approx(-math.exp(-0.01 * 0.5), rel=1e-14)
    assert 0.0 <= float(g.gamma) < 1e-12


def test_torch_variant_matches_numpy_and_autograd_matches_greeks() -> None:
    rng = np.random.default_rng(7)
    n = 64
    cols = {
        "S0": rng.uniform(50, 150, n),
        "K": rng.uniform(50, 150, n),
        "T": rng.uniform(0.02, 5, n),
        "r": rng.uniform(-0.02, 0.1, n),
        "d": rng.uniform(0, 0.08, n),
        "sigma": rng.uniform(0.05, 1, n),
    }
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in cols.items()}
    for payoff in an.PAYOFFS:
        price_t = an.bs_price(payoff=payoff, **t)
        price_np = an.bs_price(payoff=payoff, **cols)
        np.testing.assert_allclose(price_t.detach().numpy(), price_np, rtol=1e-13, atol=1e-13)
        grads = torch.autograd.grad(price_t.sum(), (t["S0"], t["sigma"], t["T"], t["r"]))
        g = an.bs_greeks(payoff=payoff, **cols)
        for got, want in zip(grads, (g.delta, g.vega, -g.theta, g.rho), strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_lognormal_quantile_and_cdf_are_inverse() -> None:
    p = np.array([1e-6, 0.01, 0.3, 0.5, 0.9, 0.999999])
    kw = dict(S0=100.0, T=1.5, r=0.02, d=0.01, sigma=0.35)
    q = an.lognormal_quantile(p=p, **kw)
    np.testing.assert_allclose(an.lognormal_cdf(s=q, **kw), p, rtol=1e-12)
    mean = math.log(100.0) + (0.02 - 0.01 - 0.5 * 0.35**2) * 1.5
    ref = stats.lognorm.ppf(p, s=0.35 * math.sqrt(1.5), scale=math.exp(mean))
    np.testing.assert_allclose(q, ref, rtol=1e-12)


def test_gbm_cf_and_shifted_cf() -> None:
    T, r, d, sigma = 1.3, 0.04, 0.015, 0.3
    u = np.linspace(0.0, 12.0, 25)
    phi = an.gbm_cf(u, T=T, r=r, d=d, sigma=sigma)
    assert phi.dtype == np.complex128
    # against the normal law's moment generating function evaluated by quadrature
    mean, sd = (r - d - 0.5 * sigma**2) * T, sigma * math.sqrt(T)
    x = np.linspace(mean - 12 * sd, mean + 12 * sd, 20001)
    w = stats.norm.pdf(x, mean, sd) * (x[1] - x[0])
    direct = (np.exp(1j * u[:, None] * x[None, :]) * w[None, :]).sum(axis=1)
    np.testing.assert_allclose(phi, direct, rtol=0, atol=1e-12)
    a = np.array([-1.0, 0.25])
    uu = np.stack([u, 2 * u])
    shifted = an.gbm_shifted_cf(uu, a, T=np.full(2, T), r=np.full(2, r), d=np.full(2, d),
                                sigma=np.full(2, sigma))
    assert shifted.shape == (2, 25)
    want = np.exp(-1j * uu * a[:, None]) * an.gbm_cf(uu, T=T, r=r, d=d, sigma=sigma)
    np.testing.assert_allclose(shifted, want, rtol=1e-13, atol=1e-15)


def test_terminal_moments_match_scipy_lognormal() -> None:
    S0, T, r, d, sigma = 80.0, 2.0, 0.03, 0.01, 0.4
    m = an.gbm_terminal_moments(S0=S0, T=T, r=r, d=d, sigma=sigma)
    mean = math.log(S0) + (r - d - 0.5 * sigma**2) * T
    dist = stats.lognorm(s=sigma * math.sqrt(T), scale=math.exp(mean))
    ref_mean, ref_var, ref_skew, ref_kurt = dist.stats(moments="mvsk")
    got = (m.mean, m.variance, m.skewness, m.excess_kurtosis)
    np.testing.assert_allclose(got, (ref_mean, ref_var, ref_skew, ref_kurt), rtol=1e-12)
    x = an.gbm_log_return_moments(T=T, r=r, d=d, sigma=sigma)
    assert (float(x.mean), float(x.variance)) == pytest.approx(
        ((r - d - 0.5 * sigma**2) * T, sigma**2 * T), rel=1e-15
    )


def test_value_at_risk_and_expected_shortfall_against_quadrature() -> None:
    kw = dict(S0=100.0, T=0.5, r=0.02, d=0.0, sigma=0.3)
    alpha = 0.99
    var = float(an.gbm_value_at_risk(alpha=alpha, **kw))
    es = float(an.gbm_expected_shortfall(alpha=alpha, **kw))
    q = float(an.lognormal_quantile(p=1 - alpha, **kw))
    assert var == pytest.approx(100.0 - q, rel=1e-14)
    mean = (0.02 - 0.5 * 0.09) * 0.5
    sd = 0.3 * math.sqrt(0.5)
    partial, _ = integrate.quad(
        lambda x: 100.0 * math.exp(x) * stats.norm.pdf(x, mean, sd),
        mean - 14 * sd, math.log(q / 100.0), epsabs=0.0, epsrel=1e-13, limit=200,
    )
    assert es == pytest.approx(100.0 - partial / (1 - alpha), rel=1e-11)
    assert es > var


@pytest.mark.parametrize(
    ("field", "value"),
    [("S0", -1.0), ("K", 0.0), ("T", -0.1), ("sigma", -0.2), ("r", math.nan)],
)
def test_bad_inputs_raise_naming_the_field(field: str, value: float) -> None:
    kw = dict(S0=100.0, K=100.0, T=1.0, r=0.01, d=0.0, sigma=0.2)
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        an.bs_put(**kw)


def test_greeks_refuse_zero_vol_and_unknown_payoff() -> None:
    with pytest.raises(ValueError, match="sigma"):
        an.bs_greeks(payoff="put", S0=100.0, K=100.0, T=1.0, r=0.0, d=0.0, sigma=0.0)
    with pytest.raises(ValueError, match="payoff"):
        an.bs_price(payoff="straddle", S0=100.0, K=100.0, T=1.0, r=0.0, d=0.0, sigma=0.2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must be"):
        an.lognormal_quantile(p=1.0, S0=100.0, T=1.0, r=0.0, d=0.0, sigma=0.2)
    with pytest.raises(ValueError, match="float64"):
        an.bs_put(S0=torch.tensor([100.0]), K=100.0, T=1.0, r=0.0, d=0.0, sigma=0.2)
