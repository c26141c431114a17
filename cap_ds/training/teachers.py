"""Frozen teachers: a second DeepSpeed engine that never holds optimizer state.

``--teacher_offload cpu``: ZeRO-3 with ``offload_param: cpu`` (weights live in host RAM and stream in per
submodule: for large teachers beside a large student). ``none``: a stage-0 engine (weights on the device).
With ``--teacher_mode cached`` the teacher runs once (the encode pass fills FiC and the cached logits) and is
then released; ``live`` keeps it for a forward every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OFFLOAD_CHOICES = ("auto", "none", "cpu")
LARGE_TEACHER_PARAMS = 300_000_000  # RoBERTa/BERT-large and up: offload by default


def teacher_ds_config(offload: str, micro_batch: int, bf16: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro_batch, "bf16": {"enabled": bf16},
                           "steps_per_print": 1_000_000}
    if offload == "cpu":
        cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()},
                                    "stage3_param_persistence_threshold": 0}
    else:
        cfg["zero_optimization"] = {"stage": 0}
    return cfg


def resolve_offload(offload: str, model: nn.Module) -> str:
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--teacher_offload {offload!r}; allowed: {', '.join(OFFLOAD_CHOICES)}")
    if offload != "auto":
        return offload
    return "cpu" if sum(p.numel() for p in model.parameters()) >= LARGE_TEACHER_PARAMS else "none"


def teacher_engine(model: nn.Module, offload: str = "auto", micro_batch: int = 32, bf16: bool = False):
    """Wrap a frozen model in an inference-only DeepSpeed engine (eval mode, no optimizer)."""
    import deepspeed

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mode = resolve_offload(offload, model)
    engine, *_ = deepspeed.initialize(model=model, config=teacher_ds_config(mode, micro_batch, bf16))
    engine.eval()
    return engine
