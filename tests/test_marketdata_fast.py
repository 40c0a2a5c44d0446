"""Batch market lookups equal the scalar ones bit for bit; the store's index and snapshot caches."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.marketdata import (
    BookQuotes,
    InstrumentQuoteError,
    MarketDataInvalid,
    MarketDataNotFound,
    MarketDataStore,
    MarketView,
    Quote,
    interpolate_curve,
    interpolate_vol,
)
from storage.objectstore import Corrupt, MemoryStore, ObjectStore, StoredObject
from tests.storage_fixtures import DelegatingStore
from tests.test_marketdata import NOW, NS, VDT, body, snapshot

UNDERLYINGS = ("SPX", "AAPL.O", "EURUSD", "NKY")
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


Instrument = tuple[str, float, float, bool]  # underlying, T, K, need_vol
InstrumentQuotes = tuple[Quote, Quote, Quote, Quote | None]


def scalar_quotes(view: MarketView, u: str, T: float, K: float, need_vol: bool) -> InstrumentQuotes:
    """The reference: the public scalar lookups, in the order a valuation makes them."""
    sigma = view.vol(u, T, K) if need_vol else None
    return view.spot(u), view.zero_rate(T), view.dividend_yield(u, T), sigma


def batch(view: MarketView, book: list[Instrument]) -> BookQuotes:
    return view.book_quotes(
        underlyings=[b[0] for b in book],
        T=[b[1] for b in book],
        K=[b[2] for b in book],
        need_vol=[b[3] for b in book],
    )


def assert_same_as_scalar(view: MarketView, book: list[Instrument]) -> None:
    got = batch(view, book)
    assert len(got.spot) == len(got.zero_rate) == len(got.dividend_yield) == len(got.vol)
    assert len(got.vol) == len(book)
    for i, inst in enumerate(book):
        row = (got.spot[i], got.zero_rate[i], got.dividend_yield[i], got.vol[i])
        want = scalar_quotes(view, *inst)
        for g, w in zip(row, want, strict=True):
            # == on the floats (no tolerance) and on the source text; a None vol only for None
            assert (g is None) == (w is None), (i, inst)
            if g is not None and w is not None:
                assert g.value == w.value, (i, inst, g, w)
                assert g.source == w.source, (i, inst)
        # the value columns hold the same floats bit for bit (NaN where no vol is read)
        for name, quote in zip(("spot", "zero_rate", "dividend_yield", "vol"), row, strict=True):
            column = got.values[name][i : i + 1]
            want_value = np.array([np.nan if quote is None else quote.value])
            assert column.tobytes() == want_value.tobytes(), (i, name)


# --- random markets and books -------------------------------------------------------------------


def increasing(
    elements: st.SearchStrategy[float], *, max_size: int
) -> st.SearchStrategy[list[float]]:
    return st.lists(elements, min_size=1, max_size=max_size, unique=True).map(sorted)


@st.composite
def curves(draw: st.DrawFn) -> dict[str, Any]:
    tenors = draw(increasing(st.floats(0.0, 30.0), max_size=6))
    rates = draw(st.lists(st.floats(-0.05, 0.15), min_size=len(tenors), max_size=len(tenors)))
    rule = draw(st.sampled_from(["linear_rate", "linear_rt"]))
    return {"tenors": tenors, "rates": rates, "interpolation": rule}


@st.composite
def surfaces(draw: st.DrawFn, spot: float) -> dict[str, Any]:
    expiries = draw(increasing(st.floats(0.01, 20.0), max_size=5))
    if draw(st.booleans()):
        axis_name, axis = "strikes", draw(increasing(st.floats(0.3 * spot, 3.0 * spot), max_size=6))
    else:
        axis_name, axis = "log_moneyness", draw(increasing(st.floats(-1.5, 1.5), max_size=6))
    row = st.lists(st.floats(0.05, 1.0), min_size=len(axis), max_size=len(axis))
    vols = draw(st.lists(row, min_size=len(expiries), max_size=len(expiries)))
    return {"expiries": expiries, axis_name: axis, "vols": vols}


@st.composite
def markets(draw: st.DrawFn) -> MarketView:
    names = draw(st.lists(st.sampled_from(UNDERLYINGS), min_size=1, max_size=4, unique=True))
    spots = {u: draw(st.floats(0.5, 5000.0)) for u in names}
    zero = {f"Z{j}": draw(curves()) for j in range(draw(st.integers(1, 2)))}
    vol_surfaces = {}
    for u in names:
        if draw(st.booleans()):
            vol_surfaces[u] = draw(surfaces(spots[u]))
    data = {
        "data_asof": NOW.isoformat(),
        "spots": spots,
        "zero_curves": zero,
        "discount_curve": draw(st.sampled_from(sorted(zero))),
        "dividend_curves": {u: draw(curves()) for u in names},
        "vol_surfaces": vol_surfaces,
    }
    return MarketView(snapshot(data))


@st.composite
def books(draw: st.DrawFn, view: MarketView) -> list[Instrument]:
    snap = view.snapshot
    book: list[Instrument] = []
    for _ in range(draw(st.integers(0, 40))):
        u = draw(st.sampled_from(sorted(snap.spots)))
        surface = snap.vol_surfaces.get(u)
        need_vol = surface is not None and draw(st.booleans())
        # Grid points themselves as well as points between and beyond them.
        pillars = [*snap.dividend_curves[u].tenors, *(surface.expiries if surface else [])]
        on_grid = st.sampled_from([p for p in pillars if p > 0.0 or not need_vol] or [1.0])
        T = draw(st.one_of(st.floats(1e-4 if need_vol else 0.0, 40.0), on_grid))
        spot = snap.spots[u]
        strikes = surface.strikes if surface is not None and surface.strikes else [spot]
        if draw(st.booleans()):
            K = spot * math.exp(draw(st.floats(-2.5, 2.5)))
        else:
            K = draw(st.sampled_from(strikes))
        book.append((u, T, K, need_vol))
    return book


@PROPERTY
@given(data=st.data())
def test_book_quotes_equal_the_scalar_lookups_exactly(data: st.DataObject) -> None:
    view = data.draw(markets())
    assert_same_as_scalar(view, data.draw(books(view)))


def mixed_market() -> MarketView:
    """Both surface axes, both curve rules, four underlyings (one without a surface)."""
    return MarketView(
        snapshot(
            {
                "data_asof": NOW.isoformat(),
                "spots": {"SPX": 5000.0, "NKY": 38000.0, "AAPL.O": 210.5, "EURUSD": 1.07},
                "zero_curves": {
                    "USD-OIS": {
                        "tenors": [0.0, 0.5, 1.0, 2.0, 10.0],
                        "rates": [0.051, 0.05, 0.047, 0.043, 0.041],
                        "interpolation": "linear_rt",
                    }
                },
                "dividend_curves": {
                    "SPX": {"tenors": [1.0, 3.0], "rates": [0.013, 0.015]},
                    "NKY": {
                        "tenors": [0.25, 2.0],
                        "rates": [0.02, 0.018],
                        "interpolation": "linear_rt",
                    },
                    "AAPL.O": {"tenors": [1.0], "rates": [0.005]},
                    "EURUSD": {"tenors": [0.5, 5.0], "rates": [0.035, 0.03]},
                },
                "vol_surfaces": {
                    "SPX": {
                        "expiries": [0.1, 0.5, 1.0, 2.0],
                        "strikes": [4000.0, 4500.0, 5000.0, 5500.0, 6000.0],
                        "vols": [[0.3, 0.24, 0.18, 0.15, 0.14]] * 4,
                    },
                    "NKY": {
                        "expiries": [0.25, 1.0, 3.0],
                        "log_moneyness": [-0.4, -0.1, 0.0, 0.1, 0.4],
                        "vols": [
                            [0.35, 0.25, 0.22, 0.2, 0.21],
                            [0.3, 0.24, 0.21, 0.2, 0.2],
                            [0.28, 0.23, 0.21, 0.2, 0.19],
                        ],
                    },
                    "EURUSD": {"expiries": [1.0], "log_moneyness": [0.0], "vols": [[0.08]]},
                },
            }
        )
    )


def random_book(view: MarketView, n: int, *, seed: int) -> list[Instrument]:
    rng = np.random.default_rng(seed)
    snap = view.snapshot
    names = sorted(snap.spots)
    book: list[Instrument] = []
    for _ in range(n):
        u = names[int(rng.integers(len(names)))]
        need_vol = u in snap.vol_surfaces and bool(rng.integers(2))
        T = float(rng.uniform(1e-3, 12.0))
        K = float(snap.spots[u] * math.exp(rng.normal(0.0, 0.5)))
        book.append((u, T, K, need_vol))
    return book


def test_a_thousand_instrument_book_equals_the_scalar_lookups() -> None:
    view = mixed_market()
    assert_same_as_scalar(view, random_book(view, 1000, seed=7))


class CountingView(MarketView):
    """Counts the scalar lookups, to show a valid book never falls back to them."""

    def __init__(self, view: MarketView) -> None:
        super().__init__(view.snapshot)
        self.calls: Counter[str] = Counter()

    def spot(self, underlying: str) -> Quote:
        self.calls["spot"] += 1
        return super().spot(underlying)

    def zero_rate(self, T: float, *, curve: str | None = None) -> Quote:
        self.calls["zero_rate"] += 1
        return super().zero_rate(T, curve=curve)

    def dividend_yield(self, underlying: str, T: float) -> Quote:
        self.calls["dividend_yield"] += 1
        return super().dividend_yield(underlying, T)

    def vol(self, underlying: str, T: float, K: float) -> Quote:
        self.calls["vol"] += 1
        return super().vol(underlying, T, K)


def test_a_valid_book_is_read_per_underlying_not_per_instrument() -> None:
    view = CountingView(mixed_market())
    book = random_book(view, 1000, seed=11)
    got = batch(view, book)
    assert sum(q is not None for q in got.vol) > 300
    # One spot lookup per underlying; no per-instrument scalar curve or surface reads.
    assert view.calls == Counter({"spot": len({u for u, *_ in book})})


def test_log_moneyness_source_text_is_unchanged() -> None:
    data = {
        "data_asof": NOW.isoformat(),
        "spots": {"SPX": 100.0},
        "zero_curves": {"USD": {"tenors": [1.0], "rates": [0.03]}},
        "dividend_curves": {"SPX": {"tenors": [1.0], "rates": [0.01]}},
        "vol_surfaces": {
            "SPX": {"expiries": [1.0], "log_moneyness": [-0.1, 0.1], "vols": [[0.3, 0.2]]}
        },
    }
    view = MarketView(snapshot(data))
    # The text the scalar vol wrote before the batch path existed (pinned, character for character).
    expected = (
        "vol_surface SPX log_moneyness bilinear total variance at T=2 ln(K/F)=0.365465 "
        "(flat extrapolation above expiry 1) (flat extrapolation above log_moneyness 0.1); "
        "F: spot SPX * exp((r - q) T); r: zero_curve USD linear_rate at T=2 "
        "(flat extrapolation above tenor 1); q: dividend_curve SPX linear_rate at T=2 "
        "(flat extrapolation above tenor 1)"
    )
    assert view.vol("SPX", 2.0, 150.0) == Quote(0.2, expected)
    assert batch(view, [("SPX", 2.0, 150.0, True)]).vol == (Quote(0.2, expected),)


def test_interpolation_on_arrays_equals_it_on_scalars() -> None:
    rng = np.random.default_rng(3)
    tenors = [0.0, 0.25, 1.0, 2.0, 5.0, 30.0]
    rates = [0.01, 0.02, 0.035, 0.03, 0.04, 0.045]
    t = np.concatenate([rng.uniform(0.0, 40.0, 500), tenors])  # (506,)
    for rule in ("linear_rate", "linear_rt"):
        whole = interpolate_curve(tenors=tenors, rates=rates, rule=rule, t=t)
        one_by_one = [
            float(interpolate_curve(tenors=tenors, rates=rates, rule=rule, t=x)) for x in t
        ]
        assert whole.tolist() == one_by_one
    grid: dict[str, Any] = {
        "expiries": [0.1, 0.5, 1.0, 3.0],
        "axis": [-0.5, -0.1, 0.0, 0.2, 0.6],
        "vols": rng.uniform(0.1, 0.5, (4, 5)).tolist(),
    }
    nodes_t, nodes_x = np.meshgrid(grid["expiries"], grid["axis"], indexing="ij")  # (4, 5)
    tq = np.concatenate([rng.uniform(1e-3, 5.0, 500), nodes_t.ravel()])  # (520,)
    xq = np.concatenate([rng.uniform(-1.0, 1.0, 500), nodes_x.ravel()])  # (520,)
    whole = interpolate_vol(**grid, t=tq, x=xq)
    one_by_one = [float(interpolate_vol(**grid, t=a, x=b)) for a, b in zip(tq, xq, strict=True)]
    assert whole.tolist() == one_by_one


def test_empty_book_and_mismatched_lengths() -> None:
    view = mixed_market()
    assert batch(view, []) == BookQuotes(spot=(), zero_rate=(), dividend_yield=(), vol=())
    with pytest.raises(ValueError, match=r"differ in length: 2, 2, 1, 2"):
        view.book_quotes(underlyings=["SPX", "SPX"], T=[1.0, 1.0], K=[1.0], need_vol=[True, True])


# --- errors: the scalar path's exception, for the first failing instrument ----------------------


def scalar_error(view: MarketView, inst: Instrument) -> Exception:
    with pytest.raises(Exception) as info:  # whatever the scalar path raises
        scalar_quotes(view, *inst)
    assert isinstance(info.value, Exception)
    return info.value


def assert_fails_like_scalar(
    view: MarketView, book: list[Instrument], *, index: int, kind: type[Exception]
) -> InstrumentQuoteError:
    with pytest.raises(InstrumentQuoteError) as info:
        batch(view, book)
    err = info.value
    want = scalar_error(view, book[index])
    assert err.index == index
    assert type(err.error) is type(want) and isinstance(err.error, kind)
    assert str(err.error) == str(want)
    assert err.__cause__ is err.error
    for inst in book[:index]:  # every earlier instrument is fine on the scalar path
        scalar_quotes(view, *inst)
    return err


OK: list[Instrument] = [
    ("SPX", 0.5, 5100.0, True),
    ("NKY", 1.5, 36000.0, True),
    ("AAPL.O", 2.0, 200.0, False),
]


def test_missing_spot_names_the_instrument() -> None:
    view = mixed_market()
    book = [*OK, ("MSFT", 1.0, 400.0, False), ("MSFT", 1.0, 400.0, False)]
    err = assert_fails_like_scalar(view, book, index=3, kind=MarketDataNotFound)
    assert "spot 'MSFT' is not in snapshot" in str(err.error)


def test_missing_surface_names_the_instrument() -> None:
    view = mixed_market()
    # AAPL.O has spot and dividends, so its forward is fine; only a vol read fails.
    book = [*OK, ("AAPL.O", 1.0, 200.0, False), ("AAPL.O", 1.0, 200.0, True)]
    err = assert_fails_like_scalar(view, book, index=4, kind=MarketDataNotFound)
    assert "vol_surface 'AAPL.O'" in str(err.error)


def test_missing_dividend_curve_names_the_instrument() -> None:
    snap = mixed_market().snapshot
    curves = {u: c for u, c in snap.dividend_curves.items() if u != "AAPL.O"}
    view = MarketView(snap.model_copy(update={"dividend_curves": curves}))
    book = [*OK[:2], ("SPX", 1.0, 5000.0, False), ("AAPL.O", 1.0, 200.0, False)]
    err = assert_fails_like_scalar(view, book, index=3, kind=MarketDataNotFound)
    assert "dividend_curve 'AAPL.O'" in str(err.error)


def test_first_failure_in_book_order_and_scalar_order_wins() -> None:
    view = mixed_market()
    # Index 1 lacks both a surface and a spot: vol is read first, so the surface is named.
    book = [OK[0], ("MSFT", 1.0, 1.0, True), ("SPX", 1.0, -1.0, True), ("EURUSD", -1.0, 1.0, False)]
    err = assert_fails_like_scalar(view, book, index=1, kind=MarketDataNotFound)
    assert "vol_surface 'MSFT'" in str(err.error)


@pytest.mark.parametrize(
    ("inst", "message"),
    [
        (("SPX", 1.0, -5.0, True), "K: strike must be finite and > 0, got -5.0"),
        (("SPX", 1.0, math.inf, True), "K: strike must be finite and > 0, got inf"),
        (("SPX", 0.0, 5000.0, True), "T: must be > 0, got 0.0"),
        (("NKY", 0.0, 38000.0, True), "T: must be > 0, got 0.0"),
        (("SPX", math.nan, 5000.0, False), "T: must be finite, got nan"),
        (("AAPL.O", -0.5, 200.0, False), "T: must be >= 0, got -0.5"),
    ],
)
def test_bad_inputs_raise_the_scalar_invalid(inst: Instrument, message: str) -> None:
    view = mixed_market()
    err = assert_fails_like_scalar(view, [*OK, inst, *OK], index=len(OK), kind=MarketDataInvalid)
    assert str(err.error) == message


def test_zero_T_without_a_vol_is_fine() -> None:
    view = mixed_market()
    assert_same_as_scalar(view, [*OK, ("SPX", 0.0, 5000.0, False), ("NKY", 0.0, 1.0, False)])


def test_log_moneyness_out_of_the_float_range_names_the_instrument() -> None:
    snap = mixed_market().snapshot
    steep = {"USD-OIS": snap.zero_curves["USD-OIS"].model_copy(update={"rates": [1e300] * 5})}
    view = MarketView(snap.model_copy(update={"zero_curves": steep}))
    # (r - q) T overflows: ln(K/F) = -inf, which the scalar vol refuses; forwards are fine.
    book = [("NKY", 1e9, 38000.0, False), ("SPX", 1e9, 5000.0, True), ("NKY", 1e9, 38000.0, True)]
    err = assert_fails_like_scalar(view, book, index=2, kind=MarketDataInvalid)
    assert str(err.error) == "strike: must be finite, got -inf"


def test_log_of_a_bad_spot_raises_the_scalar_value_error() -> None:
    snap = mixed_market().snapshot
    view = MarketView(snap.model_copy(update={"spots": {**snap.spots, "NKY": 0.0}}))
    book = [OK[0], ("NKY", 1.0, 38000.0, False), ("NKY", 1.0, 38000.0, True)]
    err = assert_fails_like_scalar(view, book, index=2, kind=ValueError)
    assert not isinstance(err.error, MarketDataInvalid)  # math.log(0): "math domain error"


# --- caches -------------------------------------------------------------------------------------


class CountingStore(DelegatingStore):
    """A real store underneath; counts gets per key, and can answer stale bytes at an etag."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gets: Counter[str] = Counter()
        self.frozen: dict[str, StoredObject] = {}  # key -> the object every get answers

    async def get(self, key: str) -> StoredObject:
        self.gets[key] += 1
        if key in self.frozen:
            return self.frozen[key]
        return await self.inner.get(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(params=["memory", "local"])
async def counting(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CountingStore]:
    if request.param == "memory":
        inner: ObjectStore = MemoryStore()
    else:
        from storage.localstore import LocalStore

        inner = LocalStore(tmp_path / "store", fsync=False)
    s = CountingStore(inner)
    yield s
    await s.aclose()


INDEX_KEY = "marketdata/eod-london/20240628T160000.000000Z/index.json"
ASOFS = [NOW - timedelta(hours=3), NOW - timedelta(hours=2), NOW - timedelta(hours=1)]


async def put_three(md: MarketDataStore) -> list[str]:
    keys = []
    for j, asof in enumerate(ASOFS):
        keys.append(
            (await md.put(namespace=NS, val_datetime=VDT, body=body(asof, spot=100.0 + j))).key
        )
    return keys


async def test_a_second_resolve_reads_only_the_index(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW)
    [*_, key] = await put_three(md)
    counting.gets.clear()
    first = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    second = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    assert first.key == key and second is first
    assert counting.gets == Counter({INDEX_KEY: 2, key: 1})
    exact = await md.get_exact(namespace=NS, val_datetime=VDT, data_asof=ASOFS[2])
    assert exact is first and counting.gets[key] == 1


async def test_a_put_is_seen_by_the_next_resolve(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW)
    await md.put(namespace=NS, val_datetime=VDT, body=body(ASOFS[0], spot=100.0))
    before = await md.resolve(namespace=NS, val_datetime=VDT)
    assert before.snapshot.spots["SPX"] == 100.0
    await md.put(namespace=NS, val_datetime=VDT, body=body(ASOFS[1], spot=123.0))
    after = await md.resolve(namespace=NS, val_datetime=VDT)
    assert after.snapshot.data_asof == ASOFS[1] and after.snapshot.spots["SPX"] == 123.0
    assert await md.list_data_asofs(namespace=NS, val_datetime=VDT) == ASOFS[:2]
    # The old snapshot is still served for its own data_asof, from the cache.
    again = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=ASOFS[0])
    assert again is before


