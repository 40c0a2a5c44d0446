"""Shared pieces of the benchmarks: held-out contracts and the one-line JSON result."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spectral_core.config import PROCESS_NAMES, Domain
from spectral_core.processes import get_process
from spectral_core.processes.domains import DOMAINS


def held_out_contracts(n: int, domain: Domain, *, seed: int = 20261127) -> dict[str, np.ndarray]:
    """n contracts uniform over the domain, strikes 0.7x..1.3x the forward, spot 100.

    Columns are the request fields of the domain's process (GBM: X0, K, T, r, d, v). Drawn with a
    pseudo-random generator, not the trainer's Sobol sequence, so they are held out.
    """
    process = get_process(next(p for p in PROCESS_NAMES if DOMAINS[p] is type(domain)))
    rng = np.random.default_rng(seed)
    cols = {field: rng.uniform(domain.bounds(name).lower, domain.bounds(name).upper, n)
            for field, name in zip(process.request_fields, domain.names, strict=True)}
    X0 = np.full(n, 100.0)
    K = X0 * np.exp((cols["r"] - cols["d"]) * cols["T"]) * rng.uniform(0.7, 1.3, n)
    return {"X0": X0, "K": K, **cols}


def machine() -> str:
    """The machine a result line was measured on: architecture, cores, Python."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


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
