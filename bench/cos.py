"""COS inversion accuracy and speed on 10,000 contracts; one JSON line.

`python -m bench.cos` (`--process gbm`, the default): the analytic GBM CF against Black-Scholes.
Contracts are uniform over the default domain with strikes 0.7..1.3 x forward; every contract is
priced as a put and as a call (one batched call each, N = 64, L = 10). us_per_price is the best
of a few timed repeats of both batched calls, divided by the 20,000 prices; the CF evaluation
(the network's job in production) is not timed.

`--process heston | bates`: the COS oracle of `spectral_core.analytic_heston` (analytic CF,
Chernoff interval, per-contract N) against QuantLib's AnalyticHestonEngine / BatesEngine
(Gatheral's form, adaptive Gauss-Lobatto at tolerance 1e-14), priced one put at a time.
Contracts are uniform over HESTON_DOMAIN / BATES_DOMAIN with T snapped to whole days of an
Actual/360 calendar (QuantLib dates are whole days; 18..1080 days spans [0.05, 3] exactly), S0 =
100, strikes 0.7..1.3 x forward. Puts only: QuantLib's call is its put plus the same parity
terms, so comparing calls would test parity, not the CF. us_per_price times the whole oracle
(CF, interval and N rules, COS) per put; quantlib_us_per_price times NPV() alone. n_terms is
the largest N the oracle chose, n_terms_median the typical one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import best_seconds, emit, held_out_contracts
from spectral_core import analytic, cos
from spectral_core import analytic_heston as ah
from spectral_core.config import CoreConfig
from spectral_core.spectrum import frequencies, truncation_interval

_SEED = 20261127
_S0 = 100.0
_DAYS_PER_YEAR = 360  # Actual/360: T = days / 360 is the year fraction QuantLib computes
# Gauss-Lobatto tolerances on the P1/P2 integrals: at relative 1e-12 BatesEngine is itself off
# by up to 2.6e-10 of spot (T = 0.05, xi = 1 corners); 1e-14 brings it to ~1e-14, and the
# sharpest Bates corner (T = 3, xi = 1, rho = -0.95) needs more than 1e5 evaluations.
_QL_REL_TOL = 1e-14
_QL_ABS_TOL = 1e-14
_QL_MAX_EVALUATIONS = 1_000_000


def _gbm(args: argparse.Namespace) -> None:
    config = CoreConfig()
    cols = held_out_contracts(args.contracts, config.domain)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}
    a, b = truncation_interval(
        t["T"], t["r"], t["d"], t["v"], L=config.spectrum.truncation_L, xp=torch
    )
    u = frequencies(a, b, n_freq=config.spectrum.n_freq, xp=torch)
    F = analytic.gbm_shifted_cf(u, a, T=t["T"], r=t["r"], d=t["d"], sigma=t["v"])

    def price_both() -> tuple[torch.Tensor, torch.Tensor]:
        common = dict(S0=t["X0"], K=t["K"], r=t["r"], T=t["T"])
        return cos.put(F, a, b, **common), cos.call(F, a, b, **common, d=t["d"])

    best = best_seconds(price_both, args.repeats)
    put, call = price_both()

    ref = {k: cols[k] for k in ("K", "T", "r", "d")}
    ref.update(S0=cols["X0"], sigma=cols["v"])
    err_put = np.abs(put.numpy() - analytic.bs_put(**ref)) / cols["X0"]
    err_call = np.abs(call.numpy() - analytic.bs_call(**ref)) / cols["X0"]
    emit(
        {
            "bench": "cos",
            "contracts": args.contracts,
            "max_abs_err_rel_spot": float(max(err_put.max(), err_call.max())),
            "us_per_price": best / (2 * args.contracts) * 1e6,
        }
    )


def stochastic_vol_contracts(
    n: int, process: str, *, seed: int = _SEED
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(params, days, K): n contracts uniform over the process's default domain, T on whole
    days, strikes 0.7..1.3 x forward at S0 = 100."""
    rng = np.random.default_rng(seed)
    params = {name: rng.uniform(lo, hi, n) for name, (lo, hi) in ah.DOMAINS[process].items()}
    days = np.rint(params["T"] * _DAYS_PER_YEAR).astype(np.int64)
    params["T"] = days / _DAYS_PER_YEAR
    K = _S0 * np.exp((params["r"] - params["d"]) * params["T"]) * rng.uniform(0.7, 1.3, n)
    return params, days, K


