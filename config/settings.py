"""Service settings: one `Settings` object with nested groups.

Layering, lowest to highest priority: the model defaults (kept equal to config/default.toml),
config/default.toml, an optional `--config FILE` TOML, then `SPECTRALMC_*` environment variables
(`SPECTRALMC_SERVER__PORT=9000`, `SPECTRALMC_CORE__SIM__SEED=3`). Nothing reads the environment
at import time: `load_settings()` is the only entry point that does.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources import EnvSettingsSource

from spectral_core.config import CoreConfig
from storage.prefixed import MODEL_NAME_PATTERN, ROOT_MODEL, is_model_name

DEFAULT_TOML = Path(__file__).with_name("default.toml")
ENV_PREFIX = "SPECTRALMC_"


class SettingsError(ValueError):
    """Settings could not be loaded or validated; the message names each bad field."""


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# A model's name (MODEL_NAME_PATTERN) labels every per-model metric; ROOT_MODEL is the model of
# the top-level [core] and [model], a GBM whose chain is the store's root.


class ServerSettings(_Group):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_instruments: int = Field(default=10_000, ge=1)
    max_string_len: int = Field(default=256, ge=8)
    max_list_items: int = Field(default=1000, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0.0)
    shutdown_timeout_s: float = Field(default=30.0, ge=0.0)
    # A market-data write may run ahead of the server clock by this much (clock skew), no more.
    max_future_data_asof_s: float = Field(default=300.0, ge=0.0)
    # POST /v1/scenarios: samples per request (each is a float in the answer, ~20 bytes)
    max_scenario_samples: int = Field(default=100_000, ge=1, le=10_000_000)
    # POST /v1/calibrations: surface points one fit may use (each is a row of every pass)
    max_calibration_points: int = Field(default=1_000, ge=1, le=100_000)
    # POST /v1/valuations: named scenarios per request (each reprices the book's options)
    max_scenarios: int = Field(default=64, ge=1, le=1_024)
    # gc.freeze() once a model serves: full collections (~230 ms over the start-up heap) then
    # skip it; bench.server: every pricing p99 lower or equal (README, Operating notes)
    gc_freeze: bool = True
    # The asyncio event loop `spectralmc serve` runs on: uvloop's (libuv) or the standard
    # library's. bench.server --event-loop measures both (README, Operating notes).
    event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    # Edge admission (server/http.py): the bodies of the pricing requests being handled
    # (/v1/price, /v1/valuations: parse, pricing, answer) are bounded in bytes; a request that
    # would pass the bound is refused with 503 + Retry-After before its body is read, so an
    # overload is shed at the cost of a header, not of a parse. A request alone is always let in.
    max_inflight_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=1 << 32)
    # The model a request that names none is priced by, and the admin routes without a model
    # act on: "bs" or a name under [models].
    default_model: str = Field(default="bs", pattern=MODEL_NAME_PATTERN)


class StoreSettings(_Group):
    url: str = "file://./var/store"
    s3_region: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    retry_attempts: int = Field(default=5, ge=1, le=50)
    retry_backoff_s: float = Field(default=0.1, ge=0.0)
    retry_backoff_max_s: float = Field(default=5.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> StoreSettings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("s3_access_key_id and s3_secret_access_key must be given together")
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError(
                f"retry_backoff_max_s ({self.retry_backoff_max_s}) must be >= "
                f"retry_backoff_s ({self.retry_backoff_s})"
            )
        return self


# RFC 6750 b64token: what a client can send after "Bearer " byte for byte in a header.
_BEARER_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")


class AdminSettings(_Group):
    # None: every admin route refuses (there is no default token).
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _check(self) -> AdminSettings:
        if self.token is None:
            return self
        value = self.token.get_secret_value()
        if len(value) < 16:
            raise ValueError("token must be at least 16 characters")
        if not _BEARER_TOKEN_RE.match(value):
            # Never echo the token: spaces, quotes or non-ASCII could not be sent as a bearer.
            raise ValueError(
                "token may only hold the bearer-token characters A-Z a-z 0-9 - . _ ~ + / "
                "(with trailing '=' padding)"
            )
        return self


_TEMPLATE_FIELDS = frozenset({"step", "loss", "batch"})


class CommitPlan(_Group):
    kind: Literal["every_steps", "every_seconds", "never"] = "every_seconds"
    every_steps: int = Field(default=1000, ge=1)
    every_seconds: float = Field(default=60.0, gt=0.0)
    # every_seconds only: a run's first commit comes after this many seconds, and the interval
    # then doubles up to every_seconds, so a fresh server has a validated version to serve
    # within seconds (None: the first commit after every_seconds too).
    first_after_s: float | None = Field(default=5.0, gt=0.0)
    message_template: str = "step {step} loss {loss} batch {batch}"

    @model_validator(mode="after")
    def _check(self) -> CommitPlan:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.message_template) if f}
        except ValueError as exc:
            raise ValueError(f"message_template is not a format string: {exc}") from None
        unknown = names - _TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"message_template uses unknown fields {sorted(unknown)}; "
                f"allowed: {sorted(_TEMPLATE_FIELDS)}"
            )
        return self


class TrainingSettings(_Group):
    enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_seconds: float | None = Field(default=None, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    commit: CommitPlan = CommitPlan()
    # The share of one core's time this trainer may take: after a step of t seconds it rests
    # t (1 - share) / share, so several models' trainers (and the pricing thread) share the
    # CPU as configured. 1: no rest. Per named model: [models.<name>] cpu_share.
    cpu_share: float = Field(default=1.0, gt=0.0, le=1.0)
    # One trainer per chain: the training lease (storage/lease.py) expires this long after its
    # holder last renewed it (every third of it); a standby server then takes over. Well above
    # the servers' clock skew.
    lease_ttl_s: float = Field(default=15.0, ge=1.0, le=3600.0)
    # Live TensorBoard scalars (loss, lr, samples/s, held-out validation, ...) under this
    # directory; None: off. Training scalars are averaged over every `tensorboard_every_steps`
    # steps (a continuous run writing every step would grow the event file without bound).
    tensorboard_dir: Path | None = None
    tensorboard_every_steps: int = Field(default=10, ge=1)


class ModelSettings(_Group):
    mode: Literal["tracking", "pinned"] = "tracking"
    poll_interval_s: float = Field(default=5.0, gt=0.0)
    pin_ref: str = Field(default="production", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    pinned_version: int | None = Field(default=None, ge=0)
    verify_on_load: bool = True
    # Admission (server/model.py): the bytes of the contract rows queued or being priced
    # (Pricer.row_bytes, ~0.8 kB a row at the default size) are bounded; past the bound a
    # request is refused at once with 503 + Retry-After, never left to time out.
    max_inflight_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, le=1 << 34)
    # Rows per forward pass of the continuous batcher (one larger request goes alone).
    max_batch_rows: int = Field(default=4096, ge=1, le=1 << 20)
    # How long a request may wait for its answer unless its X-Deadline-Ms header says
    # otherwise: work that cannot be (or was not) priced in time is refused with 503.
    deadline_s: float = Field(default=5.0, gt=0.0, le=3600.0)


class NamedModelSettings(_Group):
    """`[models.<name>]`: one more served model, with its own process config (`core`), its
    own chain under `models/<name>/` and serving mode (`model`), and its own trainer unless
    `training = false` (training also needs [training] enabled)."""

    core: CoreConfig = CoreConfig()
    model: ModelSettings = ModelSettings()
    training: bool = True
    cpu_share: float = Field(default=1.0, gt=0.0, le=1.0)  # as [training] cpu_share


class PromotionSettings(_Group):
    """The quality gate of the `serving` ref (storage/promotion.py)."""

    enabled: bool = True
    # promote when held-out mean <= served mean + this * sqrt(se^2 + served se^2)
    max_regression_se: float = Field(default=1.0, ge=0.0, le=10.0)
    cf_tolerance: float = Field(default=1e-6, gt=0.0, le=1e-2)  # |F_0 - 1|, |F_k| - 1
    density_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)  # of the density's peak
    arbitrage_tolerance_bp: float = Field(default=100.0, ge=0.0)
    actor: str = Field(default="promoter", min_length=1, max_length=64)


class JobsSettings(_Group):
    config_file: Path | None = None


class JobRetentionLimits(_Group):
    """Retention of one job's results (`jobs/<name>/...`); None = no limit of that kind."""

    max_age_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    max_count: int | None = Field(default=None, ge=1)


