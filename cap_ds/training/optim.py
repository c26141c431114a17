"""The student's optimizer: AdamW over three parameter groups (decayed weights, undecayed biases/LayerNorm, pruning
scores with their own LR and no decay), built to suit the DeepSpeed config.

- no ``optimizer`` section, optimizer state on the device: ``torch.optim.AdamW``, ``fused=True`` on CUDA (one
  multi-tensor kernel per step, no host sync, nothing to build, unlike DeepSpeed's JIT-compiled FusedAdam, which
  only DeepSpeed's fp16 stage-0 wrapper needs), ``foreach=True`` elsewhere;
- ``zero_optimization.offload_optimizer`` (ZeRO-Offload): DeepSpeed's ``DeepSpeedCPUAdam`` (DeepSpeed refuses a
  client torch optimizer there), AdamW mode, same groups;
- an ``optimizer`` section: DeepSpeed builds the optimizer it names from the section, over the same groups
  (a group's own ``lr`` / ``weight_decay`` win over the section's values).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cap_ds.compression import is_score_parameter

logger = logging.getLogger(__name__)


def optimizer_groups(model: torch.nn.Module, weight_decay: float, score_lr: float) -> list[dict]:
    """Scores get their own LR and no decay; biases and LayerNorm get no decay (HF convention)."""
    scores, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_score_parameter(name):
            scores.append(p)
        elif name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scores:
        groups.append({"params": scores, "weight_decay": 0.0, "lr": score_lr})
    return [g for g in groups if g["params"]]


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """True when the config puts the optimizer state on the CPU or NVMe (ZeRO-Offload)."""
    zero = ds_config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def adamw_implementation(device_type: str) -> dict[str, bool]:
    """torch AdamW's implementation for optimizer state on ``device_type``. CUDA: the fused kernel (one launch per
    dtype/device over every tensor, no host read; torch's own CUDA default is foreach, several launches per update
    term). Elsewhere foreach: bit-identical to torch's per-tensor CPU default, so CPU results do not move (the fused
    CPU kernel was ~4x faster on a CPU micro-benchmark but rounds differently, ~5e-7)."""
    return {"fused": True} if device_type == "cuda" else {"foreach": True}


def accelerator_type() -> str:
    """The device type DeepSpeed will put the engine on (``cuda``, ``cpu``, ...)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def build_optimizer(groups: list[dict], ds_config: dict[str, Any], lr: float, eps: float,
                    device_type: str | None = None) -> tuple[torch.optim.Optimizer | None, list[dict] | None]:
    """``(optimizer, model_parameters)`` for ``deepspeed.initialize``: one of them is None. ``device_type``: where
    the optimizer state will live (default: DeepSpeed's accelerator); picks the AdamW implementation."""
    if "optimizer" in ds_config:
        return None, groups  # DeepSpeed builds the section's optimizer over our groups
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, eps=eps, weight_decay=0.0, adamw_mode=True), None
    kernel = adamw_implementation(device_type or accelerator_type())
    return torch.optim.AdamW(groups, lr=lr, eps=eps, **kernel), None


def optimizer_name(engine) -> str:
    """The class of the optimizer that steps the weights (inside DeepSpeed's ZeRO wrapper)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return type(inner if isinstance(inner, torch.optim.Optimizer) else opt).__name__
