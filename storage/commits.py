"""Commit training snapshots to the version chain without ever blocking or crashing training.

The training thread calls `maybe_commit(step, snapshot_fn, metrics, quality)`: a cheap due-check;
when due it takes the snapshot (on the training thread, so the state is consistent) and drops it
into a one-slot mailbox. A committer thread drains the mailbox; if a commit is still running when
the next is due, the newer snapshot replaces the waiting one (the next commit carries the newest
state). Commits run on the committer thread's own event loop, or on a given loop through
run_coroutine_threadsafe (the server's loop, where its store client lives).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import string
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from spectral_core.snapshot import Snapshot
from storage.chain import VersionChain, VersionRecord

log = logging.getLogger(__name__)

PlanKind = Literal["none", "final", "every_steps", "every_seconds"]
_KINDS = ("none", "final", "every_steps", "every_seconds")


def _check_template(template: str, what: str) -> None:
    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{what} {template!r} is not a format string: {exc}") from None


@dataclass(frozen=True)
class CommitPlan:
    """When to commit: never, only at the end, every N steps, or every T seconds (plus the end).

    every_seconds with `first`: the first commit after `first` seconds, and the interval then
    doubles until it reaches `every` (a fresh run has a version early, while it learns fast)."""

    kind: PlanKind = "every_seconds"
    every: float = 300.0
    first: float | None = None
    message: str = "step {step} loss {loss} batch {batch}"
    final_message: str = "final: step {step} loss {loss} batch {batch}"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "every_steps" and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1
        ):
            raise ValueError(f"every must be an int >= 1 for every_steps, got {self.every!r}")
        if self.kind == "every_seconds" and not self.every > 0:
            raise ValueError(f"every must be > 0 seconds for every_seconds, got {self.every!r}")
        if self.first is not None and not self.first > 0:
            raise ValueError(f"first must be > 0 seconds, got {self.first!r}")
        _check_template(self.message, "message")
        _check_template(self.final_message, "final_message")

    @classmethod
    def none(cls) -> CommitPlan:
        return cls(kind="none", every=0)

    @classmethod
    def final_only(cls, *, message: str = "final: step {step} loss {loss}") -> CommitPlan:
        return cls(kind="final", every=0, final_message=message)

    @classmethod
    def every_steps(cls, n: int, *, message: str = "step {step} loss {loss}") -> CommitPlan:
        return cls(kind="every_steps", every=n, message=message)

    @classmethod
    def every_seconds(cls, t: float, *, message: str = "step {step} loss {loss}",
                      first: float | None = None) -> CommitPlan:
        return cls(kind="every_seconds", every=t, message=message, first=first)


@dataclass
class _Job:
    snapshot: Snapshot
    message: str
    metrics: dict[str, Any]
    # Quality metrics (validation errors) are stored apart from training metrics in the record.
    quality: dict[str, Any] = field(default_factory=dict)
    future: concurrent.futures.Future[VersionRecord | None] = field(
        default_factory=concurrent.futures.Future
    )


class BackgroundCommitter:
    def __init__(
        self,
        chain: VersionChain,
        plan: CommitPlan,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.monotonic,
        close_store: bool = False,
        start_step: int = 0,
        on_result: Callable[[bool], None] | None = None,
        on_commit: Callable[[VersionRecord], None] | None = None,
        fence: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
    ) -> None:
        """`loop=None`: commits run on this committer's own thread and loop, so the chain's store
        must not be in use on another loop; `close_store=True` then closes it there at close().
        `on_result(ok)` is called on the committer thread as each commit succeeds or fails (to
        count it at once, whatever the training thread is doing). `on_commit(record)` is then
        called on the committer thread with each new record (e.g. to promote it); the next commit
        waits for it. `fence()` runs on the commit loop right before each commit: it raises to
        refuse the commit (e.g. the training lease was lost) or returns training metrics to add
        (e.g. the lease epoch)."""
        self.chain = chain
        self.plan = plan
        self._target_loop = loop
        self._clock = clock
        self._close_store = close_store
        self._on_result = on_result
        self._on_commit = on_commit
        self._fence = fence
        self._last_step = start_step
        self._last_time = clock()
        # every_seconds: the current interval (from plan.first, doubling up to plan.every)
        self._interval = plan.every if plan.first is None else min(plan.first, plan.every)
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._busy = False
        self._closing = False
        self.commits_ok = 0
        self.commits_failed = 0
        self.snapshot_failures = 0
        self.superseded = 0
        self.last_error: str | None = None
        self.last_record: VersionRecord | None = None
        self._thread = threading.Thread(target=self._run, name="spectralmc-committer", daemon=True)
        self._thread.start()

    # -- training-thread side ---------------------------------------------------------------------

    def due(self, step: int) -> bool:
        kind = self.plan.kind
        if kind == "every_steps":
            return step - self._last_step >= self.plan.every
        if kind == "every_seconds":
            return self._clock() - self._last_time >= self._interval
        return False

    def maybe_commit(
        self,
        step: int,
        snapshot_fn: Callable[[], Snapshot],
        metrics: Mapping[str, Any],
        quality: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    ) -> bool:
        """Cheap unless due; when due, snapshot now and hand it to the committer. Never raises.

        `metrics` go to the record's training metrics (and fill the message), `quality` to its
        quality metrics; a callable `quality` is called right after the snapshot, on the same
        thread, so that it describes exactly the snapshot's weights.
        """
        if not self.due(step):
            return False
        self._last_step = step
        self._last_time = self._clock()
        self._interval = min(2 * self._interval, self.plan.every)
        try:
            snapshot = snapshot_fn()
            if callable(quality):
                quality = quality()
        except Exception as exc:  # a failed snapshot must not stop training
            self.snapshot_failures += 1
            self.last_error = f"snapshot failed: {type(exc).__name__}: {exc}"
            log.exception("snapshot for commit at step %d failed", step)
            return False
        self._submit(
            _Job(
                snapshot,
                self.plan.message,
                {"step": step, **dict(metrics)},
                dict(quality or {}),
            )
        )
        return True

    def final(
        self,
        snapshot: Snapshot,
        *,
        metrics: Mapping[str, Any] | None = None,
        quality: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> VersionRecord | None:
        """Commit the end state (unless the plan is "none") and wait for it; None on failure."""
        if self.plan.kind == "none":
            return None
        job = _Job(snapshot, self.plan.final_message, dict(metrics or {}), dict(quality or {}))
        self._submit(job)
        try:
            return job.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return None

    def _submit(self, job: _Job) -> None:
        with self._cond:
            if self._closing:
                job.future.set_result(None)
                return
            if self._pending is not None:
                self.superseded += 1  # keep only the newest waiting snapshot
                self._pending.future.set_result(None)
            self._pending = job
            self._cond.notify_all()

    # -- committer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        own_loop = asyncio.new_event_loop() if self._target_loop is None else None
        try:
            while True:
                with self._cond:
                    while self._pending is None and not self._closing:
                        self._cond.wait()
                    job, self._pending = self._pending, None
                    if job is None:
                        return
                    self._busy = True
                try:
                    record = self._execute(self._commit(job), own_loop)
                except Exception as exc:  # counted and logged; training goes on
                    with self._cond:
                        self.commits_failed += 1
                        self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("background commit failed: %s", exc)
                    self._report(False)
                    job.future.set_result(None)
                else:
                    with self._cond:
                        self.commits_ok += 1
                        self.last_record = record
                    self._report(True)
                    self._committed(record)
                    job.future.set_result(record)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            if own_loop is not None:
                if self._close_store:
                    try:
                        own_loop.run_until_complete(self.chain.store.aclose())
                    except Exception as exc:
                        log.warning("closing the store failed: %s", exc)
                own_loop.run_until_complete(own_loop.shutdown_asyncgens())
                own_loop.close()

    def _report(self, ok: bool) -> None:
        if self._on_result is not None:
            try:
                self._on_result(ok)
            except Exception:  # a broken callback must not stop the committer
                log.exception("commit result callback failed")

    async def _commit(self, job: _Job) -> VersionRecord:
        metrics = job.metrics
        if self._fence is not None:
            metrics = {**metrics, **(await self._fence())}
        return await self.chain.commit(
            job.snapshot, message=job.message, metrics=metrics, quality=job.quality
        )

    def _committed(self, record: VersionRecord) -> None:
        if self._on_commit is not None:
            try:
                self._on_commit(record)
            except Exception:  # the version is committed whatever its follow-up does
                log.exception("commit callback failed for version %d", record.counter)

    def _execute(
        self,
        coro: Coroutine[Any, Any, VersionRecord],
        own_loop: asyncio.AbstractEventLoop | None,
    ) -> VersionRecord:
        if own_loop is not None:
            return own_loop.run_until_complete(coro)
        assert self._target_loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._target_loop).result()

    def idle(self) -> bool:
        with self._cond:
            return self._pending is None and not self._busy

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running (for tests and shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float | None = None) -> None:
        """Let the pending commit finish, then stop the committer thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "commits_ok": self.commits_ok,
                "commits_failed": self.commits_failed,
                "snapshot_failures": self.snapshot_failures,
                "superseded": self.superseded,
                "last_error": self.last_error,
                "last_counter": self.last_record.counter if self.last_record else None,
            }