class RetentionSettings(_Group):
    """Automatic retention (storage/retention.py), run by the server every `interval_s`.

    Versions kept: the last `keep_last`, every ref'd one (tags, pins, serving) and the version
    being served, and one per `bucket_s` among those younger than `horizon_s` for each
    `[bucket_s, horizon_s]` rung of `ladder`; optionally bounded by `max_blob_bytes`.
    """

    enabled: bool = True
    # The first run happens one interval after start-up, never at start.
    interval_s: float = Field(default=600.0, gt=0.0, allow_inf_nan=False)
    keep_last: int = Field(default=10, ge=1)
    ladder: tuple[tuple[float, float], ...] = ((3600.0, 86_400.0), (86_400.0, 2_592_000.0))
    max_blob_bytes: int | None = Field(default=None, ge=1)
    job_max_age_s: float | None = Field(default=604_800.0, gt=0.0, allow_inf_nan=False)
    job_max_count: int | None = Field(default=None, ge=1)
    # Per job name overrides of job_max_age_s / job_max_count.
    job_limits: dict[str, JobRetentionLimits] = Field(default_factory=dict)
    actor: str = Field(default="retention", min_length=1, max_length=64)

    @model_validator(mode="after")
    def _check(self) -> RetentionSettings:
        for i, (bucket, horizon) in enumerate(self.ladder):
            if not (0.0 < bucket <= horizon < float("inf")):
                raise ValueError(
                    f"ladder[{i}] = [{bucket}, {horizon}]: need 0 < bucket_s <= horizon_s "
                    "(finite seconds)"
                )
        return self


