"""The CAP training loop: one optimizer step per accumulation boundary on a DeepSpeed engine, and its cadence
(log, eval, snapshot, save, stop).

The trainer is built complete: the loss (CE + KD + CAP + regulariser, ``losses.py``), the pruning schedule,
the SnC snapshots (``encode.py``), the callbacks (e.g. ``diagnostics.py``), the checkpointer and the resume
state all come in through the constructor. It calls concepts; none of them imports the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cap_ds.cap import Shard
from cap_ds.compression import PruningSchedule
from cap_ds.data.scoring import Scorer
from cap_ds.runtime.collectives import world_size
from cap_ds.runtime.errors import TrainingFailed
from cap_ds.runtime.monitor import RunLog, ScalarLogger, progress_line
from cap_ds.runtime.rng import rng_state, set_rng_state
from cap_ds.runtime.signals import StopRequested, StopSignals
from cap_ds.runtime.transfer import to_device
from cap_ds.training.agreement import StepAgreement
from cap_ds.training.checkpoint import Checkpointer
from cap_ds.training.encode import Snapshots, evaluate
from cap_ds.training.losses import TrainingLoss, read_terms

__all__ = ["CapTrainer", "LoopParts", "LoopSettings", "StepCallback", "TrainingEvents", "TrainingFailed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's cadence; fixed for the run (what it records goes to a ``RunLog``)."""

    total_steps: int
    num_epochs: int
    snapshot_steps: int = 0  # SnC every N steps (0: at every epoch start from epoch 1, if snapshot_epochs)
    snapshot_epochs: bool = True  # epoch-start snapshots when snapshot_steps is 0 (CAP-f snapshots per stage)
    snapshot_mode: str = "train"
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 0
    log_sparsity: bool = False
    show_progress: bool = True
    max_nonfinite_steps: int = 10  # consecutive NaN/inf-loss or skipped steps tolerated before failing
    check_steps: int = 10  # read the agreed stop / non-finite state every N steps (and at every other sync point)
    is_rank0: bool = True  # logs, progress bar and checkpoint messages


class StepCallback(Protocol):
    """Work outside the step (diagnostics) before an optimizer step's first micro-batch; not timed as training."""

    def before_step(self, batch: dict[str, torch.Tensor], step: int) -> None: ...


class TrainingEvents(Protocol):
    """What the loop tells its caller as it happens (the entry point records how a failed run ended)."""

    def on_train_begin(self, step: int) -> None: ...

    def on_step_end(self, step: int) -> None: ...


@dataclass(frozen=True)
class LoopParts:
    """What the loop drives besides the engine and the loss; each optional (a fine-tuning run has none of the
    pruning parts). ``shard``: the CAP encode pool saved with checkpoints; ``teacher_metrics``: saved too."""

    shard: Shard | None = None
    schedule: PruningSchedule | None = None
    snapshots: Snapshots | None = None
    checkpointer: Checkpointer | None = None
    stop: StopSignals | None = None
    callbacks: Sequence[StepCallback] = ()
    events: Sequence[TrainingEvents] = ()
    teacher_metrics: dict[str, float] | None = None


