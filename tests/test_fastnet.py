"""FastSpectralNet and the numba COS kernel: the same numbers as the torch module and cos.py.

The network copy is checked against the module evaluated in complex128 for every architecture
option (float32 rounding), the compiled kernels against their plain-Python originals, and the
COS kernel against cos.put / cos.digital_call with the analytic GBM spectrum (1e-12) and against
Black-Scholes (1e-10).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from spectral_core import analytic, cos
from spectral_core import fastnet as fn
from spectral_core.config import PROCESS_NAMES, ArchConfig, CoreConfig
from spectral_core.cvnn import build_model, theta_features
from spectral_core.pricer import Contracts, Pricer
from spectral_core.processes import get_process
from spectral_core.spectrum import truncation_interval


def _theta(n: int, seed: int, config: CoreConfig) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    dom = config.domain
    cols = [rng.uniform(b.lower, b.upper, n) for b in (dom.T, dom.r, dom.d, dom.sigma)]
    return torch.as_tensor(np.stack(cols, axis=1))  # (n, 4) float64


def _perturbed_model(arch: ArchConfig, config: CoreConfig, seed: int = 1):  # type: ignore[no-untyped-def]
    """A model away from its initialisation (and, for batch norm, with non-trivial statistics)."""
    model = build_model(
        arch, n_freq=config.spectrum.n_freq, truncation_L=config.spectrum.truncation_L
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if arch.norm == "batch":  # running statistics from a few training-mode passes
            model.train()
            for i in range(5):
                model(theta_features(_theta(64, 100 + i, config).float(), config.domain))
    return model.eval()


ARCHS = [
    ArchConfig(width=12, depth=depth, activation=act, norm=norm, residual=residual, seed=3)
    for act, norm, residual, depth in itertools.product(
        ("modrelu", "zrelu", "crelu", "cardioid"), ("layer", "batch", "none"), (True, False), (2,)
    )
] + [ArchConfig(width=16, depth=0, seed=4)]


@pytest.mark.parametrize(
    "arch", ARCHS, ids=lambda a: f"{a.activation}-{a.norm}-r{int(a.residual)}-d{a.depth}"
)
def test_fast_network_equals_module(arch: ArchConfig) -> None:
    config = CoreConfig()
    model = _perturbed_model(arch, config)
    features = theta_features(_theta(300, 5, config), config.domain)  # (300, 7) float64
    fast = fn.FastSpectralNet(model, chunk=64)  # several chunks and a ragged last one
    with torch.no_grad():
        ref = model.double()(features).real.numpy()
    # float32 GEMM path: float32 rounding; float64 per-row path: the module's own precision
    for reproducible, atol in ((False, 2e-5), (True, 1e-12)):
        got = fast.re_spectrum(features, reproducible=reproducible)
        assert got.shape == ref.shape == (300, config.spectrum.n_freq)
        assert np.all(got[:, 0] == 1.0)
        np.testing.assert_allclose(got, ref, rtol=0, atol=atol)


def test_chunk_size_does_not_change_results_beyond_rounding() -> None:
    config = CoreConfig()
    model = _perturbed_model(config.arch, config)
    features = theta_features(_theta(257, 8, config), config.domain)
    one = fn.FastSpectralNet(model, chunk=4096).re_spectrum(features)
    many = fn.FastSpectralNet(model, chunk=10).re_spectrum(features)
    np.testing.assert_allclose(one, many, rtol=0, atol=5e-6)


def test_fast_network_rejects_bad_input() -> None:
    config = CoreConfig()
    model = build_model(config.arch, n_freq=config.spectrum.n_freq)
    with pytest.raises(ValueError, match="chunk"):
        fn.FastSpectralNet(model, chunk=0)
    with pytest.raises(ValueError, match="SpectralCVNN"):
        fn.FastSpectralNet(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        fn.FastSpectralNet(model).re_spectrum(np.zeros((3, 6)))


# ------------------------------------------------------------------------------ kernels


def _planar(rows: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((rows, 2 * width)).astype(np.float32)
    h[0] = 0.0  # z = 0 exercises the |z| = 0 branches
    h[1, :width] = 0.0
    return h


@pytest.mark.parametrize("kind", [1, 2, 3, 4], ids=["modrelu", "zrelu", "crelu", "cardioid"])
def test_activation_kernel_equals_python(kind: int) -> None:
    h = _planar(9, 5, kind)
    bias = np.linspace(-0.5, 0.5, 5)
    compiled, plain = h.copy(), h.copy()
    fn._activation_rows_kernel(compiled, kind, bias)
    for row in plain:
        fn._activation_row.py_func(row, kind, bias)
    np.testing.assert_allclose(compiled, plain, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(compiled, h)


@pytest.mark.parametrize("kind", [1, 2], ids=["layer", "affine"])
def test_norm_kernels_equal_python(kind: int) -> None:
    h = _planar(7, 6, 0)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((2, 6))
    out_c, out_p = np.empty_like(h), np.empty_like(h)
    fn._norm_rows_kernel(h, out_c, kind, a, b, 1e-5)
    inner = fn._layer_norm_row if kind == 1 else fn._affine_norm_row
    for src, dst in zip(h, out_p, strict=True):
        if kind == 1:
            inner.py_func(src, dst, a, b, 1e-5)
        else:
            inner.py_func(src, dst, a, b)
    np.testing.assert_allclose(out_c, out_p, rtol=1e-5, atol=1e-5)


def test_reproducible_rows_are_batch_invariant_and_agree_with_gemm_path() -> None:
    config = CoreConfig()
    model = _perturbed_model(config.arch, config)
    fast = fn.FastSpectralNet(model)
    features = theta_features(_theta(203, 6, config), config.domain)
    whole = fast.re_spectrum(features, reproducible=True)
    for lo, hi in ((0, 1), (5, 70), (70, 203), (100, 101)):
        part = fast.re_spectrum(features[lo:hi], reproducible=True)
        assert part.tobytes() == whole[lo:hi].tobytes(), (lo, hi)
    shuffled = np.random.default_rng(0).permutation(203)
    again = fast.re_spectrum(features[shuffled], reproducible=True)
    assert again.tobytes() == whole[shuffled].tobytes()
    np.testing.assert_allclose(whole, fast.re_spectrum(features), rtol=0, atol=2e-5)


def _gbm_case(n: int, seed: int):  # type: ignore[no-untyped-def]
    """Contracts with strikes from deep ITM to beyond the truncation interval, tiny to long T."""
    config = CoreConfig()
    rng = np.random.default_rng(seed)
    T = np.concatenate([[1e-3, 5.0, 0.02], rng.uniform(0.05, 4.5, n - 3)])
    r, d = rng.uniform(-0.01, 0.09, n), rng.uniform(0.0, 0.07, n)
    v = np.concatenate([[0.05, 0.95, 0.3], rng.uniform(0.08, 0.9, n - 3)])
    S0 = rng.uniform(50, 150, n)
    K = S0 * np.exp((r - d) * T) * np.concatenate([[0.2, 1.0, 40.0], rng.uniform(0.5, 1.6, n - 3)])
    t = {k: torch.as_tensor(x) for k, x in dict(T=T, r=r, d=d, v=v, S0=S0, K=K).items()}
    a, b = truncation_interval(
        t["T"], t["r"], t["d"], t["v"], L=config.spectrum.truncation_L, xp=torch
    )
    k = torch.arange(config.spectrum.n_freq, dtype=torch.float64)
    u = k[None, :] * torch.pi / (b - a)[:, None]
    F = analytic.gbm_shifted_cf(u, a, T=t["T"], r=t["r"], d=t["d"], sigma=t["v"])
    return t, a, b, F


def test_cos_kernel_matches_cos_module_and_black_scholes() -> None:
    t, a, b, F = _gbm_case(400, 0)
    put, digital = fn.cos_put_digital(
        F.real.numpy(), a=a.numpy(), b=b.numpy(), S0=t["S0"].numpy(), K=t["K"].numpy(),
        r=t["r"].numpy(), T=t["T"].numpy(),
    )  # fmt: skip
    kw = dict(S0=t["S0"], K=t["K"], r=t["r"], T=t["T"])
    np.testing.assert_allclose(put, cos.put(F, a, b, **kw).numpy(), rtol=0, atol=1e-12 * 150)
    np.testing.assert_allclose(digital, cos.digital_call(F, a, b, **kw).numpy(), rtol=0, atol=1e-12)
    bs = analytic.bs_put(S0=t["S0"], K=t["K"], T=t["T"], r=t["r"], d=t["d"], sigma=t["v"]).numpy()
    assert np.max(np.abs(put - bs) / t["S0"].numpy()) < 1e-10


def test_cos_kernel_compiled_equals_python() -> None:
    t, a, b, F = _gbm_case(70, 1)  # more than one row tile, a ragged last tile
    args = [F.real.numpy().copy(), a.numpy(), b.numpy()] + [
        t[k].numpy() for k in ("S0", "K", "r", "T")
    ]
    out_c = (np.empty(70), np.empty(70))
    out_p = (np.empty(70), np.empty(70))
    fn._cos_put_digital_kernel(*args, *out_c)
    fn._cos_put_digital_kernel.py_func(*args, *out_p)
    np.testing.assert_allclose(out_c[0], out_p[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out_c[1], out_p[1], rtol=0, atol=1e-13)


def test_cos_kernel_validates_inputs() -> None:
    re_f, one = np.ones((2, 8)), np.ones(2)
    good = dict(a=-one, b=one, S0=one, K=one, r=0 * one, T=one)
    fn.cos_put_digital(re_f, **good)
    with pytest.raises(ValueError, match="re_f"):
        fn.cos_put_digital(np.ones(8), **good)
    with pytest.raises(ValueError, match="K must have shape"):
        fn.cos_put_digital(re_f, **{**good, "K": np.ones(3)})
    with pytest.raises(ValueError, match="b must be > a"):
        fn.cos_put_digital(re_f, **{**good, "b": -one})
    with pytest.raises(ValueError, match="S0 must be > 0"):
        fn.cos_put_digital(re_f, **{**good, "S0": -one})
    with pytest.raises(ValueError, match="T must be finite"):
        fn.cos_put_digital(re_f, **{**good, "T": np.array([1.0, np.nan])})


# ------------------------------------------------------------------------------ pricer


def test_pricer_fast_path_matches_module_path() -> None:
    config = CoreConfig()
    model = _perturbed_model(config.arch, config)
    fast = Pricer(model, config)
    assert fast._fast is not None
    module = Pricer(model, config)
    module._fast = None  # the torch module path, as used with greeks
    rng = np.random.default_rng(4)
    theta = _theta(500, 9, config).numpy()
    X0 = rng.uniform(50, 150, 500)
    K = X0 * np.exp((theta[:, 1] - theta[:, 2]) * theta[:, 0]) * rng.uniform(0.7, 1.3, 500)
    c = Contracts(X0=X0, K=K, T=theta[:, 0], r=theta[:, 1], d=theta[:, 2], v=theta[:, 3])
    got = fast.price(c, metrics=True)
    ref = module.price(c, metrics=True)
    assert got.keys() == ref.keys()
    for key in ("put", "call", "put_convexity", "call_convexity"):
        # float32 network rounding, as a fraction of spot (1e-6 = 0.01 bp)
        assert np.max(np.abs(got[key] - ref[key]) / X0) < 1e-6, key
    for key in ("digital_call", "digital_put"):
        assert np.max(np.abs(got[key] - ref[key])) < 1e-6, key
    for key, tol in (("ST_q01", 1e-5), ("ST_q50", 1e-5), ("var99", 1e-4), ("es99", 1e-4)):
        # quantiles invert the CDF (rounding in F over the density); the random weights give
        # wide, heavy-tailed laws on which the tail integrals amplify float32 rounding
        scale = np.maximum(np.abs(ref[key]), X0)
        assert np.max(np.abs(got[key] - ref[key]) / scale) < tol, key
    for key in ("put_intrinsic", "call_intrinsic", "forward"):
        assert np.array_equal(got[key], ref[key]), key
    assert fast.price(c, digitals=False).keys() == module.price(c, digitals=False).keys()


@pytest.mark.parametrize("process", PROCESS_NAMES)
def test_warm_up_prices_the_domain_centre(process: str) -> None:
    # every process: Heston and Bates contracts carry their own fields (v0, ...)
    config = CoreConfig(process=process)
    model = build_model(config.arch, n_freq=config.spectrum.n_freq,
                        n_features=get_process(process).n_features)
    for reproducible in (False, True):
        Pricer(model, config, reproducible=reproducible).warm_up()  # raises if anything fails
