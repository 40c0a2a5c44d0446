"""Path-steps per second of the MC kernels against numpy running the same scheme; for Heston and
Bates also the discretisation bias of the QE scheme in bp of spot, per step count.

`python -m bench.mc [--process gbm|heston|bates] [--device cuda]` prints exactly one JSON line.
Compilation and warm-up are excluded; each figure is the best of `--repeats` timed runs on the
same normals.

Bias (heston, bates): puts at 0.8, 1.0 and 1.2 x the forward (S0 = 1) priced by COS from the
conditional label of the default scheme (QE + martingale correction), N = 256 frequencies on
[c1 - 12 sqrt(c2), c1 + 12 sqrt(c2)] (cumulants of the analytic CF), against COS on the analytic
CF with the same frequencies: COS's own truncation cancels, what is left is the scheme's bias.
The normals are scrambled Sobol' with a Brownian bridge; each of `--bias-replicates` draws is an
independent scramble, so the bias is the mean over replicates and its standard error their
spread / sqrt(R). `bias_bp_steps{S}` is max |bias| over contracts and strikes, `bias_se_bp_steps{S}`
the SE of that entry, `bias_max_se_bp_steps{S}` the largest SE of any entry, and
`bias_lo_bp_steps{S}` / `bias_hi_bp_steps{S}` the max over entries of |bias| -+ 2 SE (lo above
the target proves S too coarse). `default_steps` is the smallest measured S with hi below
`--target-bp` (every entry within the target at 2 SE); null when no measured S holds;
`min_steps_not_rejected` the smallest S whose lo is below the target (finer ones may be needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np

from bench.common import best_seconds
from spectral_core.processes.gbm import (
    simulate_log_returns,
    simulate_log_returns_cuda,
    simulate_log_returns_numpy,
)

BIAS_STRIKES = (0.8, 1.0, 1.2)  # x the forward
BIAS_N_FREQ = 256
BIAS_L = 12.0
_DRAW_BYTES = 1 << 27  # normals per QMC draw in the bias run (contracts are grouped to fit)


def _gbm(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n = args.contracts
    steps = 64 if args.steps is None else args.steps
    theta = np.column_stack([rng.uniform(0.02, 5.0, n), rng.uniform(-0.02, 0.10, n),
                             rng.uniform(0.0, 0.08, n), rng.uniform(0.05, 1.0, n)])  # (B, 4)
    z = rng.standard_normal((n, args.paths, steps))  # (B, M, steps)
    path_steps = n * args.paths * steps
    out = np.empty((n, args.paths))
    cap = out.nbytes

    kernel_s = best_seconds(lambda: simulate_log_returns(
        theta, z, scheme=args.scheme, moment_matching=False, cap_bytes=cap, out=out), args.repeats)
    numpy_s = best_seconds(lambda: simulate_log_returns_numpy(
        theta, z, scheme=args.scheme, moment_matching=False), args.repeats)
    result: dict[str, Any] = {
        "bench": "mc",
        "kernel_path_steps_per_s": round(path_steps / kernel_s),
        "numpy_path_steps_per_s": round(path_steps / numpy_s),
        "ratio": round(numpy_s / kernel_s, 2),
        "device": args.device,
    }
    if args.device == "cuda":
        from numba import cuda

        d_theta, d_z = cuda.to_device(theta), cuda.to_device(z)
        d_out = cuda.device_array((n, args.paths))

        def run_cuda() -> None:
            simulate_log_returns_cuda(d_theta, d_z, scheme=args.scheme, moment_matching=False,
                                      cap_bytes=cap, out=d_out)
            cuda.synchronize()

        result["cuda_path_steps_per_s"] = round(path_steps / best_seconds(run_cuda, args.repeats))
    return result


# ------------------------------------------------------------------------------ Heston and Bates

def _domain_theta(process: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n contracts uniform over the process's default domain: (n, P) in its column order."""
    from spectral_core.processes.domains import BatesDomain, HestonDomain

    domain = HestonDomain() if process == "heston" else BatesDomain()
    lower, upper = np.array(domain.lower()), np.array(domain.upper())
    return lower + (upper - lower) * rng.uniform(size=(n, lower.size))


