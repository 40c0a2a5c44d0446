"""Pricer: COS plumbing exact against Black-Scholes with an exact spectrum, autograd greeks,
metrics, domain refusals, and batch-invariant (reproducible) pricing with a trained network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_core import analytic
from spectral_core.config import CoreConfig
from spectral_core.cvnn import ComplexModule, feature_bounds
from spectral_core.pricer import Contracts, DomainError, Pricer, unique_rows
from spectral_core.spectrum import truncation_interval
from spectral_core.trainer import Trainer
from tests.core_fixtures import tiny_config


class ExactGbmSpectrum(ComplexModule):
    """Stands in for the network: maps the features back to theta and returns the analytic F_k.

    It checks the pricer's plumbing (features, interval, COS, parity, autograd) to closed-form
    precision, separately from how well any network learned.
    """

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        self.config = config
        lo, hi = feature_bounds(config.domain)
        self.lo = torch.tensor(lo[:4], dtype=torch.float64)
        self.hi = torch.tensor(hi[:4], dtype=torch.float64)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo.to(features.dtype), self.hi.to(features.dtype)
        theta = (features[:, :4] + 1.0) / 2.0 * (hi - lo) + lo
        T, r, d, sigma = theta.unbind(-1)
        a, b = truncation_interval(T, r, d, sigma, L=self.config.spectrum.truncation_L, xp=torch)
        k = torch.arange(self.config.spectrum.n_freq, dtype=features.dtype)
        u = k[None, :] * torch.pi / (b - a)[:, None]
        return analytic.gbm_shifted_cf(u, a, T=T, r=r, d=d, sigma=sigma)


def contracts(n: int, seed: int = 3) -> Contracts:
    rng = np.random.default_rng(seed)
    T = rng.uniform(0.05, 4.5, n)
    r = rng.uniform(-0.01, 0.09, n)
    d = rng.uniform(0.0, 0.07, n)
    v = rng.uniform(0.08, 0.9, n)
    X0 = rng.uniform(50, 150, n)
    K = X0 * np.exp((r - d) * T) * rng.uniform(0.7, 1.3, n)
    return Contracts(X0=X0, K=K, T=T, r=r, d=d, v=v)


@pytest.fixture(scope="module")
def exact_pricer() -> Pricer:
    cfg = CoreConfig()
    return Pricer(ExactGbmSpectrum(cfg), cfg, reproducible=True)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained_snapshot():  # type: ignore[no-untyped-def]
    with Trainer(tiny_config()) as tr:
        tr.train(steps=40)
        return tr.snapshot()


def test_prices_match_black_scholes_with_exact_spectrum(exact_pricer: Pricer) -> None:
    c = contracts(200)
    out = exact_pricer.price(c)
    kw = dict(S0=c.X0, K=c.K, T=c.T, r=c.r, d=c.d, sigma=c.v)
    for key, fn in (
        ("put", analytic.bs_put),
        ("call", analytic.bs_call),
        ("digital_call", analytic.bs_digital_call),
        ("digital_put", analytic.bs_digital_put),
    ):
        np.testing.assert_allclose(
            out[key] / c.X0, fn(**kw) / c.X0, rtol=0, atol=1e-10, err_msg=key
        )
    fwd = c.X0 * np.exp((c.r - c.d) * c.T)
    disc = np.exp(-c.r * c.T)
    np.testing.assert_allclose(
        out["call"] - out["put"], disc * (fwd - c.K), rtol=0, atol=1e-12 * c.X0.max()
    )
    np.testing.assert_allclose(
        out["put_convexity"], out["put"] - out["put_intrinsic"], rtol=0, atol=0
    )
    assert (out["put_convexity"] > -1e-10).all() and (out["call_convexity"] > -1e-10).all()


def test_autograd_greeks_match_closed_forms(exact_pricer: Pricer) -> None:
    c = contracts(50, seed=5)
    out = exact_pricer.price(c, greeks=True)
    for payoff in ("put", "call"):
        g = analytic.bs_greeks(payoff=payoff, S0=c.X0, K=c.K, T=c.T, r=c.r, d=c.d, sigma=c.v)
        for name in ("delta", "gamma", "vega", "theta", "rho"):
            want = getattr(g, name)
            np.testing.assert_allclose(
                out[f"{payoff}_{name}"],
                want,
                rtol=1e-7,
                atol=1e-8 * c.X0.max(),
                err_msg=f"{payoff}_{name}",
            )


def test_distribution_metrics_match_lognormal(exact_pricer: Pricer) -> None:
    c = contracts(40, seed=9)
    c = Contracts(X0=c.X0, K=c.K, T=np.minimum(c.T, 1.0), r=c.r, d=c.d, v=np.minimum(c.v, 0.4))
    out = exact_pricer.price(c, metrics=True)
    for p in (0.01, 0.05, 0.5, 0.95, 0.99):
        q = analytic.lognormal_quantile(p=p, S0=c.X0, T=c.T, r=c.r, d=c.d, sigma=c.v)
        np.testing.assert_allclose(out[f"ST_q{round(p * 100):02d}"], q, rtol=1e-8)
    var99 = analytic.gbm_value_at_risk(alpha=0.99, S0=c.X0, T=c.T, r=c.r, d=c.d, sigma=c.v)
    np.testing.assert_allclose(out["var99"], var99, rtol=0, atol=1e-9 * c.X0.max())
    np.testing.assert_allclose(out["ST_mean"], c.X0 * np.exp((c.r - c.d) * c.T), rtol=1e-9)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("T", 7.0, r"contracts\[3\]\.T = 7\.0 is outside the trained domain \[0\.02, 5\.0\]"),
        ("v", 0.01, r"contracts\[3\]\.v = 0\.01 is outside the trained domain \[0\.05, 1\.0\]"),
        ("r", 0.5, r"contracts\[3\]\.r"),
        ("d", -0.1, r"contracts\[3\]\.d"),
        ("X0", -1.0, r"contracts\[3\]\.X0 = -1\.0"),
        ("K", float("nan"), r"contracts\[3\]\.K = nan"),
    ],
)
def test_out_of_domain_is_refused_naming_field_and_bounds(
    exact_pricer: Pricer, field: str, value: float, message: str
) -> None:
    c = contracts(6)
    arr = getattr(c, field).copy()
    arr[3] = value
    bad = Contracts(**{**c.__dict__, field: arr})
    with pytest.raises(DomainError, match=message) as info:
        exact_pricer.price(bad)
    assert info.value.field == field and info.value.index == 3


def test_contract_columns_are_validated() -> None:
    with pytest.raises(ValueError, match="missing contract field 'v'"):
        Contracts.from_columns({"X0": 1, "K": 1, "T": 1, "r": 0, "d": 0})
    with pytest.raises(ValueError, match="different lengths"):
        Contracts.from_columns({"X0": [1, 2], "K": 1, "T": 1, "r": 0, "d": 0, "v": 0.2})


def test_reproducible_pricing_is_batch_invariant(trained_snapshot) -> None:  # type: ignore[no-untyped-def]
    pricer = Pricer.from_snapshot(trained_snapshot, reproducible=True)
    c = contracts(60, seed=11)
    full = pricer.price(c, greeks=True)
    for lo, hi in ((0, 1), (5, 22), (30, 60), (17, 18)):
        part = Contracts(**{k: v[lo:hi] for k, v in c.__dict__.items()})
        sub = pricer.price(part, greeks=True)
        for key in full:
            assert full[key][lo:hi].tobytes() == sub[key].tobytes(), (key, lo, hi)


def test_unique_rows_matches_bit_for_bit() -> None:
    x = np.array([[1.0, 2.0], [0.0, 2.0], [1.0, 2.0], [-0.0, 2.0], [0.0, 2.0]])
    first, inverse = unique_rows(x)
    assert x[first][inverse].tobytes() == x.tobytes()
    assert len(first) == 3  # 0.0 and -0.0 are different rows
    assert inverse[0] == inverse[2] and inverse[1] == inverse[4] != inverse[3]


def test_unique_rows_survives_a_hash_collision() -> None:
    # Two different rows built to share the row hash: the word-for-word check must catch it
    # and the exact sort keep them apart.
    from spectral_core.pricer import _ROW_HASH

    m0, m1 = (int(v) for v in _ROW_HASH[:2])
    mod = 1 << 64
    w = np.array([[1, 2], [2, (2 - m0 * pow(m1, -1, mod)) % mod], [1, 2]], dtype=np.uint64)
    x = w.view(np.float64)
    with np.errstate(over="ignore"):
        h = (w * _ROW_HASH[:2]).sum(axis=1, dtype=np.uint64)
    assert h[0] == h[1]  # the collision is real
    first, inverse = unique_rows(x)
    assert len(first) == 2 and x[first][inverse].tobytes() == x.tobytes()
    assert inverse[0] == inverse[2] != inverse[1]


def test_rows_sharing_theta_price_as_they_do_alone(trained_snapshot) -> None:  # type: ignore[no-untyped-def]
    # The network runs once per distinct theta (T, r, d, v): a batch of many strikes and spots
    # on few thetas gives every row the bytes it has priced alone, -0.0 and 0.0 rates included.
    pricer = Pricer.from_snapshot(trained_snapshot, reproducible=True)
    base = contracts(4, seed=5)
    pick = np.array([0, 1, 0, 2, 1, 0, 3, 3, 2, 0])
    rng = np.random.default_rng(8)
    r = base.r[pick].copy()
    r[[0, 2]] = 0.0
    r[5] = -0.0
    c = Contracts(X0=rng.uniform(80, 120, 10), K=rng.uniform(70, 130, 10), T=base.T[pick], r=r,
                  d=base.d[pick], v=base.v[pick])
    together = pricer.price(c, metrics=True)
    for i in range(10):
        alone = pricer.price(Contracts(**{k: v[i:i + 1] for k, v in c.__dict__.items()}),
                             metrics=True)
        for key in together:
            assert together[key][i:i + 1].tobytes() == alone[key].tobytes(), (key, i)


def test_fast_and_reproducible_modes_agree(trained_snapshot) -> None:  # type: ignore[no-untyped-def]
    fast = Pricer.from_snapshot(trained_snapshot)
    exact = Pricer.from_snapshot(trained_snapshot, reproducible=True)
    c = contracts(100, seed=2)
    c = Contracts(X0=c.X0, K=c.K, T=c.T, r=c.r, d=c.d, v=c.v)
    a, b = fast.price(c)["put"], exact.price(c)["put"]
    # complex64 vs complex128 evaluation of the same weights: float32 rounding, in bp of spot
    assert np.max(np.abs(a - b) / c.X0) < 1e-5
