"""The training worker: continuous training in its own thread, resumed from the chain's HEAD.

The event loop never runs training code. The worker thread owns the `Trainer`; commits are handed
to a `BackgroundCommitter` that runs them on the server's loop (where the store client lives), so
a slow or dead store never blocks or crashes training. Admin control (pause, resume, commit now)
and status reads are thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from config.settings import Settings
from server.metrics import ModelMetrics
from spectral_core.config import CoreConfig
from spectral_core.snapshot import Snapshot
from spectral_core.trainer import StepMetrics, Trainer, ValidationMetrics
from storage.chain import VersionChain, VersionRecord
from storage.commits import BackgroundCommitter, CommitPlan
from storage.lease import LeaseLost, TrainingLease
from storage.objectstore import Corrupt, NotFound, Unavailable
from storage.promotion import Promoter
from storage.tasks import cancel_and_wait
from storage.tensorboard import ScalarWriter

log = structlog.get_logger(__name__)

# How many damaged versions below HEAD resuming may step over before it gives up.
_MAX_RESUME_SKIPS = 16
# Longest wait between tries to reach the store at start-up.
_MAX_START_RETRY_S = 10.0

# TensorBoard tags of the hooks other components call (see TrainingWorker.record_scalars). The
# validation tags are `quality/val_*`, the names of the version records' quality metrics, so live
# scalars and `spectralmc store tensorboard-log` of the chain line up in one TensorBoard.
TB_ERROR_OVER_FLOOR = "quality/error_over_floor"
TB_PROMOTED_VERSION = "serving/promoted_version"

# standby: another server holds the chain's training lease; this one serves and waits for it.
State = Literal["starting", "standby", "running", "paused", "finished", "stopped", "error"]


class ConfigMismatch(RuntimeError):
    """The chain's HEAD was trained with a different config than the settings name."""


@dataclass
class _CommitRequest:
    actor: str
    # the snapshot and the quality report of exactly its weights
    future: concurrent.futures.Future[tuple[Snapshot, dict[str, Any]]]


def _finite_or_none(x: float) -> float | None:
    """A finite float as is, NaN/inf as None: records and status are strict JSON."""
    f = float(x)
    return f if math.isfinite(f) else None


