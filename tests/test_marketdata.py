"""Market-data snapshots: validation, keys, append-only writes, resolution, derivation, lookups."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from storage.marketdata import (
    BackdatedWrite,
    DerivedFromMismatch,
    MarketDataInvalid,
    MarketDataNotFound,
    MarketDataStore,
    MarketSnapshot,
    MarketView,
    SnapshotBody,
    canonical_json,
    check_name,
    content_hash,
    datetime_token,
    interpolate_curve,
    interpolate_vol,
    parse_aware_datetime,
    parse_datetime_token,
    year_fraction_act365,
)
from storage.objectstore import Conflict, Corrupt, MemoryStore, ObjectStore
from tests.storage_fixtures import DelegatingStore

NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
VDT = datetime(2024, 6, 28, 16, 0, tzinfo=UTC)
NS = "eod-london"


def body_dict(asof: datetime, *, spot: float = 100.0) -> dict[str, Any]:
    return {
        "data_asof": asof.isoformat(),
        "spots": {"SPX": spot, "AAPL.O": 210.5},
        "fixings": {"SOFR": [{"at": "2024-06-27T00:00:00Z", "value": 0.0531}]},
        "zero_curves": {
            "USD-OIS": {
                "tenors": [0.5, 1.0, 2.0],
                "rates": [0.02, 0.03, 0.05],
                "interpolation": "linear_rate",
            },
            "USD-RT": {
                "tenors": [0.5, 1.0, 2.0],
                "rates": [0.02, 0.03, 0.05],
                "interpolation": "linear_rt",
            },
        },
        "discount_curve": "USD-OIS",
        "dividend_curves": {"SPX": {"tenors": [1.0], "rates": [0.015]}},
        "vol_surfaces": {
            "SPX": {
                "expiries": [0.5, 1.0],
                "strikes": [90.0, 110.0],
                "vols": [[0.2, 0.3], [0.25, 0.35]],
            }
        },
    }


def body(asof: datetime, **kw: Any) -> SnapshotBody:
    return SnapshotBody.model_validate(body_dict(asof, **kw))


def snapshot(data: dict[str, Any]) -> MarketSnapshot:
    return MarketSnapshot.model_validate({**data, "namespace": NS, "val_datetime": VDT})


@pytest.fixture(params=["memory", "local"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "memory":
        s: ObjectStore = MemoryStore()
    else:
        from storage.localstore import LocalStore

        s = LocalStore(tmp_path / "store", fsync=False)
    yield s
    await s.aclose()


@pytest.fixture
def md(store: ObjectStore) -> MarketDataStore:
    return MarketDataStore(store, clock=lambda: NOW)


# --- validation and canonical form --------------------------------------------------------------


def test_datetimes_are_normalised_to_utc() -> None:
    paris = timezone(timedelta(hours=2))
    b = body(datetime(2024, 6, 29, 10, 0, tzinfo=paris))
    assert b.data_asof == datetime(2024, 6, 29, 8, 0, tzinfo=UTC)
    assert b.data_asof.utcoffset() == timedelta(0)


def test_naive_datetime_is_refused() -> None:
    data = body_dict(NOW)
    data["data_asof"] = "2024-06-29T10:00:00"
    with pytest.raises(ValidationError) as info:
        SnapshotBody.model_validate(data)
    assert info.value.errors()[0]["loc"] == ("data_asof",)
    with pytest.raises(MarketDataInvalid, match=r"val_datetime.*no timezone"):
        parse_aware_datetime("2024-06-28T16:00:00", field="val_datetime")
    with pytest.raises(MarketDataInvalid, match=r"not an ISO-8601"):
        parse_aware_datetime("yesterday", field="val_datetime")


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 129, "sp ace", "é"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(MarketDataInvalid, match=r"namespace"):
        check_name(name, field="namespace")
    data = body_dict(NOW)
    data["spots"] = {name: 1.0}
    with pytest.raises(ValidationError):
        SnapshotBody.model_validate(data)


@pytest.mark.parametrize(
    ("path", "value", "loc"),
    [
        (("spots", "SPX"), -1.0, ("spots", "SPX")),
        (("spots", "SPX"), float("nan"), ("spots", "SPX")),
        (("spots", "SPX"), float("inf"), ("spots", "SPX")),
        (("zero_curves", "USD-OIS", "tenors"), [0.5, 0.5, 2.0], ("zero_curves", "USD-OIS")),
        (("zero_curves", "USD-OIS", "rates"), [0.01], ("zero_curves", "USD-OIS")),
        (("vol_surfaces", "SPX", "vols"), [[0.2, -0.3], [0.25, 0.35]], None),
        (("vol_surfaces", "SPX", "vols"), [[0.2, 0.3, 0.1], [0.25, 0.35]], ("vol_surfaces", "SPX")),
        (("vol_surfaces", "SPX", "expiries"), [1.0, 0.5], ("vol_surfaces", "SPX")),
        (("discount_curve",), "EUR-OIS", ()),
    ],
)
def test_invalid_market_data_names_the_field(
    path: tuple[str, ...], value: Any, loc: tuple[str, ...] | None
) -> None:
    data = body_dict(NOW)
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        SnapshotBody.model_validate(data)
    got = info.value.errors()[0]["loc"]
    if loc is not None:
        assert got[: len(loc)] == loc
    else:
        assert got[:3] == ("vol_surfaces", "SPX", "vols")


def test_two_zero_curves_need_a_discount_curve() -> None:
    data = body_dict(NOW)
    del data["discount_curve"]
    with pytest.raises(ValidationError, match=r"discount_curve is required"):
        SnapshotBody.model_validate(data)


def test_log_moneyness_surface_needs_forward_inputs() -> None:
    data = body_dict(NOW)
    data["vol_surfaces"] = {
        "AAPL.O": {"expiries": [1.0], "log_moneyness": [-0.1, 0.1], "vols": [[0.3, 0.2]]}
    }
    with pytest.raises(ValidationError, match=r"dividend_curves.AAPL.O"):
        SnapshotBody.model_validate(data)


def test_surface_axis_is_exactly_one_of_strikes_or_log_moneyness() -> None:
    data = body_dict(NOW)
    data["vol_surfaces"]["SPX"]["log_moneyness"] = [-0.1, 0.1]
    with pytest.raises(ValidationError, match=r"exactly one of strikes or log_moneyness"):
        SnapshotBody.model_validate(data)


def test_content_hash_is_stable_under_equivalent_inputs() -> None:
    a = body_dict(NOW)
    b = json.loads(json.dumps(a))
    # Same instant in another zone, ints for floats, keys reordered: same canonical document.
    b["data_asof"] = NOW.astimezone(timezone(timedelta(hours=-5))).isoformat()
    b["spots"] = {"AAPL.O": 210.5, "SPX": 100}
    b = dict(reversed(list(b.items())))
    ha, hb = content_hash(snapshot(a)), content_hash(snapshot(b))
    assert ha == hb
    assert len(ha) == 64
    changed = body_dict(NOW, spot=100.000001)
    assert content_hash(snapshot(changed)) != ha


def test_keys_are_built_from_tokens_in_time_order() -> None:
    md = MarketDataStore(MemoryStore(), clock=lambda: NOW)
    key = md.snapshot_key(namespace=NS, val_datetime=VDT, data_asof=NOW)
    assert key == "marketdata/eod-london/20240628T160000.000000Z/20240701T120000.000000Z.json"
    times = [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=s) for s in (0, 0.5, 9, 3600)]
    tokens = [datetime_token(t) for t in times]
    assert tokens == sorted(tokens)
    assert [parse_datetime_token(t) for t in tokens] == times
    with pytest.raises(MarketDataInvalid, match=r"namespace"):
        md.snapshot_key(namespace="../x", val_datetime=VDT, data_asof=NOW)


# --- writes and resolution ----------------------------------------------------------------------


async def test_round_trip_hash_is_sha256_of_stored_bytes(
    md: MarketDataStore, store: ObjectStore
) -> None:
    written = await md.put(namespace=NS, val_datetime=VDT, body=body(NOW))
    assert written.created
    raw = await store.get(written.key)
    assert hashlib.sha256(raw.data).hexdigest() == written.content_hash
    assert written.content_hash == content_hash(written.snapshot)
    got = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    assert got.snapshot == written.snapshot
    assert got.content_hash == written.content_hash
    assert got.snapshot.spots["SPX"] == 100.0


async def test_resolution_takes_greatest_data_asof_not_after_request(md: MarketDataStore) -> None:
    t = [NOW - timedelta(hours=h) for h in (3, 2, 1)]
    for i, asof in enumerate(t):
        await md.put(namespace=NS, val_datetime=VDT, body=body(asof, spot=100.0 + i))
    cases = [
        (t[0], 100.0),
        (t[0] + timedelta(minutes=30), 100.0),
        (t[1], 101.0),
        (t[2] - timedelta(microseconds=1), 101.0),
        (t[2], 102.0),
        (NOW + timedelta(days=1), 102.0),
    ]
    for asof, spot in cases:
        got = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=asof)
        assert got.snapshot.spots["SPX"] == spot, asof
    latest = await md.resolve(namespace=NS, val_datetime=VDT)  # default: the clock's now
    assert latest.snapshot.data_asof == t[2]
    with pytest.raises(MarketDataNotFound, match=r"earliest data_asof is 2024-07-01T09:00:00"):
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=t[0] - timedelta(seconds=1))
    with pytest.raises(MarketDataNotFound, match=r"no market data for namespace 'other'"):
        await md.resolve(namespace="other", val_datetime=VDT, data_asof=NOW)
    assert await md.list_data_asofs(namespace=NS, val_datetime=VDT) == t


async def test_backdated_and_equal_writes_are_refused(
    md: MarketDataStore, store: ObjectStore
) -> None:
    await md.put(namespace=NS, val_datetime=VDT, body=body(NOW - timedelta(hours=1)))
    earlier = NOW - timedelta(hours=2)
    with pytest.raises(BackdatedWrite, match=r"not later than the latest committed"):
        await md.put(namespace=NS, val_datetime=VDT, body=body(earlier))
    with pytest.raises(BackdatedWrite):
        await md.put(namespace=NS, val_datetime=VDT, body=body(NOW - timedelta(hours=1), spot=99.0))
    # The refused write left nothing behind.
    keys = await store.list("marketdata/")
    assert len(keys) == 2  # one document + the index


async def test_identical_retry_is_idempotent(md: MarketDataStore) -> None:
    first = await md.put(namespace=NS, val_datetime=VDT, body=body(NOW))
    again = await md.put(namespace=NS, val_datetime=VDT, body=body(NOW))
    assert not again.created
    assert again.content_hash == first.content_hash
    assert await md.list_data_asofs(namespace=NS, val_datetime=VDT) == [NOW]


async def test_future_data_asof_is_refused(md: MarketDataStore) -> None:
    await md.put(namespace=NS, val_datetime=VDT, body=body(NOW + timedelta(minutes=4)))
    with pytest.raises(MarketDataInvalid, match=r"data_asof.*in the future") as info:
        await md.put(namespace=NS, val_datetime=VDT, body=body(NOW + timedelta(minutes=6)))
    assert info.value.field == "data_asof"


async def test_fixing_after_val_datetime_is_refused(md: MarketDataStore) -> None:
    data = body_dict(NOW)
    data["fixings"]["SOFR"].append({"at": "2024-06-29T00:00:00Z", "value": 0.053})
    with pytest.raises(MarketDataInvalid) as info:
        await md.put(namespace=NS, val_datetime=VDT, body=SnapshotBody.model_validate(data))
    assert info.value.field == "fixings.SOFR.1.at"


class _YieldingStore(DelegatingStore):
    """A real MemoryStore that yields to the loop around each call, so writers interleave."""

    def __init__(self, seed: int) -> None:
        super().__init__(MemoryStore())
        self._rng = random.Random(seed)

    async def _enter(self, op: str, key: str) -> None:
        for _ in range(self._rng.randint(0, 3)):
            await asyncio.sleep(0)


@pytest.mark.parametrize("seed", range(8))
async def test_concurrent_writers_never_commit_out_of_order(seed: int) -> None:
    store = _YieldingStore(seed)
    md = MarketDataStore(store, clock=lambda: NOW)
    asofs = [NOW - timedelta(minutes=m) for m in random.Random(seed).sample(range(1, 60), 6)]
    results = await asyncio.gather(
        *(md.put(namespace=NS, val_datetime=VDT, body=body(a)) for a in asofs),
        return_exceptions=True,
    )
    committed = await md.list_data_asofs(namespace=NS, val_datetime=VDT)
    assert committed == sorted(committed) and len(set(committed)) == len(committed)
    won = sorted(r.snapshot.data_asof for r in results if not isinstance(r, BaseException))
    assert won == committed and won
    lost = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, BackdatedWrite) for r in lost), lost
    # Losers cleaned up: only committed documents and the index remain.
    assert len(await store.list("marketdata/")) == len(committed) + 1


async def test_tampered_document_is_reported_corrupt(
    md: MarketDataStore, store: ObjectStore
) -> None:
    written = await md.put(namespace=NS, val_datetime=VDT, body=body(NOW))
    current = await store.get(written.key)
    tampered = current.data.replace(b"100.0", b"101.0")
    await store.put_if_match(written.key, tampered, current.etag)
    with pytest.raises(Corrupt, match=r"hash"):
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)


async def test_different_uncommitted_document_blocks_that_data_asof(
    md: MarketDataStore, store: ObjectStore
) -> None:
    key = md.snapshot_key(namespace=NS, val_datetime=VDT, data_asof=NOW)
    await store.put_if_absent(key, b'{"abandoned": true}')
    with pytest.raises(Conflict, match=r"different uncommitted snapshot"):
        await md.put(namespace=NS, val_datetime=VDT, body=body(NOW))


async def test_list_val_datetimes_is_sorted_and_bounded(md: MarketDataStore) -> None:
    vdts = [VDT + timedelta(days=d) for d in (0, 3, 1, 2)]
    for v in vdts:
        await md.put(namespace=NS, val_datetime=v, body=body(NOW))
    await md.put(namespace="other", val_datetime=VDT, body=body(NOW))
    found, truncated = await md.list_val_datetimes(namespace=NS, limit=10)
    assert found == sorted(vdts) and not truncated
    found, truncated = await md.list_val_datetimes(namespace=NS, limit=2)
    assert found == sorted(vdts)[:2] and truncated
    found, truncated = await md.list_val_datetimes(namespace=NS, limit=2, after=found[-1])
    assert found == sorted(vdts)[2:] and not truncated
    assert await md.list_val_datetimes(namespace="empty", limit=5) == ([], False)


# --- derived snapshots --------------------------------------------------------------------------


async def test_derived_snapshot_pins_its_source(md: MarketDataStore) -> None:
    source = await md.put(namespace=NS, val_datetime=VDT, body=body(NOW - timedelta(hours=1)))
    ref = {
        "namespace": NS,
        "val_datetime": VDT.isoformat(),
        "data_asof": (NOW - timedelta(hours=1)).isoformat(),
        "hash": source.content_hash,
    }
    derived = SnapshotBody.model_validate({**body_dict(NOW), "derived_from": ref})
    written = await md.put(namespace=NS, val_datetime=VDT, body=derived)
    got = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    assert got.snapshot.derived_from is not None
    assert got.snapshot.derived_from.hash == source.content_hash
    assert got.content_hash == written.content_hash != source.content_hash


async def test_derived_snapshot_with_wrong_hash_or_missing_source_is_refused(
    md: MarketDataStore,
) -> None:
    source_asof = NOW - timedelta(hours=1)
    await md.put(namespace=NS, val_datetime=VDT, body=body(source_asof))
    ref = {
        "namespace": NS,
        "val_datetime": VDT.isoformat(),
        "data_asof": source_asof.isoformat(),
        "hash": "0" * 64,
    }
    bad_hash = SnapshotBody.model_validate({**body_dict(NOW), "derived_from": ref})
    with pytest.raises(DerivedFromMismatch, match=r"does not match the stored source"):
        await md.put(namespace=NS, val_datetime=VDT, body=bad_hash)
    missing = {**ref, "data_asof": (source_asof - timedelta(minutes=1)).isoformat()}
    with pytest.raises(MarketDataNotFound, match=r"no snapshot for"):
        await md.put(
            namespace=NS,
            val_datetime=VDT,
            body=SnapshotBody.model_validate({**body_dict(NOW), "derived_from": missing}),
        )
    later = {**ref, "data_asof": (NOW + timedelta(minutes=1)).isoformat()}
    with pytest.raises(MarketDataInvalid) as info:
        await md.put(
            namespace=NS,
            val_datetime=VDT,
            body=SnapshotBody.model_validate({**body_dict(NOW), "derived_from": later}),
        )
    assert info.value.field == "derived_from.data_asof"


# --- interpolation and lookups ------------------------------------------------------------------


def test_zero_curve_linear_in_rate_matches_hand_values() -> None:
    args: dict[str, Any] = {
        "tenors": [0.5, 1.0, 2.0],
        "rates": [0.02, 0.03, 0.05],
        "rule": "linear_rate",
    }
    t = np.array([0.5, 0.75, 1.5, 2.0, 0.1, 0.0, 10.0])
    expected = np.array([0.02, 0.025, 0.04, 0.05, 0.02, 0.02, 0.05])
    np.testing.assert_allclose(interpolate_curve(**args, t=t), expected, rtol=0, atol=1e-12)


def test_zero_curve_linear_in_rt_matches_hand_values() -> None:
    args: dict[str, Any] = {
        "tenors": [0.5, 1.0, 2.0],
        "rates": [0.02, 0.03, 0.05],
        "rule": "linear_rt",
    }
    # r*t at the pillars: 0.01, 0.03, 0.10; halfway between 1 and 2: 0.065 over t = 1.5.
    t = np.array([0.75, 1.5, 0.1, 10.0])
    expected = np.array([0.02 / 0.75, 0.065 / 1.5, 0.02, 0.05])
    np.testing.assert_allclose(interpolate_curve(**args, t=t), expected, rtol=0, atol=1e-12)
    zero_pillar: dict[str, Any] = {"tenors": [0.0, 1.0], "rates": [0.01, 0.03], "rule": "linear_rt"}
    got = interpolate_curve(**zero_pillar, t=np.array([0.0, 0.5]))
    np.testing.assert_allclose(got, [0.01, 0.03], rtol=0, atol=1e-12)


def test_curve_query_must_be_finite_and_non_negative() -> None:
    args: dict[str, Any] = {"tenors": [1.0], "rates": [0.01], "rule": "linear_rate"}
    with pytest.raises(MarketDataInvalid, match=r"T: must be >= 0"):
        interpolate_curve(**args, t=-0.1)
    with pytest.raises(MarketDataInvalid, match=r"T: must be finite"):
        interpolate_curve(**args, t=float("nan"))


def test_vol_bilinear_in_total_variance_matches_hand_values() -> None:
    grid: dict[str, Any] = {
        "expiries": [0.5, 1.0],
        "axis": [90.0, 110.0],
        "vols": [[0.2, 0.3], [0.25, 0.35]],
    }
    # Total variances: 0.02, 0.045 (T=0.5); 0.0625, 0.1225 (T=1): centre is their mean 0.0625.
    got = interpolate_vol(
        **grid,
        t=np.array([0.75, 0.1, 3.0, 0.25, 1.0]),
        x=np.array([100.0, 50.0, 200.0, 100.0, 95.0]),
    )
    w_t1_k95 = 0.75 * 0.0625 + 0.25 * 0.1225
    expected = [
        math.sqrt(0.0625 / 0.75),
        0.2,  # flat below both grids
        0.35,  # flat above both grids
        math.sqrt(0.5 * (0.02 + 0.045) / 0.5),  # flat in expiry, midway in strike
        math.sqrt(w_t1_k95 / 1.0),
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_single_point_surface_is_flat() -> None:
    got = interpolate_vol(
        expiries=[1.0], axis=[100.0], vols=[[0.22]], t=[0.1, 5.0], x=[50.0, 500.0]
    )
    np.testing.assert_allclose(got, [0.22, 0.22], rtol=0, atol=1e-15)


def test_market_view_lookups_name_their_source() -> None:
    view = MarketView(snapshot(body_dict(NOW)))
    assert view.spot("SPX").value == 100.0
    assert view.spot("SPX").source == "spot SPX"
    r = view.zero_rate(1.5)
    assert abs(r.value - 0.04) < 1e-12
    assert r.source == "zero_curve USD-OIS linear_rate at T=1.5"
    assert abs(view.zero_rate(1.5, curve="USD-RT").value - 0.065 / 1.5) < 1e-12
    assert "flat extrapolation above tenor 2" in view.zero_rate(3.0).source
    q = view.dividend_yield("SPX", 0.25)
    assert q.value == 0.015 and "dividend_curve SPX" in q.source
    v = view.vol("SPX", 0.75, 100.0)
    assert abs(v.value - math.sqrt(1 / 12)) < 1e-12
    assert v.source == "vol_surface SPX strikes bilinear total variance at T=0.75 K=100"
    assert abs(view.discount_factor(1.5).value - math.exp(-0.04 * 1.5)) < 1e-12


def test_market_view_log_moneyness_uses_the_forward() -> None:
    data = body_dict(NOW)
    data["zero_curves"] = {"USD": {"tenors": [1.0], "rates": [0.03]}}
    data["discount_curve"] = None
    data["dividend_curves"] = {"SPX": {"tenors": [1.0], "rates": [0.01]}}
    data["vol_surfaces"] = {
        "SPX": {"expiries": [1.0], "log_moneyness": [-0.1, 0.1], "vols": [[0.3, 0.2]]}
    }
    view = MarketView(snapshot(data))
    forward = 100.0 * math.exp(0.02)
    # ln(K/F) = 0.05 sits 3/4 of the way from -0.1 to 0.1.
    v = view.vol("SPX", 1.0, forward * math.exp(0.05))
    assert abs(v.value - math.sqrt(0.25 * 0.09 + 0.75 * 0.04)) < 1e-12
    assert "log_moneyness" in v.source and "ln(K/F)=0.05" in v.source


def test_unknown_underlying_is_named() -> None:
    view = MarketView(snapshot(body_dict(NOW)))
    with pytest.raises(
        MarketDataNotFound, match=r"spot 'MSFT' is not in snapshot.*has: AAPL.O, SPX"
    ):
        view.spot("MSFT")
    with pytest.raises(MarketDataNotFound, match=r"vol_surface 'AAPL.O'"):
        view.vol("AAPL.O", 1.0, 200.0)
    with pytest.raises(MarketDataNotFound, match=r"dividend_curve 'AAPL.O'"):
        view.dividend_yield("AAPL.O", 1.0)
    with pytest.raises(MarketDataNotFound, match=r"zero_curve 'EUR'"):
        view.zero_rate(1.0, curve="EUR")
    with pytest.raises(MarketDataInvalid, match=r"K: strike"):
        view.vol("SPX", 1.0, -5.0)


def test_year_fraction_act365() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    assert year_fraction_act365(start=start, end=datetime(2024, 7, 1, tzinfo=UTC)) == 182 / 365
    noon = datetime(2025, 1, 1, 12, tzinfo=UTC)
    assert abs(year_fraction_act365(start=start, end=noon) - 366.5 / 365) < 1e-15
    view = MarketView(snapshot(body_dict(NOW)))
    expiry = datetime(2024, 12, 20, 16, 0, tzinfo=UTC)
    assert abs(view.year_fraction(expiry) - 175 / 365) < 1e-15
    with pytest.raises(MarketDataInvalid, match=r"expiry.*before val_datetime"):
        view.year_fraction(VDT - timedelta(days=1))
    with pytest.raises(MarketDataInvalid, match=r"end.*no timezone"):
        year_fraction_act365(start=start, end=datetime(2024, 2, 1))


# --- model_params ---------------------------------------------------------------------------


def test_a_snapshot_without_model_params_keeps_its_bytes() -> None:
    # the canonical form of a snapshot written before model_params existed, field by field
    snap = snapshot(body_dict(NOW - timedelta(hours=1)))
    doc = json.loads(canonical_json(snap))
    assert "model_params" not in doc
    fields = {"format_version", "namespace", "val_datetime", "data_asof", "derived_from", "spots",
              "fixings", "zero_curves", "discount_curve", "dividend_curves", "vol_surfaces"}
    assert set(doc) == fields
    assert content_hash(snap) == hashlib.sha256(canonical_json(snap)).hexdigest()


def test_model_params_are_looked_up_with_their_source_or_named_when_missing() -> None:
    params = {"SPX": {"heston": {"v0": 0.04, "kappa": 1.5}}}
    snap = snapshot({**body_dict(NOW - timedelta(hours=1)), "model_params": params})
    assert json.loads(canonical_json(snap))["model_params"] == params
    view = MarketView(snap)
    got = view.model_params("SPX", "heston", ("v0", "kappa"))
    assert got["v0"].value == 0.04 and got["kappa"].source == "model_params SPX heston"
    for args, needle in (
        (("AAPL.O", "heston", ("v0",)), "model_params for underlying 'AAPL.O'"),
        (("SPX", "bates", ("v0",)), "model_params.SPX for model 'bates'"),
        (("SPX", "heston", ("v0", "xi", "rho")), "parameter 'xi, rho'"),
    ):
        with pytest.raises(MarketDataNotFound, match=needle):
            view.model_params(*args)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"SPX": {"Heston": {"v0": 0.04}}}, "model_params.SPX.Heston"),
        ({"SPX": {"heston": {"v0": float("nan")}}}, "model_params.SPX.heston.v0"),
        ({"SPX": {"heston": {f"p{i}": 1.0 for i in range(33)}}}, "model_params.SPX.heston"),
    ],
)
def test_bad_model_params_are_refused(params: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        snapshot({**body_dict(NOW - timedelta(hours=1)), "model_params": params})
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(loc.startswith(field) for loc in locs), locs