class CapTrainer:
    """Runs the loop on an initialised DeepSpeed engine. ``loaders.train``'s sampler is a ``ShardSampler``
    (``set_epoch`` and ``start_index`` place a resumed run); ``loaders.evaluate`` is the evaluation loader. A
    resumed run loads a checkpoint's trainer state with ``load_state_dict`` before ``train``."""

    def __init__(self, *, engine, scorer: Scorer, loaders, settings: LoopSettings, loss: TrainingLoss,
                 log: RunLog, scalars: ScalarLogger, parts: LoopParts = LoopParts()) -> None:
        self.engine, self.model, self.task, self.scorer = engine, engine.module, scorer.task, scorer
        self.train_loader, self.eval_loader = loaders.train, loaders.evaluate
        self.s, self.loss, self.log, self.scalars = settings, loss, log, scalars
        self.shard, self.schedule, self.snapshots = parts.shard, parts.schedule, parts.snapshots
        self.callbacks, self.events = tuple(parts.callbacks), tuple(parts.events)
        self.teacher_metrics = parts.teacher_metrics
        self.checkpointer = parts.checkpointer
        self.stop = parts.stop if parts.stop is not None else StopSignals()
        self.is_rank0 = settings.is_rank0
        self.last_eval_logits: np.ndarray | None = None
        self.preempted = False
        # Loop position (restored on resume): micro-batches consumed in the current epoch.
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.snapshot_epoch = 0
        self.pending_snapshot = False  # a step snapshot a stop interrupted: taken first on resume
        self.nonfinite_run = 0  # consecutive optimizer steps with a non-finite loss or skipped by DeepSpeed
        self._progress_mark: tuple[float, int] | None = None  # (time, step) of the last progress line (ETA)
        self.agreement = StepAgreement(self.device, self.nonfinite_run)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, float]:
        """Train to ``total_steps`` (or a stop request: checkpoint, ``preempted``); returns the last eval."""
        engine, s = self.engine, self.s
        engine.train()
        sampler = self.train_loader.sampler
        progress = tqdm(total=s.total_steps, initial=self.global_step, desc="train",
                        disable=not (s.show_progress and self.is_rank0))
        window_t0, window_examples = time.perf_counter(), 0
        last_eval: dict[str, float] = {}
        start_epoch, skip = self.epoch, self.batch_in_epoch
        for listener in self.events:
            listener.on_train_begin(self.global_step)
        if self.pending_snapshot:  # a resumed run whose last step's snapshot was interrupted
            try:
                self._snapshot()
            except StopRequested:
                return self._preempt(progress, last_eval)
            self.pending_snapshot = False
        for epoch in range(start_epoch, s.num_epochs):
            if self.global_step >= s.total_steps:
                break
            self.epoch = epoch
            self.batch_in_epoch = skip if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.start_index = self.batch_in_epoch * self.train_loader.batch_size
            try:
                self._epoch_start(epoch)
            except StopRequested:  # the epoch-start pass is redone on resume
                return self._preempt(progress, last_eval)
            for batch in self.train_loader:
                if self.global_step >= s.total_steps:
                    break
                t0 = time.perf_counter()
                batch = to_device(batch, self.device)
                if self.callbacks and self.batch_in_epoch % engine.gradient_accumulation_steps() == 0:
                    for callback in self.callbacks:
                        callback.before_step(batch, self.global_step + 1)
                    t0 = time.perf_counter()  # not part of the step time
                # A steady step reads nothing from the device: the terms stay there until a logging step and
                # the loop's checks are agreed on the device (agreement.py), read every check_steps.
                loss, terms = self.loss(batch, engine)
                self.agreement.add_loss(loss)
                engine.backward(loss)
                before = engine.global_steps
                engine.step()
                self.batch_in_epoch += 1
                n = int(batch["idx"].shape[0]) * world_size()
                self._count_batch(time.perf_counter() - t0, n)
                window_examples += n
                if engine.global_steps == before:
                    continue  # inside gradient accumulation
                self.global_step += 1
                for listener in self.events:
                    listener.on_step_end(self.global_step)
                self.log.step_timer.end_step()
                progress.update(1)
                applied = engine.was_step_applied()
                self.agreement.end_step(skipped=not applied, stop_requested=self.stop.requested)
                if self.schedule is not None and applied:
                    self.schedule.step()
                logging_step = self.global_step % s.logging_steps == 0 or self.global_step == s.total_steps
                eval_step = bool(s.eval_steps) and self.global_step % s.eval_steps == 0
                snapshot_step = self.snapshots is not None and bool(s.snapshot_steps) \
                    and self.global_step % s.snapshot_steps == 0 and self.global_step < s.total_steps
                save_step = bool(s.save_steps) and self.global_step % s.save_steps == 0 \
                    and self.global_step < s.total_steps
                stop = False
                if self.global_step % s.check_steps == 0 or logging_step or eval_step or snapshot_step or save_step:
                    stop = self._check_agreed()
                if logging_step:
                    values = self._log_train(terms, window_examples / max(time.perf_counter() - window_t0, 1e-9))
                    progress.set_postfix(loss=f"{values['loss']:.4f}")
                    window_t0, window_examples = time.perf_counter(), 0
                if eval_step:
                    last_eval = self._eval_and_log()
                if snapshot_step:
                    try:
                        self._snapshot()
                    except StopRequested:
                        self.pending_snapshot = True
                        return self._preempt(progress, last_eval)
                if stop:
                    return self._preempt(progress, last_eval)
                if save_step:
                    self.save_checkpoint()
            if not s.eval_steps and self.global_step > 0:
                last_eval = self._eval_and_log()
        progress.close()
        if (s.eval_steps and self.global_step % s.eval_steps != 0) or (not last_eval and self.global_step > 0):
            last_eval = self._eval_and_log()  # also a run resumed from a checkpoint of its last step
        self.scalars.flush()
        return last_eval

    def _epoch_start(self, epoch: int) -> None:
        """The schedule's epoch work (a CAP-f stage), else the epoch's SnC snapshot (from epoch 1 on)."""
        prune = self.schedule.epoch_start(epoch, self.global_step) if self.schedule is not None else None
        if prune:
            self.scalars.log("Prune", prune, self.global_step)
        elif self.snapshots is not None and self.s.snapshot_epochs and self.s.snapshot_steps == 0 \
                and epoch >= 1 and self.snapshot_epoch < epoch:
            self._snapshot()
            self.snapshot_epoch = epoch

    def _snapshot(self) -> None:
        self.snapshots.take(train_mode=self.s.snapshot_mode == "train")

    def _count_batch(self, seconds: float, examples: int) -> None:
        self.log.train_time += seconds
        self.log.examples_seen += examples
        self.log.step_timer.add_micro(seconds, examples)

    def _log_train(self, step_terms: dict[str, torch.Tensor], examples_per_second: float) -> dict[str, float]:
        """Read the last step's loss terms (one host read) and log them with the schedule's scalars."""
        terms = read_terms(step_terms)
        terms["examples_per_second"] = examples_per_second
        terms["lr"] = self.engine.get_lr()[0]
        if self.schedule is not None:
            terms.update(self.schedule.scalars())
        if self.s.log_sparsity:
            terms["sparsity"] = self.schedule.sparsity()
        self.scalars.log("Train", terms, self.global_step)
        self.log.history.append({"step": self.global_step, **terms})
        if self.is_rank0:
            self._print_progress(terms)
        return terms

    def _print_progress(self, values: dict[str, float]) -> None:
        """The logging step's plain line (printed whatever stderr is: a redirected log shows progress too); the
        ETA comes from the wall time since the previous logging step, evaluations and snapshots included (at the
        first, from the mean optimizer step time)."""
        now = time.perf_counter()
        left = max(self.s.total_steps - self.global_step, 0)
        eta = None
        if self._progress_mark is not None and self.global_step > self._progress_mark[1]:
            mark_t, mark_step = self._progress_mark
            eta = (now - mark_t) / (self.global_step - mark_step) * left
        elif self.log.timed_steps:
            eta = self.log.train_time / self.log.timed_steps * left
        self._progress_mark = (now, self.global_step)
        line = progress_line(self.global_step, self.s.total_steps, values, eta)
        # With a live progress bar the line prints above it instead of through it.
        with logging_redirect_tqdm() if self.s.show_progress else contextlib.nullcontext():
            logger.info(line)

    def _check_agreed(self) -> bool:
        """Read the agreed state (one host read): warn about and count non-finite or skipped steps, fail past
        ``max_nonfinite_steps`` consecutive ones; True when a stop was requested on any rank."""
        agreed = self.agreement.read()
        self.nonfinite_run = agreed.run
        if agreed.worst_run and self.is_rank0:
            logger.warning("step %d: up to %d consecutive optimizer steps since the last check had a NaN/inf loss or "
                           "were skipped by DeepSpeed (%d now; last loss %s)", self.global_step, agreed.worst_run,
                           agreed.run, agreed.loss)
        if agreed.worst_run > self.s.max_nonfinite_steps:
            raise TrainingFailed(
                f"training diverged: {agreed.worst_run} consecutive optimizer steps up to step {self.global_step} "
                f"had a NaN/inf loss or were skipped by DeepSpeed (last loss {agreed.loss}); lower --learning_rate "
                f"(now {self.engine.get_lr()[0]:g} at this step) or check the data; --max_nonfinite_steps "
                f"{self.s.max_nonfinite_steps} is how many such steps are tolerated")
        if agreed.stop and self.stop.signum is None:
            self.stop.request_from_peer()
        return agreed.stop

    def _preempt(self, progress, last_eval: dict[str, float]) -> dict[str, float]:
        """Stop on a signal: checkpoint the current step (every rank) and leave the loop."""
        self.save_checkpoint()
        self.preempted = True
        progress.close()
        self.scalars.flush()
        return last_eval

    def _eval_and_log(self) -> dict[str, float]:
        result = evaluate(self.model, self.eval_loader, self.scorer, self.device, self.global_step)
        self.last_eval_logits = result.logits
        self.scalars.log("Eval", result.metrics, self.global_step)
        if self.is_rank0:
            logger.info("step %d eval %s", self.global_step, result.metrics)
        return result.metrics

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        objective = self.loss.objective
        return {
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "snapshot_epoch": self.snapshot_epoch, **self.log.state_dict(),
            "pending_snapshot": self.pending_snapshot, "nonfinite_run": self.nonfinite_run,
            "encode_pool": self.shard.pool if self.shard is not None else None,
            "scheduler": self.schedule.state_dict() if self.schedule is not None else None,
            "objective": objective.state_dict() if objective is not None else None,
            "teacher_logits": self.loss.teacher_logits, "teacher_metrics": self.teacher_metrics,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loop position, the run log, the schedule, the banks and, last, the RNG (the encode passes
        and engines built before the trainer may have drawn random numbers). Teacher outputs and the encoded
        rows come back through the recipe (``encode.resumed_teacher``) before the loss is built."""
        self.global_step = state["global_step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.snapshot_epoch = state["snapshot_epoch"]
        self.log.load_state_dict(state)
        self.pending_snapshot = bool(state.get("pending_snapshot", False))
        self.nonfinite_run = int(state.get("nonfinite_run", 0))
        if self.schedule is not None:
            self.schedule.load_state_dict(state["scheduler"])
        if self.loss.objective is not None:
            self.loss.objective.load_state_dict(state["objective"])
        set_rng_state(state["rng"])
        self.agreement = StepAgreement(self.device, self.nonfinite_run)

    def save_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        path = self.checkpointer.save(f"step{self.global_step}", self.state_dict())
        if self.is_rank0:
            logger.info("checkpoint written: %s", path)
