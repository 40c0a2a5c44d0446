"""NormalsSource: QMC (Sobol' + AS241 + bridge) and Philox normals, streams, cap, threads."""

from __future__ import annotations

import gc
import importlib.util
import threading
import time
import warnings
from typing import Any

import numpy as np
import pytest
from scipy.special import ndtri
from scipy.stats import qmc

from spectral_core.device import DeviceError
from spectral_core.memory import MemoryCapError
from spectral_core.normals import (
    NormalsSource,
    bridge_plan,
    brownian_bridge,
    inverse_normal_cdf,
    scrambled_sobol_tables,
    sobol_points_uint,
)

CAP = 1 << 30


def _source(kind: str = "qmc", *, steps: int = 1, m: int = 1024, c: int = 4, seed: int = 0,
            prefetch: int = 2, **kw: Any) -> NormalsSource:
    return NormalsSource(kind, timesteps=steps, paths_per_contract=m,  # type: ignore[arg-type]
                         contracts_per_draw=c, seed=seed, cap_bytes=CAP, prefetch=prefetch, **kw)


def _producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("normals-")]


# --------------------------------------------------------------------------- building blocks

def test_inverse_normal_matches_scipy_ndtri() -> None:
    p = np.concatenate([np.random.default_rng(0).random(100_000), np.logspace(-300, -1, 500),
                        1.0 - np.logspace(-16, -1, 500), [0.5, 2.0**-54, 1.0 - 2.0**-53]])
    z = inverse_normal_cdf(p=p)
    ref = ndtri(p)
    assert np.max(np.abs(z - ref) / np.maximum(1.0, np.abs(ref))) < 1e-14


def test_inverse_normal_refuses_p_outside_open_interval() -> None:
    for bad in (0.0, 1.0, np.nan, -0.1):
        with pytest.raises(ValueError, match="p must lie"):
            inverse_normal_cdf(p=np.array([0.5, bad]))


@pytest.mark.parametrize(("dim", "start", "n"), [(1, 0, 300), (5, 0, 1024), (7, 77, 513)])
def test_sobol_kernel_reproduces_scipy_bit_for_bit(dim: int, start: int, n: int) -> None:
    sv, shift = scrambled_sobol_tables(dim=dim, seed=np.random.SeedSequence([4, 2]))
    rng = np.random.default_rng(np.random.SeedSequence([4, 2]))
    engine = qmc.Sobol(d=dim, scramble=True, bits=64, rng=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the reference draws a non-power-of-two count
        ref = engine.random(start + n)[start:]
    got = sobol_points_uint(sv=sv, shift=shift, start=start, n=n).astype(np.float64) * 2.0**-64
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 13, 64])
def test_bridge_map_is_orthogonal_and_first_normal_sets_the_endpoint(steps: int) -> None:
    plan = bridge_plan(timesteps=steps)
    assert sorted(plan[0].tolist()) == list(range(1, steps + 1))  # every grid point set once
    a = brownian_bridge(z=np.eye(steps))  # row k: increments driven by bridge normal k
    np.testing.assert_allclose(a @ a.T, np.eye(steps), atol=1e-12)
    np.testing.assert_allclose(a.sum(axis=1), np.eye(steps)[0] * np.sqrt(steps), atol=1e-12)


def test_bridge_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="timesteps must be >= 1"):
        bridge_plan(timesteps=0)
    with pytest.raises(ValueError, match="z must have shape"):
        brownian_bridge(z=np.zeros(4))


# --------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("kind", ["qmc", "philox"])
def test_moments_within_four_standard_errors(kind: str) -> None:
    with _source(kind, steps=4, m=4096, c=8, prefetch=0) as source, source.stream(0) as s:
        z = s.next()
    assert z.shape == (8, 4096, 4) and z.dtype == np.float64
    flat = z.reshape(-1)
    n = flat.size
    assert abs(flat.mean()) < 4 / np.sqrt(n)
    assert abs(flat.var() - 1.0) < 4 * np.sqrt(2 / n)
    assert abs(np.mean(flat**3)) < 4 * np.sqrt(15 / n)
    assert abs(np.mean(flat**4) - 3.0) < 4 * np.sqrt(96 / n)


