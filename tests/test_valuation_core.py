"""spectral_core.valuation: the book maths on columns equal the scalar Python formulas bit for
bit (libm's exp and log, the IEEE order of the expression), overflow included, and the
column helpers (bumps, slopes, scenario shifts, totals) do what the valuation relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_core.valuation import (
    exact_total,
    forwards,
    log_moneyness,
    positions,
    shift_columns,
    strike_bumps,
    strike_slopes,
)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _forward_scalar(S: float, T: float, r: float, d: float, K: float) -> tuple[float, ...]:
    df = _exp(-r * T)
    fwd = S * _exp((r - d) * T)
    carry = S * _exp(-d * T)
    return (df * fwd - df * K, _exp(-d * T), d * carry - r * K * df, T * K * df)


def _random_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "S": rng.uniform(1.0, 1e4, n),
        "T": rng.uniform(1e-4, 30.0, n),
        "r": rng.uniform(-0.05, 0.2, n),
        "d": rng.uniform(0.0, 0.1, n),
        "K": rng.uniform(1e-2, 2e4, n),
    }


def test_forwards_equal_the_scalar_formula_bit_for_bit() -> None:
    x = _random_inputs(20_000, seed=1)
    # overflow corners: exp((r - d) T) and exp(-r T) beyond the float range, and a huge strike
    extra = {"S": [100.0, 100.0, 1e300], "T": [30.0, 30.0, 1.0], "r": [50.0, -50.0, 0.0],
             "d": [0.0, 0.0, 0.0], "K": [100.0, 1e300, 1e300]}
    cols = {k: np.concatenate([v, np.asarray(extra[k])]) for k, v in x.items()}
    price, greeks = forwards(**cols)
    want = np.array([_forward_scalar(*(float(cols[k][i]) for k in ("S", "T", "r", "d", "K")))
                     for i in range(price.shape[0])])
    for j, got in enumerate((price, greeks["delta"], greeks["theta"], greeks["rho"])):
        assert got.tobytes() == want[:, j].tobytes(), j
    assert not np.isfinite(price[-3:]).all()  # the corners give inf or NaN, never raise


def test_log_moneyness_equals_math_log_bit_for_bit() -> None:
    x = _random_inputs(20_000, seed=2)
    got = log_moneyness(K=x["K"], S=x["S"], r=x["r"], q=x["d"], T=x["T"])
    want = np.array([math.log(k) - math.log(s) - (r - q) * t
                     for k, s, r, q, t in zip(x["K"], x["S"], x["r"], x["d"], x["T"],
                                              strict=True)])
    assert got.tobytes() == want.tobytes()
    # scalars broadcast; a strike of 0 gives -inf (the caller re-runs such a point to raise)
    assert log_moneyness(K=[0.0, 1.0], S=1.0, r=0.0, q=0.0, T=1.0).tolist() == [-math.inf, 0.0]


def test_strike_bumps_refuse_vanishing_and_overflowing_bumps() -> None:
    K = np.array([100.0, 5e-324, np.finfo(np.float64).max])
    up, down, ok = strike_bumps(K, bump=1e-4)
    assert ok.tolist() == [True, False, False]
    assert up[0] == 100.0 + 1e-2 and down[0] == 100.0 - 1e-2
    slopes = strike_slopes({"delta": np.array([3.0])}, {"delta": np.array([1.0])},
                           k_up=up[:1], k_down=down[:1], sign=-1.0)
    assert slopes["delta"][0] == -2.0 / (up[0] - down[0])


def test_shift_columns_stacks_scenarios_scenario_major() -> None:
    cols = {"X0": np.array([100.0, 50.0]), "r": np.array([0.01, 0.02]),
            "v0": np.array([0.04, 0.09]), "kappa": np.array([1.0, 2.0])}
    out = shift_columns(cols, spot_rel=np.array([0.0, -0.1]), rate_abs=np.array([0.0, 0.01]),
                        vol_abs=np.array([0.5, 0.5]), v0_abs=np.array([0.0, 0.01]))
    assert out["X0"].tolist() == [100.0, 50.0, 100.0 * 0.9, 50.0 * 0.9]
    assert out["r"].tolist() == [0.01, 0.02, 0.01 + 0.01, 0.02 + 0.01]
    assert out["v0"].tolist() == [0.04, 0.09, 0.04 + 0.01, 0.09 + 0.01]
    assert out["kappa"].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert "v" not in out  # vol_abs shifts only a column the model has


def test_exact_total_is_order_free_and_null_when_not_finite() -> None:
    xs = np.array([1e16, 1.0, -1e16, 1.0])
    assert exact_total(xs) == 2.0 == exact_total(xs[::-1])
    assert math.isnan(exact_total(np.array([1.7e308, 1.7e308])))  # fsum overflows: null
    assert math.isnan(exact_total(np.array([math.inf, -math.inf])))
    assert positions(np.array([2.0, 1e300]), np.array([3.0, 1e300])).tolist() == [6.0, math.inf]


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_columns(n: int) -> None:
    x = {k: v[:n] for k, v in _random_inputs(1, seed=3).items()}
    price, greeks = forwards(**x)
    assert price.shape == (n,) and all(g.shape == (n,) for g in greeks.values())
