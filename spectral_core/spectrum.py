"""Characteristic-function target of the network: truncation rule and the binned-FFT estimator.

Written once against an array module `xp` (numpy on CPU, cupy on CUDA; cupy is never imported
here, the caller passes it). Notation follows DESIGN.md section 3: x = ln(S_T/S0), interval
[a, b], frequencies u_k = k pi / (b - a), target F_k = E[exp(i u_k (x - a))].

Estimator (O(M) per contract plus one G-point FFT):
  * the grid has G nodes y_j = a + j h, h = 2 (b - a) / G, covering [a, a + 2 (b - a)); samples
    live on the first half, the zero-padded second half makes the FFT spacing exactly
    pi / (b - a), so FFT bin k is frequency u_k;
  * each sample in [a, b] is spread linearly (cloud-in-cell) onto its two neighbouring nodes;
  * sum_j w_j exp(2 pi i j k / G) = sum_j w_j exp(i u_k (y_j - a)): the nodes are the phase
    reference, so the bin-centre phase correction is the identity (no half-cell shift);
  * dividing by the CIC kernel's transform sinc^2(theta_k / 2), theta_k = u_k h = 2 pi k / G,
    removes the kernel's smoothing; what is left per sample is theta_k^2 (1/6 - f(1 - f)) / 2
    + O(theta_k^4) for a sample at cell fraction f, zero on average over f, so the residual
    against the direct empirical CF is ~ theta_k^2 / (2 sqrt(180 M)) for smooth densities and
    never above 1/sinc^2(theta_k/2) - 1 ~ theta_k^2 / 12 (samples all on nodes).
Linear binning is chosen because it is the lowest-order spreading whose transform (sinc^2) is
strictly positive below the Nyquist bin, so the division is safe, at 2 deposits per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from spectral_core.memory import check_cap

# Bytes of (B, M) temporaries per sample in estimate_spectrum: mask (1), grid coordinate (8),
# floor (8), int64 node (8), fraction (8), two flat index arrays (16), two weights (16), slack.
_BYTES_PER_SAMPLE = 72


@dataclass(frozen=True)
class SpectrumEstimate:
    """F: (B, N) complex128 estimate of E[exp(i u_k (x - a)) | a <= x <= b], F[:, 0] == 1.
    truncated_mass: (B,) float64 fraction of samples outside [a, b] (dropped)."""

    F: Any
    truncated_mass: Any


def _first_bad(values: Any, bad: Any) -> float:
    return float(values[bad].ravel()[0])


def _check_vector(name: str, v: Any, xp: ModuleType) -> None:
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(v.shape)}")
    finite = xp.isfinite(v)
    if not bool(finite.all()):
        raise ValueError(f"{name} must be finite, got {_first_bad(v, ~finite)}")


def _check_interval(a: Any, b: Any, xp: ModuleType) -> None:
    _check_vector("a", a, xp)
    _check_vector("b", b, xp)
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    bad = ~(b > a)
    if bool(bad.any()):
        raise ValueError(f"b must be > a, got a={_first_bad(a, bad)} b={_first_bad(b, bad)}")


def truncation_interval(
    T: Any, r: Any, d: Any, sigma: Any, *, L: float, xp: ModuleType
) -> tuple[Any, Any]:
    """[a, b] = [m - L s, m + L s] with m = (r - d) T, s = sigma sqrt(T); all (B,) -> (B,), (B,).

    Works with xp = numpy, cupy or torch (differentiable w.r.t. the parameters under torch).
    """
    if not (math.isfinite(L) and L > 0):
        raise ValueError(f"L must be finite and > 0, got {L}")
    named = {"T": T, "r": r, "d": d, "sigma": sigma}
    for name, v in named.items():
        _check_vector(name, v, xp)
        if v.shape != T.shape:
            raise ValueError(
                f"{name} must have the shape of T {tuple(T.shape)}, got {tuple(v.shape)}"
            )
    if bool((T <= 0).any()):
        raise ValueError(f"T must be > 0, got {_first_bad(T, T <= 0)}")
    if bool((sigma <= 0).any()):
        raise ValueError(f"sigma must be > 0, got {_first_bad(sigma, sigma <= 0)}")
    m = (r - d) * T
    s = sigma * xp.sqrt(T)
    return m - L * s, m + L * s


def frequencies(a: Any, b: Any, *, n_freq: int, xp: ModuleType) -> Any:
    """u_k = k pi / (b - a), k = 0..n_freq-1: (B,), (B,) -> (B, N) float64."""
    if n_freq < 1:
        raise ValueError(f"n_freq must be >= 1, got {n_freq}")
    _check_interval(a, b, xp)
    k = xp.arange(n_freq)
    # Scale first so k (int) meets a float64 array and never a default-precision float.
    return (math.pi / (b - a))[:, None] * k[None, :]


def spectrum_workspace_bytes(*, batch: int, samples: int, grid: int, n_freq: int) -> int:
    """Peak bytes estimate_spectrum allocates for a (batch, samples) input (inputs excluded)."""
    per_sample = batch * samples * _BYTES_PER_SAMPLE
    histogram = 3 * batch * grid * 8  # two bincounts and their sum
    fft = batch * (grid // 2 + 1) * 16 + 2 * batch * n_freq * 16
    return per_sample + histogram + fft


def estimate_spectrum(
    x: Any, a: Any, b: Any, *, n_freq: int, grid: int, cap_bytes: int, xp: ModuleType
) -> SpectrumEstimate:
    """Estimate F_k from samples x (B, M) float64 of ln(S_T/S0) by linear binning + FFT.

    Samples outside [a, b] (including +-inf) are dropped and reported in truncated_mass; the
    estimate is normalised by the kept count, i.e. it is the CF of x conditioned on [a, b]: that
    is the law COS inverts on [a, b] and it makes F_0 = 1 exactly, as the network's target wants.
    A contract with no sample inside its interval raises ValueError (its interval is wrong).
    Refuses with MemoryCapError when the workspace would exceed cap_bytes (memory.spectrum_bytes).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (B, M), got shape {tuple(x.shape)}")
    if x.dtype != xp.float64:
        raise ValueError(f"x must be float64, got {x.dtype}")
    n_contracts, n_samples = x.shape
    if n_samples < 1:
        raise ValueError(f"x must hold at least one sample per contract, got M={n_samples}")
    _check_interval(a, b, xp)
    if a.shape != (n_contracts,):
        raise ValueError(f"a and b must be ({n_contracts},) to match x, got {tuple(a.shape)}")
    if n_freq < 1:
        raise ValueError(f"n_freq must be >= 1, got {n_freq}")
    if grid < 2 * n_freq or grid % 2:
        raise ValueError(f"grid must be even and >= 2 * n_freq ({2 * n_freq}), got {grid}")
    check_cap(
        "spectrum estimator",
        spectrum_workspace_bytes(batch=n_contracts, samples=n_samples, grid=grid, n_freq=n_freq),
        cap_bytes,
        setting="memory.spectrum_bytes",
    )
    if bool(xp.isnan(x).any()):
        raise ValueError("x must not contain NaN")

    lo = a[:, None]  # (B, 1)
    inside = (x >= lo) & (x <= b[:, None])  # (B, M) bool
    kept = inside.sum(axis=1)  # (B,)
    if bool((kept == 0).any()):
        row = int(xp.nonzero(kept == 0)[0][0])
        raise ValueError(
            f"contract {row}: no sample inside [a, b] = [{float(a[row])}, {float(b[row])}]"
        )

    step = 2.0 * (b - a) / grid  # (B,) node spacing h
    t = xp.where(inside, (x - lo) / step[:, None], 0.0)  # (B, M) grid coordinate in [0, G/2]
    node = xp.floor(t)
    frac = t - node  # (B, M) cell fraction f in [0, 1)
    # Flattened (contract, node) index: node <= G/2 so node + 1 never leaves its contract's row.
    row_start = xp.arange(n_contracts, dtype=xp.int64) * grid  # (B,)
    flat = (node.astype(xp.int64) + row_start[:, None]).ravel()  # (B * M,)
    w_right = xp.where(inside, frac, 0.0)
    w_left = inside.astype(xp.float64) - w_right
    size = n_contracts * grid
    hist = xp.bincount(flat, weights=w_left.ravel(), minlength=size)
    hist = hist + xp.bincount(flat + 1, weights=w_right.ravel(), minlength=size)
    hist = hist.reshape(n_contracts, grid)  # (B, G) float64

    # rfft uses exp(-2 pi i jk/G); the target has exp(+i u_k (y_j - a)), hence the conjugate.
    spectrum = xp.conj(xp.fft.rfft(hist, axis=1)[:, :n_freq])  # (B, N) complex128
    kernel = xp.sinc(xp.arange(n_freq, dtype=xp.float64) / grid) ** 2  # sinc^2(theta_k / 2)
    F = spectrum / (kernel[None, :] * kept[:, None].astype(xp.float64))
    F[:, 0] = 1.0  # already 1 up to rounding; exact by construction of the target
    truncated = (n_samples - kept).astype(xp.float64) / n_samples
    return SpectrumEstimate(F=F, truncated_mass=truncated)


def empirical_cf(x: Any, u: Any, a: Any, *, xp: ModuleType) -> Any:
    """Direct O(M N) estimator mean_j exp(i u_k (x_j - a)): x (B, M), u (B, N), a (B,) -> (B, N)."""
    if x.ndim != 2 or u.ndim != 2 or a.ndim != 1:
        raise ValueError(
            "need x (B, M), u (B, N), a (B,), got "
            f"{tuple(x.shape)}, {tuple(u.shape)}, {tuple(a.shape)}"
        )
    if not (x.shape[0] == u.shape[0] == a.shape[0]):
        raise ValueError(f"batch sizes differ: x {x.shape[0]}, u {u.shape[0]}, a {a.shape[0]}")
    z = x - a[:, None]  # (B, M)
    out = xp.empty(u.shape, dtype=xp.complex128)
    for k in range(u.shape[1]):  # one frequency at a time keeps memory at O(B M)
        phase = u[:, k : k + 1] * z
        out[:, k] = xp.cos(phase).mean(axis=1) + 1j * xp.sin(phase).mean(axis=1)
    return out