def test_qmc_characteristic_function_error_is_far_below_pseudo_random() -> None:
    w = np.array([0.5, 1.0, 2.0])
    exact = np.exp(-0.5 * w**2)

    def cf_error(kind: str) -> float:
        with _source(kind, m=4096, c=16, prefetch=0) as source, source.stream(0) as s:
            z = s.next()[:, :, 0]  # (16, 4096): each contract's block estimates E[exp(i w Z)]
        est = np.exp(1j * w[None, None, :] * z[:, :, None]).mean(axis=1)  # (16, 3)
        return float(np.sqrt(np.mean(np.abs(est - exact) ** 2)))

    pseudo, quasi = cf_error("philox"), cf_error("qmc")
    assert pseudo > 0.004  # ~1/sqrt(4096) * 0.6: pseudo-random noise is really there
    assert quasi < pseudo / 50


def test_bridged_qmc_paths_have_brownian_covariance() -> None:
    steps, T = 16, 2.0
    with _source("qmc", steps=steps, m=8192, c=2, prefetch=0) as source, source.stream(3) as s:
        z = s.next().reshape(-1, steps)  # (P, steps) in path-time order
    n = z.shape[0]
    w_T = (z * np.sqrt(T / steps)).sum(axis=1)  # W(T) ~ N(0, T)
    assert abs(w_T.mean()) < 4 * np.sqrt(T / n)
    assert abs(w_T.var() - T) < 4 * T * np.sqrt(2 / n)
    cov = z.T @ z / n  # increments are i.i.d. N(0, 1)
    assert np.abs(cov - np.eye(steps)).max() < 4 * np.sqrt(2 / n)
    half = z[:, : steps // 2].sum(axis=1) * np.sqrt(T / steps)  # W(T/2) ~ N(0, T/2)
    assert abs(np.mean(half * w_T) - T / 2) < 4 * np.sqrt(3 * T * T / 4 / n)


# --------------------------------------------------------------------------- streams

@pytest.mark.parametrize("kind", ["qmc", "philox"])
def test_streams_are_reproducible_and_distinct(kind: str) -> None:
    with _source(kind, steps=3, seed=9) as a, _source(kind, steps=3, seed=9) as b:
        s0, s0_again, s1 = a.stream(0), b.stream(0), a.stream(1)
        x, y, v = s0.next(), s0_again.next(), s1.next()
        np.testing.assert_array_equal(x, y)
        assert np.abs(x - v).max() > 1.0
        if kind == "philox":  # LMS scrambles keep the point order, so only Philox is uncorrelated
            assert np.abs(np.corrcoef(x.reshape(-1), v.reshape(-1))[0, 1]) < 4 / np.sqrt(x.size)
    with _source(kind, steps=3, seed=10, prefetch=0) as other, other.stream(0) as s:
        assert np.abs(s.next() - x).max() > 1.0


def test_qmc_draws_are_independent_replicates_and_blocks_are_nets() -> None:
    w = 1.0
    with _source("qmc", m=256, c=4, prefetch=0) as source, source.stream(0) as s:
        draws = np.stack([s.next()[:, :, 0] for _ in range(64)])  # (64 draws, 4, 256)
    assert np.abs(draws[0] - draws[1]).max() > 1.0  # rescrambled, not the next block
    # each contract's block is a net: its CF error is far below the i.i.d. SE (~0.6 / 16)
    errors = np.exp(1j * w * draws).mean(axis=2) - np.exp(-0.5 * w * w)  # (64, 4)
    assert np.abs(errors).max() < 0.01
    # fresh scrambles per draw: the replicate errors of one contract slot are uncorrelated
    re = errors[:, 0].real
    lag1 = np.corrcoef(re[:-1], re[1:])[0, 1]
    assert abs(lag1) < 4 / np.sqrt(63)
    assert abs(re.mean()) < 4 * re.std(ddof=1) / np.sqrt(64)  # randomised QMC is unbiased


@pytest.mark.parametrize("kind", ["qmc", "philox"])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_position_is_bit_exact(kind: str, prefetch: int) -> None:
    with _source(kind, steps=5, m=64, c=3, prefetch=prefetch) as source:
        with source.stream(2, skip=4) as s:
            for _ in range(3):
                s.next()
            assert s.position == 7
            expected = [s.next(), s.next()]
        with source.stream(2, skip=7) as resumed:
            got = [resumed.next(), resumed.next()]
            assert resumed.position == 9
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)


def test_prefetch_and_inline_generation_agree() -> None:
    a, b = _source("qmc", steps=4, prefetch=0), _source("qmc", steps=4, prefetch=2)
    with a, b, a.stream(0) as s, b.stream(0) as t:
        for _ in range(4):
            np.testing.assert_array_equal(s.next(), t.next())


