"""Closed forms for geometric Brownian motion (Black-Scholes-Merton with dividend yield d).

Every function takes numpy arrays / Python floats (computed in numpy float64) or torch tensors
(computed in torch float64, differentiable by autograd); inputs broadcast against each other.
They are the references the COS inversion and the spectrum estimator are tested against.

Conventions: `T` in years, `r` and `d` continuously compounded, `sigma` per sqrt(year);
theta = dV/dt = -dV/dT (per year), vega = dV/dsigma and rho = dV/dr (per unit, not per %).
Digitals are cash-or-nothing paying 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy import special

Payoff = Literal["put", "call", "digital_call", "digital_put"]
PAYOFFS: tuple[Payoff, ...] = ("put", "call", "digital_call", "digital_put")

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Greeks(NamedTuple):
    """First- and second-order sensitivities of one price (same shape as the price)."""

    delta: Any
    gamma: Any
    vega: Any
    theta: Any
    rho: Any


class Moments(NamedTuple):
    """Mean, variance, skewness and excess kurtosis of a scalar random variable."""

    mean: Any
    variance: Any
    skewness: Any
    excess_kurtosis: Any

    def items(self) -> Any:
        """(name, value) pairs, so callers can treat the moments as a mapping."""
        return self._asdict().items()


class _Ops:
    """The handful of elementwise functions the closed forms need, for one array backend."""

    exp: Callable[..., Any]
    log: Callable[..., Any]
    sqrt: Callable[..., Any]
    ndtr: Callable[..., Any]
    ndtri: Callable[..., Any]
    isfinite: Callable[..., Any]

    def __init__(self, use_torch: bool) -> None:
        self.torch = use_torch
        if use_torch:
            self.exp, self.log, self.sqrt = torch.exp, torch.log, torch.sqrt
            self.ndtr, self.ndtri = torch.special.ndtr, torch.special.ndtri
            self.isfinite = torch.isfinite
        else:
            self.exp, self.log, self.sqrt = np.exp, np.log, np.sqrt
            self.ndtr, self.ndtri = special.ndtr, special.ndtri
            self.isfinite = np.isfinite

    def asarray(self, v: Any) -> Any:
        if self.torch:
            return torch.as_tensor(v, dtype=torch.float64)
        return np.asarray(v, dtype=np.float64)

    def where(self, cond: Any, x: Any, y: Any) -> Any:
        if self.torch:
            return torch.where(cond, self.asarray(x), self.asarray(y))
        return np.where(cond, x, y)

    def pdf(self, x: Any) -> Any:
        return _INV_SQRT_2PI * self.exp(-0.5 * x * x)


def _prepare(**named: Any) -> tuple[_Ops, dict[str, Any]]:
    """Pick the backend (torch if any input is a tensor) and convert every input to float64."""
    use_torch = any(isinstance(v, torch.Tensor) for v in named.values())
    ops = _Ops(use_torch)
    out: dict[str, Any] = {}
    for name, v in named.items():
        if use_torch and isinstance(v, torch.Tensor) and v.dtype != torch.float64:
            raise ValueError(f"{name} must be a float64 tensor, got {v.dtype}")
        arr = ops.asarray(v)
        if not bool(ops.isfinite(arr).all()):
            raise ValueError(f"{name} must be finite, got {_first(arr, ~ops.isfinite(arr))}")
        out[name] = arr
    return ops, out


def _first(arr: Any, mask: Any) -> float:
    """The first offending value, for error messages."""
    if isinstance(arr, torch.Tensor):
        return float(arr.detach().expand(mask.shape)[mask].flatten()[0])
    return float(np.broadcast_to(arr, mask.shape)[mask].ravel()[0])


def _require(name: str, arr: Any, bad: Any, rule: str) -> None:
    if bool(bad.any()):
        raise ValueError(f"{name} must be {rule}, got {_first(arr, bad)}")


def _check_market(
    ops: _Ops, v: dict[str, Any], *, strictly_positive_vol: bool = False, positive_t: bool = False
) -> None:
    for name in ("S0", "K"):
        if name in v:
            _require(name, v[name], v[name] <= 0, "> 0")
    if positive_t:
        _require("T", v["T"], v["T"] <= 0, "> 0")
    else:
        _require("T", v["T"], v["T"] < 0, ">= 0")
    if strictly_positive_vol:
        _require("sigma", v["sigma"], v["sigma"] <= 0, "> 0")
    else:
        _require("sigma", v["sigma"], v["sigma"] < 0, ">= 0")


def _d1_d2(ops: _Ops, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any) -> tuple[Any, Any, Any]:
    """d1, d2 and s = sigma*sqrt(T); at s == 0 they are the limits +-inf (0 at the money)."""
    s = sigma * ops.sqrt(T)
    log_moneyness = ops.log(S0 / K) + (r - d) * T  # ln(F/K)
    zero = s == 0.0
    # A safe denominator keeps autograd free of 0/0 in the branch that where() discards.
    s_safe = ops.where(zero, 1.0, s)
    d1 = (log_moneyness + 0.5 * s * s) / s_safe
    limit = ops.where(log_moneyness > 0, math.inf, ops.where(log_moneyness < 0, -math.inf, 0.0))
    d1 = ops.where(zero, limit, d1)
    d2 = ops.where(zero, limit, d1 - s)
    return d1, d2, s


def bs_price(
    *, payoff: Payoff, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any
) -> Any:
    """Black-Scholes-Merton price of a European `payoff`.

    Valid for sigma >= 0 and T >= 0: sigma*sqrt(T) == 0 gives the exact limit (discounted intrinsic
    value of the forward; an at-the-money digital is worth half its discounted payout, the limit
    of sigma -> 0). Deep ITM/OTM use the N(-d) forms, accurate in the tails.
    """
    if payoff not in PAYOFFS:
        raise ValueError(f"payoff must be one of {PAYOFFS}, got {payoff!r}")
    ops, v = _prepare(S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    S0, K, T, r, d, sigma = v["S0"], v["K"], v["T"], v["r"], v["d"], v["sigma"]
    d1, d2, _ = _d1_d2(ops, S0, K, T, r, d, sigma)
    df_r = ops.exp(-r * T)
    df_d = ops.exp(-d * T)
    if payoff == "call":
        return S0 * df_d * ops.ndtr(d1) - K * df_r * ops.ndtr(d2)
    if payoff == "put":
        return K * df_r * ops.ndtr(-d2) - S0 * df_d * ops.ndtr(-d1)
    if payoff == "digital_call":
        return df_r * ops.ndtr(d2)
    return df_r * ops.ndtr(-d2)


def bs_put(*, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """European put, e^{-rT} E[(K - S_T)^+]."""
    return bs_price(payoff="put", S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)


def bs_call(*, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """European call, e^{-rT} E[(S_T - K)^+]."""
    return bs_price(payoff="call", S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)


def bs_digital_call(*, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """Cash-or-nothing digital call, e^{-rT} P(S_T > K)."""
    return bs_price(payoff="digital_call", S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)


def bs_digital_put(*, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """Cash-or-nothing digital put, e^{-rT} P(S_T < K)."""
    return bs_price(payoff="digital_put", S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)


def bs_greeks(
    *, payoff: Payoff, S0: Any, K: Any, T: Any, r: Any, d: Any, sigma: Any
) -> Greeks:
    """Closed-form delta, gamma, vega, theta (= -dV/dT) and rho of a European `payoff`.

    Needs sigma > 0 and T > 0: at sigma*sqrt(T) == 0 gamma and the digital greeks are
    Dirac masses at the money, so the limit is not a number.
    """
    if payoff not in PAYOFFS:
        raise ValueError(f"payoff must be one of {PAYOFFS}, got {payoff!r}")
    ops, v = _prepare(S0=S0, K=K, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v, strictly_positive_vol=True, positive_t=True)
    S0, K, T, r, d, sigma = v["S0"], v["K"], v["T"], v["r"], v["d"], v["sigma"]
    d1, d2, s = _d1_d2(ops, S0, K, T, r, d, sigma)
    sqrt_t = ops.sqrt(T)
    df_r = ops.exp(-r * T)
    df_d = ops.exp(-d * T)
    n1 = ops.pdf(d1)
    n2 = ops.pdf(d2)

    if payoff in ("put", "call"):
        gamma = df_d * n1 / (S0 * s)
        vega = S0 * df_d * n1 * sqrt_t
        decay = -S0 * df_d * n1 * sigma / (2.0 * sqrt_t)
        if payoff == "call":
            delta = df_d * ops.ndtr(d1)
            theta = decay - r * K * df_r * ops.ndtr(d2) + d * S0 * df_d * ops.ndtr(d1)
            rho = K * T * df_r * ops.ndtr(d2)
        else:
            delta = -df_d * ops.ndtr(-d1)
            theta = decay + r * K * df_r * ops.ndtr(-d2) - d * S0 * df_d * ops.ndtr(-d1)
            rho = -K * T * df_r * ops.ndtr(-d2)
        return Greeks(delta=delta, gamma=gamma, vega=vega, theta=theta, rho=rho)

    # Digital call V = e^{-rT} N(d2); the digital put is e^{-rT} minus it.
    delta = df_r * n2 / (S0 * s)
    gamma = -df_r * n2 * d1 / (S0 * S0 * s * s)
    vega = -df_r * n2 * d1 / sigma
    dd2_dT = (r - d - 0.5 * sigma * sigma) / s - d2 / (2.0 * T)
    theta = r * df_r * ops.ndtr(d2) - df_r * n2 * dd2_dT
    rho = -T * df_r * ops.ndtr(d2) + df_r * n2 * sqrt_t / sigma
    if payoff == "digital_call":
        return Greeks(delta=delta, gamma=gamma, vega=vega, theta=theta, rho=rho)
    return Greeks(
        delta=-delta, gamma=-gamma, vega=-vega, theta=r * df_r - theta, rho=-T * df_r - rho
    )


def lognormal_cdf(*, s: Any, S0: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """P(S_T <= s) under risk-neutral GBM (sigma > 0, T > 0)."""
    ops, v = _prepare(s=s, S0=S0, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v, strictly_positive_vol=True, positive_t=True)
    _require("s", v["s"], v["s"] <= 0, "> 0")
    std = v["sigma"] * ops.sqrt(v["T"])
    mean = (v["r"] - v["d"] - 0.5 * v["sigma"] ** 2) * v["T"]
    return ops.ndtr((ops.log(v["s"] / v["S0"]) - mean) / std)


def lognormal_quantile(*, p: Any, S0: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """The p-quantile of S_T: S0 exp((r - d - sigma^2/2) T + sigma sqrt(T) N^{-1}(p)), 0 < p < 1."""
    ops, v = _prepare(p=p, S0=S0, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    _require("p", v["p"], (v["p"] <= 0) | (v["p"] >= 1), "in (0, 1)")
    std = v["sigma"] * ops.sqrt(v["T"])
    mean = (v["r"] - v["d"] - 0.5 * v["sigma"] ** 2) * v["T"]
    return v["S0"] * ops.exp(mean + std * ops.ndtri(v["p"]))


def gbm_cf(u: Any, *, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """CF of x = ln(S_T/S0): exp(i u (r - d - sigma^2/2) T - sigma^2 u^2 T / 2), complex128.

    `u` broadcasts against the parameters (e.g. u (B, N) with parameters (B, 1)).
    """
    ops, v = _prepare(u=u, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    drift = (v["r"] - v["d"] - 0.5 * v["sigma"] ** 2) * v["T"]
    var = v["sigma"] ** 2 * v["T"]
    u = v["u"]
    return ops.exp(1j * u * drift - 0.5 * var * u * u)


def gbm_shifted_cf(u: Any, a: Any, *, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """The COS target F_k = E[exp(i u_k (x - a))] = exp(-i u_k a) phi(u_k), complex128.

    Shapes: u (B, N), a (B,), parameters (B,) -> (B, N).
    """
    ops, v = _prepare(u=u, a=a, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    if v["u"].ndim != 2 or v["a"].ndim != 1 or v["u"].shape[0] != v["a"].shape[0]:
        raise ValueError(
            f"u must be (B, N) and a (B,), got u {tuple(v['u'].shape)} and a {tuple(v['a'].shape)}"
        )

    def col(x: Any) -> Any:
        return x[:, None] if x.ndim == 1 else x

    u, a = v["u"], col(v["a"])
    drift = (col(v["r"]) - col(v["d"]) - 0.5 * col(v["sigma"]) ** 2) * col(v["T"])
    var = col(v["sigma"]) ** 2 * col(v["T"])
    # One exponent keeps phase and modulus in a single rounding step.
    return ops.exp(1j * u * (drift - a) - 0.5 * var * u * u)  # (B, N) complex128


def gbm_log_return_moments(*, T: Any, r: Any, d: Any, sigma: Any) -> Moments:
    """Moments of x = ln(S_T/S0): normal with mean (r - d - sigma^2/2) T and variance sigma^2 T."""
    ops, v = _prepare(T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    mean = (v["r"] - v["d"] - 0.5 * v["sigma"] ** 2) * v["T"]
    zero = mean * 0.0
    var = v["sigma"] ** 2 * v["T"]
    return Moments(mean=mean, variance=var, skewness=zero, excess_kurtosis=zero)


def gbm_terminal_moments(*, S0: Any, T: Any, r: Any, d: Any, sigma: Any) -> Moments:
    """Moments of S_T (lognormal): with w = exp(sigma^2 T), skew (w+2) sqrt(w-1),
    excess kurtosis w^4 + 2w^3 + 3w^2 - 6."""
    ops, v = _prepare(S0=S0, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    var_x = v["sigma"] ** 2 * v["T"]
    w = ops.exp(var_x)
    mean = v["S0"] * ops.exp((v["r"] - v["d"]) * v["T"])
    # expm1 keeps w - 1 accurate for small sigma^2 T.
    wm1 = torch.expm1(var_x) if ops.torch else np.expm1(var_x)
    return Moments(
        mean=mean,
        variance=mean * mean * wm1,
        skewness=(w + 2.0) * ops.sqrt(wm1),
        excess_kurtosis=w**4 + 2.0 * w**3 + 3.0 * w**2 - 6.0,
    )


def gbm_value_at_risk(*, alpha: Any, S0: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """alpha-VaR (alpha = confidence, e.g. 0.99) of the loss S0 - S_T: S0 - q_{S_T}(1 - alpha)."""
    ops, v = _prepare(alpha=alpha)
    _require("alpha", v["alpha"], (v["alpha"] <= 0) | (v["alpha"] >= 1), "in (0, 1)")
    q = lognormal_quantile(p=1.0 - v["alpha"], S0=S0, T=T, r=r, d=d, sigma=sigma)
    return ops.asarray(S0) - q


def gbm_expected_shortfall(*, alpha: Any, S0: Any, T: Any, r: Any, d: Any, sigma: Any) -> Any:
    """alpha-ES of the loss S0 - S_T: S0 - E[S_T 1{S_T <= q}] / (1 - alpha), q = q_{S_T}(1 - alpha).

    E[S_T 1{S_T <= q}] = S0 e^{(r-d)T} N(N^{-1}(1 - alpha) - sigma sqrt(T)).
    """
    ops, v = _prepare(alpha=alpha, S0=S0, T=T, r=r, d=d, sigma=sigma)
    _check_market(ops, v)
    _require("alpha", v["alpha"], (v["alpha"] <= 0) | (v["alpha"] >= 1), "in (0, 1)")
    tail = 1.0 - v["alpha"]
    std = v["sigma"] * ops.sqrt(v["T"])
    forward = v["S0"] * ops.exp((v["r"] - v["d"]) * v["T"])
    partial = forward * ops.ndtr(ops.ndtri(tail) - std)
    return v["S0"] - partial / tail
