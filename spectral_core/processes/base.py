"""What a process declares, and the one interface the sampler, trainer and pricer use.

A process (DESIGN.md §8) is: its parameters and default domain (a `Domain` class, whose field
order is the theta column order), its MC label estimator (the numba kernels behind
`mc_labels`), its truncation interval [a, b] (a deterministic function of theta, from its first
two cumulants), the network's input features, and, where one exists, its analytic CF. The
analytic CF is an oracle for tests, benchmarks and reported quality metrics: no training
decision and no label reads it.

The interval is always [c1 - L sqrt(c2), c1 + L sqrt(c2)], so for every process the network
learns the CF of the standardised log-return z = (x - c1) / sqrt(c2) at w_k = k pi / (2 L): the
same standard-normal prior (cvnn) matches the first two cumulants of every process.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from spectral_core.processes.domains import Domain

if TYPE_CHECKING:
    from spectral_core.config import CoreConfig

# Sobol points (plus every corner) over which the range of each derived feature is measured.
_FEATURE_RANGE_POINTS = 4096


class ProcessMismatch(ValueError):
    """A checkpoint (or config) of one process was handed to code set up for another."""


class Process(ABC):
    """A stochastic model of x = ln(S_T / S0) with parameters theta (B, P), P = len(names)."""

    name: ClassVar[str]
    domain_type: ClassVar[type[Domain]]
    # request field for each theta column (GBM's sigma is the request's `v`)
    request_fields: ClassVar[tuple[str, ...]]
    # request field of each model-parameter sensitivity reported besides delta, gamma, theta
    # (-d/dT) and rho (d/dr): greek name -> request field
    model_greeks: ClassVar[dict[str, str]]

    @property
    def names(self) -> tuple[str, ...]:
        return self.domain_type.names

    # ------------------------------------------------------------------ parameters
    def columns(self, theta: Any) -> dict[str, Any]:
        """theta (B, P) -> {name: (B,)} views, for numpy, cupy or torch."""
        if theta.ndim != 2 or theta.shape[1] != len(self.names):
            raise ValueError(f"theta must have shape (B, {len(self.names)}) "
                             f"{list(self.names)}, got {tuple(theta.shape)}")
        return {n: theta[:, k] for k, n in enumerate(self.names)}

    # ------------------------------------------------------------------ interval
    @abstractmethod
    def cumulants(self, theta: Any, *, xp: ModuleType) -> tuple[Any, Any]:
        """First two cumulants (c1, c2) of x, (B,) each; xp = numpy, cupy or torch
        (differentiable in theta under torch)."""

    def truncation_interval(self, theta: Any, *, L: float, xp: ModuleType) -> tuple[Any, Any]:
        """[a, b] = [c1 - L sqrt(c2), c1 + L sqrt(c2)], (B,) each."""
        if not (math.isfinite(L) and L > 0):
            raise ValueError(f"L must be finite and > 0, got {L}")
        c1, c2 = self.cumulants(theta, xp=xp)
        s = xp.sqrt(c2)
        return c1 - L * s, c1 + L * s

    # ------------------------------------------------------------------ labels
    def normal_dims(self, config: CoreConfig) -> int:
        """Normals per path that one label needs."""
        return config.sim.timesteps

    @abstractmethod
    def mc_labels(self, theta: Any, z: Any, config: CoreConfig, *, xp: ModuleType,
                  on_cuda: bool) -> tuple[Any, float]:
        """MC estimate of F_k = E[exp(i u_k (x - a))] for theta (B, P) from normals z
        (B, M, normal_dims) on the training interval: ((B, N) complex128 xp array, mean mass of
        the samples outside [a, b] (0 where the estimator drops none))."""

    # ------------------------------------------------------------------ network input
    @abstractmethod
    def raw_features(self, theta: torch.Tensor) -> torch.Tensor:
        """Unscaled features (B, n_features) of theta (B, P), differentiable."""

    @property
    @abstractmethod
    def n_features(self) -> int: ...

    def feature_bounds(self, domain: Domain) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(lower, upper) of each raw feature over the domain box, measured on Sobol points and
        every corner of the box (deterministic; derived features may extrapolate slightly)."""
        from scipy.stats import qmc

        lo = np.array(domain.lower())
        hi = np.array(domain.upper())
        p = len(lo)
        unit = qmc.Sobol(d=p, scramble=False).random(_FEATURE_RANGE_POINTS)
        corners = ((np.arange(2**p)[:, None] >> np.arange(p)) & 1).astype(np.float64)
        pts = lo + np.concatenate([unit, corners]) * (hi - lo)  # (n, P)
        with torch.no_grad():
            f = self.raw_features(torch.from_numpy(pts)).numpy()
        return tuple(f.min(axis=0).tolist()), tuple(f.max(axis=0).tolist())

    def features(self, theta: torch.Tensor, domain: Domain, *, check: bool = True) -> torch.Tensor:
        """Network input (B, n_features): raw features mapped affinely to about [-1, 1]."""
        if not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
            raise ValueError(f"theta must be a real floating tensor, got {type(theta).__name__}")
        if theta.ndim != 2 or theta.shape[1] != len(self.names):
            raise ValueError(f"theta must have shape (B, {len(self.names)}) "
                             f"{list(self.names)}, got {tuple(theta.shape)}")
        if check:
            with torch.no_grad():
                if not bool(torch.isfinite(theta).all()):
                    raise ValueError("theta must be finite")
                if not bool((theta[:, 0] > 0).all()):
                    raise ValueError(f"theta T must be > 0, got min {float(theta[:, 0].min())}")
        lower, upper = _cached_bounds(self, domain)
        lo = torch.tensor(lower, dtype=theta.dtype, device=theta.device)
        hi = torch.tensor(upper, dtype=theta.dtype, device=theta.device)
        return 2.0 * (self.raw_features(theta) - lo) / (hi - lo) - 1.0

    # ------------------------------------------------------------------ oracle
    @abstractmethod
    def reference_put(self, theta: np.ndarray, *, S0: np.ndarray, K: np.ndarray) -> np.ndarray:
        """Oracle European put (closed form, or COS on the analytic CF): tests, benchmarks and
        reported validation error only."""

    def check_config(self, config: CoreConfig) -> None:
        """Raise ProcessMismatch unless `config` is a config of this process."""
        if config.process != self.name:
            raise ProcessMismatch(f"a {config.process!r} model cannot be used as {self.name!r}")


_BOUNDS: dict[tuple[str, Domain], tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _cached_bounds(process: Process,
                   domain: Domain) -> tuple[tuple[float, ...], tuple[float, ...]]:
    key = (process.name, domain)  # frozen, so hashable: no serialisation on the pricing path
    if key not in _BOUNDS:
        _BOUNDS[key] = process.feature_bounds(domain)
    return _BOUNDS[key]
