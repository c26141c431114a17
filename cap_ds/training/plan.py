"""The run's step plan, computed from the flags and the training-set size before anything loads: optimizer steps,
epochs, LR warm-up, the pruning schedule's offsets (shrunk, with a note, when a short run cannot fit the
reference warm-ups) or CAP-f's stages, and the rows the bank encode passes need.

A plan that cannot work (a ``compression_training`` schedule that ends after the run, CAP-f stages the run never
reaches) is a :class:`PlanError` naming the flag; ``preflight`` raises it before any model is loaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from cap_ds.compression import parse_compression_config
from cap_ds.compression.methods import get_method
from cap_ds.runtime.errors import UserError

logger = logging.getLogger(__name__)


class PlanError(UserError, ValueError):
    """Flags whose schedule cannot work; the message names them."""


@dataclass
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup: int
    offset: int | None = None  # unstructured pruning: dense until here
    offset_end: int | None = None  # ... and at the target from here on
    stages: list[float] = field(default_factory=list)  # CAP-f cumulative pruned fractions
    notes: list[str] = field(default_factory=list)  # what was adapted, for the log

    def log(self, prune: bool) -> None:
        """The plan, and what was adapted, in the run's log."""
        logger.info("plan: %s", self.describe(prune))
        for note in self.notes:
            logger.warning(note)

    def describe(self, prune: bool) -> str:
        text = (f"{self.total_steps} optimizer steps ({self.num_epochs} epoch(s) of {self.steps_per_epoch}), "
                f"LR warm-up {self.warmup}")
        if self.offset is not None:
            text += f", pruning dense until step {self.offset} and at the target from step {self.offset_end}"
        elif self.stages:
            text += f", CAP-f stages {self.stages}"
        elif prune:
            text += ", pruning schedule from the DeepSpeed config"
        return text


def steps_per_epoch(num_train: int, world: int, batch: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: every rank draws ceil(n / world) examples (ShardSampler pads)."""
    per_rank = -(-num_train // world)
    return max(1, math.ceil(math.ceil(per_rank / batch) / grad_accum))


def structured_stages(target: float, step: float) -> list[float]:
    """Cumulative pruned fractions of CAP-f: step, 2*step, ... up to and including ``target``."""
    stages, k = [], 1
    while k * step < target - 1e-9:
        stages.append(round(k * step, 10))
        k += 1
    return [*stages, target]


def fit_warmup_offsets(total_steps: int, warmup: int, initial_warmup: float,
                       final_warmup: float) -> tuple[int, int, str | None]:
    """The reference offsets (``initial_warmup * warmup`` dense steps, ``final_warmup * warmup`` at the target),
    shrunk in proportion when they leave no step for the ramp; returns them and a note when shrunk."""
    dense = int(round(initial_warmup * warmup))
    final = int(round(final_warmup * warmup))
    if total_steps - final > dense:
        return dense, total_steps - final, None
    room = max(total_steps - 1, 0)  # warm-up steps that leave a ramp of at least one step
    scale = room / (dense + final) if dense + final > 0 else 0.0
    new_dense, new_final = int(math.floor(dense * scale)), int(math.floor(final * scale))
    offset, offset_end = new_dense, total_steps - new_final
    note = (f"the pruning warm-ups (--initial_warmup {initial_warmup:g} and --final_warmup {final_warmup:g} times "
            f"{warmup} warm-up steps = {dense} + {final}) do not fit {total_steps} steps: shrunk to {new_dense} dense "
            f"+ {new_final} at the target, ramp over steps {offset}-{offset_end}")
    return offset, offset_end, note


def check_compression_schedule(section: dict[str, Any] | None, total_steps: int, source: str) -> None:
    """A ``compression_training`` section whose schedule ends after the run would never reach its target."""
    if not section:
        return
    cfg = parse_compression_config({"compression_training": section})
    for key in ("sparse_pruning", "row_pruning", "head_pruning"):
        tech = getattr(cfg, key, None)
        if tech is None or not tech.enabled or tech.strategy.fixed_units:
            continue
        if tech.offset_end > total_steps:
            name = "schedule_offset_end" if tech.schedule_offset_end is not None else "schedule_offset"
            raise PlanError(f"--deepspeed {source}: compression_training.{key}.shared_parameters.{name} is "
                            f"{tech.offset_end} but the run has {total_steps} optimizer steps, so the target would "
                            "never be reached; lower it or raise --max_steps/--num_train_epochs")


def plan_steps(num_train: int, world: int, rargs, pargs, *, prune: bool,
               compression: dict[str, Any] | None = None, source: str = "") -> StepPlan:
    """The plan for ``num_train`` training rows on ``world`` ranks (see the module docstring)."""
    spe = steps_per_epoch(num_train, world, rargs.per_device_train_batch_size, rargs.gradient_accumulation_steps)
    structured = prune and get_method(pargs.pruning_method).structured
    if structured:  # CAP-f: the schedule is the stages, each followed by --epochs_per_stage of retraining
        stages = structured_stages(pargs.target_sparsity, pargs.structured_step)
        num_epochs = len(stages) * pargs.epochs_per_stage
        total = num_epochs * spe if rargs.max_steps <= 0 else min(rargs.max_steps, num_epochs * spe)
        last_start = (len(stages) - 1) * pargs.epochs_per_stage * spe
        if total <= last_start:
            raise PlanError(f"--max_steps {rargs.max_steps} ends before the last CAP-f stage (pruning "
                            f"{stages[-1]:.0%} of heads/neurons) starts at step {last_start} ({len(stages)} stages "
                            f"x --epochs_per_stage {pargs.epochs_per_stage} x {spe} steps per epoch); raise "
                            "--max_steps, or lower --target_sparsity or --epochs_per_stage")
        warmup = rargs.warmup_steps or math.ceil(rargs.warmup_ratio * total)
        return StepPlan(spe, total, num_epochs, warmup, stages=stages)
    total = rargs.max_steps if rargs.max_steps > 0 else max(1, math.ceil(rargs.num_train_epochs * spe))
    num_epochs = math.ceil(total / spe)
    warmup = rargs.warmup_steps or math.ceil(rargs.warmup_ratio * total)
    plan = StepPlan(spe, total, num_epochs, warmup)
    if warmup > total:
        plan.notes.append(f"LR warm-up {warmup} is longer than the run's {total} steps: the LR never peaks")
    if not prune:
        return plan
    if compression:
        if parse_compression_config({"compression_training": compression}).enabled:
            check_compression_schedule(compression, total, source)  # the section replaces the pruning flags
            return plan
    plan.offset, plan.offset_end, note = fit_warmup_offsets(total, warmup, pargs.initial_warmup, pargs.final_warmup)
    if note:
        plan.notes.append(note)
    return plan
