"""Device selection and zero-copy hand-off on the CPU; the CUDA paths live in tests/gpu."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from spectral_core.device import DeviceError, array_module, from_torch, resolve_device, to_torch

NO_GPU = not torch.cuda.is_available()


def test_cpu_resolves_to_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_picks_cuda_only_when_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is available")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        resolve_device("cuda")
    assert issubclass(DeviceError, RuntimeError)


def test_unknown_device_name_is_refused() -> None:
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'auto', got 'gpu'"):
        resolve_device("gpu")  # type: ignore[arg-type]


def test_array_module_for_cpu_is_numpy() -> None:
    assert array_module(torch.device("cpu")) is np
    assert array_module("cpu") is np
    with pytest.raises(ValueError, match="cpu or cuda"):
        array_module("meta")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_array_module_for_cuda_without_cupy_names_the_extra() -> None:
    with pytest.raises(DeviceError, match=r"spectralmc\[gpu\]"):
        array_module("cuda")


def test_numpy_to_torch_shares_memory() -> None:
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    tensor = to_torch(array)
    assert tensor.data_ptr() == array.ctypes.data and tensor.dtype == torch.float64
    tensor[1, 2] = -7.0
    assert array[1, 2] == -7.0


def test_read_only_array_is_refused() -> None:
    array = np.zeros(3)
    array.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        to_torch(array)


def test_non_array_is_refused() -> None:
    with pytest.raises(TypeError, match="DLPack"):
        to_torch([1.0, 2.0])


def test_torch_to_numpy_shares_memory_and_keeps_dtype() -> None:
    tensor = torch.arange(6, dtype=torch.float64).to(torch.complex128).reshape(2, 3)
    array = from_torch(tensor, np)
    assert array.ctypes.data == tensor.data_ptr() and array.dtype == np.complex128
    array[0, 1] = 5j
    assert tensor[0, 1] == 5j
    assert to_torch(array).data_ptr() == tensor.data_ptr()  # round trip, still no copy


def test_from_torch_refusals() -> None:
    with pytest.raises(ValueError, match="requires grad"):
        from_torch(torch.zeros(2, requires_grad=True), np)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        from_torch(np.zeros(2), np)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="xp must be numpy or cupy"):
        from_torch(torch.zeros(2), torch)
