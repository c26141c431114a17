"""Compression scheduler: moves every compressed module's threshold along the cubic schedule.

Stepped by the training loop after each *applied* optimizer step (DeepSpeed's engine used to do this itself).
Unlike DeepSpeed's on/off switch, sparsity ramps from dense at ``schedule_offset`` to each group's
``dense_ratio`` at ``schedule_offset_end``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compress import masked_modules
from .config import CompressionConfig, parse_compression_config
from .schedule import cubic_schedule


class CompressionScheduler:
    """Owns the pruning step counter; DeepSpeed's ``compression_scheduler(model, config)`` shape."""

    def __init__(self, model: nn.Module, deepspeed_config: str | Path | dict[str, Any] | CompressionConfig) -> None:
        self.config = deepspeed_config if isinstance(deepspeed_config, CompressionConfig) else \
            parse_compression_config(deepspeed_config)
        self.sparse = self.config.sparse_pruning
        self.modules = masked_modules(model)
        self.groups = {g.name: g for g in self.sparse.groups}
        self.training_steps = 0
        self._apply()

    @property
    def method(self) -> str:
        return self.sparse.canonical_method

    def threshold_for(self, group: str) -> float:
        """Kept fraction (magnitude/movement) or sigmoid threshold (soft movement) at the current step."""
        sp = self.sparse
        stride = sp.schedule_offset_stride
        step = (self.training_steps // stride) * stride
        if self.method == "soft_movement":
            return cubic_schedule(step, sp.schedule_offset, sp.offset_end, sp.initial_threshold, sp.final_threshold)
        final = self.groups[group].dense_ratio
        if step < sp.schedule_offset:
            return 1.0
        return cubic_schedule(step, sp.schedule_offset, sp.offset_end, 1.0, final)

    @property
    def threshold(self) -> float:
        """The first group's threshold (what gets logged)."""
        return self.threshold_for(next(iter(self.groups))) if self.groups else 1.0

    @property
    def regularization_lambda(self) -> float:
        """Soft movement's L1 weight, proportional to the threshold (reference: lambda_final * t / t_final)."""
        sp = self.sparse
        if self.method != "soft_movement" or sp.final_threshold == 0:
            return 0.0
        return sp.final_lambda * self.threshold / sp.final_threshold

    def _apply(self) -> None:
        for module in self.modules.values():
            module.threshold = self.threshold_for(module.group)

    def step(self, step_zero_check: bool = False) -> None:
        """Advance one optimizer step and update all thresholds."""
        self.training_steps += 1
        self._apply()

    def set_step(self, step: int) -> None:
        self.training_steps = int(step)
        self._apply()

    def regularization(self) -> torch.Tensor | None:
        """lambda_t * mean over modules of mean(sigmoid(scores)), from values stashed in the last forward."""
        if self.method != "soft_movement":
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
