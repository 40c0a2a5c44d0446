"""Scenario sampling by inverse CDF through COS: against the closed-form lognormal quantile."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from spectral_core import analytic
from spectral_core.pricer import Contracts, Pricer
from spectral_core.scenarios import sample_terminal, terminal_quantiles, uniforms
from storage.localstore import LocalStore
from tests.server_fixtures import (
    Client,
    check_schema,
    commit_model,
    loads,
    make_settings,
    start_client,
    trained_snapshots,
)


def _f64(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


def _gbm_spectrum(T: float, r: float, d: float, sigma: float, n: int = 64, L: float = 10.0):
    c1, sd = (r - d - 0.5 * sigma**2) * T, sigma * math.sqrt(T)
    a, b = _f64(c1 - L * sd), _f64(c1 + L * sd)
    k = torch.arange(n, dtype=torch.float64)
    u = k[None, :] * math.pi / (b - a)[:, None]
    F = analytic.gbm_shifted_cf(u, a, T=_f64(T), r=_f64(r), d=_f64(d), sigma=_f64(sigma))
    return F, a, b, c1, sd


@pytest.mark.parametrize(("T", "sigma"), [(1.0, 0.25), (0.05, 0.1), (2.0, 0.8)])
def test_quantiles_of_the_exact_cf_are_the_lognormal_quantiles(T: float, sigma: float) -> None:
    F, a, b, c1, sd = _gbm_spectrum(T, 0.03, 0.01, sigma)
    u = uniforms(2000, seed=3)
    got = terminal_quantiles(F, a, b, S0=100.0, u=u)
    want = 100.0 * np.exp(c1 + sd * stats.norm.ppf(u))
    assert np.max(np.abs(got - want) / want) < 1e-10


def test_same_seed_same_bits_other_seed_other_draws() -> None:
    F, a, b, *_ = _gbm_spectrum(1.0, 0.02, 0.0, 0.3)
    x = terminal_quantiles(F, a, b, S0=50.0, u=uniforms(3000, seed=11))
    y = terminal_quantiles(F, a, b, S0=50.0, u=uniforms(3000, seed=11))
    z = terminal_quantiles(F, a, b, S0=50.0, u=uniforms(3000, seed=12))
    assert x.tobytes() == y.tobytes()
    assert not np.array_equal(x, z)
    # more levels than one solver chunk: chunking changes nothing
    u = uniforms(9000, seed=5)
    whole = terminal_quantiles(F, a, b, S0=50.0, u=u)
    assert whole[:3000].tobytes() == terminal_quantiles(F, a, b, S0=50.0, u=u[:3000]).tobytes()


def test_uniforms_lie_strictly_inside_and_are_uniform() -> None:
    u = uniforms(100_000, seed=0)
    assert u.min() > 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="n must be >= 1"):
        uniforms(0, seed=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        uniforms(5, seed=-1)


def test_refuses_more_than_one_contract() -> None:
    F, a, b, *_ = _gbm_spectrum(1.0, 0.02, 0.0, 0.3)
    with pytest.raises(ValueError, match="one contract"):
        terminal_quantiles(torch.cat([F, F]), torch.cat([a, a]), torch.cat([b, b]), S0=1.0,
                           u=uniforms(3, seed=0))


# ------------------------------------------------------------------------- POST /v1/scenarios
CONTRACT = {"X0": 100.0, "T": 1.0, "r": 0.02, "d": 0.01, "v": 0.2}


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Client:
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    return await start_client(aiohttp_client, store=store,
                              settings=make_settings(max_scenario_samples=5000))


async def _post(client: Client, body: dict[str, Any]) -> tuple[int, bytes]:
    resp = await client.post("/v1/scenarios", json=body)
    return resp.status, await resp.read()


async def test_samples_are_the_library_quantiles_and_repeat_bit_for_bit(client: Client) -> None:
    status, raw = await _post(client, {"contract": CONTRACT, "n": 2000, "seed": 9})
    assert status == 200, raw
    body = loads(raw)
    check_schema(body, "ScenarioResult")
    assert body["model"]["counter"] == 1 and (body["n"], body["seed"]) == (2000, 9)
    assert body["contract"] == CONTRACT
    status, again = await _post(client, {"contract": CONTRACT, "n": 2000, "seed": 9})
    assert again == raw  # same inputs, same version: same bytes
    snapshot, _ = trained_snapshots()[0]
    pricer = Pricer.from_snapshot(snapshot, reproducible=True)
    c = Contracts(**{k: [v] for k, v in {**CONTRACT, "K": CONTRACT["X0"]}.items()})
    want = sample_terminal(pricer, c, n=2000, seed=9)
    assert body["samples"] == [float(x) for x in want]
    # the learned law is close to the true lognormal for this trained model: a loose KS check
    sd = CONTRACT["v"] * math.sqrt(CONTRACT["T"])
    mean = math.log(CONTRACT["X0"]) + (CONTRACT["r"] - CONTRACT["d"] - 0.5 * sd**2)
    assert stats.kstest(body["samples"], stats.lognorm(s=sd, scale=math.exp(mean)).cdf).pvalue \
        > 1e-4


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"contract": CONTRACT, "n": 5001, "seed": 1}, 422, "n"),
    ({"contract": CONTRACT, "n": 0, "seed": 1}, 422, "n"),
    ({"contract": CONTRACT, "n": 10, "seed": -1}, 422, "seed"),
    ({"contract": {**CONTRACT, "v": 5.0}, "n": 10, "seed": 1}, 422, "contract.v"),
    ({"contract": {**CONTRACT, "K": 1.0}, "n": 10, "seed": 1}, 422, "contract.K"),
    ({"contract": CONTRACT, "n": 10, "seed": 1, "model_version": 7}, 404, None),
])
async def test_refusals_name_the_field(client: Client, body: dict[str, Any], status: int,
                                       field: str | None) -> None:
    got, raw = await _post(client, body)
    assert got == status, raw
    answer = json.loads(raw)
    if field is not None:
        assert any(e["path"] == field for e in answer["fields"]), answer
    else:
        assert "version 7" in answer["detail"]
