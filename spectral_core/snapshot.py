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
