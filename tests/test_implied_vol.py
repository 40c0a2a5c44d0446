"""Implied vol by Let's Be Rational: it inverts Black-Scholes to ~1e-10 over the domain and
refuses, with a reason, prices that have no implied vol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_core.analytic import bs_call, bs_put
from spectral_core.implied_vol import ABOVE_MAXIMUM, BELOW_INTRINSIC, NO_SOLUTION, implied_vol


@pytest.mark.parametrize("kind", ["put", "call"])
def test_implied_vol_inverts_black_scholes_over_the_domain(kind: str) -> None:
    rng = np.random.default_rng(11)
    n = 2000
    T = rng.uniform(0.02, 5.0, n)
    r = rng.uniform(-0.02, 0.10, n)
    d = rng.uniform(0.0, 0.08, n)
    sigma = rng.uniform(0.05, 1.0, n)
    fwd = 100.0 * np.exp((r - d) * T)
    K = fwd * np.exp(rng.uniform(-2.0, 2.0, n) * sigma * np.sqrt(T))  # +-2 sd of log-moneyness
    price = (bs_put if kind == "put" else bs_call)(S0=100.0, K=K, T=T, r=r, d=d, sigma=sigma)
    vol, reasons = implied_vol(price, S0=100.0, K=K, T=T, r=r, d=d, kind=kind)
    assert all(reason is None for reason in reasons)
    np.testing.assert_allclose(vol, sigma, rtol=0, atol=1e-10)


def test_a_price_below_intrinsic_has_no_vol_and_says_why() -> None:
    intrinsic = math.exp(-0.03) * (110.0 - 100.0 * math.exp(0.02))
    vol, reasons = implied_vol(np.array([intrinsic - 1e-6, 0.0]), S0=100.0,
                               K=np.array([110.0, 100.0]), T=1.0, r=0.03, d=0.01, kind="put")
    assert np.isnan(vol).all()
    assert reasons == [BELOW_INTRINSIC, BELOW_INTRINSIC]


def test_a_price_at_the_upper_bound_has_no_vol_and_says_why() -> None:
    # a call is worth less than the discounted forward; a put less than the discounted strike
    call_cap = 100.0 * math.exp(-0.01)
    put_cap = 110.0 * math.exp(-0.03)
    for kind, cap in (("call", call_cap), ("put", put_cap)):
        vol, reasons = implied_vol(np.array([cap]), S0=100.0, K=110.0, T=1.0, r=0.03, d=0.01,
                                   kind=kind)  # type: ignore[arg-type]
        assert np.isnan(vol[0]) and reasons == [ABOVE_MAXIMUM]


def test_a_vol_is_never_zero() -> None:
    # Far out of the money (F / K = 1e300) a subnormal put price lies within rounding of its
    # intrinsic value 0, where the inversion can only answer 0: that is no vol, with a reason.
    price = np.array([0.5, 1e-310])
    vol, reasons = implied_vol(price, S0=1e300, K=1.0, T=1.0, r=0.0, d=0.0, kind="put")
    assert vol[0] > 0 and reasons[0] is None
    assert (vol[1] > 0 and reasons[1] is None) or (np.isnan(vol[1]) and reasons[1] == NO_SOLUTION)
    assert not (vol == 0.0).any()


def test_non_finite_prices_have_no_vol() -> None:
    vol, reasons = implied_vol(np.array([math.nan]), S0=100.0, K=100.0, T=1.0, r=0.0, d=0.0,
                               kind="call")
    assert np.isnan(vol[0]) and reasons == ["price is not finite"]


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="T must be finite and > 0"):
        implied_vol(np.array([1.0]), S0=100.0, K=100.0, T=0.0, r=0.0, d=0.0, kind="call")
    with pytest.raises(ValueError, match="kind must be"):
        implied_vol(np.array([1.0]), S0=100.0, K=100.0, T=1.0, r=0.0, d=0.0,
                    kind="straddle")  # type: ignore[arg-type]
