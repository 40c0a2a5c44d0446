"""COS inversion with the analytic GBM CF against Black-Scholes and lognormal closed forms."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from spectral_core import analytic as an
from spectral_core import cos
from spectral_core.spectrum import frequencies, truncation_interval

N_FREQ, L = 64, 10.0


class Market(NamedTuple):
    S0: torch.Tensor
    K: torch.Tensor
    T: torch.Tensor
    r: torch.Tensor
    d: torch.Tensor
    sigma: torch.Tensor

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self._asdict().items()}


class Spec(NamedTuple):
    F: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def market(**cols: np.ndarray | list[float]) -> Market:
    n = max(np.size(v) for v in cols.values())
    return Market(
        **{
            k: torch.tensor(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy())
            for k, v in cols.items()
        }
    )


def spectrum_of(m: Market, *, n_freq: int = N_FREQ) -> Spec:
    """Analytic shifted GBM CF on the truncation interval: differentiable in T, r, d, sigma."""
    a, b = truncation_interval(m.T, m.r, m.d, m.sigma, L=L, xp=torch)
    u = frequencies(a, b, n_freq=n_freq, xp=torch)
    return Spec(an.gbm_shifted_cf(u, a, T=m.T, r=m.r, d=m.d, sigma=m.sigma), a, b)


def price(payoff: str, m: Market, s: Spec) -> torch.Tensor:
    kw = dict(S0=m.S0, K=m.K, r=m.r, T=m.T)
    if payoff == "call":
        kw["d"] = m.d
    return getattr(cos, payoff)(*s, **kw)


def grid_market() -> Market:
    """A product grid over the default domain, strikes 0.7..1.3 x forward."""
    rows = list(
        itertools.product(
            (0.02, 0.1, 0.5, 1.0, 2.5, 5.0),
            (-0.02, 0.04, 0.10),
            (0.0, 0.04, 0.08),
            (0.05, 0.2, 0.5, 1.0),
            (0.7, 0.85, 1.0, 1.15, 1.3),
        )
    )
    T, r, d, sigma, mny = (np.array(c) for c in zip(*rows, strict=True))
    S0 = np.full(T.shape, 100.0)
    return market(S0=S0, K=mny * S0 * np.exp((r - d) * T), T=T, r=r, d=d, sigma=sigma)


def random_market(n: int, seed: int) -> Market:
    rng = np.random.default_rng(seed)
    T, r = rng.uniform(0.02, 5, n), rng.uniform(-0.02, 0.10, n)
    d, sigma = rng.uniform(0, 0.08, n), rng.uniform(0.05, 1.0, n)
    S0 = rng.uniform(20, 200, n)
    K = S0 * np.exp((r - d) * T) * rng.uniform(0.7, 1.3, n)
    return market(S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)


def assert_matches_black_scholes(m: Market, *, tol: float = 1e-10) -> None:
    s = spectrum_of(m)
    ref = m.numpy()
    for payoff in an.PAYOFFS:
        got = price(payoff, m, s).numpy()
        want = an.bs_price(payoff=payoff, **ref)
        unit = ref["S0"] if payoff in ("put", "call") else 1.0  # digitals pay 1
        err = np.abs(got - want) / unit
        assert err.max() <= tol, (payoff, err.max(), int(err.argmax()))


def test_prices_match_black_scholes_over_the_default_domain_grid() -> None:
    assert_matches_black_scholes(grid_market())


def test_prices_match_black_scholes_on_random_contracts() -> None:
    assert_matches_black_scholes(random_market(2000, 1))


def test_deep_in_and_out_of_the_money() -> None:
    mny = np.array([0.2, 0.4, 2.5, 5.0])
    T, r, d, sigma = 1.0, 0.03, 0.01, 0.25
    S0 = 100.0
    assert_matches_black_scholes(
        market(S0=S0, K=mny * S0 * math.exp((r - d) * T), T=T, r=r, d=d, sigma=sigma)
    )


def test_strike_beyond_the_interval_is_clipped() -> None:
    """Short, low-vol contract: [a, b] spans only +-7% so 1.3x forward lies beyond b."""
    m = market(S0=100.0, K=[60.0, 140.0], T=0.02, r=0.01, d=0.0, sigma=0.05)
    s = spectrum_of(m)
    assert float(torch.log(m.K[1] / m.S0[1])) > float(s.b[1])
    assert float(torch.log(m.K[0] / m.S0[0])) < float(s.a[0])
    assert_matches_black_scholes(m)


def test_tiny_expiry() -> None:
    m = market(S0=100.0, K=[95.0, 100.0, 100.2, 105.0], T=1e-4, r=0.05, d=0.02, sigma=0.3)
    assert_matches_black_scholes(m)


def test_high_volatility() -> None:
    """sigma sqrt(T) = 4.5: e^b ~ 1e19, so a direct COS call would be noise; parity is not."""
    m = market(S0=100.0, K=[50.0, 100.0, 200.0], T=5.0, r=0.05, d=0.0, sigma=2.0)
    assert_matches_black_scholes(m)


def test_call_by_parity_matches_a_direct_cos_call_on_moderate_intervals() -> None:
    """Direct COS call, V_k = 2/(b-a) (S0 chi_k(x*, b) - K psi_k(x*, b)), from DESIGN.md."""
    m = random_market(200, 2)
    keep = (m.sigma * torch.sqrt(m.T)) < 0.6
    m = Market(*(v[keep] for v in m))
    F, a, b = spectrum_of(m)
    u = frequencies(a, b, n_freq=N_FREQ, xp=torch)  # (B, N)
    lo = torch.clamp(torch.log(m.K / m.S0), min=a, max=b)[:, None]
    a2, b2 = a[:, None], b[:, None]
    chi = (
        torch.cos(u * (b2 - a2)) * torch.exp(b2) - torch.cos(u * (lo - a2)) * torch.exp(lo)
        + u * torch.sin(u * (b2 - a2)) * torch.exp(b2)
        - u * torch.sin(u * (lo - a2)) * torch.exp(lo)
    ) / (1 + u * u)
    psi = torch.empty_like(u)
    psi[:, 0] = (b2 - lo)[:, 0]
    psi[:, 1:] = (torch.sin(u[:, 1:] * (b2 - a2)) - torch.sin(u[:, 1:] * (lo - a2))) / u[:, 1:]
    V = 2 / (b2 - a2) * (m.S0[:, None] * chi - m.K[:, None] * psi)
    weight = torch.ones(N_FREQ, dtype=torch.float64)
    weight[0] = 0.5
    direct = torch.exp(-m.r * m.T) * (F.real * weight * V).sum(dim=1)
    by_parity = price("call", m, Spec(F, a, b))
    assert ((direct - by_parity).abs() / m.S0).max() <= 1e-12


def test_parity_of_puts_calls_and_digitals_to_rounding() -> None:
    m = random_market(1000, 3)
    s = spectrum_of(m)
    gap = price("call", m, s) - price("put", m, s)
    parity = m.S0 * torch.exp(-m.d * m.T) - m.K * torch.exp(-m.r * m.T)
    assert ((gap - parity).abs() / m.S0).max() <= 1e-14
    digitals = price("digital_call", m, s) + price("digital_put", m, s)
    assert (digitals - torch.exp(-m.r * m.T)).abs().max() <= 1e-15


def test_several_strikes_per_contract() -> None:
    m = random_market(50, 4)
    s = spectrum_of(m)
    strikes = m.S0[:, None] * torch.tensor([0.8, 1.0, 1.25], dtype=torch.float64)  # (B, 3)
    for payoff in an.PAYOFFS:
        kw = dict(S0=m.S0, r=m.r, T=m.T)
        if payoff == "call":
            kw["d"] = m.d
        fn = getattr(cos, payoff)
        many = fn(*s, K=strikes, **kw)
        assert many.shape == (50, 3)
        for j in range(3):
            one = fn(*s, K=strikes[:, j].contiguous(), **kw)
            torch.testing.assert_close(many[:, j], one, rtol=0, atol=1e-13)


def test_cdf_and_density_match_the_normal_law_of_x() -> None:
    m = random_market(500, 5)
    s = spectrum_of(m)
    mean = ((m.r - m.d - 0.5 * m.sigma**2) * m.T).numpy()
    sd = (m.sigma * torch.sqrt(m.T)).numpy()
    z = np.linspace(-6, 6, 13)
    y = torch.tensor(mean[:, None] + sd[:, None] * z[None, :])  # (B, 13)
    from scipy import stats

    got = cos.cdf(*s, y=y).numpy()
    np.testing.assert_allclose(got, np.broadcast_to(stats.norm.cdf(z), got.shape), atol=1e-12)
    dens = cos.density(*s, y=y).numpy()
    want = stats.norm.pdf(z)[None, :] / sd[:, None]
    np.testing.assert_allclose(dens * sd[:, None], want * sd[:, None], atol=1e-12)
    # outside [a, b] the CDF is 0 (exactly) or 1 (to rounding of sin(k pi))
    ends = cos.cdf(*s, y=torch.stack([s.a - 1.0, s.b + 1.0], dim=1)).numpy()
    np.testing.assert_array_equal(ends[:, 0], 0.0)
    np.testing.assert_allclose(ends[:, 1], 1.0, rtol=0, atol=1e-15)


def test_quantiles_match_the_lognormal_closed_form() -> None:
    m = random_market(500, 6)
    s = spectrum_of(m)
    p = torch.tensor([1e-4, 0.01, 0.05, 0.5, 0.95, 0.99, 0.9999], dtype=torch.float64)
    got = cos.quantile(*s, S0=m.S0, p=p.expand(500, -1).contiguous())
    ref = m.numpy()
    want = an.lognormal_quantile(
        p=p.numpy()[None, :],
        **{k: ref[k][:, None] for k in ("S0", "T", "r", "d", "sigma")},
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8)
    # a Python float level is the same level for every contract
    np.testing.assert_allclose(cos.quantile(*s, S0=m.S0, p=0.05).numpy(), want[:, 2], rtol=1e-8)


def test_quantile_is_robust_to_a_noisy_non_monotone_spectrum() -> None:
    """A learned spectrum is noisy: its COS density goes negative in the tails. The solver must
    still return a level where the COS CDF crosses p, inside [a, b]."""
    m = random_market(200, 7)
    F, a, b = spectrum_of(m)
    gen = torch.Generator().manual_seed(0)
    noise = 3e-3 * torch.randn(F.shape, generator=gen, dtype=torch.float64)
    noisy = F + noise.to(torch.complex128)
    noisy[:, 0] = 1.0
    p = torch.full((200,), 0.02, dtype=torch.float64)
    q = cos.quantile(noisy, a, b, S0=m.S0, p=p)
    y = torch.log(q / m.S0)
    assert ((y >= a) & (y <= b)).all()
    step = 1e-9 * (b - a)
    below = cos.cdf(noisy, a, b, y=y - step)
    above = cos.cdf(noisy, a, b, y=y + step)
    assert ((below <= p + 1e-12) & (above >= p - 1e-12)).all()


def test_log_return_moments() -> None:
    m = random_market(500, 8)
    got = cos.moments_log_return(*spectrum_of(m))
    want = an.gbm_log_return_moments(**{k: v for k, v in m.numpy().items() if k not in ("S0", "K")})
    sd = (m.sigma * torch.sqrt(m.T)).numpy()
    np.testing.assert_allclose((got.mean.numpy() - want.mean) / sd, 0.0, atol=1e-12)
    np.testing.assert_allclose(got.variance.numpy(), want.variance, rtol=1e-12)
    np.testing.assert_allclose(got.skewness.numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(got.excess_kurtosis.numpy(), 0.0, atol=1e-10)


def test_terminal_moments_on_moderate_intervals() -> None:
    """E[S_T^n] integrates e^{n x} up to b: accurate while sigma sqrt(T) <~ 0.5 (module doc)."""
    m = random_market(2000, 9)
    keep = (m.sigma * torch.sqrt(m.T)) <= 0.5
    m = Market(*(v[keep] for v in m))
    got = cos.moments_terminal(*spectrum_of(m), S0=m.S0)
    ref = m.numpy()
    want = an.gbm_terminal_moments(**{k: ref[k] for k in ("S0", "T", "r", "d", "sigma")})
    np.testing.assert_allclose(got.mean.numpy(), want.mean, rtol=1e-11)
    np.testing.assert_allclose(got.variance.numpy(), want.variance, rtol=1e-9)
    np.testing.assert_allclose(got.skewness.numpy(), want.skewness, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.excess_kurtosis.numpy(), want.excess_kurtosis, rtol=1e-4,
                               atol=1e-6)
    assert dict(got.items()).keys() == {"mean", "variance", "skewness", "excess_kurtosis"}


@pytest.mark.parametrize("alpha", [0.95, 0.99, 0.999])
def test_value_at_risk_and_expected_shortfall(alpha: float) -> None:
    m = random_market(500, 10)
    s = spectrum_of(m)
    ref = {k: v for k, v in m.numpy().items() if k != "K"}
    var = cos.value_at_risk(*s, S0=m.S0, alpha=alpha).numpy()
    es = cos.expected_shortfall(*s, S0=m.S0, alpha=alpha).numpy()
    np.testing.assert_allclose(
        var / ref["S0"], an.gbm_value_at_risk(alpha=alpha, **ref) / ref["S0"], rtol=0, atol=1e-10
    )
    np.testing.assert_allclose(
        es / ref["S0"], an.gbm_expected_shortfall(alpha=alpha, **ref) / ref["S0"],
        rtol=0, atol=1e-10,
    )
    assert (es > var).all()


@pytest.mark.parametrize("payoff", an.PAYOFFS)
def test_autograd_greeks_through_the_cos_sum_match_closed_forms(payoff: str) -> None:
    base = random_market(40, 11)
    leaves = Market(*(v.clone().requires_grad_(True) for v in base))
    value = price(payoff, leaves, spectrum_of(leaves))
    d_s0, d_t, d_r, d_sigma = torch.autograd.grad(
        value.sum(), (leaves.S0, leaves.T, leaves.r, leaves.sigma), create_graph=True
    )
    (gamma,) = torch.autograd.grad(d_s0.sum(), (leaves.S0,))
    want = an.bs_greeks(payoff=payoff, **base.numpy())
    unit = base.S0.numpy() if payoff in ("put", "call") else np.ones(40)
    s0 = base.S0.numpy()
    checks = {
        "delta": (d_s0, want.delta, unit / s0),
        "gamma": (gamma, want.gamma, unit / s0**2),
        "vega": (d_sigma, want.vega, unit),
        "theta": (-d_t, want.theta, unit),
        "rho": (d_r, want.rho, unit),
    }
    for name, (got, ref, scale) in checks.items():
        err = np.abs(got.detach().numpy() - ref) / scale
        assert err.max() <= 1e-8, (payoff, name, err.max())


def test_quantile_gradient_is_the_implicit_function_derivative() -> None:
    base = market(S0=[100.0, 80.0], K=[1.0, 1.0], T=[1.0, 0.3], r=[0.02, 0.05], d=[0.0, 0.01],
                  sigma=[0.3, 0.6])
    sigma = base.sigma.clone().requires_grad_(True)
    m = base._replace(sigma=sigma)
    p = torch.tensor([0.05, 0.9], dtype=torch.float64, requires_grad=True)
    q = cos.quantile(*spectrum_of(m), S0=m.S0, p=p)
    d_sigma, d_p = torch.autograd.grad(q.sum(), (sigma, p))
    z = torch.special.ndtri(p.detach())
    sqrt_t = torch.sqrt(base.T)
    # q = S0 exp((r - d - sigma^2/2) T + sigma sqrt(T) z)
    torch.testing.assert_close(d_sigma, q.detach() * (-base.sigma * base.T + sqrt_t * z),
                               rtol=1e-8, atol=0)
    density_z = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(d_p, q.detach() * base.sigma * sqrt_t / density_z, rtol=1e-8,
                               atol=0)


def test_validation_names_the_bad_input() -> None:
    m = random_market(3, 12)
    F, a, b = spectrum_of(m)
    kw = dict(S0=m.S0, K=m.K, r=m.r, T=m.T)
    with pytest.raises(ValueError, match="complex128"):
        cos.put(F.to(torch.complex64), a, b, **kw)
    with pytest.raises(ValueError, match="F must be"):
        cos.put(F[0], a, b, **kw)
    with pytest.raises(ValueError, match=r"a must have shape \(3,\)"):
        cos.put(F, a[:2], b, **kw)
    with pytest.raises(ValueError, match="b must be > a"):
        cos.put(F, a, a, **kw)
    with pytest.raises(ValueError, match="S0 must be > 0"):
        cos.put(F, a, b, **{**kw, "S0": -m.S0})
    with pytest.raises(ValueError, match="K must be > 0"):
        cos.put(F, a, b, **{**kw, "K": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="T must be > 0"):
        cos.put(F, a, b, **{**kw, "T": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="r must be float64"):
        cos.put(F, a, b, **{**kw, "r": m.r.float()})
    with pytest.raises(ValueError, match="K must have shape"):
        cos.put(F, a, b, **{**kw, "K": m.K[:2]})
    with pytest.raises(ValueError, match="d must have shape"):
        cos.call(F, a, b, **kw, d=m.d[:1])
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        cos.quantile(F, a, b, S0=m.S0, p=1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        cos.value_at_risk(F, a, b, S0=m.S0, alpha=0.0)
    with pytest.raises(ValueError, match="y must be finite"):
        cos.cdf(F, a, b, y=torch.full((3,), math.nan, dtype=torch.float64))
