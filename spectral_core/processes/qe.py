"""Heston Monte Carlo: Andersen's QE variance scheme and the conditional (Rao-Blackwellised) label.

Heston (DESIGN.md section 8): dv = kappa (theta_v - v) dt + xi sqrt(v) dW2, d<W1, W2> = rho dt,
theta = (T, r, d, v0, kappa, theta_v, xi, rho) (B, >= 8) float64; only the first 8 columns are
read, so Bates theta passes through unchanged (its caller puts the effective dividend
d + lam (exp(mu_j + sigma_j^2 / 2) - 1) in column 2 and multiplies the label by the jump factor).

Variance: Andersen (2008) quadratic-exponential (QE) with psi_c = 1.5. One standard normal z per
step drives it: the quadratic branch uses z, the exponential branch u = Phi(z), read through
1 - u = erfc(z/sqrt2)/2 (one erfc, and the tail that sets v_{t+dt} keeps full precision). QE
matches the exact conditional mean and variance of v_{t+dt} and never leaves [0, inf), with or
without the Feller condition.

Log-return: given the variance path, x = ln(S_T/S0) is Gaussian. With Andersen's K coefficients
and the trapezoid rule (gamma1 = gamma2 = 1/2, I = sum dt (v_t + v_{t+dt}) / 2) the kernel returns
per path m = (r - d) T + sum_steps (K0 + K1 v_t + K2 v_{t+dt}) and s2 = sum_steps (K3 v_t +
K4 v_{t+dt}); uncorrected that is m = (r-d)T - I/2 + (rho/xi)(v_T - v0 - kappa theta_v T +
kappa I), s2 = (1 - rho^2) I. Nothing of x itself is sampled: the label
F_k = mean_paths exp(i u_k (m - a) - u_k^2 s2 / 2) is the CF of x averaged over variance paths,
which carries far less noise than exp(i u_k (x - a)) (`sample_log_returns` draws that plain x).

Martingale correction (`martingale_correction=True`, Andersen section 4.3.3): per step K0 is
replaced by K0* = -ln M - (K1 + K3/2) v_t, M = E[exp(A v_{t+dt}) | v_t], A = K2 + K4/2, so
E[exp(x_{t+dt} - x_t - (r-d) dt) | v_t] = 1 exactly for the discrete scheme: E[exp(m + s2/2)] =
exp((r - d) T). M exists only for A < 1/(2a) (quadratic) and A < beta (exponential); a step where
it does not exist keeps the uncorrected K0 (that step is then not a martingale step). For
rho <= 0, A <= 0 and M always exists; for rho > 0 it fails only when mean + var / mean of
v_{t+dt} exceeds about 2 xi / rho, far outside the default domain (rho <= 0.2, xi >= 0.1).

Discretisation bias (bench.mc --process heston: puts at 0.8 / 1 / 1.2 x forward over the default
domain, against the analytic CF; QuantLib's QE-M agrees on the worst contract): max |bias| in bp
of spot 25.6 / 9.3 / 3.6 / 1.1 / 0.31 at 8 / 16 / 32 / 64 / 128 steps. It is led by contracts
with large kappa T, and falls like (kappa dt)^2: measured, the variance of x comes out short,
as the trapezoid I on the grid carries too little of the leverage term's (kappa rho / xi) I
noise. A fixed step count needs ~256 or more for 0.1 bp over the whole domain.

The step is written once, as the plain Python functions below, and compiled by `numba.njit`
(CPU, parallel over paths) and `numba.cuda.jit(device=True)` (one thread per path). The numpy
`*_numpy` functions are the references (vectorised over contracts and paths, stepping in time).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda as _numba_cuda
from numba import float64, njit, prange
from scipy import special

from spectral_core.memory import check_cap, nbytes_of

PSI_C = 1.5  # Andersen's switch: quadratic branch for psi <= PSI_C, exponential above
N_THETA = 8  # theta columns read: T, r, d, v0, kappa, theta_v, xi, rho
THETA_NAMES: tuple[str, ...] = ("T", "r", "d", "v0", "kappa", "theta_v", "xi", "rho")
# Label recurrence: exp(i u_k y - c k^2) is restarted from its exact value every CF_CHUNK
# frequencies; inside a chunk the ratio recurrence loses at most ~CF_CHUNK^2 / 2 ulps.
CF_CHUNK = 16
# A label term below this (and every later one, as exp(-c k^2) falls with k) is dropped: it moves
# F by < 1e-20, far below float64 resolution of F_k ~ 1.
CF_NEGLIGIBLE = 1e-20
_TINY_TAIL = 1e-300  # floor of 1 - Phi(z): z > 38 would give log(x / 0)
_SQRT1_2 = 0.7071067811865476

_CUDA_THREADS = 128  # threads per block; a power of two for the tree reductions
# numba's intrinsics confuse mypy; the simulator swaps this global by identity, so an alias works.
cuda: Any = _numba_cuda


# ------------------------------------------------------------------------- the step (one source)

def heston_coefficients(dt: float, kappa: float, theta_v: float, xi: float,
                        rho: float) -> tuple[float, float, float, float, float, float, float,
                                             float, float, float]:
    """Per-contract step constants, hoisted out of the time loop.

    Returns (e, c_v, c_theta, K0, K1, K2, K3, K4, A, K13): e = exp(-kappa dt); the conditional
    variance of v_{t+dt} is c_v v_t + c_theta; Andersen's K0..K4 with gamma1 = gamma2 = 1/2;
    A = K2 + K4/2 (the exponent of M) and K13 = K1 + K3/2 (the v_t part of K0*).
    """
    e = math.exp(-kappa * dt)
    one_minus_e = -math.expm1(-kappa * dt)  # no cancellation for small kappa dt
    xi2 = xi * xi
    c_v = xi2 * e * one_minus_e / kappa
    c_theta = theta_v * xi2 * one_minus_e * one_minus_e / (2.0 * kappa)
    half = 0.5 * dt
    lev = rho / xi
    k0 = -lev * kappa * theta_v * dt
    k1 = half * (kappa * lev - 0.5) - lev
    k2 = half * (kappa * lev - 0.5) + lev
    k3 = half * (1.0 - rho) * (1.0 + rho)  # 1 - rho^2 without cancellation near |rho| = 1
    k4 = k3
    return e, c_v, c_theta, k0, k1, k2, k3, k4, k2 + 0.5 * k4, k1 + 0.5 * k3


def qe_step(v: float, z: float, theta_v: float, e: float, c_v: float, c_theta: float,
            k0: float, k1: float, k2: float, k3: float, k4: float, a_mgf: float, k13: float,
            correct: bool) -> tuple[float, float, float]:
    """One step from v_t = v driven by the standard normal z -> (v_{t+dt}, dm, ds2).

    dm = K0 (or K0*) + K1 v_t + K2 v_{t+dt} and ds2 = K3 v_t + K4 v_{t+dt} are the step's shares
    of m and s2. log_mgf = ln E[exp(A v_{t+dt}) | v_t] of the branch taken; `ok` says it exists.
    """
    mean = theta_v + (v - theta_v) * e
    var = v * c_v + c_theta
    log_mgf = 0.0
    ok = True
    if mean <= 0.0:  # v_t = theta_v = 0: the variance stays at 0 (M = 1)
        v_next = 0.0
    elif var <= 0.0:  # no conditional variance left (underflow): a deterministic step
        v_next = mean
        log_mgf = a_mgf * mean
    else:
        psi = var / mean / mean  # two divisions: mean * mean may underflow, psi may be inf
        if psi <= PSI_C:
            two_over = 2.0 / psi
            b2 = two_over - 1.0 + math.sqrt(two_over * (two_over - 1.0))
            a = mean / (1.0 + b2)
            root = math.sqrt(b2) + z
            v_next = a * root * root
            x = 2.0 * a_mgf * a
            ok = x < 1.0
            if ok:
                log_mgf = a_mgf * b2 * a / (1.0 - x) - 0.5 * math.log1p(-x)
        else:
            p = 1.0 - 2.0 / (psi + 1.0)  # (psi - 1) / (psi + 1), = 1 for psi = inf
            beta = (1.0 - p) / mean
            tail = 0.5 * math.erfc(z * _SQRT1_2)  # 1 - u, u = Phi(z), at full precision
            if tail >= 1.0 - p:  # u <= p: the atom at 0
                v_next = 0.0
            else:
                if tail < _TINY_TAIL:
                    tail = _TINY_TAIL
                v_next = math.log((1.0 - p) / tail) / beta
            ok = a_mgf < beta
            if ok:
                log_mgf = math.log(p + beta * (1.0 - p) / (beta - a_mgf))
    drift = k0
    if correct and ok:
        drift = -log_mgf - k13 * v
    return v_next, drift + k1 * v + k2 * v_next, k3 * v + k4 * v_next


def cf_chunk(theta1: float, c: float, w_re: float, w_im: float, q2: float, k0: int,
             count: int, acc_re: Any, acc_im: Any, offset: int) -> bool:
    """Add exp(i k theta1 - c k^2), k = k0 .. k0 + count - 1, to acc[offset + k - k0].

    theta1 = u_1 (m - a), c = u_1^2 s2 / 2, w = exp(i theta1), q2 = exp(-2c). The chunk starts
    from the exact value at k0 (one sincos, two exp), then steps by the rotation w and the ratio
    exp(-c (2k + 1)), itself stepped by q2: no transcendental per (path, k), and the error
    cannot grow past one chunk. Returns True once the terms fall below CF_NEGLIGIBLE: exp(-c k^2)
    only falls with k, so the caller may skip every later chunk.
    """
    angle = k0 * theta1
    p_re = math.cos(angle)
    p_im = math.sin(angle)
    g = math.exp(-c * k0 * k0)
    ratio = math.exp(-c * (2 * k0 + 1))
    for j in range(count):
        if g < CF_NEGLIGIBLE:
            return True
        acc_re[offset + j] += g * p_re
        acc_im[offset + j] += g * p_im
        p_re, p_im = p_re * w_re - p_im * w_im, p_re * w_im + p_im * w_re
        g *= ratio
        ratio *= q2
    return False


# --------------------------------------------------------------------------------- validation

def _check_theta_values(theta: np.ndarray) -> None:
    """Raise ValueError naming the first bad contract parameter (of the first 8 columns)."""
    head = theta[:, :N_THETA]
    bad = ~np.isfinite(head)
    if bad.any():
        b, k = np.argwhere(bad)[0]
        raise ValueError(f"theta[{b}, {k}] ({THETA_NAMES[k]}) must be finite, got {head[b, k]}")
    rules = ((0, "> 0", head[:, 0] > 0.0), (3, ">= 0", head[:, 3] >= 0.0),
             (4, "> 0", head[:, 4] > 0.0), (5, ">= 0", head[:, 5] >= 0.0),
             (6, "> 0", head[:, 6] > 0.0), (7, "in [-1, 1]", np.abs(head[:, 7]) <= 1.0))
    for k, rule, ok in rules:
        if not ok.all():
            b = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"theta[{b}, {k}] ({THETA_NAMES[k]}) must be {rule}, "
                             f"got {head[b, k]}")


def _check_sim_shapes(theta_shape: tuple[int, ...], theta_dtype: Any, z_shape: tuple[int, ...],
                      z_dtype: Any) -> tuple[int, int, int]:
    if len(theta_shape) != 2 or theta_shape[1] < N_THETA:
        raise ValueError(f"theta must have shape (B, >= 8) [{', '.join(THETA_NAMES)}], "
                         f"got {theta_shape}")
    if len(z_shape) != 3 or z_shape[0] != theta_shape[0]:
        raise ValueError(f"normals must have shape (B={theta_shape[0]}, M, steps), got {z_shape}")
    if min(z_shape) < 1:
        raise ValueError(f"normals must be non-empty, got shape {z_shape}")
    for name, dtype in (("theta", theta_dtype), ("normals", z_dtype)):
        if np.dtype(dtype) != np.float64:
            raise ValueError(f"{name} must be float64, got {np.dtype(dtype)}")
    return z_shape[0], z_shape[1], z_shape[2]


def _check_correction(martingale_correction: Any) -> None:
    if not isinstance(martingale_correction, bool):
        raise ValueError(f"martingale_correction must be a bool, got {martingale_correction!r}")


def _check_out(out: Any, shape: tuple[int, ...], dtype: Any, want: Any, ok: bool) -> None:
    if tuple(out.shape) != shape or np.dtype(dtype) != np.dtype(want) or not ok:
        raise ValueError(f"out must be a writeable C-contiguous {np.dtype(want)} array of shape "
                         f"{shape}, got {np.dtype(dtype)} {tuple(out.shape)}")


def _host_out(out: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy array, got {type(out).__name__}")
    _check_out(out, shape, out.dtype, dtype, out.flags.c_contiguous and out.flags.writeable)
    return out


def _validate_sim_host(theta: Any, normals: Any,
                       martingale_correction: Any) -> tuple[np.ndarray, int, int, int]:
    if not isinstance(theta, np.ndarray) or not isinstance(normals, np.ndarray):
        raise ValueError(f"theta and normals must be numpy arrays, got "
                         f"{type(theta).__name__} and {type(normals).__name__}")
    _check_correction(martingale_correction)
    n_contracts, n_paths, n_steps = _check_sim_shapes(theta.shape, theta.dtype, normals.shape,
                                                      normals.dtype)
    if not normals.flags.c_contiguous:
        raise ValueError("normals must be C-contiguous (no hidden copy of the largest input)")
    _check_theta_values(theta)
    return np.ascontiguousarray(theta[:, :N_THETA]), n_contracts, n_paths, n_steps


def _paths_cap(shape: tuple[int, ...], cap_bytes: int, where: str) -> None:
    check_cap(f"Heston conditional moments{where}", nbytes_of(shape, np.float64), int(cap_bytes),
              setting="memory.paths_bytes")


def _check_interval_host(a: Any, b: Any, n_contracts: int) -> tuple[np.ndarray, np.ndarray]:
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, np.ndarray) or v.dtype != np.float64 or v.shape != (n_contracts,):
            raise ValueError(f"{name} must be a float64 numpy array of shape ({n_contracts},), "
                             f"got {getattr(v, 'dtype', type(v).__name__)} "
                             f"{tuple(getattr(v, 'shape', ()))}")
        finite = np.isfinite(v)
        if not finite.all():
            raise ValueError(f"{name} must be finite, got {v[~finite][0]}")
    bad = ~(b > a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"b must be > a, got a={a[i]} b={b[i]} (contract {i})")
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _check_n_freq(n_freq: Any) -> int:
    if isinstance(n_freq, bool) or not isinstance(n_freq, int | np.integer) or n_freq < 1:
        raise ValueError(f"n_freq must be an integer >= 1, got {n_freq!r}")
    return int(n_freq)


def _check_ms2_shape(shape: tuple[int, ...], dtype: Any, name: str = "ms2") -> tuple[int, int]:
    if len(shape) != 3 or shape[2] != 2 or min(shape) < 1:
        raise ValueError(f"{name} must have shape (B, M, 2) [m, s2] with B, M >= 1, got {shape}")
    if np.dtype(dtype) != np.float64:
        raise ValueError(f"{name} must be float64, got {np.dtype(dtype)}")
    return shape[0], shape[1]


def _validate_label_host(ms2: Any, a: Any, b: Any,
                         n_freq: Any) -> tuple[np.ndarray, np.ndarray, int]:
    if not isinstance(ms2, np.ndarray):
        raise ValueError(f"ms2 must be a numpy array, got {type(ms2).__name__}")
    n_contracts, _ = _check_ms2_shape(ms2.shape, ms2.dtype)
    if not ms2.flags.c_contiguous:
        raise ValueError("ms2 must be C-contiguous (no hidden copy of the paths)")
    a, b = _check_interval_host(a, b, n_contracts)
    return a, b, _check_n_freq(n_freq)


def _label_cap(shape: tuple[int, int], cap_bytes: int, where: str) -> None:
    check_cap(f"Heston conditional CF label{where}", nbytes_of(shape, np.complex128),
              int(cap_bytes), setting="memory.spectrum_bytes")


# ------------------------------------------------------------------------------- CPU kernels

_coefficients_cpu = njit(inline="always")(heston_coefficients)
_step_cpu = njit(inline="always")(qe_step)
_chunk_cpu = njit(inline="always")(cf_chunk)


@njit(parallel=True, nogil=True, cache=True)
def _heston_kernel(theta: np.ndarray, z: np.ndarray, correct: bool, out: np.ndarray) -> None:
    n_contracts, n_paths, n_steps = z.shape
    coef = np.empty((n_contracts, 10))  # (B, 10) per-contract step constants
    for b in range(n_contracts):
        c = _coefficients_cpu(theta[b, 0] / n_steps, theta[b, 4], theta[b, 5], theta[b, 6],
                              theta[b, 7])
        for j in range(10):
            coef[b, j] = c[j]
    for i in prange(n_contracts * n_paths):
        b = i // n_paths
        p = i - b * n_paths
        theta_v = theta[b, 5]
        e, c_v, c_theta, k0, k1 = coef[b, 0], coef[b, 1], coef[b, 2], coef[b, 3], coef[b, 4]
        k2, k3, k4, a_mgf, k13 = coef[b, 5], coef[b, 6], coef[b, 7], coef[b, 8], coef[b, 9]
        v = theta[b, 3]
        m = 0.0
        s2 = 0.0
        for t in range(n_steps):
            v, dm, ds2 = _step_cpu(v, z[b, p, t], theta_v, e, c_v, c_theta, k0, k1, k2, k3, k4,
                                   a_mgf, k13, correct)
            m += dm
            s2 += ds2
        out[b, p, 0] = (theta[b, 1] - theta[b, 2]) * theta[b, 0] + m
        out[b, p, 1] = s2


@njit(parallel=True, nogil=True, cache=True)
def _label_kernel(ms2: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    n_contracts, n_paths, _ = ms2.shape
    n_freq = out.shape[1]
    for row in prange(n_contracts):
        acc_re = np.zeros(n_freq)  # (N,) sums over paths
        acc_im = np.zeros(n_freq)
        u1 = math.pi / (b[row] - a[row])
        for p in range(n_paths):
            theta1 = u1 * (ms2[row, p, 0] - a[row])
            c = 0.5 * u1 * u1 * ms2[row, p, 1]
            w_re = math.cos(theta1)
            w_im = math.sin(theta1)
            q2 = math.exp(-2.0 * c)
            for k0 in range(0, n_freq, CF_CHUNK):
                if _chunk_cpu(theta1, c, w_re, w_im, q2, k0, min(CF_CHUNK, n_freq - k0),
                              acc_re, acc_im, k0):
                    break
        out[row, 0] = complex(1.0, 0.0)  # F_0 = 1 exactly
        for k in range(1, n_freq):
            out[row, k] = complex(acc_re[k] / n_paths, acc_im[k] / n_paths)


@njit(parallel=True, nogil=True, cache=True)
def _sample_kernel(ms2: np.ndarray, z: np.ndarray, out: np.ndarray) -> None:
    n_contracts, n_paths = z.shape
    for i in prange(n_contracts * n_paths):
        b = i // n_paths
        p = i - b * n_paths
        out[b, p] = ms2[b, p, 0] + math.sqrt(ms2[b, p, 1]) * z[b, p]


# ------------------------------------------------------------------------------ CPU public API

def simulate_heston_conditional(theta: np.ndarray, normals: np.ndarray, *,
                                martingale_correction: bool = True, cap_bytes: int,
                                out: np.ndarray | None = None) -> np.ndarray:
    """Conditional Gaussian moments (m, s2) of x = ln(S_T/S0) per contract and variance path.

    theta: (B, >= 8) float64 [T, r, d, v0, kappa, theta_v, xi, rho, ...]; normals: (B, M, steps)
    float64 C-contiguous, normals[..., t] drives the variance over step t; dt = T / steps per
    contract. Returns (B, M, 2) float64 (`out` when given): out[..., 0] = m, out[..., 1] = s2.
    CPU numba, parallel over paths. Refuses with MemoryCapError (memory.paths_bytes) first.
    """
    theta, n_contracts, n_paths, _ = _validate_sim_host(theta, normals, martingale_correction)
    shape = (n_contracts, n_paths, 2)
    _paths_cap(shape, cap_bytes, "")
    result = _host_out(out, shape, np.float64)  # (B, M, 2)
    _heston_kernel(theta, normals, martingale_correction, result)
    return result


def simulate_heston_conditional_numpy(theta: np.ndarray, normals: np.ndarray, *,
                                      martingale_correction: bool = True) -> np.ndarray:
    """The scheme of `simulate_heston_conditional` in numpy, stepping in time: the reference.

    Every branch is evaluated on every path and selected with np.where (the garbage of the
    branches not taken is silenced, never used). No memory cap: a test and bench reference only.
    """
    theta, n_contracts, n_paths, n_steps = _validate_sim_host(theta, normals,
                                                              martingale_correction)
    T, r, d, v0, kappa, theta_v, xi, rho = (theta[:, k : k + 1] for k in range(N_THETA))  # (B, 1)
    dt = T / n_steps
    e = np.exp(-kappa * dt)
    one_minus_e = -np.expm1(-kappa * dt)
    xi2 = xi * xi
    c_v = xi2 * e * one_minus_e / kappa
    c_theta = theta_v * xi2 * one_minus_e * one_minus_e / (2.0 * kappa)
    half, lev = 0.5 * dt, rho / xi
    k0 = -lev * kappa * theta_v * dt
    k1 = half * (kappa * lev - 0.5) - lev
    k2 = half * (kappa * lev - 0.5) + lev
    k3 = half * (1.0 - rho) * (1.0 + rho)
    k4 = k3
    a_mgf, k13 = k2 + 0.5 * k4, k1 + 0.5 * k3
    v = np.repeat(v0, n_paths, axis=1)  # (B, M)
    m = np.zeros((n_contracts, n_paths))
    s2 = np.zeros((n_contracts, n_paths))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for t in range(n_steps):
            z = normals[:, :, t]  # (B, M)
            mean = theta_v + (v - theta_v) * e
            var = v * c_v + c_theta
            psi = var / mean / mean
            live = (mean > 0.0) & (var > 0.0)
            quad = live & (psi <= PSI_C)
            expo = live & (psi > PSI_C)
            # quadratic branch
            two_over = 2.0 / psi
            b2 = two_over - 1.0 + np.sqrt(two_over * (two_over - 1.0))
            a = mean / (1.0 + b2)
            v_quad = a * (np.sqrt(b2) + z) ** 2
            x = 2.0 * a_mgf * a
            ok_quad = x < 1.0
            mgf_quad = a_mgf * b2 * a / (1.0 - x) - 0.5 * np.log1p(-x)
            # exponential branch
            p = 1.0 - 2.0 / (psi + 1.0)
            beta = (1.0 - p) / mean
            tail = 0.5 * special.erfc(z * _SQRT1_2)
            v_exp = np.where(tail >= 1.0 - p, 0.0,
                             np.log((1.0 - p) / np.maximum(tail, _TINY_TAIL)) / beta)
            ok_exp = a_mgf < beta
            mgf_exp = np.log(p + beta * (1.0 - p) / (beta - a_mgf))

            v_next = np.where(quad, v_quad, np.where(expo, v_exp, np.where(mean > 0.0, mean,
                                                                           0.0)))
            dead = mean <= 0.0
            log_mgf = np.where(quad, mgf_quad, np.where(expo, mgf_exp,
                                                        np.where(dead, 0.0, a_mgf * mean)))
            ok = np.where(quad, ok_quad, np.where(expo, ok_exp, True))
            drift = np.where(ok & martingale_correction, -log_mgf - k13 * v, k0)
            m += drift + k1 * v + k2 * v_next
            s2 += k3 * v + k4 * v_next
            v = v_next
    out = np.empty((n_contracts, n_paths, 2))  # (B, M, 2)
    out[..., 0] = (r - d) * T + m
    out[..., 1] = s2
    return out


def conditional_cf_label(ms2: np.ndarray, a: np.ndarray, b: np.ndarray, *, n_freq: int,
                         cap_bytes: int, out: np.ndarray | None = None) -> np.ndarray:
    """F_k = mean_paths exp(i u_k (m - a) - u_k^2 s2 / 2), u_k = k pi / (b - a): (B, N) complex128.

    ms2: (B, M, 2) float64 from `simulate_heston_conditional`; a, b: (B,) float64 with b > a.
    It is E[exp(i u_k (x - a)) | variance path] averaged over the paths (the Rao-Blackwellised
    estimate of the shifted CF); unlike the binned estimator nothing is truncated to [a, b]: the
    conditional law is Gaussian on the whole line. F_0 = 1 exactly. CPU numba, parallel over
    contracts, chunked recurrence in k (see `cf_chunk`). It equals the direct formula to the
    rounding of the phase k u_1 (m - a) that any float64 formula carries: ~1e-13 for a single
    path at k = 255, ~1e-15 once averaged over paths.
    Refuses with MemoryCapError (memory.spectrum_bytes) before allocating.
    """
    a, b, n_freq = _validate_label_host(ms2, a, b, n_freq)
    shape = (ms2.shape[0], n_freq)
    _label_cap(shape, cap_bytes, "")
    result = _host_out(out, shape, np.complex128)  # (B, N)
    _label_kernel(ms2, a, b, result)
    return result


def conditional_cf_label_numpy(ms2: np.ndarray, a: np.ndarray, b: np.ndarray, *,
                               n_freq: int) -> np.ndarray:
    """The label by the direct formula, one frequency at a time (memory O(B M)): the reference."""
    a, b, n_freq = _validate_label_host(ms2, a, b, n_freq)
    y = ms2[..., 0] - a[:, None]  # (B, M)
    s2 = ms2[..., 1]
    out = np.empty((ms2.shape[0], n_freq), dtype=np.complex128)  # (B, N)
    for k in range(n_freq):
        u = (k * math.pi / (b - a))[:, None]  # (B, 1)
        out[:, k] = np.exp(1j * u * y - 0.5 * u * u * s2).mean(axis=1)
    out[:, 0] = 1.0
    return out


def sample_log_returns(ms2: np.ndarray, z_extra: np.ndarray, *, cap_bytes: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """x = m + sqrt(s2) z_extra (B, M) float64: an exact draw of x given each variance path.

    The plain (not Rao-Blackwellised) sample, for the binned-FFT label (spectrum.estimate_spectrum)
    from the same variance paths. z_extra: (B, M) float64 standard normals independent of the
    variance's. Refuses with MemoryCapError (memory.paths_bytes) before allocating.
    """
    if not isinstance(ms2, np.ndarray) or not isinstance(z_extra, np.ndarray):
        raise ValueError(f"ms2 and z_extra must be numpy arrays, got {type(ms2).__name__} "
                         f"and {type(z_extra).__name__}")
    shape = _check_ms2_shape(ms2.shape, ms2.dtype)
    if z_extra.shape != shape or z_extra.dtype != np.float64:
        raise ValueError(f"z_extra must be float64 of shape {shape}, got {z_extra.dtype} "
                         f"{z_extra.shape}")
    if not (ms2.flags.c_contiguous and z_extra.flags.c_contiguous):
        raise ValueError("ms2 and z_extra must be C-contiguous")
    check_cap("Heston log-return samples", nbytes_of(shape, np.float64), int(cap_bytes),
              setting="memory.paths_bytes")
    result = _host_out(out, shape, np.float64)  # (B, M)
    _sample_kernel(ms2, z_extra, result)
    return result


# ----------------------------------------------------------------------------------------- CUDA

# numba compiles these on first launch only, so importing this module never initialises CUDA.
_coefficients_cuda = cuda.jit(device=True)(heston_coefficients)
_step_cuda = cuda.jit(device=True)(qe_step)
_chunk_cuda = cuda.jit(device=True)(cf_chunk)


@cuda.jit
def _heston_kernel_cuda(theta: Any, z: Any, correct: bool, out: Any) -> None:
    i = cuda.grid(1)
    n_contracts, n_paths, n_steps = z.shape
    if i < n_contracts * n_paths:
        b = i // n_paths
        p = i - b * n_paths
        theta_v = theta[b, 5]
        e, c_v, c_theta, k0, k1, k2, k3, k4, a_mgf, k13 = _coefficients_cuda(
            theta[b, 0] / n_steps, theta[b, 4], theta_v, theta[b, 6], theta[b, 7])
        v = theta[b, 3]
        m = 0.0
        s2 = 0.0
        for t in range(n_steps):
            v, dm, ds2 = _step_cuda(v, z[b, p, t], theta_v, e, c_v, c_theta, k0, k1, k2, k3, k4,
                                    a_mgf, k13, correct)
            m += dm
            s2 += ds2
        out[b, p, 0] = (theta[b, 1] - theta[b, 2]) * theta[b, 0] + m
        out[b, p, 1] = s2


@cuda.jit(device=True)
def _block_sum_cuda(buf: Any, tid: int, value: float) -> float:
    """Sum of `value` over the block's threads (a tree in shared memory), seen by every thread."""
    buf[tid] = value
    cuda.syncthreads()
    width = _CUDA_THREADS // 2
    while width > 0:
        if tid < width:
            buf[tid] += buf[tid + width]
        cuda.syncthreads()
        width //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit
