"""bench.continuous: its pure parts (monotone rule, minute keys, chunking, metrics) and one short
end-to-end run against the real server (slow)."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from bench import continuous
from bench.continuous import (
    chunk_bounds,
    is_monotone,
    minute_key,
    promotion_counts,
    schedule_s,
    summary_minutes,
)


def test_monotone_holds_when_the_error_falls_or_stays() -> None:
    rng = np.random.default_rng(0)
    first = rng.uniform(1.0, 3.0, 2000)
    better = first * 0.8
    same = better.copy()  # one version measured twice: d = 0
    assert is_monotone([first, better, same])


def test_monotone_tolerates_a_rise_within_two_standard_errors() -> None:
    rng = np.random.default_rng(1)
    first = rng.uniform(1.0, 3.0, 2000)
    d = rng.normal(0.0, 1.0, 2000)
    d -= d.mean()
    d += 1.0 * d.std(ddof=1) / math.sqrt(d.size)  # a rise of 1 se: noise
    assert is_monotone([first, first + d])


def test_monotone_fails_on_a_rise_past_two_standard_errors() -> None:
    rng = np.random.default_rng(2)
    first = rng.uniform(1.0, 3.0, 2000)
    d = rng.normal(0.0, 1.0, 2000)
    d -= d.mean()
    d += 3.0 * d.std(ddof=1) / math.sqrt(d.size)
    better = first * 0.5
    assert not is_monotone([first, better, better + d])


def test_monotone_fails_on_a_non_finite_error() -> None:
    first = np.ones(10)
    assert not is_monotone([first, np.full(10, np.nan)])


def test_monotone_of_one_measurement_is_true() -> None:
    assert is_monotone([np.ones(5)])


@pytest.mark.parametrize(
    ("minutes", "keys"),
    [(2.0, ["2"]), (5.0, ["5"]), (7.0, ["5", "7"]), (30.0, ["5", "10", "30"]),
     (45.0, ["5", "10", "30", "45"]), (0.5, ["0.5"])],
)
def test_summary_minutes_are_5_10_30_up_to_the_run_and_the_run(
    minutes: float, keys: list[str]
) -> None:
    assert [minute_key(m) for m in summary_minutes(minutes)] == keys


def test_schedule_measures_at_ready_every_interval_and_at_the_end() -> None:
    assert schedule_s(2.0, 30.0) == [0.0, 30.0, 60.0, 90.0, 120.0]
    assert schedule_s(1.0, 25.0) == [0.0, 25.0, 50.0, 60.0]
    with pytest.raises(ValueError, match="interval_s"):
        schedule_s(1.0, 0.0)


def test_chunks_cover_every_row_within_both_limits() -> None:
    sizes = [100, 120, 90, 110, 100, 95, 130]
    bounds = chunk_bounds(sizes, max_rows=3, max_body_bytes=300, overhead=16)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
    assert all(a == b for (_, a), (b, _) in pairwise(bounds))
    for a, b in bounds:
        assert 1 <= b - a <= 3
        assert 16 + sum(sizes[a:b]) + (b - a - 1) <= 300
    assert bounds == [(0, 2), (2, 4), (4, 6), (6, 7)]


def test_chunks_split_on_the_row_count_alone() -> None:
    assert chunk_bounds([10] * 5, max_rows=2, max_body_bytes=10**6, overhead=16) == [
        (0, 2), (2, 4), (4, 5)]


def test_a_row_larger_than_the_body_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="row 1"):
        chunk_bounds([10, 400], max_rows=10, max_body_bytes=300, overhead=16)


def test_the_held_out_set_fits_the_default_limits_in_one_request() -> None:
    data = continuous.held_out("gbm")
    assert len(data.oracle) == 2000
    rows = [row for body in data.bodies for row in json.loads(body)["contracts"]]
    assert len(rows) == 2000
    assert set(rows[0]) == {"X0", "K", "T", "r", "d", "v"}


def test_promotion_counts_are_null_without_the_counter() -> None:
    text = "# HELP other_total x\n# TYPE other_total counter\nother_total 3.0\n"
    assert promotion_counts(text) == (None, None)


def test_promotion_counts_read_both_labels() -> None:
    head = ("# HELP spectralmc_promotions_total p\n"
            "# TYPE spectralmc_promotions_total counter\n")
    assert promotion_counts(head) == (0, 0)  # declared, nothing counted yet
    # summed over the other labels (the server counts by result and reason)
    text = head + ('spectralmc_promotions_total{reason="better",result="promoted"} 3.0\n'
                   'spectralmc_promotions_total{reason="first",result="promoted"} 1.0\n'
                   'spectralmc_promotions_total{reason="worse",result="refused"} 1.0\n'
                   'spectralmc_promotions_total{reason="invalid",result="refused"} 2.0\n')
    assert promotion_counts(text) == (4, 3)


def test_a_named_model_is_served_next_to_bs_and_named_in_each_request(tmp_path: Path) -> None:
    """--model heston: the settings the bench serves load, with heston a named model of its
    process (the top-level [core] stays the gbm bs), the averaging on its core; every held-out
    request names the model and carries heston's contract fields."""
    from config.settings import load_settings

    text = continuous.service_toml("heston", "ema").format(
        port=8123, store=tmp_path / "store", commit_every_s=60.0)
    (tmp_path / "settings.toml").write_text(text)
    settings = load_settings(config_file=tmp_path / "settings.toml", env={})
    assert settings.core.process == "gbm" and settings.core.optim.averaging == "none"
    named = settings.models["heston"]
    assert named.training and named.core.process == "heston"
    assert named.core.optim.averaging == "ema"
    data = continuous.held_out("heston", 5, model="heston")
    for body in (*data.bodies, data.probe):
        doc = json.loads(body)
        assert doc["model"] == "heston"
        assert set(doc["contracts"][0]) == {"X0", "K", "T", "r", "d", "v0", "kappa", "theta_v",
                                            "xi", "rho"}
    assert "model" not in json.loads(continuous.held_out("gbm", 5).probe)


@pytest.mark.slow
def test_a_short_run_prints_one_result_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "bs", "--minutes", "0.5", "--interval-s", "10", "--commit-every-s", "10"]
    assert continuous.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"bench", "model", "minutes", "ready_s", "served_mean_bp", "served_p99_bp",
            "promotions", "refused", "monotone", "store_mb", "per_minute",
            "machine"} <= set(result)
    assert result["bench"] == "continuous" and result["model"] == "bs"
    assert math.isfinite(result["ready_s"]) and result["ready_s"] > 0
    assert set(result["served_mean_bp"]) == set(result["served_p99_bp"]) == {"0.5"}
    minutes = [m["minute"] for m in result["per_minute"]]
    assert minutes == pytest.approx([0.0, 10 / 60, 20 / 60, 0.5], abs=1e-3)
    assert all(m["version"] >= 1 and m["mean_bp"] > 0 for m in result["per_minute"])
    assert isinstance(result["monotone"], bool)
    assert result["store_mb"] > 0
