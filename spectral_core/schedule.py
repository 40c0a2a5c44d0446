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
    # warmup_cosine: linear warm-up, then cosine decay to min_lr at total_steps, then flat.
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


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