def _kernel_theta(theta: np.ndarray, process: str) -> np.ndarray:
    """What the Heston kernel gets: for Bates column 2 holds d + lam (E[e^J] - 1), so that the
    Heston label times the uncompensated jump CF is the Bates CF."""
    if process == "heston":
        return theta
    kernel = theta.copy()
    lam, mu_j, sigma_j = theta[:, 8], theta[:, 9], theta[:, 10]
    kernel[:, 2] += lam * np.expm1(mu_j + 0.5 * sigma_j * sigma_j)
    return kernel


def _columns(theta: np.ndarray, process: str) -> dict[str, np.ndarray]:
    """Oracle keyword arguments, (B, 1) each (they broadcast against u (B, N))."""
    names = ["T", "r", "d", "v0", "kappa", "theta_v", "xi", "rho"]
    if process == "bates":
        names += ["lam", "mu_j", "sigma_j"]
    return {name: theta[:, k : k + 1] for k, name in enumerate(names)}


def _oracle_cf(u: np.ndarray, theta: np.ndarray, process: str) -> np.ndarray:
    from spectral_core.analytic_heston import bates_cf, heston_cf

    cf = heston_cf if process == "heston" else bates_cf
    return np.asarray(cf(u, **_columns(theta, process)))


def _interval(theta: np.ndarray, process: str) -> tuple[np.ndarray, np.ndarray]:
    """[c1 - L sqrt(c2), c1 + L sqrt(c2)]: cumulants by central differences of ln phi at
    u = +-h, h = 0.01 / scale (the oracle's log CF keeps full relative accuracy there)."""
    T, v0, kappa, theta_v = theta[:, 0], theta[:, 3], theta[:, 4], theta[:, 5]
    w = theta_v * T + (v0 - theta_v) * -np.expm1(-kappa * T) / kappa  # E[int v dt]
    h = (0.01 / np.sqrt(w))[:, None]  # (B, 1)
    log_plus = np.log(_oracle_cf(h, theta, process))[:, 0]
    log_minus = np.log(_oracle_cf(-h, theta, process))[:, 0]
    c1 = ((log_plus - log_minus) / (2j * h[:, 0])).real
    c2 = -((log_plus + log_minus) / h[:, 0] ** 2).real
    s = np.sqrt(c2)
    return c1 - BIAS_L * s, c1 + BIAS_L * s


