"""`spectralmc store ...` (storage.cli.main): commands, exit codes, one-line errors, TensorBoard."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import datetime
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from storage.chain import VersionChain, blob_key
from storage.cli import main
from storage.localstore import LocalStore
from storage.prefixed import model_store
from tests.storage_fixtures import MotoServer, make_snapshot, moto_server, new_bucket, s3_store

__all__ = ["moto_server"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(argv, out=out)
    err = capsys.readouterr().err
    return code, out.getvalue(), err


async def _fill(root: Path, n: int = 4, *, model: str = "bs") -> VersionChain:
    chain = VersionChain(model_store(LocalStore(root), model))
    for i in range(1, n + 1):
        await chain.commit(
            make_snapshot(i, size=3),
            message="step {step} loss {loss}",
            metrics={"step": 100 * i, "loss": 1.0 / i},
            quality={"price_rmse": 0.1 / i},
        )
    return chain


def test_read_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_fill(tmp_path))
    url = f"file://{tmp_path}"
    code, out, err = run(["--url", url, "list-versions"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 4 and "step 200 loss 0.5" in lines[1]
    code, out, _ = run(["--url", url, "inspect", "3"], capsys)
    assert code == 0 and json.loads(out)["counter"] == 3
    code, out, _ = run(["--url", url, "verify"], capsys)
    assert code == 0 and out.startswith("ok: 4 versions verified")


def test_model_option_acts_on_that_models_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_fill(tmp_path, 2))  # bs: the store's root
    asyncio.run(_fill(tmp_path, 3, model="heston"))  # models/heston/
    url = f"file://{tmp_path}"
    assert len(run(["--url", url, "list-versions"], capsys)[1].splitlines()) == 2
    code, out, _ = run(["--url", url, "--model", "heston", "list-versions"], capsys)
    assert code == 0 and len(out.splitlines()) == 3
    assert run(["--url", url, "--model", "heston", "--actor", "al", "pin", "2"], capsys)[0] == 0
    _, log, _ = run(["--url", url, "--model", "heston", "log"], capsys)
    assert "al" in log and "pin" in log
    assert "pin" not in run(["--url", url, "log"], capsys)[1]  # bs's audit log is untouched
    code, out, _ = run(["--url", url, "--model", "heston", "verify"], capsys)
    assert code == 0 and out.startswith("ok: 3 versions verified")
    assert (tmp_path / "models" / "heston").is_dir()


def test_refs_gc_and_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_fill(tmp_path, 6))
    url = f"file://{tmp_path}"
    assert run(["--url", url, "--actor", "alice", "tag", "production", "2"], capsys)[0] == 0
    assert run(["--url", url, "--actor", "bob", "pin", "5"], capsys)[0] == 0
    assert run(["--url", url, "--actor", "bob", "pin", "production"], capsys)[1] == "pin -> 2\n"
    code, out, _ = run(["--url", url, "list-versions"], capsys)
    assert "[pin, production]" in out.splitlines()[1]
    code, out, _ = run(["--url", url, "gc-preview", "--keep", "2"], capsys)
    assert code == 0 and out.startswith("would collect 3 version(s) [1, 3, 4]")
    code, _, err = run(["--url", url, "gc-run", "--keep", "2"], capsys)
    assert code == 2 and "--yes" in err and len(err.strip().splitlines()) == 1
    assert len(list((tmp_path / "objects").iterdir())) == 6
    code, out, _ = run(["--url", url, "--actor", "ops", "gc-run", "--keep", "2", "--yes"], capsys)
    assert code == 0 and out.startswith("collected 3 version(s)")
    assert run(["--url", url, "verify"], capsys)[0] == 0
    assert run(["--url", url, "--actor", "carol", "unpin"], capsys)[1] == "unpinned (was 2)\n"
    code, out, _ = run(["--url", url, "log"], capsys)
    actions = [line.split()[3] for line in out.splitlines()]
    assert actions == ["tag", "pin", "pin", "gc", "unpin"]
    assert "alice" in out.splitlines()[0] and "production: None -> 2" in out.splitlines()[0]


def test_integrity_failures_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain = asyncio.run(_fill(tmp_path))
    rec = asyncio.run(chain.get(2))
    blob = tmp_path / blob_key(rec.blob_sha256)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x40
    blob.write_bytes(bytes(data))
    url = f"file://{tmp_path}"
    code, out, err = run(["--url", url, "verify"], capsys)
    assert code == 1 and "first bad version 2" in out
    assert len(err.strip().splitlines()) == 1 and "first bad version 2" in err
    code, out, _ = run(["--url", url, "find-corruption"], capsys)
    assert code == 1 and out.splitlines()[0].startswith("version 2: blob_hash")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "--url"),
        (["--url", "file:///tmp/x"], "cmd"),
        (["--url", "file:///tmp/x", "frobnicate"], "frobnicate"),
        (["--url", "file:///tmp/x", "inspect", "abc"], "not a version number"),
        (["--url", "file:///tmp/x", "inspect", "0"], "version must be >= 1"),
        (["--url", "ftp://nope", "verify"], "unknown store scheme"),
        (["--url", "file:///tmp/x", "gc-preview"], "--keep"),
        (["--url", "file:///tmp/x", "--model", "../bs", "verify"], "a model name must match"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_unknown_version_and_bad_ref(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_fill(tmp_path, 2))
    url = f"file://{tmp_path}"
    code, _, err = run(["--url", url, "inspect", "9"], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run(["--url", url, "tag", "../evil", "1"], capsys)
    assert code == 2 and "invalid ref name" in err
    code, _, err = run(["--url", url, "pin", "nosuchref"], capsys)
    assert code == 2 and "not set" in err


def test_store_unreachable_exit_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.storage_fixtures import free_port

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, _, err = run(["--url", "s3://some-bucket/p?endpoint=http://127.0.0.1:1", "log"], capsys)
    assert code == 2 and "credentials" in err.lower()  # none configured: a fix-it error, not 3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"s3://some-bucket/p?endpoint=http://127.0.0.1:{free_port()}"
    code, _, err = run(["--url", url, "list-versions"], capsys)
    assert code == 3 and "unavailable" in err and len(err.strip().splitlines()) == 1


def test_cli_against_s3(
    moto_server: MotoServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(moto_server)

    async def fill() -> None:
        store = s3_store(moto_server, bucket, prefix="c")
        await VersionChain(store).commit(make_snapshot(1), metrics={"step": 1})
        await store.aclose()

    asyncio.run(fill())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # credentials the way an operator gives them
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"s3://{bucket}/c?endpoint={moto_server.endpoint}"
    code, out, _ = run(["--url", url, "verify"], capsys)
    assert code == 0 and "1 versions verified" in out


def test_tensorboard_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_fill(tmp_path / "s", 3))
    code, out, _ = run(
        ["--url", f"file://{tmp_path / 's'}", "tensorboard-log", str(tmp_path / "tb")], capsys
    )
    assert code == 0 and "wrote 3 version(s)" in out
    (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert str(event_file) in out
    # read back by TensorBoard itself
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/step", "quality/price_rmse", "chain/version"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [100, 200, 300]  # step from the training metrics
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-6)
    rmse = acc.Scalars("quality/price_rmse")
    assert [e.value for e in rmse] == pytest.approx([0.1, 0.05, 0.1 / 3], rel=1e-6)
    assert [e.value for e in acc.Scalars("chain/version")] == [1, 2, 3]
    chain = asyncio.run(VersionChain(LocalStore(tmp_path / "s")).list())
    walls = [datetime.fromisoformat(r.created_at).timestamp() for r in chain]
    assert [e.wall_time for e in loss] == pytest.approx(walls)  # wall time = commit time


def test_tensorboard_log_unwritable_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_fill(tmp_path / "s", 1))
    (tmp_path / "file").write_text("not a directory")
    code, _, err = run(
        ["--url", f"file://{tmp_path / 's'}", "tensorboard-log", str(tmp_path / "file")], capsys
    )
    assert code == 2 and "cannot write TensorBoard events" in err
    assert len(err.strip().splitlines()) == 1