def quantlib_puts(
    process: str, params: dict[str, np.ndarray], days: np.ndarray, K: np.ndarray
) -> tuple[np.ndarray, float]:
    """QuantLib puts one contract at a time, and the seconds spent in NPV() alone."""
    import QuantLib as ql  # a dev dependency: only the heston / bates runs need it

    today = ql.Date(2, 1, 2024)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual360()
    spot = ql.QuoteHandle(ql.SimpleQuote(_S0))
    out = np.empty(K.shape[0])
    seconds = 0.0
    for i in range(K.shape[0]):
        col = {k: float(v[i]) for k, v in params.items()}
        rates = ql.YieldTermStructureHandle(ql.FlatForward(today, col["r"], dc, ql.Continuous))
        divs = ql.YieldTermStructureHandle(ql.FlatForward(today, col["d"], dc, ql.Continuous))
        heston = (col["v0"], col["kappa"], col["theta_v"], col["xi"], col["rho"])
        engine: ql.PricingEngine
        if process == "heston":
            model = ql.HestonModel(ql.HestonProcess(rates, divs, spot, *heston))
            # The (relTolerance, maxEvaluations) constructor is OptimalCV, not Gatheral, in 1.44.
            engine = ql.AnalyticHestonEngine(
                model,
                ql.AnalyticHestonEngine.Gatheral,
                ql.FourierIntegration.gaussLobatto(_QL_REL_TOL, _QL_ABS_TOL, _QL_MAX_EVALUATIONS),
            )
        else:
            jumps = (col["lam"], col["mu_j"], col["sigma_j"])
            model = ql.BatesModel(ql.BatesProcess(rates, divs, spot, *heston, *jumps))
            engine = ql.BatesEngine(model, _QL_REL_TOL, _QL_MAX_EVALUATIONS)
        option = ql.VanillaOption(
            ql.PlainVanillaPayoff(ql.Option.Put, float(K[i])),
            ql.EuropeanExercise(today + int(days[i])),
        )
        option.setPricingEngine(engine)
        start = time.perf_counter()
        out[i] = option.NPV()
        seconds += time.perf_counter() - start
    return out, seconds


def _stochastic_vol(args: argparse.Namespace) -> None:
    process = args.process
    params, days, K = stochastic_vol_contracts(args.contracts, process)
    S0 = np.full(args.contracts, _S0)

    def oracle() -> np.ndarray:
        return ah.cos_oracle_put(process, S0=S0, K=K, params=params)

    best = best_seconds(oracle, args.repeats)
    put = oracle()
    a, b = ah.oracle_interval(process, params=params)
    n_terms = ah.oracle_n_terms(process, params=params, S0=S0, K=K, a=a, b=b)
    reference, ql_seconds = quantlib_puts(process, params, days, K)
    emit(
        {
            "bench": "cos",
            "process": process,
            "contracts": args.contracts,
            "max_abs_err_rel_spot": float(np.max(np.abs(put - reference)) / _S0),
            "us_per_price": best / args.contracts * 1e6,
            "n_terms": int(n_terms.max()),
            "n_terms_median": int(np.median(n_terms)),
            "quantlib_us_per_price": ql_seconds / args.contracts * 1e6,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cos")
    parser.add_argument("--process", choices=("gbm", "heston", "bates"), default="gbm")
    parser.add_argument("--contracts", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.process == "gbm":
        _gbm(args)
    else:
        _stochastic_vol(args)


if __name__ == "__main__":
    main()
