"""Snapshot <-> bytes: one blob = header + canonical JSON metadata + safetensors tensors.

Layout (all integers little-endian):

    magic      8 bytes  b"SPMCCKPT"
    version    u32      FORMAT_VERSION
    meta_len   u64      length of the JSON metadata
    data_len   u64      length of the safetensors payload
    meta       meta_len bytes: canonical JSON {"format_version", "meta", "tensors": {name: spec}}
    data       data_len bytes: safetensors (tensors only; never pickle)

Complex tensors are stored as their real view (..., 2) of the matching float dtype and the
original dtype is recorded in the tensor spec, so every dtype round-trips bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spectral_core.snapshot import Snapshot
from storage.objectstore import Corrupt

MAGIC = b"SPMCCKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQQ")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_COMPLEX = {torch.complex64, torch.complex128}


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding hashed and stored: sorted keys, no spaces, ASCII, no NaN/inf."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_json_able(value: Any, path: str) -> None:
    """Raise ValueError naming the first non JSON-native value (tuples would not round-trip)."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{path} must be finite, got {value!r}")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_able(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-str key {k!r}")
            _check_json_able(item, f"{path}[{k!r}]")
        return
    raise ValueError(f"{path} is not JSON-native: {type(value).__name__}")


def encode_checkpoint(snapshot: Snapshot) -> bytes:
    """Serialise a Snapshot; deterministic, so equal snapshots give equal bytes (and hashes)."""
    if not isinstance(snapshot, Snapshot):
        raise ValueError(f"snapshot must be a Snapshot, got {type(snapshot).__name__}")
    _check_json_able(snapshot.meta, "snapshot.meta")
    specs: dict[str, dict[str, Any]] = {}
    payload: dict[str, torch.Tensor] = {}
    for name, tensor in snapshot.tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"snapshot.tensors has an invalid name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"snapshot.tensors[{name!r}] is {type(tensor).__name__}, not a Tensor")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"snapshot.tensors[{name!r}] has unsupported dtype {tensor.dtype}")
        if tensor.layout != torch.strided:
            raise ValueError(f"snapshot.tensors[{name!r}] must be dense, got {tensor.layout}")
        # A private contiguous CPU copy: safetensors refuses tensors that share storage.
        t = tensor.detach().to("cpu").contiguous().clone()
        spec: dict[str, Any] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
        if t.dtype in _COMPLEX:
            t = torch.view_as_real(t).contiguous()  # (..., 2) float32 | float64
            spec["stored_as"] = "real_view"
        payload[name] = t
        specs[name] = spec
    meta = canonical_json(
        {"format_version": FORMAT_VERSION, "meta": snapshot.meta, "tensors": specs}
    )
    data = st_save(payload) if payload else b""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), len(data)) + meta + data


def decode_checkpoint(data: bytes, *, expected_sha256: str) -> Snapshot:
    """Check the SHA-256 first (Corrupt on mismatch), then parse; never unpickles."""
    if not isinstance(expected_sha256, str) or not _SHA256_RE.match(expected_sha256):
        raise ValueError(f"expected_sha256 must be 64 lowercase hex chars, got {expected_sha256!r}")
    actual = sha256_hex(bytes(data))
    if actual != expected_sha256:
        raise Corrupt(f"checkpoint sha256 {actual} != expected {expected_sha256}")
    try:
        return _parse(bytes(data))
    except Corrupt:
        raise
    except Exception as exc:  # any parse failure of hash-matching bytes is a malformed blob
        raise Corrupt(f"malformed checkpoint: {type(exc).__name__}: {exc}") from exc


def _parse(data: bytes) -> Snapshot:
    if len(data) < _HEADER.size:
        raise Corrupt(f"checkpoint too short: {len(data)} bytes")
    magic, version, meta_len, data_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Corrupt(f"bad checkpoint magic {magic!r}")
    if version != FORMAT_VERSION:
        raise Corrupt(f"unsupported checkpoint format_version {version} (known: {FORMAT_VERSION})")
    if _HEADER.size + meta_len + data_len != len(data):
        raise Corrupt(
            f"checkpoint length {len(data)} != header {_HEADER.size} + {meta_len} + {data_len}"
        )
    meta_bytes = data[_HEADER.size : _HEADER.size + meta_len]
    doc = json.loads(meta_bytes)
    if canonical_json(doc) != meta_bytes:
        raise Corrupt("checkpoint metadata is not canonical JSON")
    if doc.get("format_version") != FORMAT_VERSION:
        raise Corrupt(f"metadata format_version {doc.get('format_version')!r} != {version}")
    specs: dict[str, dict[str, Any]] = doc["tensors"]
    raw = data[_HEADER.size + meta_len :]
    loaded = st_load(raw) if raw else {}
    if set(loaded) != set(specs):
        raise Corrupt(f"tensor names differ: stored {sorted(loaded)} vs metadata {sorted(specs)}")
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        dtype = _DTYPES[spec["dtype"]]
        t = loaded[name]
        if spec.get("stored_as") == "real_view":
            if dtype not in _COMPLEX:
                raise Corrupt(f"tensor {name!r}: real_view for non-complex dtype {dtype}")
            t = torch.view_as_complex(t.contiguous())
        if t.dtype != dtype or list(t.shape) != spec["shape"]:
            raise Corrupt(
                f"tensor {name!r}: got {t.dtype} {list(t.shape)}, "
                f"metadata says {dtype} {spec['shape']}"
            )
        tensors[name] = t
    return Snapshot(tensors=tensors, meta=doc["meta"])
