"""The quality of one set of weights: held-out error against the oracle, validity, noise floor.

Every version the service commits carries this report, computed on exactly the weights it
stores, so that promotion (storage/promotion.py) can compare a candidate with the served
version without loading either. The figures, all on the trainer's validation contracts:

- `held_out_mean_bp`, `_se_bp`, `_p99_bp`, `_max_bp`: |COS put from the learned CF - oracle put|
  in bp of spot at the validation strikes; the standard error is that of the mean over
  contracts (each contract's strikes averaged first: they are not independent draws).
- `noise_floor_bp`: the same error for the validation set's own MC labels, i.e. what the
  network learns from; `error_over_floor` is the ratio.
- Validity of the learned CF as a CF: `f0_max_err` = max |F_0 - 1|, `max_modulus` = max |F_k|
  (a CF has |F_k| <= 1), `min_density_rel` = the most negative COS density on a grid over
  [a, b] relative to the peak, and `arbitrage_max_bp` = the largest violation of the
  no-arbitrage bounds by the validation puts (bp of spot). Calls are priced from puts by
  parity, so parity holds to rounding by construction; its content is the lower bound, a
  non-negative call. (A call integrated directly from the learned density is no check: the
  e^x weight near b amplifies the series' ripple in the far tail by e^b.)
- `finite`: every output finite. A diverged model is refused on this alone.

The thresholds are the promotion policy's, not this module's: the report only measures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from spectral_core import cos
from spectral_core.config import CoreConfig
from spectral_core.processes import get_process

# Points of the density check on [a, b] per contract: enough to see a negative lobe of the COS
# series of 64 terms, small enough to keep a (contracts, points, terms) tensor to a few MB.
DENSITY_POINTS = 128
# Contracts per density chunk: bounds that tensor at 64 * 128 * N doubles.
_DENSITY_CHUNK = 64

# Keys a record's quality metrics must carry to count as assessed (storage/promotion.py).
ASSESSED_KEY = "held_out_mean_bp"


@dataclass(frozen=True)
class QualityReport:
    step: int
    held_out_mean_bp: float
    held_out_se_bp: float
    held_out_p99_bp: float
    held_out_max_bp: float
    held_out_contracts: int
    noise_floor_bp: float
    error_over_floor: float
    f0_max_err: float
    max_modulus: float
    min_density_rel: float
    arbitrage_max_bp: float
    finite: bool

    def as_dict(self) -> dict[str, Any]:
        """Strict-JSON values (NaN/inf as None): a version record's quality metrics."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[k] = v
        return out


def _f(x: torch.Tensor) -> float:
    return float(x.detach().cpu())


def per_contract_mean(err: torch.Tensor, contracts: int) -> torch.Tensor:
    """(levels * B,) errors in level-major order -> (B,) mean over each contract's levels."""
    return err.reshape(-1, contracts).mean(dim=0)


