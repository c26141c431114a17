"""The run's pruning, decided once from the flags and the ``--deepspeed`` file: which ``compression_training``
section applies (the file's, or the one the pruning flags stand for), the masks installed before
``deepspeed.initialize`` (so score parameters reach the optimizer), the embeddings frozen (the reference keeps
them dense), the LR schedule each method retrains with, and the pruning schedule the loop moves: the cubic
``CompressionScheduler`` for unstructured methods, CAP-f's ``StageSchedule`` for ``first_order``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cap_ds.compression import (
    UNITS,
    CompressionConfig,
    CompressionScheduler,
    FirstOrderPruner,
    ImportancePass,
    PruningMethod,
    PruningSchedule,
    StageSchedule,
    find_method,
    first_order_section,
    get_method,
    init_compression,
    parse_compression_config,
)
from cap_ds.training.encode import Snapshots
from cap_ds.training.losses import TrainingLoss
from cap_ds.training.plan import StepPlan

logger = logging.getLogger(__name__)


def sparse_section(pargs, offset: int, offset_end: int) -> dict[str, Any]:
    """The compression_training section the pruning flags stand for."""
    method = get_method(pargs.pruning_method)
    return {"sparse_pruning": {
        "shared_parameters": {
            "enabled": True, "method": pargs.pruning_method, "schedule_offset": offset,
            "schedule_offset_end": offset_end, "mask_init": pargs.score_init,
            "mask_scale": pargs.mask_scale,
            "final_threshold": pargs.final_threshold, "final_lambda": pargs.final_lambda,
            "threshold_control": pargs.threshold_control and method.supports_threshold_control,
        },
        "different_groups": {"sp1": {"params": {"dense_ratio": round(1.0 - pargs.target_sparsity, 10)},
                                     "modules": [pargs.prune_modules]}},
    }}


def _prunes_units_with(compression: dict[str, Any] | None, method: PruningMethod) -> bool:
    """Whether the ``--deepspeed`` file's section prunes rows or heads with ``method`` (then it is used)."""
    return bool(compression) and any(
        find_method(compression.get(k, {}).get("shared_parameters", {}).get("method"), UNITS) is method
        for k in ("head_pruning", "row_pruning"))


@dataclass
class Pruning:
    """The pruning a run applies: its config, whether it is CAP-f, and (unstructured) its scheduler."""

    config: CompressionConfig
    structured: bool
    scheduler: CompressionScheduler | None

    def regularizer(self) -> Callable[[], torch.Tensor | None] | None:
        """The loss term the method adds (soft movement's L1), asked after each forward."""
        return self.scheduler.regularization if self.scheduler is not None else None


def install_pruning(student: torch.nn.Module, pargs, plan: StepPlan, compression: dict[str, Any] | None, *,
                    source: str, is_rank0: bool) -> Pruning:
    """Masks into ``student`` (before ``deepspeed.initialize``) and the embeddings frozen. ``compression``: the
    ``--deepspeed`` file's section, used when it is enabled (CAP-f: when it prunes first-order)."""
    method = get_method(pargs.pruning_method)
    structured = method.structured
    if structured:
        section = compression if _prunes_units_with(compression, method) else first_order_section(
            student.config.num_attention_heads)
        config = parse_compression_config({"compression_training": section})
    else:
        config = parse_compression_config({"compression_training": compression}) if compression else None
        if config is None or not config.enabled:
            config = parse_compression_config(
                {"compression_training": sparse_section(pargs, plan.offset, plan.offset_end)})
        elif is_rank0:
            logger.info("using the compression_training section of %s (pruning flags ignored)", source)
    init_compression(student, config)
    scheduler = None if structured else CompressionScheduler(student, config)
    for p in student.base_model.embeddings.parameters():
        p.requires_grad_(False)  # reference: embeddings stay frozen (and dense) while pruning
    return Pruning(config, structured, scheduler)


def staged_linear(stage_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: warm-up then linear decay to 0, restarted at every CAP-f stage."""
    warm = max(1, math.ceil(warmup_ratio * stage_steps))

    def factor(step: int) -> float:
        i = step % stage_steps
        return i / warm if i < warm else max(0.0, (stage_steps - i) / max(1, stage_steps - warm))

    return factor


def lr_schedule(pruning: Pruning | None, plan: StepPlan, pargs,
                warmup_ratio: float) -> Callable[[torch.optim.Optimizer], Any]:
    """What ``deepspeed.initialize`` builds the LR scheduler with: linear warm-up and decay over the run, or
    (reference CAP-f) over every stage, each stage retraining with a fresh warm-up."""
    if pruning is not None and pruning.structured:
        stage_steps = pargs.epochs_per_stage * plan.steps_per_epoch
        return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, staged_linear(stage_steps, warmup_ratio))
    from transformers import get_linear_schedule_with_warmup

    return lambda opt: get_linear_schedule_with_warmup(opt, plan.warmup, plan.total_steps)


@dataclass(frozen=True)
class PassContext:
    """How an importance pass runs: the stop signals it checks, and whether this rank shows a bar and reports."""

    stop: Any
    show_progress: bool
    report: bool


def pruning_schedule(pruning: Pruning | None, engine, plan: StepPlan, pargs, *, loss: TrainingLoss, importance_loader,
                     snapshots: Snapshots | None, context: PassContext) -> PruningSchedule | None:
    """The schedule the loop moves: the unstructured scheduler, or CAP-f's stages (each after an SnC snapshot
    in eval mode, from stage 1 on, then an importance pass with the full training loss)."""
    if pruning is None or not pruning.structured:
        return pruning.scheduler if pruning is not None else None
    importance = ImportancePass(engine, importance_loader, loss, context.stop, pargs.importance_batches,
                                show_progress=context.show_progress, report=context.report)
    before = (lambda: snapshots.take(train_mode=False)) if snapshots is not None else None
    return StageSchedule(FirstOrderPruner(engine.module, pruning.config), plan.stages, pargs.epochs_per_stage,
                         importance, before)
