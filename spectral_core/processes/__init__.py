"""The process library (DESIGN.md §8): one module per process, each declaring a `Process`.

`get_process(name)` imports the module on first use, so `spectral_core.config` (which needs only
the domains) never pulls in the kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spectral_core.processes.base import Process

_MODULES = {"gbm": ("gbm", "GbmProcess"), "heston": ("heston", "HestonProcess"),
            "bates": ("bates", "BatesProcess")}
_INSTANCES: dict[str, Process] = {}


def get_process(name: str) -> Process:
    """The process called `name` ("gbm", "heston" or "bates")."""
    if name not in _MODULES:
        raise ValueError(f"process must be one of {sorted(_MODULES)}, got {name!r}")
    if name not in _INSTANCES:
        module, cls = _MODULES[name]
        mod = importlib.import_module(f"spectral_core.processes.{module}")
        _INSTANCES[name] = getattr(mod, cls)()
    return _INSTANCES[name]
