"""Suite-wide fixtures."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _unfreeze_the_heap() -> Iterator[None]:
    """An app under test freezes the heap once its model serves ([server] gc_freeze); undo it
    after each test, so the suite's own garbage stays collectable."""
    yield
    gc.unfreeze()