# --------------------------------------------------------------------------- cap and validation

def test_cap_is_refused_at_construction() -> None:
    draw = 4 * 1024 * 8 * 8  # C * M * steps * 8 bytes
    with pytest.raises(MemoryCapError, match=r"memory\.normals_bytes"):
        NormalsSource("qmc", timesteps=8, paths_per_contract=1024, contracts_per_draw=4, seed=0,
                      cap_bytes=2 * 3 * draw - 1, prefetch=2)
    NormalsSource("qmc", timesteps=8, paths_per_contract=1024, contracts_per_draw=4, seed=0,
                  cap_bytes=2 * 3 * draw, prefetch=2).close()
    with pytest.raises(MemoryCapError):
        NormalsSource("philox", timesteps=8, paths_per_contract=1024, contracts_per_draw=4,
                      seed=0, cap_bytes=draw - 1, prefetch=0, max_open_streams=1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "sobol"}, "kind must be"),
    ({"steps": 0}, "timesteps must be"),
    ({"m": 1000}, "power of two"),
    ({"c": 0}, "contracts_per_draw must be"),
    ({"seed": -1}, "seed must be"),
    ({"prefetch": -1}, "prefetch must be"),
    ({"max_open_streams": 0}, "max_open_streams must be"),
    ({"device": "tpu"}, "device must be"),
])
def test_bad_arguments_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _source(**kwargs)  # type: ignore[arg-type]


def test_philox_accepts_any_path_count() -> None:
    with _source("philox", m=1000, c=2, prefetch=0) as source, source.stream(0) as s:
        assert s.next().shape == (2, 1000, 1)


def test_bad_stream_arguments_are_refused() -> None:
    with _source(prefetch=0) as source:
        with pytest.raises(ValueError, match="stream_id"):
            source.stream(-1)
        with pytest.raises(ValueError, match="skip"):
            source.stream(0, skip=-3)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_cuda_device_without_cupy_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="gpu extra"):
        _source(device="cuda")


# --------------------------------------------------------------------------- thread lifecycle

def test_close_stops_the_producer_and_next_after_close_fails() -> None:
    source = _source("philox", prefetch=2)
    s = source.stream(0)
    s.next()
    assert len(_producer_threads()) == 1
    s.close()
    s.close()  # idempotent
    assert _producer_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        s.next()


def test_source_close_closes_every_stream_and_refuses_new_ones() -> None:
    source = _source("qmc", prefetch=1)
    a, b = source.stream(0), source.stream(1)
    assert source.open_streams == 2
    source.close()
    assert _producer_threads() == [] and source.open_streams == 0
    for s in (a, b):
        with pytest.raises(RuntimeError, match="closed"):
            s.next()
    with pytest.raises(RuntimeError, match="source is closed"):
        source.stream(2)


def test_open_stream_limit_matches_the_cap() -> None:
    with _source(prefetch=0, max_open_streams=1) as source:
        first = source.stream(0)
        with pytest.raises(RuntimeError, match="max_open_streams=1"):
            source.stream(1)
        first.close()
        source.stream(1).close()


def test_unclosed_stream_stops_its_thread_when_collected() -> None:
    source = _source("philox", prefetch=2)
    s = source.stream(0)
    s.next()
    del s
    gc.collect()
    deadline = time.monotonic() + 5.0
    while _producer_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _producer_threads() == []
    assert source.open_streams == 0


def test_producer_failure_surfaces_in_next(monkeypatch: pytest.MonkeyPatch) -> None:
    # No real input makes generation fail, so the draw function is wrapped to fail at draw 1.
    real = NormalsSource._draw_maker

    def failing_maker(self: NormalsSource, stream_id: int) -> object:
        make = real(self, stream_id)

        def draw(index: int) -> np.ndarray:
            if index == 1:
                raise FloatingPointError("injected failure")
            return make(index)

        return draw

    monkeypatch.setattr(NormalsSource, "_draw_maker", failing_maker)
    with _source("philox", prefetch=2) as source, source.stream(0) as s:
        s.next()
        with pytest.raises(RuntimeError, match="producer failed") as info:
            s.next()
        assert isinstance(info.value.__cause__, FloatingPointError)
        with pytest.raises(RuntimeError, match="closed"):
            s.next()
    assert _producer_threads() == []


def test_skip_beyond_the_draw_index_range_is_refused() -> None:
    with _source(prefetch=0) as source, pytest.raises(ValueError, match="skip must be < 2"):
        source.stream(0, skip=2**63)
