"""Observability: scalars through DeepSpeed's monitor (TensorBoard/CSV/W&B as configured), log lines for long
passes, and the run log (history, diagnostics, timing) that ends in metrics.json."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cap_ds.runtime.steptimer import StepTimer

logger = logging.getLogger(__name__)


def configure_logging(is_rank0: bool, disable_tqdm: bool) -> bool:
    """Log lines from rank 0 (warnings from the others); returns whether to show progress bars: not in a
    redirected log, where they become escape-code noise. Progress is logged either way: the trainer's line every
    ``--logging_steps`` (:func:`progress_line`) and ``PassReport`` lines for the long passes."""
    import transformers

    logging.basicConfig(level=logging.INFO if is_rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning() if is_rank0 else transformers.logging.set_verbosity_error()
    show_progress = not disable_tqdm and sys.stderr.isatty()
    if not show_progress:
        import datasets

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return show_progress


# Loss terms in the progress line, in this order, under these names (those the run has).
PROGRESS_TERMS = {"ce": "ce", "kd": "kd", "prc": "prc", "snc": "snc", "fic": "fic", "regularizer": "reg"}


def progress_line(step: int, total: int, values: dict[str, float], eta_s: float | None) -> str:
    """One plain line for a logging step, readable in a redirected log (what a cluster job's output shows):
    ``step 40/900 | loss 0.412 (ce 0.2 kd 0.11 prc 0.05) | sparsity 0.620 | lr 8.1e-05 | 31.2 ex/s | ETA 6m12s``.
    ``values`` are the logged scalars (``loss``, the terms, ``lr``, ``examples_per_second``, ``sparsity`` when
    pruning); missing ones are left out."""
    parts = [f"step {step}/{total}"]
    if "loss" in values:
        terms = " ".join(f"{name} {values[key]:.3g}" for key, name in PROGRESS_TERMS.items() if key in values)
        parts.append(f"loss {values['loss']:.4g}" + (f" ({terms})" if terms else ""))
    if "sparsity" in values:
        parts.append(f"sparsity {values['sparsity']:.3f}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2g}")
    if "examples_per_second" in values:
        parts.append(f"{values['examples_per_second']:.1f} ex/s")
    if eta_s is not None:
        parts.append(f"ETA {clock(eta_s)}")
    return " | ".join(parts)


def clock(seconds: float) -> str:
    """``45s``, ``6m12s``, ``2h05m``: an ETA at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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


@dataclass
class RunLog:
    """What a run records as it goes, apart from its settings: the logged training rows, the gradient
    diagnostics, and the time and examples its optimizer steps and snapshots took. Saved in every checkpoint (a
    resumed run reports the whole run) and read into metrics.json."""

    history: list[dict[str, Any]] = field(default_factory=list)
    grad_history: list[dict[str, Any]] = field(default_factory=list)
    examples_seen: int = 0
    train_time: float = 0.0  # optimizer steps only (forward, losses, backward, step)
    snapshot_time: float = 0.0  # SnC encode passes (epoch, step and CAP-f stage snapshots), reported apart
    step_timer: StepTimer = field(default_factory=StepTimer)  # per-step times: steady-state median step time

    @property
    def timed_steps(self) -> int:
        """Optimizer steps timed so far (the step timer's count; kept in checkpoints for readers)."""
        return self.step_timer.steps

    @property
    def timed_examples(self) -> int:
        """Examples of the timed optimizer steps."""
        return self.step_timer.examples

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "grad_history": self.grad_history, "examples_seen": self.examples_seen,
                "train_time": self.train_time, "timed_examples": self.timed_examples,
                "timed_steps": self.timed_steps, "snapshot_time": self.snapshot_time,
                "step_timer": self.step_timer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Throughput and step time cover every step of the run, before and after the resume (a checkpoint
        # written before cap_ds saved the timing: only this process's steps).
        self.history[:] = state["history"]
        self.grad_history[:] = state.get("grad_history", [])
        self.examples_seen = state["examples_seen"]
        self.train_time = float(state.get("train_time", 0.0))
        self.snapshot_time = float(state.get("snapshot_time", 0.0))
        self.step_timer.load_state_dict(state.get("step_timer"))
