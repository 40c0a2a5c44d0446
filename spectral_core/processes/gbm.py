"""Geometric Brownian motion: simulated log-returns x = ln(S_T / S_0) per contract and path.

The step is written once, as the plain Python functions `gbm_coefficients` (per-contract
constants, hoisted out of the time loop) and `gbm_step`, and compiled twice: by `numba.njit` into
the CPU kernel and by `numba.cuda.jit(device=True)` into the CUDA kernel.
`simulate_log_returns_numpy` applies the same step with numpy, vectorised over contracts and paths:
it is the test reference and the bench baseline.

Schemes (the state is x = ln(S_t / S_0) for both):

* ``"log_euler"``: x += (r - d - sigma^2/2) dt + sigma sqrt(dt) z, exact in law for GBM.
* ``"euler"``: S *= 1 + (r - d) dt + sigma sqrt(dt) z, applied as x += log1p(growth). A step whose
  growth factor would be <= EULER_MIN_GROWTH (S would reach or cross zero) is floored at
  EULER_MIN_GROWTH: S shrinks by that factor instead, deterministically, and x stays finite.

Optional moment matching shifts each contract's x so that the sample mean of exp(x) equals the
forward growth exp((r - d) T) exactly (to rounding).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from numba import cuda as _numba_cuda
from numba import float64, njit, prange

from spectral_core.analytic import bs_put
from spectral_core.cvnn import N_FEATURES, feature_bounds, theta_features
from spectral_core.memory import check_cap, nbytes_of
from spectral_core.processes.base import Process
from spectral_core.processes.domains import Domain, GbmDomain
from spectral_core.spectrum import estimate_spectrum, truncation_interval

if TYPE_CHECKING:
    from spectral_core.config import CoreConfig

Scheme = Literal["log_euler", "euler"]
LOG_EULER = 0
EULER = 1
SCHEME_CODES: dict[str, int] = {"log_euler": LOG_EULER, "euler": EULER}
EULER_MIN_GROWTH = 1e-8  # smallest one-step factor S_{t+dt} / S_t the Euler scheme may apply

_CUDA_THREADS = 128  # threads per block; a power of two for the tree reductions
# numba's intrinsics confuse mypy; the simulator swaps this global by identity, so an alias works.
cuda: Any = _numba_cuda


def gbm_coefficients(dt: float, r: float, d: float, sigma: float,
                     scheme_code: int) -> tuple[float, float]:
    """Per-contract step constants (drift, vol): the step is x + drift + vol * z (log_euler)."""
    vol = sigma * math.sqrt(dt)
    if scheme_code == LOG_EULER:
        return (r - d - 0.5 * sigma * sigma) * dt, vol
    return (r - d) * dt, vol


def gbm_step(x: float, drift: float, vol: float, z: float, scheme_code: int) -> float:
    """One time step of x = ln(S_t / S_0) driven by the standard normal z."""
    if scheme_code == LOG_EULER:
        return x + drift + vol * z
    growth = drift + vol * z  # S_{t+dt} / S_t - 1
    if growth < EULER_MIN_GROWTH - 1.0:
        growth = EULER_MIN_GROWTH - 1.0
    return x + math.log1p(growth)


def moment_matching_shift(x: np.ndarray, r: float, d: float, T: float) -> float:
    """Shift that makes mean(exp(x + shift)) = exp((r - d) T); log-mean-exp taken stably."""
    top = x[0]
    for m in range(1, x.shape[0]):
        top = max(top, x[m])
    total = 0.0
    for m in range(x.shape[0]):
        total += math.exp(x[m] - top)
    return (r - d) * T - (top + math.log(total / x.shape[0]))


_coefficients_cpu = njit(inline="always")(gbm_coefficients)
_step_cpu = njit(inline="always")(gbm_step)
_shift_cpu = njit(moment_matching_shift)


@njit(parallel=True, nogil=True, cache=True)
def _paths_kernel(theta: np.ndarray, z: np.ndarray, scheme_code: int, out: np.ndarray) -> None:
    n_contracts, n_paths, n_steps = z.shape
    drift = np.empty(n_contracts)
    vol = np.empty(n_contracts)
    for b in range(n_contracts):
        drift[b], vol[b] = _coefficients_cpu(theta[b, 0] / n_steps, theta[b, 1], theta[b, 2],
                                             theta[b, 3], scheme_code)
    for i in prange(n_contracts * n_paths):
        b = i // n_paths
        m = i - b * n_paths
        x = 0.0
        for t in range(n_steps):
            x = _step_cpu(x, drift[b], vol[b], z[b, m, t], scheme_code)
        out[b, m] = x


@njit(parallel=True, nogil=True, cache=True)
def _moment_match_kernel(theta: np.ndarray, out: np.ndarray) -> None:
    for b in prange(out.shape[0]):
        shift = _shift_cpu(out[b], theta[b, 1], theta[b, 2], theta[b, 0])
        for m in range(out.shape[1]):
            out[b, m] += shift


def _scheme_code(scheme: str) -> int:
    if scheme not in SCHEME_CODES:
        raise ValueError(f"scheme must be one of {sorted(SCHEME_CODES)}, got {scheme!r}")
    return SCHEME_CODES[scheme]


def _check_theta_values(theta: np.ndarray) -> None:
    """Raise ValueError naming the first bad contract parameter (non-finite, T <= 0, sigma < 0)."""
    bad = ~np.isfinite(theta)
    if bad.any():
        b, k = np.argwhere(bad)[0]
        raise ValueError(f"theta[{b}, {k}] ({('T', 'r', 'd', 'sigma')[k]}) must be finite, "
                         f"got {theta[b, k]}")
    for k, name, ok in ((0, "T", theta[:, 0] > 0.0), (3, "sigma", theta[:, 3] >= 0.0)):
        if not ok.all():
            b = int(np.flatnonzero(~ok)[0])
            rule = "> 0" if name == "T" else ">= 0"
            raise ValueError(f"theta[{b}, {k}] ({name}) must be {rule}, got {theta[b, k]}")


def _check_shapes(theta_shape: tuple[int, ...], theta_dtype: Any, z_shape: tuple[int, ...],
                  z_dtype: Any) -> tuple[int, int, int]:
    if len(theta_shape) != 2 or theta_shape[1] != 4:
        raise ValueError(f"theta must have shape (B, 4) [T, r, d, sigma], got {theta_shape}")
    if len(z_shape) != 3 or z_shape[0] != theta_shape[0]:
        raise ValueError(f"normals must have shape (B={theta_shape[0]}, M, steps), got {z_shape}")
    if min(z_shape) < 1:
        raise ValueError(f"normals must be non-empty, got shape {z_shape}")
    for name, dtype in (("theta", theta_dtype), ("normals", z_dtype)):
        if np.dtype(dtype) != np.float64:
            raise ValueError(f"{name} must be float64, got {np.dtype(dtype)}")
    return z_shape[0], z_shape[1], z_shape[2]


def _check_out(out: Any, shape: tuple[int, int], dtype: Any, contiguous: bool) -> None:
    if tuple(out.shape) != shape or np.dtype(dtype) != np.float64 or not contiguous:
        raise ValueError(f"out must be a C-contiguous float64 array of shape {shape}, "
                         f"got {np.dtype(dtype)} {tuple(out.shape)}")


def _validate_host(theta: Any, normals: Any, scheme: str,
                   moment_matching: bool) -> tuple[np.ndarray, int, int, int, int]:
    if not isinstance(theta, np.ndarray) or not isinstance(normals, np.ndarray):
        raise ValueError(f"theta and normals must be numpy arrays, got "
                         f"{type(theta).__name__} and {type(normals).__name__}")
    code = _scheme_code(scheme)
    if not isinstance(moment_matching, bool):
        raise ValueError(f"moment_matching must be a bool, got {moment_matching!r}")
    n_contracts, n_paths, n_steps = _check_shapes(theta.shape, theta.dtype, normals.shape,
                                                  normals.dtype)
    if not normals.flags.c_contiguous:
        raise ValueError("normals must be C-contiguous (no hidden copy of the largest input)")
    _check_theta_values(theta)
    return np.ascontiguousarray(theta), code, n_contracts, n_paths, n_steps


def simulate_log_returns(theta: np.ndarray, normals: np.ndarray, *, scheme: Scheme,
                         moment_matching: bool, cap_bytes: int,
                         out: np.ndarray | None = None) -> np.ndarray:
    """x = ln(S_T / S_0) for B contracts x M paths on the CPU (numba, parallel over paths).

    theta: (B, 4) float64 [T, r, d, sigma]; normals: (B, M, steps) float64, z[..., t] drives step t;
    dt = T / steps per contract. Returns (B, M) float64 (`out` when given).
    """
    theta, code, n_contracts, n_paths, _ = _validate_host(theta, normals, scheme, moment_matching)
    shape = (n_contracts, n_paths)
    check_cap("GBM log-return paths", nbytes_of(shape, np.float64), int(cap_bytes),
              setting="memory.paths_bytes")
    if out is None:
        out = np.empty(shape, dtype=np.float64)  # (B, M)
    elif not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy array, got {type(out).__name__}")
    else:
        _check_out(out, shape, out.dtype, out.flags.c_contiguous and out.flags.writeable)
    _paths_kernel(theta, normals, code, out)
    if moment_matching:
        _moment_match_kernel(theta, out)
    return out


def simulate_log_returns_numpy(theta: np.ndarray, normals: np.ndarray, *, scheme: Scheme,
                               moment_matching: bool) -> np.ndarray:
    """The scheme of `simulate_log_returns` in plain numpy, stepping through time: the reference."""
    theta, code, n_contracts, n_paths, n_steps = _validate_host(theta, normals, scheme,
                                                                moment_matching)
    T, r, d, sigma = (theta[:, k : k + 1] for k in range(4))  # (B, 1) each
    dt = T / n_steps
    vol = sigma * np.sqrt(dt)
    drift = (r - d - 0.5 * sigma * sigma) * dt if code == LOG_EULER else (r - d) * dt
    x = np.zeros((n_contracts, n_paths))  # (B, M)
    for t in range(n_steps):
        if code == LOG_EULER:
            x += drift
            x += vol * normals[:, :, t]
        else:
            growth = drift + vol * normals[:, :, t]
            np.maximum(growth, EULER_MIN_GROWTH - 1.0, out=growth)
            x += np.log1p(growth)
    if moment_matching:
        top = x.max(axis=1, keepdims=True)  # (B, 1)
        log_mean = top + np.log(np.exp(x - top).sum(axis=1, keepdims=True) / n_paths)
        x += (r - d) * T - log_mean
    return x


# ----------------------------------------------------------------------------------------- CUDA

# numba compiles these on first launch only, so importing this module never initialises CUDA.
_coefficients_cuda = cuda.jit(device=True)(gbm_coefficients)
_step_cuda = cuda.jit(device=True)(gbm_step)


@cuda.jit
def _paths_kernel_cuda(theta: Any, z: Any, scheme_code: int, out: Any) -> None:
    i = cuda.grid(1)
    n_contracts, n_paths, n_steps = z.shape
    if i < n_contracts * n_paths:
        b = i // n_paths
        m = i - b * n_paths
        drift, vol = _coefficients_cuda(theta[b, 0] / n_steps, theta[b, 1], theta[b, 2],
                                        theta[b, 3], scheme_code)
        x = 0.0
        for t in range(n_steps):
            x = _step_cuda(x, drift, vol, z[b, m, t], scheme_code)
        out[b, m] = x


@cuda.jit
def _check_theta_kernel_cuda(theta: Any, flag: Any) -> None:
    b = cuda.grid(1)
    if b < theta.shape[0]:
        ok = theta[b, 0] > 0.0 and theta[b, 3] >= 0.0
        for k in range(4):
            ok = ok and math.isfinite(theta[b, k])
        if not ok:
            cuda.atomic.max(flag, 0, 1)


@cuda.jit
def _moment_match_kernel_cuda(theta: Any, out: Any) -> None:
    # One block per contract: block-wide max, then the sum of exp, then the shift.
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n_paths = out.shape[1]
    buf = cuda.shared.array(_CUDA_THREADS, float64)
    # comparisons, not max(): numba's CUDA target types max(x, y) as max(iterable) and refuses it
    top = -math.inf
    for m in range(tid, n_paths, _CUDA_THREADS):
        if out[b, m] > top:
            top = out[b, m]
    buf[tid] = top
    cuda.syncthreads()
    width = _CUDA_THREADS // 2
    while width > 0:
        if tid < width and buf[tid + width] > buf[tid]:
            buf[tid] = buf[tid + width]
        cuda.syncthreads()
        width //= 2
    top = buf[0]
    cuda.syncthreads()
    total = 0.0
    for m in range(tid, n_paths, _CUDA_THREADS):
        total += math.exp(out[b, m] - top)
    buf[tid] = total
    cuda.syncthreads()
    width = _CUDA_THREADS // 2
    while width > 0:
        if tid < width:
            buf[tid] += buf[tid + width]
        cuda.syncthreads()
        width //= 2
    shift = (theta[b, 1] - theta[b, 2]) * theta[b, 0] - (top + math.log(buf[0] / n_paths))
    for m in range(tid, n_paths, _CUDA_THREADS):
        out[b, m] += shift


def _as_device_array(obj: Any, name: str) -> Any:
    """A numba device-array view of `obj` (no copy); host arrays are refused, never copied."""
    if getattr(obj, "__cuda_ndarray__", False):
        return obj
    if hasattr(obj, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(obj)
    raise ValueError(f"{name} must be a CUDA device array (numba, cupy or any "
                     f"__cuda_array_interface__ object), got {type(obj).__name__}")


def simulate_log_returns_cuda(theta: Any, normals: Any, *, scheme: Scheme, moment_matching: bool,
                              cap_bytes: int, out: Any = None) -> Any:
    """`simulate_log_returns` on the GPU: device arrays in, device array (B, M) float64 out.

    Nothing large crosses to the host: theta is validated by a kernel that returns one flag, and
    only when it is raised is theta (B x 4) read back to name the bad value.
    """
    code = _scheme_code(scheme)
    if not isinstance(moment_matching, bool):
        raise ValueError(f"moment_matching must be a bool, got {moment_matching!r}")
    d_theta = _as_device_array(theta, "theta")
    d_z = _as_device_array(normals, "normals")
    n_contracts, n_paths, _ = _check_shapes(tuple(d_theta.shape), d_theta.dtype,
                                            tuple(d_z.shape), d_z.dtype)
    if not (d_theta.is_c_contiguous() and d_z.is_c_contiguous()):
        raise ValueError("theta and normals must be C-contiguous device arrays")
    shape = (n_contracts, n_paths)
    check_cap("GBM log-return paths (device)", nbytes_of(shape, np.float64), int(cap_bytes),
              setting="memory.paths_bytes")
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    blocks = (n_contracts + _CUDA_THREADS - 1) // _CUDA_THREADS
    _check_theta_kernel_cuda[blocks, _CUDA_THREADS](d_theta, flag)
    if flag.copy_to_host()[0]:
        _check_theta_values(d_theta.copy_to_host())
    if out is None:
        result = d_out = cuda.device_array(shape, dtype=np.float64)  # (B, M)
    else:
        result, d_out = out, _as_device_array(out, "out")
        _check_out(d_out, shape, d_out.dtype, d_out.is_c_contiguous())
    blocks = (n_contracts * n_paths + _CUDA_THREADS - 1) // _CUDA_THREADS
    _paths_kernel_cuda[blocks, _CUDA_THREADS](d_theta, d_z, code, d_out)
    if moment_matching:
        _moment_match_kernel_cuda[n_contracts, _CUDA_THREADS](d_theta, d_out)
    return result


# ------------------------------------------------------------------------------ the process


class GbmProcess(Process):
    """GBM theta = (T, r, d, sigma): log-return paths by `simulate_log_returns`, the binned-FFT
    label, the interval (r - d) T +- L sigma sqrt(T), Black-Scholes as the oracle."""

    name: ClassVar[str] = "gbm"
    domain_type: ClassVar[type[Domain]] = GbmDomain
    request_fields: ClassVar[tuple[str, ...]] = ("T", "r", "d", "v")
    model_greeks: ClassVar[dict[str, str]] = {"vega": "v"}

    def cumulants(self, theta: Any, *, xp: ModuleType) -> tuple[Any, Any]:
        T, r, d, sigma = (theta[:, k] for k in range(4))
        return (r - d) * T, sigma * sigma * T

    def truncation_interval(self, theta: Any, *, L: float, xp: ModuleType) -> tuple[Any, Any]:
        # the historical form, sigma sqrt(T), so every GBM interval keeps its last bit
        return truncation_interval(theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3], L=L, xp=xp)

    def mc_labels(self, theta: Any, z: Any, config: CoreConfig, *, xp: ModuleType,
                  on_cuda: bool) -> tuple[Any, float]:
        kw: dict[str, Any] = dict(scheme=config.sim.scheme,
                                  moment_matching=config.sim.moment_matching,
                                  cap_bytes=config.memory.paths_bytes)
        if on_cuda:
            x = xp.asarray(simulate_log_returns_cuda(theta, z, **kw))  # (B, M) on the device
        else:
            x = simulate_log_returns(theta, z, **kw)  # (B, M) float64
        a, b = self.truncation_interval(theta, L=config.spectrum.truncation_L, xp=xp)
        est = estimate_spectrum(x, a, b, n_freq=config.spectrum.n_freq,
                                grid=config.spectrum.grid, cap_bytes=config.memory.spectrum_bytes,
                                xp=xp)
        return est.F, float(est.truncated_mass.mean())

    @property
    def n_features(self) -> int:
        return N_FEATURES

    def raw_features(self, theta: torch.Tensor) -> torch.Tensor:
        t, r, d, sigma = theta.unbind(dim=1)
        return torch.stack([t, r, d, sigma, sigma * torch.sqrt(t), (r - d) * t, torch.log(t)],
                           dim=1)

    def feature_bounds(self, domain: Domain) -> tuple[tuple[float, ...], tuple[float, ...]]:
        assert isinstance(domain, GbmDomain)
        return feature_bounds(domain)

    def features(self, theta: torch.Tensor, domain: Domain, *, check: bool = True) -> torch.Tensor:
        assert isinstance(domain, GbmDomain)
        return theta_features(theta, domain, check=check)

    def reference_put(self, theta: np.ndarray, *, S0: np.ndarray, K: np.ndarray) -> np.ndarray:
        T, r, d, sigma = (theta[:, k] for k in range(4))
        return np.asarray(bs_put(S0=S0, K=K, T=T, r=r, d=d, sigma=sigma))