def _min_density_rel(F: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Min over contracts of (min COS density on the grid) / (max on the grid)."""
    worst = torch.tensor(math.inf, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, DENSITY_POINTS, dtype=torch.float64)
    for lo in range(0, F.shape[0], _DENSITY_CHUNK):
        Fc, ac, bc = F[lo:lo + _DENSITY_CHUNK], a[lo:lo + _DENSITY_CHUNK], b[lo:lo + _DENSITY_CHUNK]
        y = ac[:, None] + (bc - ac)[:, None] * t[None, :]
        dens = cos.density(Fc, ac, bc, y=y)  # (B, S)
        peak = dens.max(dim=1).values
        rel = dens.min(dim=1).values / torch.where(peak > 0, peak, torch.ones_like(peak))
        rel = torch.where(peak > 0, rel, torch.full_like(rel, -math.inf))
        worst = torch.minimum(worst, rel.min())
    return worst


def validation_puts(
    F: torch.Tensor, theta: torch.Tensor, config: CoreConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """COS puts (S0 = 1) from the CFs F (B, N) of contracts theta (B, P) at strikes
    config.train.validation_moneyness x the forward, and those strikes: (levels * B,) each,
    level-major."""
    process = get_process(config.process)
    theta = theta.to(torch.float64)
    F = F.to(torch.complex128)
    cols = process.columns(theta)
    T, r, d = cols["T"], cols["r"], cols["d"]
    a, b = process.truncation_interval(theta, L=config.spectrum.truncation_L, xp=torch)
    ones = torch.ones_like(T)
    strikes, puts = [], []
    for mny in config.train.validation_moneyness:
        K = mny * torch.exp((r - d) * T)
        strikes.append(K)
        puts.append(cos.put(F, a, b, S0=ones, K=K, r=r, T=T))
    return torch.cat(puts), torch.cat(strikes)


def _arbitrage_bp(puts: torch.Tensor, strikes: torch.Tensor, theta: torch.Tensor,
                  config: CoreConfig) -> torch.Tensor:
    """Max violation (bp of spot, S0 = 1) of the no-arbitrage bounds by the validation puts
    (validation_puts): max(K e^{-rT} - e^{-dT}, 0) <= P <= K e^{-rT}.

    Calls are priced from puts by parity (spectral_core/cos.py), so parity itself holds to
    rounding; its lower bound P >= K e^{-rT} - e^{-dT} is exactly "the parity call is >= 0"."""
    cols = get_process(config.process).columns(theta)
    levels = len(config.train.validation_moneyness)
    T, r, d = (cols[k].repeat(levels) for k in ("T", "r", "d"))
    lower = torch.clamp(strikes * torch.exp(-r * T) - torch.exp(-d * T), min=0.0)
    upper = strikes * torch.exp(-r * T)
    worst = torch.maximum(torch.clamp(lower - puts, min=0.0).max(),
                          torch.clamp(puts - upper, min=0.0).max())
    return worst * 1e4


def assess(
    F: torch.Tensor,
    theta: torch.Tensor,
    config: CoreConfig,
    *,
    reference: torch.Tensor,
    noise_floor_bp: float,
    step: int,
) -> QualityReport:
    """The report for learned CFs F (B, N) of the validation contracts theta (B, P).

    `reference` holds the oracle puts at the validation strikes (trainer.validation_reference)
    and `noise_floor_bp` the mean error of the MC labels against them."""
    F = F.to(torch.complex128).cpu()
    theta = theta.to(torch.float64).cpu()
    B = theta.shape[0]
    puts, strikes = validation_puts(F, theta, config)
    err = (puts - reference.to(torch.float64).cpu()).abs() * 1e4
    finite = bool(torch.isfinite(torch.view_as_real(F)).all()) and bool(torch.isfinite(err).all())
    nan = math.nan
    if not finite:
        return QualityReport(step, nan, nan, nan, nan, B, noise_floor_bp, nan, nan, nan, nan,
                             nan, False)
    process = get_process(config.process)
    a, b = process.truncation_interval(theta, L=config.spectrum.truncation_L, xp=torch)
    per_contract = per_contract_mean(err, B)
    mean = _f(err.mean())
    se = _f(per_contract.std(unbiased=True)) / math.sqrt(B) if B > 1 else nan
    return QualityReport(
        step=step,
        held_out_mean_bp=mean,
        held_out_se_bp=se,
        held_out_p99_bp=_f(torch.quantile(err, 0.99)),
        held_out_max_bp=_f(err.max()),
        held_out_contracts=B,
        noise_floor_bp=noise_floor_bp,
        error_over_floor=mean / noise_floor_bp if noise_floor_bp > 0 else nan,
        f0_max_err=_f((F[:, 0] - 1).abs().max()),
        max_modulus=_f(F.abs().max()),
        min_density_rel=_f(_min_density_rel(F, a, b)),
        arbitrage_max_bp=_f(_arbitrage_bp(puts, strikes, theta, config)),
        finite=True,
    )