class LoggingSettings(_Group):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # `format`, not `json`: a field named json would shadow BaseModel.json.
    format: Literal["json", "console"] = "json"


class Settings(BaseSettings):
    """Every serialisable knob of the service. Build it with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    admin: AdminSettings = AdminSettings()
    training: TrainingSettings = TrainingSettings()
    model: ModelSettings = ModelSettings()
    promotion: PromotionSettings = PromotionSettings()
    jobs: JobsSettings = JobsSettings()
    retention: RetentionSettings = RetentionSettings()
    logging: LoggingSettings = LoggingSettings()
    core: CoreConfig = CoreConfig()
    models: dict[str, NamedModelSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _named_models(self) -> Settings:
        # [core] is model `bs`, which reads sigma from the vol surface: a GBM. Heston and Bates
        # are named models ([models.<name>]) whose parameters come from the snapshot.
        if self.core.process != "gbm":
            raise ValueError(
                f"core.process = {self.core.process!r}: [core] is the {ROOT_MODEL!r} model, a "
                f"gbm; serve {self.core.process} as a named model: [models.<name>] with "
                f'core.process = "{self.core.process}"'
            )
        for name in self.models:
            if not is_model_name(name):
                raise ValueError(f"models.{name}: a model name must match {MODEL_NAME_PATTERN}")
            if name == ROOT_MODEL:
                raise ValueError(f"models.{ROOT_MODEL}: {ROOT_MODEL!r} is [core] and [model]")
        known = [ROOT_MODEL, *self.models]
        if self.server.default_model not in known:
            raise ValueError(
                f"server.default_model = {self.server.default_model!r} names no model "
                f"(models: {known})"
            )
        return self

    def for_model(self, name: str) -> Settings:
        """These settings as model `name` sees them: its [core], [model] and training switch
        in place of the top-level ones (everything else shared)."""
        if name == ROOT_MODEL:
            return self
        named = self.models[name]
        training = self.training.model_copy(
            update={"enabled": self.training.enabled and named.training,
                    "cpu_share": named.cpu_share}
        )
        return self.model_copy(update={"core": named.core, "model": named.model,
                                       "training": training})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit values: files and the environment are layered by load_settings.
        return (init_settings,)


class _MappingEnvSource(EnvSettingsSource):
    """The standard env source (prefix, nesting, JSON values) over a given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = dict(environ)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self.case_sensitive:
            return dict(self._environ)
        return {k.lower(): v for k, v in self._environ.items()}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: `server.port: Input should be ... (got 'x')`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "<root>"
        got = err.get("input")
        secret = any(w in loc for w in ("token", "secret", "key_id"))
        hidden = secret or isinstance(got, Mapping) or got is None
        shown = "" if hidden else f" (got {got!r})"
        lines.append(f"{loc}: {err['msg']}{shown}")
    return "; ".join(lines)


def load_settings(
    config_file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """default.toml, then `config_file`, then `env` (os.environ when None), validated."""
    data = _read_toml(DEFAULT_TOML)
    if config_file is not None:
        data = _deep_merge(data, _read_toml(Path(config_file)))
    environ = os.environ if env is None else env
    try:
        from_env = _MappingEnvSource(Settings, environ)()
        return Settings(**_deep_merge(data, from_env))
    except ValidationError as exc:
        where = f" (files: {DEFAULT_TOML}{', ' + str(config_file) if config_file else ''}; env)"
        raise SettingsError(f"invalid settings{where}: {format_validation_error(exc)}") from None
    except ValueError as exc:  # pydantic-settings raises SettingsError(ValueError) on bad env JSON
        raise SettingsError(f"invalid settings in the environment: {exc}") from None
