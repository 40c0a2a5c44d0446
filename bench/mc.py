"""GBM path-steps per second: the numba CPU kernel against numpy running the same scheme.

`python -m bench.mc [--device cuda]` prints exactly one JSON line. Compilation and warm-up are
excluded; each figure is the best of `--repeats` timed runs on the same normals.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from bench.common import best_seconds
from spectral_core.processes.gbm import (
    simulate_log_returns,
    simulate_log_returns_cuda,
    simulate_log_returns_numpy,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--contracts", type=int, default=64)
    parser.add_argument("--paths", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--scheme", choices=["log_euler", "euler"], default="log_euler")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.contracts
    theta = np.column_stack([rng.uniform(0.02, 5.0, n), rng.uniform(-0.02, 0.10, n),
                             rng.uniform(0.0, 0.08, n), rng.uniform(0.05, 1.0, n)])  # (B, 4)
    z = rng.standard_normal((n, args.paths, args.steps))  # (B, M, steps)
    path_steps = n * args.paths * args.steps
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
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