def _label_kernel_cuda(ms2: Any, a: Any, b: Any, out: Any) -> None:
    # Block (contract, chunk): its threads stride over the paths, each summing CF_CHUNK
    # frequencies in registers, then one tree reduction per frequency. Contracts run along x,
    # whose grid limit (2^31 - 1) is far above y's (65535).
    row = cuda.blockIdx.x
    chunk = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    n_paths = ms2.shape[1]
    n_freq = out.shape[1]
    k0 = chunk * CF_CHUNK
    count = n_freq - k0
    if count > CF_CHUNK:  # not min(): numba's CUDA target types min(int, int) as min(iterable)
        count = CF_CHUNK
    acc_re = cuda.local.array(CF_CHUNK, float64)
    acc_im = cuda.local.array(CF_CHUNK, float64)
    for j in range(CF_CHUNK):
        acc_re[j] = 0.0
        acc_im[j] = 0.0
    u1 = math.pi / (b[row] - a[row])
    for p in range(tid, n_paths, _CUDA_THREADS):
        theta1 = u1 * (ms2[row, p, 0] - a[row])
        c = 0.5 * u1 * u1 * ms2[row, p, 1]
        _chunk_cuda(theta1, c, math.cos(theta1), math.sin(theta1), math.exp(-2.0 * c), k0,
                    count, acc_re, acc_im, 0)
    buf = cuda.shared.array(_CUDA_THREADS, float64)
    for j in range(count):
        total_re = _block_sum_cuda(buf, tid, acc_re[j])
        total_im = _block_sum_cuda(buf, tid, acc_im[j])
        if tid == 0:
            out[row, k0 + j] = complex(total_re / n_paths, total_im / n_paths)
    if tid == 0 and k0 == 0:
        out[row, 0] = complex(1.0, 0.0)  # F_0 = 1 exactly


