"""Small, fast core configurations shared by the trainer, pricer and server tests."""

from __future__ import annotations

from spectral_core.config import (
    ArchConfig,
    CoreConfig,
    OptimConfig,
    SimConfig,
    SpectrumConfig,
    TrainConfig,
)


def tiny_config(**train_overrides: object) -> CoreConfig:
    """A model small enough to train a few dozen steps in a second or two."""
    train = TrainConfig(
        batch_contracts=32, validation_contracts=64, validation_every=10, **train_overrides
    )
    return CoreConfig(
        sim=SimConfig(paths_per_contract=1024),
        spectrum=SpectrumConfig(n_freq=32, grid=256),
        arch=ArchConfig(width=16, depth=1),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, total_steps=400),
        train=train,
    )


def tiny_heston_config(**train_overrides: object) -> CoreConfig:
    """The tiny model on the Heston process (a few dozen steps in a few seconds)."""
    base = tiny_config(**train_overrides)
    return CoreConfig(process="heston", sim=SimConfig(paths_per_contract=256, timesteps=8),
                      spectrum=base.spectrum, arch=base.arch, optim=base.optim, train=base.train)
