"""Compression scheduler: moves every compressed module's thresholds along the cubic schedule.

Stepped by the training loop after each *applied* optimizer step (DeepSpeed's engine used to do this itself).
Unlike DeepSpeed's on/off switch, each technique ramps from dense at its ``schedule_offset`` to each group's
``dense_ratio`` at ``schedule_offset_end`` (no end: DeepSpeed's switch at ``schedule_offset``, no KeyError).
``first_order`` structured masks are not scheduled: ``FirstOrderPruner`` sets them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compress import masked_modules
from .config import CompressionConfig, TechniqueConfig, as_compression_config
from .schedule import cubic_schedule


def _scheduled(tech: TechniqueConfig, step: int, initial: float, final: float) -> float:
    """``initial`` before ``schedule_offset``; then the cubic ramp, or ``final`` at once when there is no ramp."""
    stride = tech.schedule_offset_stride
    step = (step // stride) * stride
    if step < tech.schedule_offset:
        return float(initial)
    if tech.offset_end <= tech.schedule_offset:
        return float(final)
    return cubic_schedule(step, tech.schedule_offset, tech.offset_end, initial, final)


def _kept_fraction(tech: TechniqueConfig, step: int, final: float) -> float:
    return _scheduled(tech, step, 1.0, final)


class CompressionScheduler:
    """Owns the pruning step counter; DeepSpeed's ``compression_scheduler(model, config)`` shape."""

    def __init__(self, model: nn.Module, deepspeed_config: str | Path | dict[str, Any] | CompressionConfig) -> None:
        self.config = as_compression_config(deepspeed_config)
        self.sparse = self.config.sparse_pruning
        self.row = self.config.row_pruning
        self.head = self.config.head_pruning
        self.modules = masked_modules(model)
        self.groups = {g.name: g for g in self.sparse.groups}
        self.row_groups = {g.name: g for g in self.row.groups}
        self.head_groups = {g.name: g for g in self.head.groups}
        self.training_steps = 0
        for module in self.modules.values():
            module.mask_cache_enabled = True  # this scheduler invalidates the masks whenever they may change
        self._apply()

    @property
    def method(self) -> str:
        return self.sparse.canonical_method

    def threshold_for(self, group: str) -> float:
        """Sparse kept fraction (magnitude/movement) or sigmoid threshold (soft movement) at the current step."""
        sp = self.sparse
        if self.method == "soft_movement":
            return _scheduled(sp, self.training_steps, sp.initial_threshold, sp.final_threshold)
        return _kept_fraction(sp, self.training_steps, self.groups[group].dense_ratio)

    def row_threshold_for(self, group: str) -> float:
        return _kept_fraction(self.row, self.training_steps, self.row_groups[group].dense_ratio)

    def head_threshold_for(self, group: str) -> float:
        return _kept_fraction(self.head, self.training_steps, self.head_groups[group].dense_ratio)

    @property
    def threshold(self) -> float:
        """The first sparse group's threshold (what gets logged); 1.0 without sparse pruning."""
        if self.sparse.enabled and self.groups:
            return self.threshold_for(next(iter(self.groups)))
        return 1.0

    @property
    def regularization_lambda(self) -> float:
        """Soft movement's L1 weight, proportional to the threshold (reference: lambda_final * t / t_final)."""
        sp = self.sparse
        if not sp.enabled or self.method != "soft_movement" or sp.final_threshold == 0:
            return 0.0
        return sp.final_lambda * self.threshold / sp.final_threshold

    def _apply(self) -> None:
        for module in self.modules.values():
            module.invalidate_masks()
            if module.method is not None and module.group in self.groups and self.sparse.enabled:
                module.threshold = self.threshold_for(module.group)
            if module.row_method not in (None, "first_order") and module.row_group in self.row_groups:
                module.row_threshold = self.row_threshold_for(module.row_group)
            if module.head_method not in (None, "first_order") and module.head_group in self.head_groups:
                module.head_threshold = self.head_threshold_for(module.head_group)

    def step(self, step_zero_check: bool = False) -> None:
        """Advance one optimizer step and update all thresholds. Call it after every applied optimizer step (and
        only then): it also drops the masks cached for the step before."""
        self.training_steps += 1
        self._apply()

    def set_step(self, step: int) -> None:
        self.training_steps = int(step)
        self._apply()

    def regularization(self) -> torch.Tensor | None:
        """lambda_t * mean over modules of mean(sigmoid(scores)), from values stashed in the last forward."""
        if not self.sparse.enabled or self.method != "soft_movement":
            return None
        terms = [m.last_regularization for m in self.modules.values() if m.last_regularization is not None]
        if not terms:
            return None
        return self.regularization_lambda * torch.stack(terms).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"training_steps": self.training_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_step(state["training_steps"])


def compression_scheduler(model: nn.Module, deepspeed_config) -> CompressionScheduler:
    """DeepSpeed-compatible factory name."""
    return CompressionScheduler(model, deepspeed_config)