@cuda.jit
def _sample_kernel_cuda(ms2: Any, z: Any, out: Any) -> None:
    i = cuda.grid(1)
    n_contracts, n_paths = z.shape
    if i < n_contracts * n_paths:
        b = i // n_paths
        p = i - b * n_paths
        out[b, p] = ms2[b, p, 0] + math.sqrt(ms2[b, p, 1]) * z[b, p]


@cuda.jit
def _check_theta_kernel_cuda(theta: Any, flag: Any) -> None:
    b = cuda.grid(1)
    if b < theta.shape[0]:
        ok = (theta[b, 0] > 0.0 and theta[b, 3] >= 0.0 and theta[b, 4] > 0.0
              and theta[b, 5] >= 0.0 and theta[b, 6] > 0.0 and abs(theta[b, 7]) <= 1.0)
        for k in range(N_THETA):
            ok = ok and math.isfinite(theta[b, k])
        if not ok:
            cuda.atomic.max(flag, 0, 1)


@cuda.jit
def _check_interval_kernel_cuda(a: Any, b: Any, flag: Any) -> None:
    i = cuda.grid(1)
    if i < a.shape[0]:
        ok = math.isfinite(a[i]) and math.isfinite(b[i]) and b[i] > a[i]
        if not ok:
            cuda.atomic.max(flag, 0, 1)


