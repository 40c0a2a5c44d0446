"""Heston stochastic volatility: theta = (T, r, d, v0, kappa, theta_v, xi, rho).

    dS/S = (r - d) dt + sqrt(v) dW_S,  dv = kappa (theta_v - v) dt + xi sqrt(v) dW_v,
    d<W_S, W_v> = rho dt.

* MC: the variance path by Andersen's QE scheme with martingale correction (`qe.py`; valid
  without the Feller condition), one normal per step.
* Label: given the variance path, x is Gaussian with mean m and variance s2 (`qe.py`), so the
  default "conditional" label averages the Gaussian CF exp(i u_k (m - a) - u_k^2 s2 / 2) over
  paths (Rao-Blackwellised); "binned" samples x = m + sqrt(s2) z from that law with one more
  normal per path and takes the binned-FFT estimate, as GBM does.
* Interval: [c1 - L sqrt(c2), c1 + L sqrt(c2)] from the closed-form cumulants.
* Oracle: the little-trap CF (`analytic_heston`), priced by COS with the oracle's own N and
  interval; reported quality metrics, tests and benchmarks only.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from spectral_core import analytic_heston
from spectral_core.processes import qe
from spectral_core.processes.base import Process
from spectral_core.processes.domains import Domain, HestonDomain
from spectral_core.spectrum import estimate_spectrum

if TYPE_CHECKING:
    from spectral_core.config import CoreConfig

HESTON_NAMES = HestonDomain.names


class HestonProcess(Process):
    name: ClassVar[str] = "heston"
    domain_type: ClassVar[type[Domain]] = HestonDomain
    request_fields: ClassVar[tuple[str, ...]] = HESTON_NAMES
    model_greeks: ClassVar[dict[str, str]] = {
        "d_v0": "v0", "d_kappa": "kappa", "d_theta_v": "theta_v", "d_xi": "xi", "d_rho": "rho",
    }

    def cumulants(self, theta: Any, *, xp: ModuleType) -> tuple[Any, Any]:
        cols = self.columns(theta)
        return analytic_heston.heston_cumulants(**{n: cols[n] for n in HESTON_NAMES}, xp=xp)

    def normal_dims(self, config: CoreConfig) -> int:
        # the binned label draws x from its conditional law with one more normal per path
        return config.sim.timesteps + (config.sim.label == "binned")

    def _heston_theta(self, theta: Any, xp: ModuleType) -> Any:
        """The (B, 8) Heston columns the variance kernel reads."""
        return theta

    def _label_factor(self, theta: Any, a: Any, b: Any, n_freq: int, xp: ModuleType) -> Any:
        """What multiplies the Heston label exactly at u_k = k pi / (b - a) (Bates: the jump
        CF); None for Heston."""
        return None

    def mc_labels(self, theta: Any, z: Any, config: CoreConfig, *, xp: ModuleType,
                  on_cuda: bool) -> tuple[Any, float]:
        sim, spec, mem = config.sim, config.spectrum, config.memory
        steps = sim.timesteps
        z_var = z if sim.label == "conditional" else xp.ascontiguousarray(z[:, :, :steps])
        h_theta = self._heston_theta(theta, xp)
        if on_cuda:
            ms2 = qe.simulate_heston_conditional_cuda(
                h_theta, z_var, martingale_correction=sim.martingale_correction,
                cap_bytes=mem.paths_bytes)
        else:
            ms2 = qe.simulate_heston_conditional(
                h_theta, z_var, martingale_correction=sim.martingale_correction,
                cap_bytes=mem.paths_bytes)  # (B, M, 2): m, s2
        a, b = self.truncation_interval(theta, L=spec.truncation_L, xp=xp)
        truncated = 0.0
        if sim.label == "conditional":
            label = qe.conditional_cf_label_cuda if on_cuda else qe.conditional_cf_label
            F = xp.asarray(label(ms2, a, b, n_freq=spec.n_freq,
                                 cap_bytes=mem.spectrum_bytes))  # (B, N) complex128
        else:
            sample = qe.sample_log_returns_cuda if on_cuda else qe.sample_log_returns
            z_x = xp.ascontiguousarray(z[:, :, steps])  # (B, M): the extra normal per path
            x = xp.asarray(sample(ms2, z_x, cap_bytes=mem.paths_bytes))  # (B, M)
            est = estimate_spectrum(x, a, b, n_freq=spec.n_freq, grid=spec.grid,
                                    cap_bytes=mem.spectrum_bytes, xp=xp)
            F, truncated = est.F, float(est.truncated_mass.mean())
        factor = self._label_factor(theta, a, b, spec.n_freq, xp)
        if factor is not None:
            F = F * factor
        return F, truncated

    @property
    def n_features(self) -> int:
        return len(self.names) + 5

    def raw_features(self, theta: torch.Tensor) -> torch.Tensor:
        """theta, then log T, c1, sqrt(c2) (the interval's centre and scale), kappa T (how far
        the variance mean-reverts) and xi sqrt(T) (how far it diffuses)."""
        cols = self.columns(theta)
        c1, c2 = (c.to(theta.dtype) for c in self.cumulants(theta.double(), xp=torch))
        T = cols["T"]
        derived = [torch.log(T), c1, torch.sqrt(c2), cols["kappa"] * T,
                   cols["xi"] * torch.sqrt(T)]
        return torch.cat([theta, torch.stack(derived, dim=1)], dim=1)

    def reference_put(self, theta: np.ndarray, *, S0: np.ndarray, K: np.ndarray) -> np.ndarray:
        cols = self.columns(np.asarray(theta, dtype=np.float64))
        return np.asarray(analytic_heston.cos_oracle_put(self.name, S0=S0, K=K, params=cols))
