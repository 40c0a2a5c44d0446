"""bench.storage runs end to end at tiny sizes on both backends (no wall-clock asserts)."""

from __future__ import annotations

import json

import pytest

from bench import storage as bench_storage
from tests.storage_fixtures import MotoServer, moto_server

__all__ = ["moto_server"]  # the session fixture, imported for pytest

KEYS = {
    "bench",
    "commit_ms_p50_local",
    "commit_ms_p50_s3",
    "verify_1000_s_local",
    "verify_1000_s_s3",
    "commit_ms_p99_local",
    "commit_ms_p99_s3",
    "commits",
    "versions",
    "checkpoint_bytes",
    "verify_blob_bytes",
    "cpus",
}


def test_bench_storage_prints_one_json_line(
    moto_server: MotoServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--commits", "3", "--versions", "5", "--backends", "local,s3",
            "--s3-endpoint", moto_server.endpoint, "--timeout-s", "120"]
    assert bench_storage.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) >= KEYS
    assert result["bench"] == "storage"
    assert (result["commits"], result["versions"]) == (3, 5)
    for key in KEYS - {"bench"}:
        assert isinstance(result[key], int | float) and result[key] > 0, key


def test_bench_storage_one_backend_leaves_the_other_null(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_storage.main(["--commits", "1", "--versions", "2", "--backends", "local"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["commit_ms_p50_local"] > 0 and result["verify_1000_s_local"] > 0
    assert result["commit_ms_p50_s3"] is None and result["verify_1000_s_s3"] is None


def test_bench_storage_refuses_out_of_range_arguments() -> None:
    for argv in (["--commits", "0"], ["--versions", "-1"], ["--backends", "gcs"]):
        with pytest.raises(SystemExit):
            bench_storage.parse_args(argv)
