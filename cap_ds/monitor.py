"""Observability: scalars through DeepSpeed's monitor (TensorBoard/CSV/W&B as configured) and tqdm on rank 0."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class ScalarLogger:
    """Writes ``Train/<tag>`` / ``Eval/<tag>`` scalars with the engine's monitor (rank 0 only)."""

    def __init__(self, engine, is_rank0: bool) -> None:
        self.monitor = getattr(engine, "monitor", None)
        self.enabled = bool(self.monitor is not None and self.monitor.enabled and is_rank0)

    def log(self, prefix: str, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.monitor.write_events([(f"{prefix}/{k}", float(v), step) for k, v in scalars.items()])

    def flush(self) -> None:
        if not self.enabled:
            return
        summary = getattr(getattr(self.monitor, "tb_monitor", None), "summary_writer", None)
        if summary is not None:
            summary.flush()


class PassReport:
    """Log lines for a long pass over data (bank encodes, snapshots, importance): the row count when it starts,
    an estimate of its duration once the first batches are timed, then a progress line every few minutes. What
    a redirected log shows instead of progress bars (rank 0 only: ``enabled``)."""

    def __init__(self, desc: str, rows: int, enabled: bool = True, estimate_after_s: float = 10.0,
                 every_s: float = 300.0) -> None:
        import time

        self.desc, self.rows, self.enabled = desc, rows, enabled
        self.estimate_after_s, self.every_s = estimate_after_s, every_s
        self.clock = time.perf_counter
        self.t0 = self.clock()
        self.done = 0
        self.next_log = self.t0 + estimate_after_s
        if enabled:
            logger.info("%s: %s rows on this rank", desc, f"{rows:,}")

    def update(self, rows: int) -> None:
        self.done += rows
        if not self.enabled:
            return
        now = self.clock()
        if now < self.next_log or self.done >= self.rows:
            return
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.rows - self.done) / max(rate, 1e-9)
        logger.info("%s: %s of %s rows in %.0f s (%.0f rows/s), about %s left", self.desc, f"{self.done:,}",
                    f"{self.rows:,}", now - self.t0, rate, _duration(left))
        self.next_log = now + self.every_s


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
