"""Checkpoint framing: bit-exact round trip, hash checked first, malformed blobs refused."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from spectral_core.snapshot import Snapshot
from storage.checkpoint import (
    FORMAT_VERSION,
    MAGIC,
    canonical_json,
    decode_checkpoint,
    encode_checkpoint,
    sha256_hex,
)
from storage.objectstore import Corrupt
from tests.storage_fixtures import make_snapshot, same_bits


def _roundtrip(snap: Snapshot) -> Snapshot:
    blob = encode_checkpoint(snap)
    return decode_checkpoint(blob, expected_sha256=sha256_hex(blob))


def test_roundtrip_is_bit_exact_for_every_dtype() -> None:
    snap = make_snapshot(7, size=5)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, 3.0])
    # A NaN with a non-default payload must survive too (compare raw bits, not values).
    payload_nan = torch.tensor([0x7FC12345], dtype=torch.int32).view(torch.float32)
    tensors = {
        **snap.tensors,
        "special32": special,
        "special64": special.double(),
        "nan_payload": payload_nan,
        "cspecial": torch.complex(special, special.flip(0)),
        "cspecial128": torch.complex(special.double(), -special.double()),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.complex64),
        "strided": torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2],  # non-contiguous
        "flag": torch.tensor([True, False]),
    }
    back = _roundtrip(Snapshot(tensors=tensors, meta=snap.meta))
    assert set(back.tensors) == set(tensors)
    for name, t in tensors.items():
        assert same_bits(back.tensors[name], t), name
    assert back.meta == snap.meta


def test_encoding_is_deterministic_and_complex_stored_as_real_view() -> None:
    a = encode_checkpoint(make_snapshot(3))
    assert a == encode_checkpoint(make_snapshot(3))
    assert a != encode_checkpoint(make_snapshot(4))
    magic, version, meta_len, data_len = struct.unpack_from("<8sIQQ", a)
    assert (magic, version) == (MAGIC, FORMAT_VERSION)
    assert 28 + meta_len + data_len == len(a)
    meta = json.loads(a[28 : 28 + meta_len])
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["tensors"]["cw"] == {
        "dtype": "complex64",
        "shape": [8, 3],
        "stored_as": "real_view",
    }
    assert meta["tensors"]["counts"] == {"dtype": "int64", "shape": [8]}
    assert b"pickle" not in a and b"\x80\x04" not in a[: 28 + meta_len]


def test_hash_is_checked_before_parsing() -> None:
    blob = encode_checkpoint(make_snapshot(1))
    good = sha256_hex(blob)
    with pytest.raises(Corrupt, match="sha256"):
        decode_checkpoint(blob, expected_sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(Corrupt, match="sha256"):
        decode_checkpoint(blob[:-1], expected_sha256=good)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    with pytest.raises(Corrupt, match="sha256"):
        decode_checkpoint(bytes(flipped), expected_sha256=good)
    for bad in ("", "abc", good.upper(), good[:-1] + "g"):
        with pytest.raises(ValueError, match="expected_sha256"):
            decode_checkpoint(blob, expected_sha256=bad)


def _reframed(
    meta: dict[str, object], data: bytes, *, magic: bytes = MAGIC, version: int = 1
) -> bytes:
    m = canonical_json(meta)
    return struct.pack("<8sIQQ", magic, version, len(m), len(data)) + m + data


def test_malformed_blobs_with_matching_hash_are_corrupt() -> None:
    blob = encode_checkpoint(make_snapshot(2))
    meta_len, _ = struct.unpack_from("<QQ", blob, 12)
    meta = json.loads(blob[28 : 28 + meta_len])
    data = blob[28 + meta_len :]
    cases = {
        "magic": _reframed(meta, data, magic=b"NOTCKPT!"),
        "format_version": _reframed(meta, data, version=2),
        "length": blob + b"\x00",
        "short": blob[:10],
        "names differ": _reframed(
            {**meta, "tensors": {"x": {"dtype": "float32", "shape": [1]}}}, data
        ),
        "metadata says": _reframed(
            {**meta, "tensors": {**meta["tensors"], "counts": {"dtype": "int64", "shape": [9]}}},
            data,
        ),
    }
    for what, bad in cases.items():
        with pytest.raises(Corrupt):
            decode_checkpoint(bad, expected_sha256=sha256_hex(bad))
        assert what


def test_bad_snapshots_are_refused_with_the_field_named() -> None:
    t = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"snapshot.meta\['loss'\] must be finite"):
        encode_checkpoint(Snapshot(tensors=t, meta={"loss": float("nan")}))
    with pytest.raises(ValueError, match="not JSON-native: tuple"):
        encode_checkpoint(Snapshot(tensors=t, meta={"shape": (1, 2)}))
    with pytest.raises(ValueError, match="non-str key"):
        encode_checkpoint(Snapshot(tensors=t, meta={"m": {1: 2}}))
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_checkpoint(Snapshot(tensors={"q": torch.zeros(2, dtype=torch.float8_e4m3fn)}))
    with pytest.raises(ValueError, match="invalid name"):
        encode_checkpoint(Snapshot(tensors={"__metadata__": torch.zeros(1)}))
    with pytest.raises(ValueError, match="not a Tensor"):
        encode_checkpoint(Snapshot(tensors={"w": [1.0]}))  # type: ignore[dict-item]


def test_shared_storage_and_empty_snapshots() -> None:
    base = torch.arange(6, dtype=torch.float64)
    snap = Snapshot(tensors={"a": base, "view": base[2:4]}, meta={})
    back = _roundtrip(snap)
    assert same_bits(back.tensors["view"], base[2:4]) and same_bits(back.tensors["a"], base)
    assert _roundtrip(Snapshot(tensors={}, meta={"only": "meta"})).meta == {"only": "meta"}
