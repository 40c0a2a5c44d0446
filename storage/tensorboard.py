"""TensorBoard scalars through TensorBoard's own writer (`torch.utils.tensorboard.SummaryWriter`).

One small wrapper for the two writers of the project: the training worker's live scalars
(`[training] tensorboard_dir`) and `spectralmc store tensorboard-log` (per-version scalars of a
chain). Both write standard event files (`events.out.tfevents.*`) that `tensorboard --logdir DIR`
and TensorBoard's `EventAccumulator` read. Tags are `group/name` (`train/loss`, `quality/...`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any


class ScalarWriter:
    """Scalars into one new event file under `logdir` (created if missing).

    Thread-safe: the training thread writes steps while the event loop may write a promotion.
    Writes after `close()` are ignored, so a late hook never fails. The SummaryWriter flushes its
    queue every `flush_secs` in the background, and on `flush()` and `close()`.
    """

    def __init__(self, logdir: str | Path, *, flush_secs: float = 10.0, max_queue: int = 100):
        # Imported here: the service imports this module, TensorBoard loads only when enabled.
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._writer: Any = SummaryWriter(
            log_dir=str(self.logdir), flush_secs=flush_secs, max_queue=max_queue
        )
        self._path = self._event_file()

    def _event_file(self) -> Path | None:
        # The event file's name is not public API: read it where this version keeps it.
        event_writer = getattr(self._writer.file_writer, "event_writer", None)
        name = getattr(event_writer, "_file_name", None)
        return None if name is None else Path(name)

    @property
    def path(self) -> Path | None:
        """The event file written (None if this TensorBoard version hides its name)."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._writer is None

    def scalars(
        self, step: int, values: Mapping[str, Any], *, walltime: float | None = None
    ) -> int:
        """Write each numeric value of `values` as scalar `tag` at `step`; returns how many.

        None, bools and non-numbers are skipped (a metric that does not exist yet); NaN and inf
        are written as they are (a diverged loss is worth seeing).
        """
        n = 0
        with self._lock:
            if self._writer is None:
                return 0
            for tag, value in values.items():
                if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self._writer.add_scalar(tag, float(value), int(step), walltime=walltime)
                n += 1
        return n

    def flush(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; idempotent."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def finite_scalars(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """`{prefix/name: value}` for the finite numeric entries of `metrics`, sorted by name."""
    out: dict[str, float] = {}
    for name, value in sorted(metrics.items()):
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and math.isfinite(float(value)):
            out[f"{prefix}/{name}"] = float(value)
    return out


__all__ = ["ScalarWriter", "finite_scalars"]
