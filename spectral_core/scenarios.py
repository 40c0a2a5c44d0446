"""Scenario sampling: draws of S_T from the learned distribution, by inverse CDF through COS.

For one contract the learned CF gives the COS CDF of x = ln(S_T/S0) on [a, b]; a uniform
u in (0, 1) maps to S0 exp(Q(u)) with Q the COS quantile (spectral_core/cos.py: safeguarded
Newton, converging even where a learned density dips below zero). The uniforms come from
numpy's PCG64 seeded by the caller, so the same seed, model version and contract give the same
samples bit for bit (float64 throughout, one thread of torch ops on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch

from spectral_core import cos
from spectral_core.pricer import Contracts, Pricer

# Levels solved per COS pass: the solver holds a few (levels, N) float64 tensors, so 8,192
# levels of N = 64 terms keep it to ~4 MB each.
_CHUNK = 8192
# 53-bit uniforms on the open interval (0, 1): (k + 0.5) / 2^53, k = 0 .. 2^53 - 1.
_U_SCALE = float(2**53)


def uniforms(n: int, seed: int) -> np.ndarray:
    """n float64 uniforms in (0, 1), strictly inside (a quantile at 0 or 1 is not finite)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    k = np.random.Generator(np.random.PCG64(seed)).integers(0, 2**53, size=n, dtype=np.int64)
    return (k.astype(np.float64) + 0.5) / _U_SCALE


def terminal_quantiles(
    F: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, S0: float, u: np.ndarray
) -> np.ndarray:
    """S_T at levels u of one contract's COS CDF: F (1, N) complex128, a and b (1,)."""
    if F.ndim != 2 or F.shape[0] != 1:
        raise ValueError(f"F must be one contract's spectrum (1, N), got {tuple(F.shape)}")
    s0 = torch.tensor([S0], dtype=torch.float64)
    out = np.empty(len(u), dtype=np.float64)
    with torch.no_grad():
        for lo in range(0, len(u), _CHUNK):
            p = torch.from_numpy(u[lo:lo + _CHUNK])[None, :]
            out[lo:lo + len(p[0])] = cos.quantile(F, a, b, S0=s0, p=p)[0].numpy()
    return out


def sample_terminal(pricer: Pricer, contract: Contracts, *, n: int, seed: int) -> np.ndarray:
    """n draws of S_T for one contract (its K is not used) from `pricer`'s learned law.

    The contract must lie in the trained domain (DomainError otherwise, as for prices)."""
    if len(contract) != 1:
        raise ValueError(f"sample one contract at a time, got {len(contract)}")
    pricer.check_domain(contract)
    theta = torch.tensor(
        [[float(getattr(contract, f)[0]) for f in pricer.process.request_fields]],
        dtype=torch.float64,
    )
    a, b = pricer.process.truncation_interval(theta, L=pricer.config.spectrum.truncation_L,
                                              xp=torch)
    with torch.no_grad():
        F = pricer.spectrum(theta)
    return terminal_quantiles(F, a, b, S0=float(contract.X0[0]), u=uniforms(n, seed))
