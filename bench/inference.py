"""Pricing throughput against QuantLib's analytic engine and against MC of equal accuracy.

python -m bench.inference
-> {"bench":"inference","prices_per_s":..,"vs_quantlib_analytic":..,"vs_mc_equal_accuracy":..}
prices_per_s counts one price per contract: the put, with the call by parity and the intrinsic
and convexity values in the same pass (digitals off, as the QuantLib baseline prices one put),
through the batch pricer (float32 GEMM path). reproducible_prices_per_s is the same with
`Pricer(reproducible=True)`, the server's batch-invariant float64 path, digitals on as served.
The MC baseline samples S_T directly with antithetic normals and runs each contract until the
put's standard error is 1 bp of spot.
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
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--quantlib-contracts", type=int, default=2_000)
    p.add_argument("--mc-contracts", type=int, default=20)
    args = p.parse_args(argv)

    config = CoreConfig()
    model = build_model(
        config.arch, n_freq=config.spectrum.n_freq, truncation_L=config.spectrum.truncation_L
    )
    pricer = Pricer(model, config)
    cols = held_out_contracts(args.batch, config.domain)
    contracts = Contracts.from_columns(cols)
    ours = args.batch / best_seconds(lambda: pricer.price(contracts, digitals=False), 10)
    served = Pricer(model, config, reproducible=True)
    reproducible = args.batch / best_seconds(lambda: served.price(contracts), 5)
    qlr = quantlib_prices_per_s(cols, args.quantlib_contracts)
    mcr = mc_prices_per_s(cols, args.mc_contracts)
    emit(
        {
            "bench": "inference",
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