def _as_device_array(obj: Any, name: str) -> Any:
    """A numba device-array view of `obj` (no copy); host arrays are refused, never copied."""
    if getattr(obj, "__cuda_ndarray__", False):
        return obj
    if hasattr(obj, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(obj)
    raise ValueError(f"{name} must be a CUDA device array (numba, cupy or any "
                     f"__cuda_array_interface__ object), got {type(obj).__name__}")


def _device_out(out: Any, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
    """(what to return, the numba view to fill): a fresh device array, or the caller's `out`."""
    if out is None:
        fresh = cuda.device_array(shape, dtype=dtype)
        return fresh, fresh
    view = _as_device_array(out, "out")
    _check_out(view, shape, view.dtype, dtype, view.is_c_contiguous())
    return out, view


def _raised(flag: Any) -> bool:
    """The one scalar read back from a validation kernel."""
    return bool(flag.copy_to_host()[0])


def simulate_heston_conditional_cuda(theta: Any, normals: Any, *,
                                     martingale_correction: bool = True, cap_bytes: int,
                                     out: Any = None) -> Any:
    """`simulate_heston_conditional` on the GPU: device arrays in, device (B, M, 2) float64 out.

    Nothing large crosses to the host: theta is validated by a kernel that returns one flag, and
    only when it is raised is theta (B x P) read back to name the bad value.
    """
    _check_correction(martingale_correction)
    d_theta = _as_device_array(theta, "theta")
    d_z = _as_device_array(normals, "normals")
    n_contracts, n_paths, _ = _check_sim_shapes(tuple(d_theta.shape), d_theta.dtype,
                                                tuple(d_z.shape), d_z.dtype)
    if not (d_theta.is_c_contiguous() and d_z.is_c_contiguous()):
        raise ValueError("theta and normals must be C-contiguous device arrays")
    shape = (n_contracts, n_paths, 2)
    _paths_cap(shape, cap_bytes, " (device)")
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    blocks = (n_contracts + _CUDA_THREADS - 1) // _CUDA_THREADS
    _check_theta_kernel_cuda[blocks, _CUDA_THREADS](d_theta, flag)
    if _raised(flag):
        _check_theta_values(d_theta.copy_to_host())
    result, d_out = _device_out(out, shape, np.float64)  # (B, M, 2)
    blocks = (n_contracts * n_paths + _CUDA_THREADS - 1) // _CUDA_THREADS
    _heston_kernel_cuda[blocks, _CUDA_THREADS](d_theta, d_z, martingale_correction, d_out)
    return result


def conditional_cf_label_cuda(ms2: Any, a: Any, b: Any, *, n_freq: int, cap_bytes: int,
                              out: Any = None) -> Any:
    """`conditional_cf_label` on the GPU: device ms2 (B, M, 2), a, b (B,) -> device (B, N)
    complex128. One block of 128 threads per (contract, chunk of CF_CHUNK frequencies).

    a and b are validated by a kernel returning one flag; only when it is raised are they
    ((B,) each) read back to name the bad value.
    """
    n_freq = _check_n_freq(n_freq)
    d_ms2 = _as_device_array(ms2, "ms2")
    d_a = _as_device_array(a, "a")
    d_b = _as_device_array(b, "b")
    n_contracts, _ = _check_ms2_shape(tuple(d_ms2.shape), d_ms2.dtype)
    for name, v in (("a", d_a), ("b", d_b)):
        if tuple(v.shape) != (n_contracts,) or np.dtype(v.dtype) != np.float64:
            raise ValueError(f"{name} must be a float64 device array of shape ({n_contracts},), "
                             f"got {np.dtype(v.dtype)} {tuple(v.shape)}")
    if not d_ms2.is_c_contiguous():
        raise ValueError("ms2 must be a C-contiguous device array")
    shape = (n_contracts, n_freq)
    _label_cap(shape, cap_bytes, " (device)")
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    blocks = (n_contracts + _CUDA_THREADS - 1) // _CUDA_THREADS
    _check_interval_kernel_cuda[blocks, _CUDA_THREADS](d_a, d_b, flag)
    if _raised(flag):
        _check_interval_host(d_a.copy_to_host(), d_b.copy_to_host(), n_contracts)
    result, d_out = _device_out(out, shape, np.complex128)  # (B, N)
    grid = (n_contracts, (n_freq + CF_CHUNK - 1) // CF_CHUNK)
    _label_kernel_cuda[grid, _CUDA_THREADS](d_ms2, d_a, d_b, d_out)
    return result


def sample_log_returns_cuda(ms2: Any, z_extra: Any, *, cap_bytes: int, out: Any = None) -> Any:
    """`sample_log_returns` on the GPU: device ms2 (B, M, 2), z_extra (B, M) -> device (B, M)."""
    d_ms2 = _as_device_array(ms2, "ms2")
    d_z = _as_device_array(z_extra, "z_extra")
    shape = _check_ms2_shape(tuple(d_ms2.shape), d_ms2.dtype)
    if tuple(d_z.shape) != shape or np.dtype(d_z.dtype) != np.float64:
        raise ValueError(f"z_extra must be float64 of shape {shape}, got {np.dtype(d_z.dtype)} "
                         f"{tuple(d_z.shape)}")
    if not (d_ms2.is_c_contiguous() and d_z.is_c_contiguous()):
        raise ValueError("ms2 and z_extra must be C-contiguous device arrays")
    check_cap("Heston log-return samples (device)", nbytes_of(shape, np.float64), int(cap_bytes),
              setting="memory.paths_bytes")
    result, d_out = _device_out(out, shape, np.float64)  # (B, M)
    blocks = (shape[0] * shape[1] + _CUDA_THREADS - 1) // _CUDA_THREADS
    _sample_kernel_cuda[blocks, _CUDA_THREADS](d_ms2, d_z, d_out)
    return result
