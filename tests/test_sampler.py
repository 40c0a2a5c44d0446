"""ContractSampler: scipy's scrambled Sobol' points over the domain, resumable bit-for-bit."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.stats import qmc

from spectral_core.config import PARAM_NAMES, Bounds, DomainConfig
from spectral_core.sampler import ContractSampler

DOMAIN = DomainConfig()


def _scipy_reference(domain: DomainConfig, seed: int, n: int) -> np.ndarray:
    engine = qmc.Sobol(d=4, scramble=True, bits=64, rng=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the reference draws a non-power-of-two count
        u = engine.random(n)
    lower, upper = np.array(domain.lower()), np.array(domain.upper())
    return np.clip(lower + u * (upper - lower), lower, upper)


def test_points_are_scipys_scrambled_sobol_bit_for_bit() -> None:
    sampler = ContractSampler(DOMAIN, seed=7)
    got = np.concatenate([sampler.sample(5), sampler.sample(123), sampler.sample(1)])
    np.testing.assert_array_equal(got, _scipy_reference(DOMAIN, 7, 129))


def test_shape_dtype_bounds_and_column_order() -> None:
    domain = DomainConfig(T=Bounds(lower=1.0, upper=2.0), r=Bounds(lower=-0.5, upper=-0.4),
                          d=Bounds(lower=10.0, upper=11.0), sigma=Bounds(lower=0.2, upper=0.3))
    theta = ContractSampler(domain, seed=0).sample(1000)
    assert theta.shape == (1000, 4) and theta.dtype == np.float64
    for k, name in enumerate(PARAM_NAMES):
        bounds = getattr(domain, name)
        assert bounds.lower <= theta[:, k].min() and theta[:, k].max() <= bounds.upper


def test_column_means_have_qmc_accuracy() -> None:
    # A scrambled Sobol' net of 4096 points integrates u to ~1/n; i.i.d. points: SE 0.0045.
    theta = ContractSampler(DOMAIN, seed=3).sample(4096)
    u = (theta - np.array(DOMAIN.lower())) / (np.array(DOMAIN.upper()) - np.array(DOMAIN.lower()))
    assert np.abs(u.mean(axis=0) - 0.5).max() < 2e-4


def test_resume_after_odd_draws_is_bit_exact() -> None:
    first = ContractSampler(DOMAIN, seed=11)
    for n in (3, 17, 1, 250):
        first.sample(n)
    assert first.position == 271
    resumed = ContractSampler(DOMAIN, seed=11, skip=first.position)
    assert resumed.position == 271
    np.testing.assert_array_equal(resumed.sample(33), first.sample(33))
    np.testing.assert_array_equal(resumed.sample(7), first.sample(7))


def test_state_round_trips_through_json() -> None:
    sampler = ContractSampler(DOMAIN, seed=5, skip=9)
    sampler.sample(13)
    state = json.loads(json.dumps(sampler.state()))
    restored = ContractSampler.from_state(DOMAIN, state)
    assert restored.position == sampler.position == 22
    np.testing.assert_array_equal(restored.sample(64), sampler.sample(64))


def test_seeds_give_different_points() -> None:
    a = ContractSampler(DOMAIN, seed=1).sample(8)
    b = ContractSampler(DOMAIN, seed=2).sample(8)
    assert not np.allclose(a, b)


def test_non_power_of_two_draws_emit_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ContractSampler(DOMAIN, seed=0, skip=3).sample(5)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_bad_n_is_refused(n: object) -> None:
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        ContractSampler(DOMAIN, seed=0).sample(n)  # type: ignore[arg-type]


def test_bad_seed_skip_domain_are_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        ContractSampler(DOMAIN, seed=-1)
    with pytest.raises(ValueError, match="skip"):
        ContractSampler(DOMAIN, seed=0, skip=-5)
    with pytest.raises(ValueError, match="domain"):
        ContractSampler({"T": (0, 1)}, seed=0)  # type: ignore[arg-type]


def test_bad_state_is_refused() -> None:
    good = ContractSampler(DOMAIN, seed=1).state()
    with pytest.raises(ValueError, match="'bits'"):
        ContractSampler.from_state(DOMAIN, {**good, "bits": 30})
    with pytest.raises(ValueError, match="missing"):
        ContractSampler.from_state(DOMAIN, {k: v for k, v in good.items() if k != "position"})
    with pytest.raises(ValueError, match="skip"):
        ContractSampler.from_state(DOMAIN, {**good, "position": -1})
