"""Pricing throughput against QuantLib's analytic engine and against MC of equal accuracy.

python -m bench.inference [--process gbm|heston|bates] [--book]
-> {"bench":"inference","process":..,"prices_per_s":..,"vs_quantlib_analytic":..,
    "vs_mc_equal_accuracy":..}
prices_per_s counts one price per contract: the put, with the call by parity and the intrinsic
and convexity values in the same pass (digitals off, as the QuantLib baseline prices one put),
through the batch pricer (float32 GEMM path). reproducible_prices_per_s is the same with
`Pricer(reproducible=True)`, the server's batch-invariant float64 path, digitals on as served.
The MC baseline samples S_T directly with antithetic normals and runs each contract until the
put's standard error is 1 bp of spot. For heston the baselines are QuantLib's
AnalyticHestonEngine (its default integration, the model's parameters set per contract) and
MCEuropeanHestonEngine run to a 1 bp-of-spot standard error; for bates, BatesEngine and the same
MC on the Heston part. The network's weights do not change its speed, so an untrained model of
the default size is timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import QuantLib as ql

from bench.common import best_seconds, emit, held_out_contracts
from spectral_core.config import CoreConfig
from spectral_core.cvnn import build_model
from spectral_core.pricer import Contracts, Pricer
from spectral_core.processes import get_process

_TODAY = ql.Date(27, 11, 2026)


class _HestonQuantLib:
    """One QuantLib Heston (or Bates) set-up whose quotes and model parameters are reset per
    contract, so a timing counts pricing, not object construction."""

    def __init__(self, process: str, engine: str) -> None:
        ql.Settings.instance().evaluationDate = _TODAY
        dc = ql.Actual365Fixed()
        self.spot, self.rate, self.div = (ql.SimpleQuote(0.0) for _ in range(3))
        curve = {q: ql.YieldTermStructureHandle(ql.FlatForward(_TODAY, ql.QuoteHandle(q), dc))
                 for q in (self.rate, self.div)}
        args = (curve[self.rate], curve[self.div], ql.QuoteHandle(self.spot),
                0.04, 1.0, 0.04, 0.5, -0.5)
        self.bates = process == "bates"
        if self.bates:
            self.process = ql.BatesProcess(*args, 0.1, -0.1, 0.1)
            self.model = ql.BatesModel(self.process)
        else:
            self.process = ql.HestonProcess(*args)
            self.model = ql.HestonModel(self.process)
        if engine == "analytic":
            self.engine = (ql.BatesEngine(self.model) if self.bates
                           else ql.AnalyticHestonEngine(self.model))
        else:
            self.engine = ql.MCEuropeanHestonEngine(
                self.process, "pseudorandom", timeStepsPerYear=32, requiredTolerance=1e-4 * 100,
                seed=7)

    def set(self, cols: dict[str, np.ndarray], i: int) -> None:
        self.spot.setValue(float(cols["X0"][i]))
        self.rate.setValue(float(cols["r"][i]))
        self.div.setValue(float(cols["d"][i]))
        # QuantLib's order: theta, kappa, sigma (vol of vol), rho, v0 [, lambda, nu, delta]
        params = [cols["theta_v"][i], cols["kappa"][i], cols["xi"][i], cols["rho"][i],
                  cols["v0"][i]]
        if self.bates:
            params += [cols["lam"][i], cols["mu_j"][i], cols["sigma_j"][i]]
        self.model.setParams(ql.Array([float(x) for x in params]))

    def put(self, cols: dict[str, np.ndarray], i: int) -> float:
        self.set(cols, i)
        expiry = _TODAY + max(round(float(cols["T"][i]) * 365), 1)
        opt = ql.VanillaOption(ql.PlainVanillaPayoff(ql.Option.Put, float(cols["K"][i])),
                               ql.EuropeanExercise(expiry))
        opt.setPricingEngine(self.engine)
        return float(opt.NPV())


def heston_quantlib_prices_per_s(process: str, engine: str, cols: dict[str, np.ndarray],
                                 n: int) -> float:
    lib = _HestonQuantLib(process, engine)
    if engine == "mc":
        t0 = time.perf_counter()
        for i in range(n):
            lib.put(cols, i)
        return n / (time.perf_counter() - t0)
    return n / best_seconds(lambda: [lib.put(cols, i) for i in range(n)], 3, warm_up=False)


def quantlib_prices_per_s(cols: dict[str, np.ndarray], n: int) -> float:
    today = ql.Date(27, 11, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    spot, rate, div, vol = (ql.SimpleQuote(0.0) for _ in range(4))
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(spot),
        ql.YieldTermStructureHandle(ql.FlatForward(today, ql.QuoteHandle(div), dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, ql.QuoteHandle(rate), dc)),
        ql.BlackVolTermStructureHandle(
            ql.BlackConstantVol(today, ql.NullCalendar(), ql.QuoteHandle(vol), dc)
        ),
    )
    engine = ql.AnalyticEuropeanEngine(process)

    def run() -> None:
        for i in range(n):
            spot.setValue(float(cols["X0"][i]))
            rate.setValue(float(cols["r"][i]))
            div.setValue(float(cols["d"][i]))
            vol.setValue(float(cols["v"][i]))
            expiry = today + max(round(float(cols["T"][i]) * 365), 1)
            payoff = ql.PlainVanillaPayoff(ql.Option.Put, float(cols["K"][i]))
            opt = ql.VanillaOption(payoff, ql.EuropeanExercise(expiry))
            opt.setPricingEngine(engine)
            opt.NPV()

    return n / best_seconds(run, 3, warm_up=False)


def mc_prices_per_s(cols: dict[str, np.ndarray], n: int, *, target_bp: float = 1.0) -> float:
    rng = np.random.default_rng(7)

    def price_one(i: int) -> None:
        S0, K, T, r, d, v = (float(cols[k][i]) for k in ("X0", "K", "T", "r", "d", "v"))
        drift, vol = (r - d - 0.5 * v * v) * T, v * np.sqrt(T)
        disc = np.exp(-r * T)
        pilot = rng.standard_normal(4096)
        # Antithetic pairs: the mean of the payoffs at +z and -z.
        pay = 0.5 * disc * (
            np.maximum(K - S0 * np.exp(drift + vol * pilot), 0)
            + np.maximum(K - S0 * np.exp(drift - vol * pilot), 0)
        )
        pairs = int(np.ceil((pay.std() / (target_bp * 1e-4 * S0)) ** 2)) + 1
        done = 0
        total = 0.0
        while done < pairs:  # chunks bound the memory
            m = min(pairs - done, 1 << 20)
            z = rng.standard_normal(m)
            up = np.maximum(K - S0 * np.exp(drift + vol * z), 0)
            down = np.maximum(K - S0 * np.exp(drift - vol * z), 0)
            total += float(np.sum(up + down))
            done += m
        _ = disc * total / (2 * pairs)

    t0 = time.perf_counter()
    for i in range(n):
        price_one(i)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inference")
    p.add_argument("--process", choices=["gbm", "heston", "bates"], default="gbm")
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--quantlib-contracts", type=int, default=2_000)
    p.add_argument("--mc-contracts", type=int, default=None,
                   help="contracts the MC baseline prices (default 20 for gbm, 3 for heston)")
    p.add_argument("--book", action="store_true",
                   help="instead: a 1,000-instrument book with scenarios through the app "
                        "(bench/book.py)")
    p.add_argument("--instruments", type=int, default=1_000, help="with --book")
    p.add_argument("--scenarios", type=int, default=16, help="with --book")
    p.add_argument("--requests", type=int, default=30, help="with --book")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="with --book: [server] gc_freeze = false (default true)")
    args = p.parse_args(argv)
    if args.book:
        from bench import book

        book.main(args.process, instruments=args.instruments, n_scenarios=args.scenarios,
                  requests=args.requests, gc_freeze=args.gc_freeze)
        return

    config = CoreConfig(process=args.process)
    model = build_model(
        config.arch, n_freq=config.spectrum.n_freq, truncation_L=config.spectrum.truncation_L,
        n_features=get_process(args.process).n_features,
    )
    pricer = Pricer(model, config)
    cols = held_out_contracts(args.batch, config.domain)
    contracts = Contracts.from_columns(cols, fields=pricer.contract_fields)
    ours = args.batch / best_seconds(lambda: pricer.price(contracts, digitals=False), 10)
    served = Pricer(model, config, reproducible=True)
    reproducible = args.batch / best_seconds(lambda: served.price(contracts), 5)
    if args.process == "gbm":
        qlr = quantlib_prices_per_s(cols, args.quantlib_contracts)
        mcr = mc_prices_per_s(cols, args.mc_contracts or 20)
    else:
        qlr = heston_quantlib_prices_per_s(args.process, "analytic", cols,
                                           args.quantlib_contracts)
        mcr = heston_quantlib_prices_per_s(args.process, "mc", cols, args.mc_contracts or 3)
    emit(
        {
            "bench": "inference",
            "process": args.process,
            "batch": args.batch,
            "prices_per_s": ours,
            "reproducible_prices_per_s": reproducible,
            "quantlib_prices_per_s": qlr,
            "mc_prices_per_s": mcr,
            "vs_quantlib_analytic": ours / qlr,
            "vs_mc_equal_accuracy": ours / mcr,
        }
    )


if __name__ == "__main__":
    main()
