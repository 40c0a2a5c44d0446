"""Typed application and request keys: the one place a component is named in app state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from config.settings import Settings
from server.metrics import Metrics

if TYPE_CHECKING:
    # Types only: the error middleware imports this module for the request id, and must not
    # pull in the trainer, the pricer or the store backends (nor server.jobs, a cycle).
    from server.calibrations import Calibrator
    from server.jobs import JobScheduler
    from server.model import ModelService
    from server.models import ServedModel
    from server.worker import TrainingWorker
    from storage.chain import VersionChain
    from storage.marketdata import MarketDataStore
    from storage.objectstore import ObjectStore

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str


ReadyCheck = Callable[[], Readiness]


def _no_model() -> Readiness:
    return Readiness(False, "no model loaded")


class ModelReadiness:
    """The /readyz probe: a callable whose check can be swapped once a model is loaded.

    The app is frozen once it starts, so a cleanup_ctx cannot replace the AppKey's value; it
    calls `app[MODEL_READY_KEY].set(check)` instead.
    """

    def __init__(self, check: ReadyCheck = _no_model) -> None:
        self._check = check

    def set(self, check: ReadyCheck) -> None:
        self._check = check

    def __call__(self) -> Readiness:
        return self._check()


SETTINGS_KEY = web.AppKey("settings", Settings)
STORE_KEY: web.AppKey[ObjectStore] = web.AppKey("store")
MARKETDATA_KEY: web.AppKey[MarketDataStore] = web.AppKey("marketdata")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
METRICS_KEY = web.AppKey("metrics", Metrics)
MODEL_READY_KEY = web.AppKey("model_ready", ModelReadiness)
CLOCK_KEY: web.AppKey[Clock] = web.AppKey("clock")
CHAIN_KEY: web.AppKey[VersionChain] = web.AppKey("chain")
# The default model's parts ([server] default_model); MODELS_KEY holds every named model.
MODEL_KEY: web.AppKey[ModelService] = web.AppKey("model")
MODELS_KEY: web.AppKey[dict[str, ServedModel]] = web.AppKey("models")
CALIBRATOR_KEY: web.AppKey[Calibrator] = web.AppKey("calibrator")
# None when settings.training.enabled is false.
WORKER_KEY: web.AppKey[TrainingWorker | None] = web.AppKey("worker")

JOBS_KEY: web.AppKey[JobScheduler] = web.AppKey("jobs")

REQUEST_ID_KEY = web.RequestKey("request_id", str)
