"""Named models: settings, one chain per model under models/<name>/, GET /v1/models, admin
routes per model, and the `model` label on the per-model metrics."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from config.settings import NamedModelSettings, RetentionSettings, SettingsError, load_settings
from server.keys import MODELS_KEY
from server.retention import MODEL_RETENTIONS_KEY
from storage.localstore import LocalStore
from storage.objectstore import ObjectStore
from tests.server_fixtures import (
    HESTON,
    NOW,
    check_schema,
    commit_model,
    make_settings,
    market_body,
    model_chain,
    put_market_data,
    start_client,
    trained_snapshots,
    until,
)
from tests.test_admin_worker import TOKEN

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _settings(**kw: Any) -> Any:
    s = make_settings(models={"heston": HESTON}, poll_interval_s=0.05, **kw)
    return s.model_copy(update={"admin": s.admin.model_copy(update={"token": _secret()})})


def _secret() -> Any:
    return SecretStr(TOKEN)


@pytest.fixture
async def store(tmp_path: Any) -> ObjectStore:
    s = LocalStore(tmp_path / "store")
    await commit_model(s)  # bs: the store's root, as every store before named models
    await commit_model(s, model="heston")
    return s


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[models."Bad Name".core]\nprocess = "heston"\n', "a model name must match"),
        ('[models."heston\\n".core]\nprocess = "heston"\n', "a model name must match"),
        ('[models.bs.core]\nprocess = "gbm"\n', "'bs' is \\[core\\] and \\[model\\]"),
        ('[server]\ndefault_model = "sabr"\n', "default_model = 'sabr' names no model"),
        ('[models.heston.core]\nprocess = "sabr"\n', "models.heston.core.process"),
    ],
)
def test_bad_model_settings_name_the_field(tmp_path: Any, toml: str, message: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(toml)
    with pytest.raises(SettingsError, match=message):
        load_settings(f, env={})


def test_a_named_model_reads_its_own_core_model_and_training(tmp_path: Any) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[models.heston]\ntraining = false\n[models.heston.core]\nprocess = "heston"\n'
                 '[models.heston.model]\nmode = "pinned"\npin_ref = "prod"\n')
    s = load_settings(f, env={})
    own = s.for_model("heston")
    assert own.core.process == "heston" and own.model.pin_ref == "prod"
    assert not own.training.enabled and s.training.enabled
    assert s.for_model("bs") is s
    env = {"SPECTRALMC_MODELS__HESTON__MODEL__POLL_INTERVAL_S": "2.5"}
    assert load_settings(f, env=env).models["heston"].model.poll_interval_s == 2.5


# ------------------------------------------------------------------------------ serving


async def test_each_model_serves_its_own_chain(aiohttp_client: Any, store: ObjectStore) -> None:
    client = await start_client(aiohttp_client, store=store, settings=_settings())

    async def both_loaded() -> bool:
        body = await (await client.get("/v1/models")).json()
        return all(m["live"] is not None for m in body["models"])

    await until(both_loaded, what="both models to load")
    resp = await client.get("/v1/models")
    body = await resp.json()
    check_schema(body, "ModelList")
    assert body["default"] == "bs"
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["bs"]["process"] == "gbm" and by_name["bs"]["chain"] == "/"
    heston = by_name["heston"]
    assert heston["process"] == "heston" and heston["chain"] == "models/heston/"
    assert heston["domain"]["rho"] == [-0.95, 0.2]
    assert heston["training"] == "disabled"
    heston_rec = (await model_chain(store, "heston").list())[-1]
    assert heston["live"]["counter"] == heston_rec.counter
    assert heston["live"]["version_hash"] == heston_rec.version_hash
    # the heston chain lives under its prefix; the root chain holds only the bs version
    keys = await store.list("models/")
    assert keys and all(k.startswith("models/heston/") for k in keys)
    assert len(await model_chain(store).list()) == 1
    one = await client.get("/v1/models/heston")
    assert (await one.json())["name"] == "heston"
    missing = await client.get("/v1/models/sabr")
    assert missing.status == 404
    assert "model 'sabr' is not served here" in (await missing.json())["detail"]


async def test_a_version_of_another_process_is_not_served(aiohttp_client: Any,
                                                         tmp_path: Any) -> None:
    s = LocalStore(tmp_path / "store")
    await commit_model(s)
    # a gbm version committed into the heston chain: loading it as heston must fail
    await model_chain(s, "heston").commit(
        _gbm_snapshot(),
        message="wrong process", metrics={},
    )
    client = await start_client(aiohttp_client, store=s, settings=_settings())

    async def failed() -> bool:
        text = await (await client.get("/metrics")).text()
        return 'spectralmc_model_load_failures_total{kind="ProcessMismatch",model="heston"}' in text

    await until(failed, what="the heston model to refuse a gbm version")
    body = await (await client.get("/v1/models/heston")).json()
    assert body["live"] is None


def _gbm_snapshot() -> Any:
    return trained_snapshots()[0][0]


async def test_admin_pins_per_model_and_audits_in_its_chain(aiohttp_client: Any,
                                                          store: ObjectStore) -> None:
    await commit_model(store, model="heston")  # heston v2
    client = await start_client(aiohttp_client, store=store, settings=_settings())
    resp = await client.put("/v1/admin/models/heston/pin", json={"version": 1}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["pinned"] == 1

    async def pinned() -> bool:
        body = await (await client.get("/v1/models/heston")).json()
        return body["live"] is not None and body["live"]["counter"] == 1

    await until(pinned, what="heston to serve the pinned version")
    heston_log = await model_chain(store, "heston").log()
    assert [e.action for e in heston_log if e.action.startswith("pin")]
    root_log = await model_chain(store).log()
    assert not [e for e in root_log if e.action.startswith("pin")]
    # bs is untouched
    bs = await (await client.get("/v1/models/bs")).json()
    assert bs["live"]["mode"] == "tracking"
    unknown = await client.put("/v1/admin/models/sabr/pin", json={"version": 1}, headers=ADMIN)
    assert unknown.status == 404
    status = await client.get("/v1/admin/models/heston/training", headers=ADMIN)
    assert (await status.json())["training"]["state"] == "disabled"
    pause = await client.post("/v1/admin/models/heston/training/pause", headers=ADMIN)
    assert pause.status == 409 and "model 'heston'" in await pause.text()


async def test_metrics_carry_the_model_label(aiohttp_client: Any, store: ObjectStore) -> None:
    client = await start_client(aiohttp_client, store=store, settings=_settings())

    async def both() -> bool:
        text = await (await client.get("/metrics")).text()
        return all(f'model="{m}"' in text and "spectralmc_model_version_info{" in text
                   for m in ("bs", "heston"))

    await until(both, what="both models' version series")
    text = await (await client.get("/metrics")).text()
    info = [ln for ln in text.splitlines() if ln.startswith("spectralmc_model_version_info{")]
    assert sorted('model="heston"' in ln for ln in info) == [False, True]


def test_named_model_settings_default_to_training_on() -> None:
    assert NamedModelSettings().training


async def test_each_model_chain_has_its_own_retention(aiohttp_client: Any,
                                                     store: ObjectStore) -> None:
    # v2 has its own blob; versions that share a blob with a kept one are not collected
    await commit_model(store, model="heston", which=1)
    settings = _settings().model_copy(
        update={"retention": RetentionSettings(keep_last=1, ladder=())}
    )
    client = await start_client(aiohttp_client, store=store, settings=settings)

    async def heston_served() -> bool:
        body = await (await client.get("/v1/models/heston")).json()
        return body["live"] is not None and body["live"]["counter"] == 2

    await until(heston_served, what="heston to serve its HEAD")
    services = client.app[MODEL_RETENTIONS_KEY]
    assert [s.model for s in services] == ["bs", "heston"]
    report = await services[1].run_once()
    assert report.errors == {} and report.collected == [1]
    verified = await model_chain(store, "heston").verify()
    assert verified.ok and verified.collected == [1]  # a tombstone in heston's own chain
    assert (await model_chain(store).verify()).collected == []  # bs's chain untouched
    gc = [e for e in await model_chain(store, "heston").log() if e.action.startswith("gc")]
    assert gc  # audited in heston's own chain
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_store_bytes{model="heston"}' in text


# ------------------------------------------------------------------------------ pricing

HESTON_CONTRACTS = [
    {"X0": 100.0, "K": 95.0, "T": 0.5, "r": 0.02, "d": 0.01,
     "v0": 0.04, "kappa": 1.5, "theta_v": 0.05, "xi": 0.5, "rho": -0.6},
    {"X0": 80.0, "K": 90.0, "T": 1.5, "r": 0.03, "d": 0.0,
     "v0": 0.09, "kappa": 3.0, "theta_v": 0.03, "xi": 0.8, "rho": -0.2},
]


async def _serving(client: Any) -> None:
    async def loaded() -> bool:
        body = await (await client.get("/v1/models")).json()
        return all(m["live"] is not None for m in body["models"])

    await until(loaded, what="both models to load")


async def test_price_names_its_model_and_takes_the_process_parameters(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    from spectral_core.pricer import Contracts, Pricer

    client = await start_client(aiohttp_client, store=store, settings=_settings())
    await _serving(client)
    resp = await client.post("/v1/price", json={"model": "heston", "contracts": HESTON_CONTRACTS,
                                                "greeks": True, "metrics": True})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    check_schema(body, "PriceResult")
    record = (await model_chain(store, "heston").list())[-1]
    assert body["model"]["name"] == "heston" and body["model"]["counter"] == record.counter
    # the heston version itself, priced in-process on the same batch-invariant path
    pricer = Pricer.from_snapshot(await model_chain(store, "heston").load_record(record),
                                  reproducible=True)
    cols = {k: [c[k] for c in HESTON_CONTRACTS] for k in HESTON_CONTRACTS[0]}
    want = pricer.price(Contracts.from_columns(cols, fields=pricer.contract_fields),
                        greeks=True, metrics=True)
    for i, row in enumerate(body["contracts"]):
        assert row["inputs"] == HESTON_CONTRACTS[i]
        for key in ("put", "call", "digital_call", "forward"):
            assert row[key] == pytest.approx(float(want[key][i]), rel=1e-12, abs=1e-12), key
        greeks = row["greeks"]["put"]
        assert set(greeks) == set(pricer.greek_names)  # d_v0 ... d_rho, no vega
        assert "d_v0" in greeks and "vega" not in greeks
        assert greeks["d_v0"] == pytest.approx(float(want["put_d_v0"][i]), rel=1e-12,
                                               abs=1e-12)
        assert "put_d_v0" not in row["metrics"] and "ST_q50" in row["metrics"]
    # no model named: bs, as before
    bs = await client.post("/v1/price", json={"contracts": [
        {"X0": 100.0, "K": 100.0, "T": 1.0, "r": 0.02, "d": 0.0, "v": 0.2}]})
    assert (await bs.json())["model"]["name"] == "bs"


@pytest.mark.parametrize(
    ("model", "change", "status", "field", "reason"),
    [
        ("heston", {"v0": None}, 422, "contracts.0.v0", "required by model 'heston' (heston)"),
        ("heston", {"v": 0.2}, 422, "contracts.0.v", "not a parameter of model 'heston'"),
        ("heston", {"kappa": 40.0}, 422, "contracts.0.kappa", "outside the model's trained"),
        ("bs", {"v": None, "v0": None, "kappa": None, "theta_v": None, "xi": None, "rho": None},
         422, "contracts.0.v", "required by model 'bs' (gbm)"),
        ("sabr", {}, 404, None, "model 'sabr' is not served here"),
    ],
)
async def test_price_refuses_contracts_that_do_not_fit_the_model(
    aiohttp_client: Any, store: ObjectStore, model: str, change: dict[str, Any], status: int,
    field: str | None, reason: str,
) -> None:
    client = await start_client(aiohttp_client, store=store, settings=_settings())
    await _serving(client)
    contract = {k: v for k, v in {**HESTON_CONTRACTS[0], **change}.items() if v is not None}
    resp = await client.post("/v1/price", json={"model": model, "contracts": [contract]})
    text = await resp.text()
    assert resp.status == status, text
    assert reason in text
    if field is not None:
        assert field in [f["path"] for f in (await resp.json())["fields"]]


# ------------------------------------------------------------------------------ valuations

HESTON_SPX = {"v0": 0.04, "kappa": 1.5, "theta_v": 0.05, "xi": 0.5, "rho": -0.6}
BOOK = [
    {"id": "c", "type": "european_call", "underlying": "SPX", "strike": 100.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 10.0},
    {"id": "p", "type": "european_put", "underlying": "SPX", "strike": 90.0,
     "expiry": "2024-12-20T16:00:00Z", "quantity": -5.0},
    {"id": "dc", "type": "digital_call", "underlying": "SPX", "strike": 105.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 100.0},
    {"id": "f", "type": "forward", "underlying": "SPX", "strike": 101.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 3.0},
]


def _valuation(**extra: Any) -> dict[str, Any]:
    return {"valuation_namespace": "eod", "val_datetime": "2024-06-28T16:00:00Z",
            "data_asof": NOW.isoformat(), "instruments": BOOK, "model": "heston", **extra}


async def _with_market(aiohttp_client: Any, store: ObjectStore, **extra: Any) -> Any:
    client = await start_client(aiohttp_client, store=store, settings=_settings())
    await _serving(client)
    await put_market_data(client, body=market_body(NOW - timedelta(hours=1), **extra))
    return client


async def test_a_heston_valuation_reads_model_params_and_echoes_them(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    client = await _with_market(aiohttp_client, store,
                                model_params={"SPX": {"heston": HESTON_SPX}})
    resp = await client.post("/v1/valuations", json=_valuation(greeks=True))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    check_schema(body, "ValuationResult")
    assert body["model"]["name"] == "heston"
    rows = {r["id"]: r for r in body["instruments"]}
    for rid in ("c", "p", "dc"):
        inputs = rows[rid]["inputs"]
        assert "sigma" not in inputs  # a Heston model does not read the vol surface
        for name, value in HESTON_SPX.items():
            assert inputs[name] == {"value": value, "source": "model_params SPX heston"}
    assert set(rows["f"]["inputs"]) == {"S0", "T", "r", "d"}
    assert rows["f"]["unit_greeks"]["d_v0"] == 0.0 and rows["f"]["unit_greeks"]["delta"] > 0
    # the same contracts priced directly on the heston model
    options = [rows["c"], rows["p"]]
    direct = await client.post("/v1/price", json={"model": "heston", "greeks": True, "contracts": [
        {"X0": r["inputs"]["S0"]["value"], "K": r["strike"], "T": r["inputs"]["T"]["value"],
         "r": r["inputs"]["r"]["value"], "d": r["inputs"]["d"]["value"], **HESTON_SPX}
        for r in options]})
    assert direct.status == 200, await direct.text()
    for row, ref, kind in zip(options, (await direct.json())["contracts"], ("call", "put"),
                              strict=True):
        assert row["unit_price"] == pytest.approx(ref[kind], rel=1e-12, abs=1e-12)
        assert row["implied_vol"] == ref["implied_vol"][kind] and row["implied_vol"] > 0
        assert row["unit_greeks"] == pytest.approx(ref["greeks"][kind], rel=1e-12, abs=1e-12)
    assert set(body["totals"]["greeks"]) == set(rows["c"]["unit_greeks"])


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        (None, 404, "model_params for underlying 'SPX' is not in snapshot"),
        ({"SPX": {"bates": HESTON_SPX}}, 404, "model_params.SPX for model 'heston'"),
        ({"SPX": {"heston": {**HESTON_SPX, "xi": None}}}, 404,
         "model_params.SPX.heston parameter 'xi'"),
        ({"SPX": {"heston": {**HESTON_SPX, "kappa": 40.0}}}, 422,
         "kappa = 40.0 (model_params SPX heston) is outside the model's trained domain"),
    ],
)
async def test_heston_valuation_errors_name_what_is_missing_or_out_of_bounds(
    aiohttp_client: Any, store: ObjectStore, params: Any, status: int, needle: str
) -> None:
    if params is not None:
        params = {u: {m: {k: v for k, v in p.items() if v is not None} for m, p in per.items()}
                  for u, per in params.items()}
    extra = {} if params is None else {"model_params": params}
    client = await _with_market(aiohttp_client, store, **extra)
    resp = await client.post("/v1/valuations", json=_valuation())
    text = await resp.text()
    assert resp.status == status, text
    assert needle in text
    if status == 422:
        assert (await resp.json())["fields"][0]["path"] == "instruments.0.kappa"


async def test_heston_scenarios_shift_v0_and_refuse_a_vol_shift(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    client = await _with_market(aiohttp_client, store,
                                model_params={"SPX": {"heston": HESTON_SPX}})
    resp = await client.post("/v1/valuations", json=_valuation(
        scenarios=[{"name": "v0up", "v0_abs": 0.01, "spot_rel": -0.05}]))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    check_schema(body, "ValuationResult")
    rows = {r["id"]: r for r in body["instruments"]}
    got = {r["id"]: r for r in body["scenarios"][0]["instruments"]}
    contracts = [
        {"X0": rows[i]["inputs"]["S0"]["value"] * 0.95, "K": rows[i]["strike"],
         "T": rows[i]["inputs"]["T"]["value"], "r": rows[i]["inputs"]["r"]["value"],
         "d": rows[i]["inputs"]["d"]["value"], **{**HESTON_SPX, "v0": HESTON_SPX["v0"] + 0.01}}
        for i in ("c", "p")]
    direct = await client.post("/v1/price", json={"model": "heston", "contracts": contracts})
    priced = (await direct.json())["contracts"]
    assert got["c"]["unit_price"] == pytest.approx(priced[0]["call"], rel=1e-12, abs=1e-12)
    assert got["p"]["unit_price"] == pytest.approx(priced[1]["put"], rel=1e-12, abs=1e-12)
    bad = await client.post("/v1/valuations", json=_valuation(
        scenarios=[{"name": "x", "vol_abs": 0.01}]))
    assert bad.status == 422
    assert (await bad.json())["fields"][0]["path"] == "scenarios.0.vol_abs"


async def test_scenarios_sample_a_named_heston_model(aiohttp_client: Any,
                                                     store: ObjectStore) -> None:
    from spectral_core.pricer import Contracts, Pricer
    from spectral_core.scenarios import sample_terminal

    client = await start_client(aiohttp_client, store=store, settings=_settings())
    await _serving(client)
    contract = {k: v for k, v in HESTON_CONTRACTS[0].items() if k != "K"}
    resp = await client.post("/v1/scenarios", json={"model": "heston", "contract": contract,
                                                    "n": 500, "seed": 3})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    check_schema(body, "ScenarioResult")
    assert body["model"]["name"] == "heston" and body["contract"] == contract
    record = (await model_chain(store, "heston").list())[-1]
    pricer = Pricer.from_snapshot(await model_chain(store, "heston").load_record(record),
                                  reproducible=True)
    c = Contracts(**{f: [contract["X0"] if f == "K" else contract[f]]
                     for f in pricer.contract_fields})
    assert body["samples"] == [float(x) for x in sample_terminal(pricer, c, n=500, seed=3)]
    for change, path in (({"v0": None}, "contract.v0"), ({"v": 0.2}, "contract.v")):
        bad = {k: v for k, v in {**contract, **change}.items() if v is not None}
        resp = await client.post("/v1/scenarios", json={"model": "heston", "contract": bad,
                                                        "n": 5, "seed": 1})
        assert resp.status == 422
        assert path in [f["path"] for f in (await resp.json())["fields"]]


async def test_a_model_with_no_promoted_version_says_why_it_serves_nothing(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    from tests.server_fixtures import trained_heston_snapshots

    s = LocalStore(tmp_path / "store")
    await commit_model(s)
    snapshot, _ = trained_heston_snapshots()[0]
    # assessed (it carries a quality report) but refused by the gate: no serving ref
    await model_chain(s, "heston").commit(snapshot, quality={"held_out_mean_bp": 50.0})
    client = await start_client(aiohttp_client, store=s, settings=_settings())
    resp = await client.post("/v1/price", json={"model": "heston", "contracts": HESTON_CONTRACTS})
    assert resp.status == 503
    assert "no version has passed the promotion gate yet (HEAD is version 1" in (
        await resp.json())["detail"]
    ready = await (await client.get("/readyz")).json()
    assert ready["status"] == "ready" and "heston: none" in ready["reason"]


async def test_replicas_on_one_store_agree_on_a_named_models_pin(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    await commit_model(store, model="heston", which=1)  # heston v2 (HEAD)
    a = await start_client(aiohttp_client, store=store, settings=_settings())
    b = await start_client(aiohttp_client, store=store, settings=_settings())

    async def serves(client: Any, counter: int, mode: str) -> bool:
        live = (await (await client.get("/v1/models/heston")).json())["live"]
        return live is not None and (live["counter"], live["mode"]) == (counter, mode)

    for c in (a, b):
        await until(lambda c=c: serves(c, 2, "tracking"), what="both replicas on heston HEAD")
    resp = await a.put("/v1/admin/models/heston/pin", json={"version": 1}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    await until(lambda: serves(b, 1, "pinned"), what="replica b to follow a's pin")
    assert await serves(a, 1, "pinned")
    bs = (await (await b.get("/v1/models/bs")).json())["live"]
    assert bs["mode"] == "tracking"  # bs is not pinned by heston's pin
    resp = await b.delete("/v1/admin/models/heston/pin", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    await until(lambda: serves(a, 2, "tracking"), what="replica a to follow b's unpin")


def test_a_named_models_cpu_share_reaches_its_trainer_settings(tmp_path: Any) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[training]\ncpu_share = 0.8\n[models.heston]\ncpu_share = 0.25\n'
                 '[models.heston.core]\nprocess = "heston"\n')
    s = load_settings(f, env={})
    assert s.training.cpu_share == 0.8 and s.for_model("heston").training.cpu_share == 0.25
    f.write_text('[models.heston]\ncpu_share = 0\n')
    with pytest.raises(SettingsError, match=r"models\.heston\.cpu_share"):
        load_settings(f, env={})


def test_the_duty_cycle_rests_in_proportion_to_the_busy_time() -> None:
    from server.worker import DutyCycle

    now = [100.0]
    duty = DutyCycle(0.25, clock=lambda: now[0])
    assert duty.rest_s() == 0.0  # nothing measured yet
    duty.mark()
    now[0] += 0.2  # a 0.2 s step
    assert duty.rest_s() == pytest.approx(0.6)  # busy 0.2 of every 0.8 s: a quarter
    duty.mark()
    now[0] += 0.05
    assert duty.rest_s() == pytest.approx(0.15)
    full = DutyCycle(1.0, clock=lambda: now[0])
    full.mark()
    now[0] += 1.0
    assert full.rest_s() == 0.0
    with pytest.raises(ValueError, match="share must be in"):
        DutyCycle(0.0)


# ------------------------------------------------------------------------------ bates

BATES_SPX = {**HESTON_SPX, "lam": 0.3, "mu_j": -0.1, "sigma_j": 0.15}


async def test_a_bates_model_prices_values_and_samples_through_the_server(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    """The third process end to end: its own parameters on /v1/price, from model_params on
    /v1/valuations (with its jump greeks), on /v1/scenarios; a wrong one named."""
    from spectral_core.config import CoreConfig
    from spectral_core.pricer import Contracts, Pricer
    from spectral_core.trainer import Trainer
    from tests.core_fixtures import tiny_heston_config

    base = tiny_heston_config()
    config = CoreConfig(process="bates", sim=base.sim, spectrum=base.spectrum, arch=base.arch,
                        optim=base.optim, train=base.train)
    with Trainer(config) as trainer:
        trainer.train(steps=10)
        snapshot = trainer.snapshot()
    s = LocalStore(tmp_path / "store")
    await commit_model(s)
    await model_chain(s, "jumps").commit(snapshot, message="tiny bates")
    settings = make_settings(models={"jumps": NamedModelSettings(core=config, training=False)},
                             poll_interval_s=0.05)
    client = await start_client(aiohttp_client, store=s, settings=settings)
    await _serving(client)
    contract = {"X0": 100.0, "K": 95.0, "T": 0.5, "r": 0.02, "d": 0.01, **BATES_SPX}
    resp = await client.post("/v1/price", json={"model": "jumps", "contracts": [contract],
                                                "greeks": True})
    assert resp.status == 200, await resp.text()
    row = (await resp.json())["contracts"][0]
    pricer = Pricer.from_snapshot(snapshot, reproducible=True)
    want = pricer.price(Contracts.from_columns({k: [v] for k, v in contract.items()},
                                               fields=pricer.contract_fields), greeks=True)
    assert row["put"] == pytest.approx(float(want["put"][0]), rel=1e-12, abs=1e-12)
    assert {"d_lam", "d_mu_j", "d_sigma_j", "d_v0"} <= set(row["greeks"]["put"])
    missing = {k: v for k, v in contract.items() if k != "lam"}
    resp = await client.post("/v1/price", json={"model": "jumps", "contracts": [missing]})
    assert resp.status == 422 and "contracts.0.lam" in await resp.text()
    await put_market_data(client, body=market_body(NOW - timedelta(hours=1),
                                                   model_params={"SPX": {"jumps": BATES_SPX}}))
    val = await client.post("/v1/valuations", json={**_valuation(greeks=True), "model": "jumps"})
    assert val.status == 200, await val.text()
    body = await val.json()
    check_schema(body, "ValuationResult")
    put = {r["id"]: r for r in body["instruments"]}["p"]
    assert put["inputs"]["lam"] == {"value": 0.3, "source": "model_params SPX jumps"}
    assert "d_sigma_j" in body["totals"]["greeks"]
    sc = await client.post("/v1/scenarios", json={"model": "jumps", "n": 50, "seed": 1,
                                                  "contract": {k: v for k, v in contract.items()
                                                               if k != "K"}})
    assert sc.status == 200, await sc.text()
    assert len((await sc.json())["samples"]) == 50


async def test_each_chain_has_one_retention_whatever_the_default_model(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    settings = _settings()
    settings = settings.model_copy(update={"server": settings.server.model_copy(
        update={"default_model": "heston"})})
    client = await start_client(aiohttp_client, store=store, settings=settings)
    services = client.app[MODEL_RETENTIONS_KEY]
    models = client.app[MODELS_KEY]
    assert [s.model for s in services] == ["bs", "heston"]
    assert [s.chain for s in services] == [models["bs"].chain, models["heston"].chain]
    assert [s.jobs_prefix for s in services] == ["jobs", None]  # job results pruned once