async def test_the_parsed_index_is_reused_while_its_etag_holds(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW)
    await put_three(md)
    await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    real = await counting.inner.get(INDEX_KEY)
    # Same etag, other bytes: a parse would fail, so a clean answer shows the parse was reused.
    counting.frozen[INDEX_KEY] = StoredObject(INDEX_KEY, b"not an index", real.etag)
    assert (
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    ).snapshot.data_asof == ASOFS[2]
    counting.frozen[INDEX_KEY] = StoredObject(INDEX_KEY, b"not an index", "moved")
    with pytest.raises(Corrupt, match=r"not a valid market data index"):
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)


async def test_snapshot_cache_is_least_recently_used_and_bounded(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW, cache_entries=2)
    k1, k2, k3 = await put_three(md)
    counting.gets.clear()

    async def at(asof_index: int) -> None:
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=ASOFS[asof_index])

    await at(0)
    await at(1)
    await at(0)  # hit: 1 is now the least recently used
    await at(2)  # evicts 1, not 0
    await at(0)
    assert (counting.gets[k1], counting.gets[k2], counting.gets[k3]) == (1, 1, 1)
    await at(1)
    assert counting.gets[k2] == 2


async def test_index_cache_is_bounded(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW, cache_entries=1)
    other = VDT + timedelta(days=1)
    await md.put(namespace=NS, val_datetime=VDT, body=body(ASOFS[0]))
    await md.put(namespace=NS, val_datetime=other, body=body(ASOFS[0]))
    await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    await md.resolve(namespace=NS, val_datetime=other, data_asof=NOW)  # evicts VDT's index
    real = await counting.inner.get(INDEX_KEY)
    counting.frozen[INDEX_KEY] = StoredObject(INDEX_KEY, b"not an index", real.etag)
    with pytest.raises(Corrupt, match=r"not a valid market data index"):
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)


async def test_zero_cache_entries_reads_every_time(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW, cache_entries=0)
    [*_, key] = await put_three(md)
    counting.gets.clear()
    for _ in range(3):
        await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    assert counting.gets == Counter({INDEX_KEY: 3, key: 3})
    with pytest.raises(ValueError, match=r"cache_entries must be >= 0, got -1"):
        MarketDataStore(counting, cache_entries=-1)


async def test_a_cached_snapshot_is_the_one_the_index_hash_names(counting: CountingStore) -> None:
    md = MarketDataStore(counting, clock=lambda: NOW)
    [*_, key] = await put_three(md)
    first = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    current = await counting.inner.get(key)
    await counting.inner.put_if_match(key, current.data.replace(b"102.0", b"999.0"), current.etag)
    # The (key, hash) entry still holds the bytes whose hash the index committed.
    cached = await md.resolve(namespace=NS, val_datetime=VDT, data_asof=NOW)
    assert cached is first and cached.snapshot.spots["SPX"] == 102.0
    # A store without the cache reads, checks the hash and refuses the tampered document.
    with pytest.raises(Corrupt, match=r"hash"):
        await MarketDataStore(counting, cache_entries=0).resolve(
            namespace=NS, val_datetime=VDT, data_asof=NOW
        )
