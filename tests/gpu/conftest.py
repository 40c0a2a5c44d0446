"""Every test under tests/gpu is marked `gpu` and skipped, with the reason, without a usable GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _missing_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    from numba import cuda

    if not cuda.is_available():
        return "no CUDA GPU: numba.cuda.is_available() is False"
    if importlib.util.find_spec("cupy") is None:
        return "no CUDA GPU: cupy is missing (install the gpu extra: spectralmc[gpu])"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if _HERE in Path(str(item.path)).resolve().parents]
    if not mine:
        return
    reason = _missing_gpu_reason()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
