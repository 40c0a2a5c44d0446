"""Device selection and zero-copy array hand-off between torch, numpy, cupy and numba.

Nothing silently changes device: asking for CUDA without a usable GPU is a start-up error, and the
hand-off helpers refuse (rather than copy) when the array and the target live on different devices.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

DeviceName = Literal["cpu", "cuda", "auto"]


class DeviceError(RuntimeError):
    """The requested device cannot be used (no GPU, no GPU extra, array on the wrong device)."""


def resolve_device(name: DeviceName) -> torch.device:
    """Map a configured device name to a torch device; "auto" picks CUDA when a GPU is usable."""
    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if available else "cpu")
    if not available:
        built = torch.version.cuda or "none (CPU-only build)"
        raise DeviceError(
            f"device='cuda' requested but no usable CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {built}); use device='cpu' or 'auto'"
        )
    return torch.device("cuda")


def _device_type(device: torch.device | str) -> str:
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {dev}")
    return dev.type


def array_module(device: torch.device | str) -> ModuleType:
    """numpy for a CPU device, cupy for a CUDA device (imported lazily: it is an optional extra)."""
    if _device_type(device) == "cpu":
        return np
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:
        raise DeviceError(
            "CUDA arrays need cupy, which is not installed: install the gpu extra "
            "(pip install 'spectralmc[gpu]')"
        ) from exc


def to_torch(array: Any) -> torch.Tensor:
    """View a numpy, cupy or numba array as a torch tensor without copying.

    Read-only numpy arrays are refused: the tensor view would be writable.
    """
    if isinstance(array, np.ndarray):
        if not array.flags.writeable:
            raise ValueError("array is read-only; a zero-copy torch view would be writable")
        return torch.from_numpy(array)
    if hasattr(array, "__dlpack__"):
        return torch.from_dlpack(array)
    if hasattr(array, "__cuda_array_interface__"):
        # numba device arrays speak only the CUDA array interface; as_tensor wraps it, no copy.
        return torch.as_tensor(array, device="cuda")
    raise TypeError(
        f"array must support DLPack or the CUDA array interface, got {type(array).__name__}"
    )


def from_torch(tensor: torch.Tensor, xp: ModuleType) -> Any:
    """View a torch tensor as an array of module `xp` (numpy or cupy) without copying."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.requires_grad:
        raise ValueError("tensor requires grad; call .detach() first so the view leaves autograd")
    name = getattr(xp, "__name__", repr(xp))
    if name == "numpy":
        if tensor.device.type != "cpu":
            raise DeviceError(f"tensor is on {tensor.device}; numpy needs a CPU tensor (no copy)")
        return np.from_dlpack(tensor)
    if name == "cupy":
        if tensor.device.type != "cuda":
            raise DeviceError(f"tensor is on {tensor.device}; cupy needs a CUDA tensor (no copy)")
        return xp.from_dlpack(tensor)
    raise ValueError(f"xp must be numpy or cupy, got {name}")
