"""Hard memory caps for simulation buffers.

Every component that allocates host or device buffers for simulation states its bytes up front and
calls `check_cap` at construction, so nothing can run out of memory mid-run.
"""

from __future__ import annotations

import math

import numpy as np


class MemoryCapError(ValueError):
    """A component would allocate more than its configured hard cap."""


def nbytes_of(shape: tuple[int, ...], dtype: np.dtype | type | str) -> int:
    """Bytes of a dense array of `shape` and `dtype`."""
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def check_cap(component: str, nbytes: int, cap: int, *, setting: str) -> None:
    """Refuse an allocation of `nbytes` for `component` when it exceeds `cap`.

    `setting` names the config field that holds the cap, so the error says what to change.
    """
    if nbytes > cap:
        raise MemoryCapError(
            f"{component} needs {nbytes:,} bytes, over its hard cap of {cap:,} bytes "
            f"(raise {setting} or shrink the batch)"
        )
