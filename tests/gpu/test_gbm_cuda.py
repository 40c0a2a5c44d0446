"""The real CUDA kernel against the CPU kernel; zero-copy hand-off numba -> cupy -> torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from spectral_core.device import from_torch, to_torch
from spectral_core.normals import NormalsSource
from spectral_core.processes.gbm import simulate_log_returns, simulate_log_returns_cuda

CAP = 1 << 30


def _inputs(n: int = 8, m: int = 512, steps: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    theta = np.column_stack([rng.uniform(0.02, 5, n), rng.uniform(-0.02, 0.1, n),
                             rng.uniform(0, 0.08, n), rng.uniform(0.05, 1.0, n)])
    theta[0, 3] = 3.0  # large vol: the Euler floor runs on the device too
    return theta, rng.standard_normal((n, m, steps))


@pytest.mark.parametrize("scheme", ["log_euler", "euler"])
@pytest.mark.parametrize("mm", [False, True])
def test_cuda_kernel_matches_cpu_kernel(scheme: str, mm: bool) -> None:
    from numba import cuda

    theta, z = _inputs()
    cpu = simulate_log_returns(theta, z, scheme=scheme,  # type: ignore[arg-type]
                               moment_matching=mm, cap_bytes=CAP)
    dev = simulate_log_returns_cuda(cuda.to_device(theta), cuda.to_device(z),
                                    scheme=scheme,  # type: ignore[arg-type]
                                    moment_matching=mm, cap_bytes=CAP)
    np.testing.assert_allclose(dev.copy_to_host(), cpu, rtol=0, atol=1e-12)


def test_moment_matching_on_gpu_gives_the_exact_forward() -> None:
    import cupy as cp

    theta, z = _inputs(m=3000)
    x = simulate_log_returns_cuda(cp.asarray(theta), cp.asarray(z), scheme="euler",
                                  moment_matching=True, cap_bytes=CAP)
    forward = np.exp((theta[:, 1] - theta[:, 2]) * theta[:, 0])
    np.testing.assert_allclose(cp.asnumpy(cp.exp(cp.asarray(x)).mean(axis=1)), forward,
                               rtol=1e-12, atol=0)


def test_cupy_out_is_filled_in_place_and_returned() -> None:
    import cupy as cp

    theta, z = _inputs()
    out = cp.full((8, 512), cp.nan)
    result = simulate_log_returns_cuda(cp.asarray(theta), cp.asarray(z), scheme="log_euler",
                                       moment_matching=False, cap_bytes=CAP, out=out)
    assert result is out and bool(cp.isfinite(out).all())


def test_numba_to_cupy_to_torch_hand_off_shares_memory() -> None:
    import cupy as cp
    from numba import cuda

    theta, z = _inputs()
    x: Any = simulate_log_returns_cuda(cuda.to_device(theta), cuda.to_device(z),
                                       scheme="log_euler", moment_matching=False, cap_bytes=CAP)
    pointer = x.__cuda_array_interface__["data"][0]
    as_cupy = cp.asarray(x)  # CUDA array interface: a view
    tensor = to_torch(as_cupy)  # DLPack: a view
    assert as_cupy.data.ptr == pointer and tensor.data_ptr() == pointer
    assert tensor.device.type == "cuda"
    assert to_torch(x).data_ptr() == pointer  # numba straight to torch, also a view
    back = from_torch(tensor, cp)
    assert back.data.ptr == pointer
    before = x.copy_to_host()
    tensor.mul_(2.0)  # a write through torch is seen by the numba array: one buffer
    np.testing.assert_array_equal(x.copy_to_host(), 2.0 * before)


def test_cuda_normals_source_matches_cpu_draws() -> None:
    import cupy as cp

    kw: dict[str, Any] = {"timesteps": 4, "paths_per_contract": 256, "contracts_per_draw": 2,
                          "seed": 3, "cap_bytes": CAP, "prefetch": 1}
    cpu, gpu = NormalsSource("qmc", **kw), NormalsSource("qmc", device="cuda", **kw)
    with cpu, gpu, cpu.stream(0) as a, gpu.stream(0) as b:
        host, dev = a.next(), b.next()
    assert isinstance(dev, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(dev), host)


def test_from_torch_refuses_device_mismatch() -> None:
    import cupy as cp

    from spectral_core.device import DeviceError

    with pytest.raises(DeviceError, match="numpy needs a CPU tensor"):
        from_torch(torch.zeros(2, device="cuda"), np)
    with pytest.raises(DeviceError, match="cupy needs a CUDA tensor"):
        from_torch(torch.zeros(2), cp)
