"""Learning-rate schedules.

`constant` and `warmup_cosine` are pure functions of the step (`lr_at`). `plateau` reacts to the
validation history, so its only state (current scale, best loss, bad evaluations) is a small
JSON-able dict carried in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from spectral_core.config import OptimConfig


def lr_at(cfg: OptimConfig, step: int, *, plateau_scale: float = 1.0) -> float:
    """Learning rate for optimiser step `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "plateau":
        return max(cfg.lr * plateau_scale, cfg.min_lr)
    # warmup_cosine: linear warm-up, cosine decay to min_lr at total_steps, then restart_cycles
    # warm restarts (cycle i: length total_steps * growth^i, peak lr * decay^i), then min_lr.
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step < cfg.total_steps:
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        return _cosine(cfg.lr, cfg.min_lr, (step - cfg.warmup_steps) / span)
    start, cycle = cfg.total_steps, 1
    while cycle <= cfg.restart_cycles:
        peak = cfg.lr * cfg.restart_decay**cycle
        if peak <= cfg.min_lr:
            break
        length = max(round(cfg.total_steps * cfg.restart_growth**cycle), 1)
        if step < start + length:
            return _cosine(peak, cfg.min_lr, (step - start) / length)
        start, cycle = start + length, cycle + 1
    return cfg.min_lr


def _cosine(peak: float, floor: float, progress: float) -> float:
    """Half-cosine from peak (progress 0) to floor (progress 1)."""
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class PlateauState:
    """Scale the lr by `plateau_factor` after `plateau_patience` evaluations without improvement."""

    scale: float = 1.0
    best: float = math.inf
    bad_evals: int = 0

    def observe(self, cfg: OptimConfig, val_loss: float) -> None:
        if val_loss < self.best * (1.0 - 1e-4):
            self.best = val_loss
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals >= cfg.plateau_patience:
            self.scale *= cfg.plateau_factor
            self.bad_evals = 0

    def to_json(self) -> dict[str, float | int | None]:
        d = asdict(self)
        d["best"] = None if math.isinf(self.best) else self.best
        return d

    @classmethod
    def from_json(cls, d: dict[str, float | int | None]) -> PlateauState:
        best = d.get("best")
        return cls(
            scale=float(d["scale"] or 1.0),
            best=math.inf if best is None else float(best),
            bad_evals=int(d["bad_evals"] or 0),
        )