def _finite_json(value: Any) -> Any:
    """`value` with every NaN/inf float (at any depth of dicts and lists) replaced by None."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def committable_snapshot(trainer: Trainer) -> Snapshot:
    """The trainer's snapshot with strict-JSON meta: a diverged run (NaN validation in the meta)
    must still commit, and checkpoints refuse non-finite metadata."""
    snap = trainer.snapshot()
    return Snapshot(tensors=snap.tensors, meta=_finite_json(snap.meta))


def commit_plan(settings: Settings) -> CommitPlan:
    c = settings.training.commit
    if c.kind == "never":
        return CommitPlan.none()
    if c.kind == "every_steps":
        return CommitPlan(kind="every_steps", every=c.every_steps, message=c.message_template)
    return CommitPlan(kind="every_seconds", every=c.every_seconds, message=c.message_template,
                      first=c.first_after_s)


def training_config(settings: Settings) -> CoreConfig:
    """The numerical config with the training device from settings applied."""
    return settings.core.model_copy(update={"device": settings.training.device})


class DutyCycle:
    """Keeps a loop's busy share at `share` of the wall clock: `rest_s()` after a busy spell of
    t seconds (since the last `mark()`) is t (1 - share) / share."""

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (0.0 < share <= 1.0):
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.share = share
        self.clock = clock
        self._since: float | None = None

    def rest_s(self) -> float:
        if self._since is None or self.share >= 1.0:
            return 0.0
        busy = max(self.clock() - self._since, 0.0)
        return busy * (1.0 - self.share) / self.share

    def mark(self) -> None:
        self._since = self.clock()


class TrainingWorker:
    def __init__(
        self,
        settings: Settings,
        chain: VersionChain,
        metrics: ModelMetrics,
        *,
        promoter: Promoter | None = None,
    ) -> None:
        """`promoter`: each committed version goes through its quality gate (None: no serving
        ref is moved by this worker)."""
        self.settings = settings
        self.promoter = promoter
        self.chain = chain
        self.metrics = metrics
        self.config = training_config(settings)
        self.state: State = "starting"
        self.error: str | None = None
        self.started_at: float | None = None
        self.resumed_from: int | None = None
        self.last_step: StepMetrics | None = None
        self.last_validation: ValidationMetrics | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._requests: list[_CommitRequest] = []
        self._thread: threading.Thread | None = None
        self._committer: BackgroundCommitter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starter: asyncio.Task[None] | None = None
        # One trainer per chain (storage/lease.py): the lease is taken before training starts,
        # renewed every third of its TTL, and checked before every commit (the fence).
        self.lease = TrainingLease(chain, ttl_s=settings.training.lease_ttl_s)
        self._lease_task: asyncio.Task[None] | None = None
        self._lease_lost = threading.Event()
        # live TensorBoard scalars ([training] tensorboard_dir); opened by the training thread
        self._tb: ScalarWriter | None = None
        self._tb_window: list[StepMetrics] = []

    # ------------------------------------------------------------------ lifecycle (event loop side)
    async def start(self) -> None:
        """Take the training lease, read HEAD (to resume from it) and start the training thread.
        While the store is unreachable or another server holds the lease, keep trying in the
        background ("starting" or "standby" until then)."""
        self._loop = asyncio.get_running_loop()
        if not await self._try_start():
            self._starter = asyncio.create_task(self._start_later(), name="resume")

    async def _try_start(self) -> bool:
        """One attempt; True when it is settled (training launched, or failed for good)."""
        try:
            epoch = await self.lease.acquire()
            if epoch is None:
                if self.state != "standby":
                    state, _ = await self.lease.read()
                    log.info("another server trains this chain; standing by",
                             holder=None if state is None else state.holder)
                self.state, self.error = "standby", None
                return False
            found = await self._resume_point()
        except Unavailable as exc:
            # Resuming needs the chain's HEAD, and training from scratch meanwhile would throw
            # the stored progress away: wait for the store.
            if self.error is None:
                log.warning("store unavailable at start; training waits for it", error=str(exc))
            self.error = f"waiting for the store: {exc}"
            return False
        except Exception as exc:
            self._fail(exc)
            return True
        self.error = None
        self._launch(found)
        self._lease_task = asyncio.create_task(self._keep_lease(), name="training-lease")
        return True

    async def _start_later(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            # a standby server polls about three times per lease TTL, so it takes over promptly
            wait = self.settings.training.lease_ttl_s / 3 if self.state == "standby" else delay
            await asyncio.sleep(wait)
            delay = min(2 * delay, _MAX_START_RETRY_S)
            if await self._try_start():
                return

    async def _keep_lease(self) -> None:
        """Renew the lease; when it is lost, stop training (no commit) and stand by again."""
        period = self.settings.training.lease_ttl_s / 3
        while not self._stop.is_set():
            await asyncio.sleep(period)
            thread = self._thread
            if self.state in ("finished", "error") and (thread is None or not thread.is_alive()):
                # the budget is spent (or training failed), the final commit made: let a
                # standby server go on
                await self.lease.release()
                return
            try:
                await self.lease.renew()
            except LeaseLost as exc:
                log.error("training lease lost; training stops and this server stands by",
                          error=str(exc))
                break
            except Exception as exc:  # transient: the fence stops commits if it expires
                log.warning("training lease renewal failed", error=f"{type(exc).__name__}: {exc}")
        else:
            return
        self._lease_lost.set()
        self._running.set()  # wake a paused loop so that it sees the loss
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._committer is not None:
            await asyncio.to_thread(self._committer.close)
        self._lease_lost.clear()
        self.state = "standby"
        self._starter = asyncio.create_task(self._start_later(), name="resume")

    async def _fence(self) -> dict[str, Any]:
        """Before each commit: still the leaseholder? The epoch goes into the record."""
        return {"lease_epoch": await self.lease.check()}

    def _launch(self, found: tuple[int, Snapshot] | None) -> None:
        """Start the committer and the training thread from `found` (None: from scratch)."""
        snapshot: Snapshot | None = None
        if found is not None:
            self.resumed_from, snapshot = found
        self._committer = BackgroundCommitter(
            self.chain,
            commit_plan(self.settings),
            loop=self._loop,
            start_step=0 if snapshot is None else int(snapshot.meta["global_step"]),
            # Counted as each commit ends: a paused or finished loop still reports them.
            on_result=self._count_commit,
            on_commit=self._promote_from_thread,
            fence=self._fence,
        )
        self._thread = threading.Thread(
            target=self._run, args=(snapshot,), name="spectralmc-training", daemon=True
        )
        self._thread.start()

    async def _resume_point(self) -> tuple[int, Snapshot] | None:
        """The newest version to resume from: HEAD, or, when HEAD's blob is damaged (bit rot, a
        lost object), the newest older version whose blob loads, so that a damaged blob stops
        nothing; `verify` still names the damaged version. None on an empty chain."""
        record = await self.chain.head()
        skipped: list[str] = []
        while record is not None:
            if record.config_fingerprint not in (None, self.config.fingerprint()):
                raise ConfigMismatch(
                    f"chain version {record.counter} was trained with config "
                    f"{record.config_fingerprint}, settings give {self.config.fingerprint()}; "
                    "the stored config wins: use the matching [core] settings or a new store"
                )
            try:
                snapshot = await self.chain.load_record(record)
            except (Corrupt, NotFound) as exc:
                skipped.append(f"version {record.counter}: {exc}")
                log.error("cannot resume from version", counter=record.counter, error=str(exc))
                if record.counter == 1 or len(skipped) >= _MAX_RESUME_SKIPS:
                    raise Corrupt(
                        f"no loadable version to resume from: {'; '.join(skipped)}"
                    ) from None
                record = await self.chain.get(record.counter - 1)
                continue
            if skipped:
                log.warning(
                    "resuming past damaged versions", counter=record.counter, skipped=skipped
                )
            return record.counter, snapshot
        return None

    async def stop(self) -> None:
        """Stop training after the current step, make the final commit, wait for it."""
        self._stop.set()
        self._running.set()
        starter, self._starter = self._starter, None
        if starter is not None and not starter.done():
            await cancel_and_wait(starter)
        lease_task, self._lease_task = self._lease_task, None
        if lease_task is not None and not lease_task.done():
            await cancel_and_wait(lease_task)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._committer is not None:
            committer = self._committer
            await asyncio.to_thread(committer.close)
        if self._tb is not None:
            await asyncio.to_thread(self._tb.close)
        await self.lease.release()  # a standby server takes over at once
        if self.state not in ("error", "finished"):
            self.state = "stopped"

    # ------------------------------------------------------------------ admin
    def pause(self) -> None:
        self._running.clear()
        if self.state == "running":
            self.state = "paused"

    def resume(self) -> None:
        self._running.set()
        if self.state == "paused":
            self.state = "running"

    async def commit_now(self, *, actor: str, timeout: float = 60.0) -> VersionRecord:
        """Snapshot at the next step boundary and commit it (awaits the commit)."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"training is not running (state {self.state})")
        fut: concurrent.futures.Future[tuple[Snapshot, dict[str, Any]]] = (
            concurrent.futures.Future()
        )
        with self._lock:
            self._requests.append(_CommitRequest(actor, fut))
        snapshot, quality = await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        step = snapshot.meta["global_step"]
        try:
            record = await self.chain.commit(
                snapshot,
                message=f"manual commit by {actor} at step {step}",
                metrics={**self._training_metrics(), **(await self._fence())},
                quality=quality,
            )
        except Exception:
            self._count_commit(False)
            raise
        self._count_commit(True)
        await self._promote(record)
        return record

    # ------------------------------------------------------------------ promotion
    async def _promote(self, record: VersionRecord) -> None:
        """The quality gate on a new version; its failure is logged, never the commit's."""
        if self.promoter is None:
            return
        try:
            decision = await self.promoter.consider(record)
        except Exception as exc:
            log.error("promotion decision failed; the serving ref stays",
                      counter=record.counter, error=f"{type(exc).__name__}: {exc}")
            return
        if decision.promote:
            self.record_promotion(record.counter)

    def _promote_from_thread(self, record: VersionRecord) -> None:
        """Committer thread: run the gate on the server loop and wait for it (one at a time)."""
        loop = self._loop
        if self.promoter is None or loop is None or loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(self._promote(record), loop)
        try:
            fut.result(timeout=self.settings.server.shutdown_timeout_s or None)
        except concurrent.futures.TimeoutError:
            log.error("promotion decision timed out", counter=record.counter)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        s, v = self.last_step, self.last_validation
        c = self._committer
        stats = c.stats() if c is not None else {}
        last = c.last_record if c is not None else None
        return {
            "state": self.state,
            "error": self.error,
            "device": self.config.device,
            "config_fingerprint": self.config.fingerprint(),
            "resumed_from": self.resumed_from,
            "step": None if s is None else s.step,
            # JSON has no NaN/inf: a diverged loss reads as null, never as invalid JSON.
            "loss": None if s is None else _finite_or_none(s.loss),
            "lr": None if s is None else _finite_or_none(s.lr),
            "samples_per_s": None if s is None else _finite_or_none(s.samples_per_s),
            "steps_per_s": None if s is None else _finite_or_none(s.steps_per_s),
            "validation": None
            if v is None
            else {k: _finite_or_none(x) for k, x in v.as_dict().items()},
            "last_commit": None
            if last is None
            else {
                "counter": last.counter,
                "version_hash": last.version_hash,
                "created_at": last.created_at,
            },
            "last_commit_error": None if c is None else c.last_error,
            # this server's training lease: epoch None while another server holds it
            "lease": {"holder": self.lease.holder, "epoch": self.lease.epoch},
            "commits_ok": stats.get("commits_ok", 0),
            "commits_failed": stats.get("commits_failed", 0),
        }

    # ------------------------------------------------------------------ training thread
    def _fail(self, exc: BaseException) -> None:
        self.state = "error"
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("training worker failed", error=self.error)

    def _training_metrics(self) -> dict[str, Any]:
        """The record's training metrics (they also fill the commit message)."""
        s = self.last_step
        if s is None:
            return {}
        return {
            "step": s.step,
            "loss": _finite_or_none(s.loss),
            "batch": self.config.train.batch_contracts,
            "lr": _finite_or_none(s.lr),
        }

    def _quality_metrics(self, trainer: Trainer) -> dict[str, Any]:
        """The record's quality metrics: the report of the trainer's current weights (held-out
        error, validity, noise floor; spectral_core/quality.py), which the promotion gate
        reads, and the latest validation (its val_loss drives training; it may be up to
        `validation_every` steps older than the weights)."""
        report = trainer.quality()
        self.record_error_over_floor(report.error_over_floor, step=report.step)
        out = report.as_dict()
        v = self.last_validation
        if v is not None:
            out.update({
                "val_step": v.step,
                "val_loss": _finite_or_none(v.val_loss),
                "val_mean_abs_bp": _finite_or_none(v.mean_abs_bp),
                "val_max_abs_bp": _finite_or_none(v.max_abs_bp),
            })
        return out

    def _on_validation(self, v: ValidationMetrics) -> None:
        self.last_validation = v
        self.metrics.training_validation_error.set(v.mean_abs_bp)
        # every held-out field, named like the records' quality metrics (val_loss, val_mean_...)
        self._tb_write(v.step, {
            f"quality/{k if k.startswith('val_') else 'val_' + k}": x
            for k, x in v.as_dict().items()
            if k != "step"
        })

    # ------------------------------------------------------------------ TensorBoard
    @property
    def tensorboard(self) -> ScalarWriter | None:
        """The live scalar writer (None: off, not opened yet, or failed)."""
        return self._tb

    def record_scalars(
        self, values: Mapping[str, float | None], *, step: int | None = None
    ) -> None:
        """Hook for other components (promotion, quality checks): write `values` (tag -> value,
        None skipped) to the live TensorBoard at `step` (default: the last training step).
        Thread-safe; a no-op when TensorBoard is off or closed."""
        if step is None:
            step = 0 if self.last_step is None else self.last_step.step
        self._tb_write(step, values)

    def record_error_over_floor(self, ratio: float, *, step: int | None = None) -> None:
        """Held-out error over the MC noise floor of the current weights."""
        self.record_scalars({TB_ERROR_OVER_FLOOR: ratio}, step=step)

    def record_promotion(self, counter: int, *, step: int | None = None) -> None:
        """The serving ref moved to version `counter`."""
        self.record_scalars({TB_PROMOTED_VERSION: float(counter)}, step=step)

    def _open_tensorboard(self) -> None:
        directory = self.settings.training.tensorboard_dir
        if directory is None or self._tb is not None:
            return
        try:
            self._tb = ScalarWriter(directory)
        except Exception as exc:  # a diagnostics sink never stops training
            log.error("cannot open the TensorBoard directory; training goes on without it",
                      directory=str(directory), error=f"{type(exc).__name__}: {exc}")
            return
        log.info("writing TensorBoard scalars", directory=str(directory))

    def _tb_write(self, step: int, values: Mapping[str, float | None]) -> None:
        tb = self._tb
        if tb is None:
            return
        try:
            tb.scalars(step, values)
        except Exception as exc:  # e.g. disk full: log once, turn live scalars off
            log.error("TensorBoard write failed; live scalars are off",
                      error=f"{type(exc).__name__}: {exc}")
            self._tb = None
            with contextlib.suppress(Exception):
                tb.close()

    def _tb_step(self, m: StepMetrics) -> None:
        """Collect the step; every `tensorboard_every_steps` steps write the window's means."""
        if self._tb is None:
            return
        self._tb_window.append(m)
        if m.step % self.settings.training.tensorboard_every_steps == 0:
            self._tb_flush_window()

    def _tb_flush_window(self) -> None:
        window, self._tb_window = self._tb_window, []
        if not window:
            return
        n, last = len(window), window[-1]
        self._tb_write(last.step, {
            "train/loss": math.fsum(w.loss for w in window) / n,
            "train/grad_norm": math.fsum(w.grad_norm for w in window) / n,
            "train/lr": last.lr,
            # every step of a run draws the same samples: throughput = harmonic mean
            "train/samples_per_s": n / math.fsum(1.0 / w.samples_per_s for w in window),
            "train/steps_per_s": n / math.fsum(1.0 / w.steps_per_s for w in window),
        })

    def _run(self, snapshot: Snapshot | None) -> None:
        try:
            trainer = Trainer(self.config) if snapshot is None else Trainer.restore(
                snapshot, device=self.config.device, process=self.config.process
            )
        except Exception as exc:
            self._fail(exc)
            return
        assert self._committer is not None
        committer = self._committer
        self.started_at = time.monotonic()
        first_step = trainer.global_step
        self.state = "running" if self._running.is_set() else "paused"
        self._open_tensorboard()

        duty = DutyCycle(self.settings.training.cpu_share)

        def should_continue() -> bool:
            """Between steps: rest for the CPU share, serve commit requests, wait while paused,
            stop or lose the lease."""
            rest = duty.rest_s()
            if rest > 0.0:
                self._stop.wait(rest)  # a stop ends the rest at once
            try:
                return _between_steps()
            finally:
                duty.mark()

        def _between_steps() -> bool:
            while True:
                if self._stop.is_set() or self._lease_lost.is_set():
                    return False
                self._serve_requests(trainer)
                if self._running.wait(timeout=0.2):
                    return not (self._stop.is_set() or self._lease_lost.is_set())

        def on_step(m: StepMetrics) -> None:
            self.last_step = m
            self.metrics.training_step.set(m.step)
            self.metrics.training_loss.set(m.loss if math.isfinite(m.loss) else float("nan"))
            self.metrics.training_samples_per_second.set(m.samples_per_s)
            self._tb_step(m)
            committer.maybe_commit(
                trainer.global_step,
                lambda: committable_snapshot(trainer),
                self._training_metrics(),
                quality=lambda: self._quality_metrics(trainer),
            )

        try:
            # the Trainer's own loop: budgets, validation cadence, divergence guard; a service
            # trains on past early stopping
            trainer.train(
                steps=self.settings.training.max_steps,
                seconds=self.settings.training.max_seconds,
                on_step=on_step,
                on_validation=self._on_validation,
                should_continue=should_continue,
                early_stopping=False,
            )
            if self._lease_lost.is_set():
                # another server trains the chain now: no final commit, stand by
                self._cancel_requests()
                return
            if not self._stop.is_set():
                self.state = "finished"
            # Final commit of the end state, then wait for it (runs on the server loop).
            self._serve_requests(trainer)
            if trainer.global_step > first_step and committer.plan.kind != "none":
                committer.final(
                    committable_snapshot(trainer),
                    metrics=self._training_metrics(),
                    quality=self._quality_metrics(trainer),
                    timeout=self.settings.server.shutdown_timeout_s,
                )
        except Exception as exc:
            self._fail(exc)
        finally:
            trainer.close()
            self._cancel_requests()
            # the steps since the last point, then to disk (stop() closes the writer)
            self._tb_flush_window()
            tb = self._tb
            if tb is not None:
                try:
                    tb.flush()
                except Exception as exc:
                    log.error("TensorBoard flush failed", error=f"{type(exc).__name__}: {exc}")

    def _count_commit(self, ok: bool) -> None:
        self.metrics.commits.labels(result="ok" if ok else "error").inc()

    def _serve_requests(self, trainer: Trainer) -> None:
        with self._lock:
            reqs, self._requests = self._requests, []
        for r in reqs:
            try:
                snapshot = committable_snapshot(trainer)
                r.future.set_result((snapshot, self._quality_metrics(trainer)))
            except Exception as exc:
                r.future.set_exception(exc)

    def _cancel_requests(self) -> None:
        with self._lock:
            reqs, self._requests = self._requests, []
        for r in reqs:
            r.future.set_exception(RuntimeError("training stopped"))
