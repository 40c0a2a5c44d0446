"""Shared pieces of the benchmarks: held-out contracts and the one-line JSON result."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spectral_core.config import DomainConfig


def held_out_contracts(
    n: int, domain: DomainConfig, *, seed: int = 20261127
) -> dict[str, np.ndarray]:
    """n contracts uniform over the domain, strikes 0.7x..1.3x the forward, spot 100.

    Drawn with a pseudo-random generator, not the trainer's Sobol sequence, so they are held out.
    """
    rng = np.random.default_rng(seed)
    T = rng.uniform(domain.T.lower, domain.T.upper, n)
    r = rng.uniform(domain.r.lower, domain.r.upper, n)
    d = rng.uniform(domain.d.lower, domain.d.upper, n)
    v = rng.uniform(domain.sigma.lower, domain.sigma.upper, n)
    X0 = np.full(n, 100.0)
    K = X0 * np.exp((r - d) * T) * rng.uniform(0.7, 1.3, n)
    return {"X0": X0, "K": K, "T": T, "r": r, "d": d, "v": v}


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's single result line."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def best_seconds(run: Callable[[], Any], repeats: int, *, warm_up: bool = True) -> float:
    """Best wall time of `repeats` calls (after one untimed warm-up: JIT, page faults, caches)."""
    if warm_up:
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
