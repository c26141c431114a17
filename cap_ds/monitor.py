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
