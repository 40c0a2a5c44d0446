"""COS inversion accuracy and speed: analytic GBM CF vs Black-Scholes on 10,000 contracts.

`python -m bench.cos` prints one JSON line. Contracts are uniform over the default domain with
strikes 0.7..1.3 x forward; every contract is priced as a put and as a call (one batched call
each, N = 64, L = 10). us_per_price is the best of a few timed repeats of both batched calls,
divided by the 20,000 prices; the CF evaluation (the network's job in production) is not timed.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import best_seconds, emit, held_out_contracts
from spectral_core import analytic, cos
from spectral_core.config import CoreConfig
from spectral_core.spectrum import frequencies, truncation_interval


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cos")
    parser.add_argument("--contracts", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
