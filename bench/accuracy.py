"""Accuracy per second: train from scratch for S seconds, price 2,000 held-out contracts.

python -m bench.accuracy --seconds S [--device cpu|cuda]
-> {"bench":"accuracy","seconds":S,"device":..,"steps":..,"mean_abs_bp":..,"p99_abs_bp":..,
    "max_abs_bp":..,"quantile01_rel_err":..}
Errors are in basis points of spot against Black-Scholes; quantile01_rel_err is the mean relative
error of the 1% quantile of S_T against the lognormal quantile.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import norm

from bench.common import emit, held_out_contracts
from spectral_core import analytic
from spectral_core.config import CoreConfig
from spectral_core.pricer import Contracts, Pricer
from spectral_core.trainer import Trainer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--contracts", type=int, default=2000)
    args = p.parse_args(argv)

    config = CoreConfig(device=args.device)
    with Trainer(config) as trainer:
        trainer.train(seconds=args.seconds)
        steps = trainer.global_step
        snapshot = trainer.snapshot()
    pricer = Pricer.from_snapshot(snapshot, device="cpu", reproducible=False)
    cols = held_out_contracts(args.contracts, config.domain)
    res = pricer.price(Contracts.from_columns(cols), metrics=True)
    ref = analytic.bs_put(
        S0=cols["X0"], K=cols["K"], T=cols["T"], r=cols["r"], d=cols["d"], sigma=cols["v"]
    )
    err_bp = np.abs(res["put"] - ref) / cols["X0"] * 1e4
    # lognormal 1% quantile of S_T
    mu = np.log(cols["X0"]) + (cols["r"] - cols["d"] - 0.5 * cols["v"] ** 2) * cols["T"]
    q01 = np.exp(mu + cols["v"] * np.sqrt(cols["T"]) * norm.ppf(0.01))
    q_err = np.abs(res["ST_q01"] - q01) / q01
    emit(
        {
            "bench": "accuracy",
            "seconds": args.seconds,
            "device": args.device,
            "steps": steps,
            "mean_abs_bp": float(err_bp.mean()),
            "p99_abs_bp": float(np.quantile(err_bp, 0.99)),
            "max_abs_bp": float(err_bp.max()),
            "quantile01_rel_err": float(q_err.mean()),
        }
    )


if __name__ == "__main__":
    main()
