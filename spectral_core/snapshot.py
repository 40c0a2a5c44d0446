"""The trainer's resumable state: tensors plus JSON-able metadata (never pickled)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Snapshot:
    """Everything needed to resume training bit-exactly or to serve the model.

    tensors: flat name -> CPU tensor (model parameters, optimiser moments, RNG states as uint8).
    meta: JSON-able dict (config, global step, sampler/normals positions, schedule state, metrics).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


# Prefixes of the model weights in a snapshot: the raw (trained) weights, and with iterate
# averaging (OptimConfig.averaging) the averaged ones, which are what is served.
RAW_PREFIX = "model."
AVERAGED_PREFIX = "ema.module."
AVERAGED_COUNT = "ema.n_averaged"


def served_weights(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The model state to serve: the average once averaging has begun, else the raw weights."""
    t = snapshot.tensors
    count = t.get(AVERAGED_COUNT)
    prefix = AVERAGED_PREFIX if count is not None and int(count) > 0 else RAW_PREFIX
    return {k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)}
