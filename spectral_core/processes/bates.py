"""Bates: Heston plus compound-Poisson lognormal jumps, theta = Heston's + (lam, mu_j, sigma_j).

The jumps (intensity lam, log-jump size N(mu_j, sigma_j^2)) are compensated in the drift, so
E[S_T] = S0 exp((r - d) T). They are independent of the variance path, so
F_k = E[exp(i u_k (x_H - a))] * E[exp(i u_k J_T)]: the Heston label of the same variance path,
simulated with the compensated dividend d + lam (exp(mu_j + sigma_j^2 / 2) - 1), times the exact
CF of the jump sum, which adds no label noise.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar

import torch

from spectral_core import analytic_heston
from spectral_core.processes.domains import BatesDomain, Domain
from spectral_core.processes.heston import HESTON_NAMES, HestonProcess


class BatesProcess(HestonProcess):
    name: ClassVar[str] = "bates"
    domain_type: ClassVar[type[Domain]] = BatesDomain
    request_fields: ClassVar[tuple[str, ...]] = BatesDomain.names
    model_greeks: ClassVar[dict[str, str]] = {
        **HestonProcess.model_greeks, "d_lam": "lam", "d_mu_j": "mu_j", "d_sigma_j": "sigma_j",
    }

    def cumulants(self, theta: Any, *, xp: ModuleType) -> tuple[Any, Any]:
        cols = self.columns(theta)
        return analytic_heston.bates_cumulants(**cols, xp=xp)

    def _heston_theta(self, theta: Any, xp: ModuleType) -> Any:
        cols = self.columns(theta)
        compensator = cols["lam"] * xp.expm1(cols["mu_j"] + 0.5 * cols["sigma_j"] ** 2)
        h = xp.stack([cols[n] for n in HESTON_NAMES], axis=1)  # (B, 8)
        h[:, 2] = cols["d"] + compensator  # the jumps' compensator as a dividend
        return xp.ascontiguousarray(h)

    def _label_factor(self, theta: Any, a: Any, b: Any, n_freq: int, xp: ModuleType) -> Any:
        cols = self.columns(theta)
        u = (math.pi / (b - a))[:, None] * xp.arange(n_freq)[None, :]  # (B, N)
        return analytic_heston.jump_cf_uncompensated(
            u, T=cols["T"][:, None], lam=cols["lam"][:, None], mu_j=cols["mu_j"][:, None],
            sigma_j=cols["sigma_j"][:, None], xp=xp)  # (B, N)

    @property
    def n_features(self) -> int:
        return len(self.names) + 6

    def raw_features(self, theta: torch.Tensor) -> torch.Tensor:
        """Heston's features plus lam T, the expected number of jumps."""
        cols = self.columns(theta)
        base = super().raw_features(theta)
        return torch.cat([base, (cols["lam"] * cols["T"])[:, None]], dim=1)
