"""Canonical JSON of answers and of the job results that store them.

Sorted keys, no whitespace, UTF-8, every float64 in its shortest round-trip form (orjson: ryu),
non-finite numbers as null, numpy arrays serialised in C. Equal documents give equal bytes, so
the same request against the same dataset and model version answers with the same bytes, and a
job's stored result is byte for byte the answer the API would give.

Not for the version chain: its records are hashed, so they keep `storage.checkpoint`'s
`canonical_json`, whose bytes must never change.
"""

from __future__ import annotations

from typing import Any

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


def canonical_bytes(obj: Any) -> bytes:
    """The canonical bytes of a JSON document (dicts with str keys, lists, str, int, float,
    bool, None, numpy float64 arrays); NaN and +-inf become null."""
    return orjson.dumps(obj, option=_OPTIONS)
