"""Accuracy per second: train from scratch for S seconds, price 2,000 held-out contracts.

python -m bench.accuracy [--process gbm|heston|bates] --seconds S [--device cpu|cuda]
-> {"bench":"accuracy","process":..,"seconds":S,"device":..,"steps":..,"mean_abs_bp":..,
    "p99_abs_bp":..,"max_abs_bp":..,"quantile01_rel_err":..,"iv_mean_volbp":..,
    "iv_p99_volbp":..,"noise_floor_ratio":..,"lob_mean_abs_bp":..,...}

Errors of put prices are in basis points of spot against the process's oracle (Black-Scholes for
gbm; COS on the analytic CF, checked against QuantLib in tests/test_heston_cf.py, for heston and
bates). quantile01_rel_err: mean relative error of the 1% quantile of S_T (gbm: lognormal
closed form; otherwise the quantile of the oracle's COS CDF). iv_*: |implied vol of the learned
price - implied vol of the oracle price| in vol-bp, over contracts with T >= 0.1 and
|ln(K/F)| <= 2 sigma_atm sqrt(T), sigma_atm the oracle's at-the-money-forward implied vol.
noise_floor_ratio: the learned mean error over the mean error of one MC label of the training
batch's size (the noise floor a single label has; below 1 the network averages past it). lob_*:
the same price errors on 2,000 contracts of the Liu-Oosterlee-Bohte sub-box (heston, bates).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from bench.common import emit, held_out_contracts
from spectral_core import analytic_heston, cos
from spectral_core.config import Bounds, CoreConfig
from spectral_core.implied_vol import implied_vol
from spectral_core.normals import NormalsSource
from spectral_core.pricer import Contracts, Pricer
from spectral_core.trainer import Trainer

# Liu, Oosterlee & Bohte (2019), the Heston box of their learned pricer
LOB_BOX = {"T": (0.1, 1.4), "r": (0.0, 0.1), "rho": (-0.95, 0.0), "kappa": (0.2, 2.0),
           "theta_v": (0.005, 0.5), "xi": (0.1, 0.5), "v0": (0.05, 0.5)}
NOISE_FLOOR_CONTRACTS = 256
# COS terms of the oracle quantile on the oracle's (Chernoff) interval: the 1% quantile sits in
# the body of the law, where 2048 terms resolve the CDF far below the learned error.
ORACLE_QUANTILE_TERMS = 2048


def _theta(pricer: Pricer, cols: dict[str, np.ndarray]) -> np.ndarray:
    return np.column_stack([cols[f] for f in pricer.process.request_fields])  # (B, P)


def _put_errors_bp(pricer: Pricer, cols: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    res = pricer.price(Contracts.from_columns(cols, fields=pricer.contract_fields))
    ref = pricer.process.reference_put(_theta(pricer, cols), S0=cols["X0"], K=cols["K"])
    return np.abs(res["put"] - ref) / cols["X0"] * 1e4, res["put"], ref


def _quantile01_err(pricer: Pricer, cols: dict[str, np.ndarray]) -> float:
    res = pricer.price(Contracts.from_columns(cols, fields=pricer.contract_fields), metrics=True)
    if pricer.process.name == "gbm":
        mu = np.log(cols["X0"]) + (cols["r"] - cols["d"] - 0.5 * cols["v"] ** 2) * cols["T"]
        q01 = np.exp(mu + cols["v"] * np.sqrt(cols["T"]) * norm.ppf(0.01))
    else:
        params = {n: cols[n] for n in pricer.process.request_fields}
        a, b = analytic_heston.oracle_interval(pricer.process.name, params=params)
        u = (np.pi / (b - a))[:, None] * np.arange(ORACLE_QUANTILE_TERMS)[None, :]  # (B, N)
        cf = analytic_heston.heston_cf if pricer.process.name == "heston" else (
            analytic_heston.bates_cf)
        F = cf(u, **{k: v[:, None] for k, v in params.items()}) * np.exp(-1j * u * a[:, None])
        q01 = cos.quantile(torch.from_numpy(F), torch.from_numpy(a), torch.from_numpy(b),
                           S0=torch.from_numpy(cols["X0"]), p=0.01).numpy()
    return float(np.mean(np.abs(res["ST_q01"] - q01) / q01))


def _iv_errors_volbp(pricer: Pricer, cols: dict[str, np.ndarray], learned: np.ndarray,
                     oracle: np.ndarray) -> np.ndarray:
    T, r, d, X0, K = cols["T"], cols["r"], cols["d"], cols["X0"], cols["K"]
    fwd = X0 * np.exp((r - d) * T)
    atm = pricer.process.reference_put(_theta(pricer, cols), S0=X0, K=fwd)
    sigma_atm, _ = implied_vol(atm, S0=X0, K=fwd, T=T, r=r, d=d, kind="put")
    keep = (T >= 0.1) & (np.abs(np.log(K / fwd)) <= 2.0 * sigma_atm * np.sqrt(T))
    # OTM side of each strike: the better-conditioned inversion (parity makes them equal)
    call = fwd > K
    iv = {}
    for name, put in (("learned", learned), ("oracle", oracle)):
        price = np.where(call, put + np.exp(-r * T) * (fwd - K), put)
        vols = np.full(len(T), np.nan)
        for kind, mask in (("call", call & keep), ("put", ~call & keep)):
            if mask.any():
                vols[mask], _ = implied_vol(price[mask], S0=X0[mask], K=K[mask], T=T[mask],
                                            r=r[mask], d=d[mask], kind=kind)
        iv[name] = vols
    err = np.abs(iv["learned"] - iv["oracle"])[keep] * 1e4
    # a learned price with no implied vol counts as missing, reported by the count below
    return err


def _noise_floor_bp(config: CoreConfig, pricer: Pricer, cols: dict[str, np.ndarray]) -> float:
    """Mean put error (bp) of single MC labels of the training size: what the network learns
    from, priced through the same COS sum."""
    n = min(NOISE_FLOOR_CONTRACTS, len(cols["T"]))
    sub = {k: v[:n] for k, v in cols.items()}
    theta = _theta(pricer, sub)
    process = pricer.process
    source = NormalsSource(config.sim.normals, timesteps=process.normal_dims(config),
                           paths_per_contract=config.sim.paths_per_contract,
                           contracts_per_draw=n, seed=config.sim.seed + 77,
                           cap_bytes=config.memory.normals_bytes, prefetch=0)
    with source, source.stream(0) as stream:
        F, _ = process.mc_labels(theta, stream.next(), config, xp=np, on_cuda=False)
    th = torch.from_numpy(theta)
    a, b = process.truncation_interval(th, L=config.spectrum.truncation_L, xp=torch)
    t = {k: torch.from_numpy(v) for k, v in sub.items()}
    put = cos.put(torch.from_numpy(F), a, b, S0=t["X0"], K=t["K"], r=t["r"], T=t["T"]).numpy()
    ref = process.reference_put(theta, S0=sub["X0"], K=sub["K"])
    return float(np.mean(np.abs(put - ref) / sub["X0"] * 1e4))


def _summary(err: np.ndarray, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}mean_abs_bp": float(err.mean()),
            f"{prefix}p99_abs_bp": float(np.quantile(err, 0.99)),
            f"{prefix}max_abs_bp": float(err.max())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy")
    p.add_argument("--process", choices=["gbm", "heston", "bates"], default="gbm")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--contracts", type=int, default=2000)
    args = p.parse_args(argv)

    config = CoreConfig(process=args.process, device=args.device)
    with Trainer(config) as trainer:
        trainer.train(seconds=args.seconds)
        steps = trainer.global_step
        snapshot = trainer.snapshot()
    pricer = Pricer.from_snapshot(snapshot, device="cpu", reproducible=False)
    cols = held_out_contracts(args.contracts, config.domain)
    err_bp, learned, oracle = _put_errors_bp(pricer, cols)
    result: dict[str, Any] = {"bench": "accuracy", "process": args.process,
                              "seconds": args.seconds, "device": args.device, "steps": steps,
                              **_summary(err_bp),
                              "quantile01_rel_err": _quantile01_err(pricer, cols)}
    iv_err = _iv_errors_volbp(pricer, cols, learned, oracle)
    result.update(iv_mean_volbp=float(np.nanmean(iv_err)),
                  iv_p99_volbp=float(np.nanquantile(iv_err, 0.99)),
                  iv_contracts=int(iv_err.size), iv_missing=int(np.isnan(iv_err).sum()))
    result["noise_floor_bp"] = _noise_floor_bp(config, pricer, cols)
    result["noise_floor_ratio"] = result["mean_abs_bp"] / result["noise_floor_bp"]
    if args.process != "gbm":
        box = config.domain.model_copy(
            update={n: Bounds(lower=lo, upper=hi) for n, (lo, hi) in LOB_BOX.items()})
        lob = held_out_contracts(args.contracts, box, seed=20261201)
        lob_err, _, _ = _put_errors_bp(pricer, lob)
        result.update(_summary(lob_err, "lob_"))
    emit(result)


if __name__ == "__main__":
    main()