def _puts(F: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """COS puts (B, 3) at BIAS_STRIKES x forward, S0 = 1, from F (B, N) on [a, b]."""
    import torch

    from spectral_core import cos

    T, r, d = theta[:, 0], theta[:, 1], theta[:, 2]
    strikes = np.exp((r - d) * T)[:, None] * np.array(BIAS_STRIKES)  # (B, 3)
    tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    prices = cos.put(tensor(F), tensor(a), tensor(b), S0=torch.ones(len(T), dtype=torch.float64),
                     K=tensor(strikes), r=tensor(r), T=tensor(T))
    return prices.numpy()


def _mc_puts(theta: np.ndarray, process: str, a: np.ndarray, b: np.ndarray, *, steps: int,
             paths: int, replicates: int, seed: int) -> np.ndarray:
    """Put prices (R, B, 3), one row per independent QMC replicate of `paths` paths each."""
    from spectral_core.analytic_heston import jump_cf_uncompensated
    from spectral_core.normals import NormalsSource
    from spectral_core.processes.qe import conditional_cf_label, simulate_heston_conditional

    n_contracts = theta.shape[0]
    kernel_theta = _kernel_theta(theta, process)
    u = np.arange(BIAS_N_FREQ) * math.pi / (b - a)[:, None]  # (B, N)
    jumps = np.ones_like(u, dtype=np.complex128)
    if process == "bates":
        jumps = jump_cf_uncompensated(u, T=theta[:, :1], lam=theta[:, 8:9], mu_j=theta[:, 9:10],
                                      sigma_j=theta[:, 10:11], xp=np)
    group = max(1, min(n_contracts, _DRAW_BYTES // (paths * steps * 8)))
    prices = np.empty((replicates, n_contracts, len(BIAS_STRIKES)))
    for g, start in enumerate(range(0, n_contracts, group)):
        rows = slice(start, min(n_contracts, start + group))
        count = rows.stop - rows.start
        source = NormalsSource("qmc", timesteps=steps, paths_per_contract=paths,
                               contracts_per_draw=count, seed=seed, cap_bytes=2 * _DRAW_BYTES,
                               prefetch=0, max_open_streams=1)
        with source, source.stream(g) as stream:
            for rep in range(replicates):
                ms2 = simulate_heston_conditional(kernel_theta[rows], stream.next(),
                                                  cap_bytes=2 * _DRAW_BYTES)  # (C, P, 2)
                F = conditional_cf_label(ms2, a[rows], b[rows], n_freq=BIAS_N_FREQ,
                                         cap_bytes=_DRAW_BYTES)  # (C, N)
                prices[rep, rows] = _puts(F * jumps[rows], a[rows], b[rows], theta[rows])
    return prices


def _bias(args: argparse.Namespace, steps_list: list[int]) -> dict[str, Any]:
    rng = np.random.default_rng(20261127)
    theta = _domain_theta(args.process, args.bias_contracts, rng)
    a, b = _interval(theta, args.process)
    u = np.arange(BIAS_N_FREQ) * math.pi / (b - a)[:, None]  # (B, N)
    F = _oracle_cf(u, theta, args.process) * np.exp(-1j * u * a[:, None])
    F[:, 0] = 1.0
    exact = _puts(F, a, b, theta)  # (B, 3)
    fields: dict[str, Any] = {}
    default_steps = not_rejected = None
    for steps in steps_list:
        prices = _mc_puts(theta, args.process, a, b, steps=steps, paths=args.bias_paths,
                          replicates=args.bias_replicates, seed=args.seed)
        bias = (prices.mean(axis=0) - exact) * 1e4  # (B, 3) bp of spot
        se = prices.std(axis=0, ddof=1) / math.sqrt(args.bias_replicates) * 1e4
        worst = np.unravel_index(int(np.abs(bias).argmax()), bias.shape)
        fields[f"bias_bp_steps{steps}"] = round(float(abs(bias[worst])), 4)
        fields[f"bias_se_bp_steps{steps}"] = round(float(se[worst]), 4)
        fields[f"bias_max_se_bp_steps{steps}"] = round(float(se.max()), 4)
        # 2-SE bounds of max |bias|: lo > target proves the step count too coarse, hi < target
        # proves it fine enough.
        fields[f"bias_lo_bp_steps{steps}"] = round(float((np.abs(bias) - 2 * se).max()), 4)
        fields[f"bias_hi_bp_steps{steps}"] = round(float((np.abs(bias) + 2 * se).max()), 4)
        if default_steps is None and float((np.abs(bias) + 2 * se).max()) < args.target_bp:
            default_steps = steps
        if not_rejected is None and float((np.abs(bias) - 2 * se).max()) < args.target_bp:
            not_rejected = steps
    fields["default_steps"] = default_steps
    fields["min_steps_not_rejected"] = not_rejected
    return fields


def _heston(args: argparse.Namespace) -> dict[str, Any]:
    from spectral_core.config import CoreConfig
    from spectral_core.processes.qe import (
        conditional_cf_label,
        simulate_heston_conditional,
        simulate_heston_conditional_cuda,
        simulate_heston_conditional_numpy,
    )

    configured = CoreConfig(process=args.process).sim.timesteps  # the default the config uses
    steps = configured if args.steps is None else args.steps
    rng = np.random.default_rng(0)
    n = args.contracts
    theta = _kernel_theta(_domain_theta(args.process, n, rng), args.process)  # (B, P)
    z = rng.standard_normal((n, args.paths, steps))  # (B, M, steps)
    path_steps = n * args.paths * steps
    out = np.empty((n, args.paths, 2))
    cap = out.nbytes

    kernel_s = best_seconds(lambda: simulate_heston_conditional(theta, z, cap_bytes=cap, out=out),
                            args.repeats)
    numpy_s = best_seconds(lambda: simulate_heston_conditional_numpy(theta, z),
                           max(1, args.repeats // 2))
    result: dict[str, Any] = {
        "bench": "mc",
        "process": args.process,
        "kernel_path_steps_per_s": round(path_steps / kernel_s),
        "numpy_path_steps_per_s": round(path_steps / numpy_s),
        "ratio": round(numpy_s / kernel_s, 2),
        "device": args.device,
        "steps": steps,
    }
    # One training batch's MC: 256 contracts x 256 paths, then the N = 64 label.
    batch_raw = _domain_theta(args.process, 256, rng)
    batch_theta = _kernel_theta(batch_raw, args.process)
    batch_z = rng.standard_normal((256, 256, steps))
    batch_cap = 256 * 256 * 2 * 8  # the (B, M, 2) moments; the (B, 64) label is smaller
    ms2 = simulate_heston_conditional(batch_theta, batch_z, cap_bytes=batch_cap)
    a, b = _interval(batch_raw, args.process)
    result["batch256x256_sim_ms"] = round(1e3 * best_seconds(
        lambda: simulate_heston_conditional(batch_theta, batch_z, cap_bytes=batch_cap),
        args.repeats), 2)
    result["batch256x256_label64_ms"] = round(1e3 * best_seconds(
        lambda: conditional_cf_label(ms2, a, b, n_freq=64, cap_bytes=batch_cap), args.repeats), 2)
    if args.device == "cuda":
        from numba import cuda

        d_theta, d_z = cuda.to_device(theta), cuda.to_device(z)
        d_out = cuda.device_array((n, args.paths, 2))

        def run_cuda() -> None:
            simulate_heston_conditional_cuda(d_theta, d_z, cap_bytes=cap, out=d_out)
            cuda.synchronize()

        result["cuda_path_steps_per_s"] = round(path_steps / best_seconds(run_cuda, args.repeats))
    if args.bias_contracts > 0:
        steps_list = sorted({int(s) for s in args.bias_steps.split(",")} | {configured})
        started = time.perf_counter()
        fields = _bias(args, steps_list)
        result["bias_bp"] = fields[f"bias_bp_steps{configured}"]
        result["bias_se_bp"] = fields[f"bias_se_bp_steps{configured}"]
        result["bias_steps"] = configured
        result.update(fields)
        result["bias_paths_per_contract"] = args.bias_paths * args.bias_replicates
        result["bias_contracts"] = args.bias_contracts
        result["bias_s"] = round(time.perf_counter() - started, 1)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process", choices=["gbm", "heston", "bates"], default="gbm")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--contracts", type=int, default=64)
    parser.add_argument("--paths", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed step count (gbm: 64; heston/bates: the configured default)")
    parser.add_argument("--scheme", choices=["log_euler", "euler"], default="log_euler",
                        help="gbm only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bias-contracts", type=int, default=24,
                        help="heston/bates: contracts of the bias run (0 skips it)")
    parser.add_argument("--bias-paths", type=int, default=1 << 14,
                        help="QMC paths per contract per replicate (a power of two)")
    parser.add_argument("--bias-replicates", type=int, default=8)
    parser.add_argument("--bias-steps", default="8,16,32,64,128,256")
    parser.add_argument("--target-bp", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    result = _gbm(args) if args.process == "gbm" else _heston(args)
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
