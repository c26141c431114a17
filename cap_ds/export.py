"""Export: the pruned model with masks baked into plain linears, saved with ``save_pretrained`` (safetensors)
plus the tokenizer, so ``AutoModelForSequenceClassification.from_pretrained`` loads it with no cap_ds code.
Writes go to a temporary folder renamed into place: a failed export never leaves a half-written ``final/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compression.layers import MaskedLinear


@torch.no_grad()
def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with ``weight * mask`` for every masked linear and no score parameters."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("mask_scores")}
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            state[f"{name}.weight"] = module.masked_weight().detach().clone()
    return state


def plain_model(model: nn.Module) -> nn.Module:
    """A fresh transformers model of the same config holding the baked weights."""
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_config(model.config)
    plain.load_state_dict(baked_state_dict(model), strict=True)
    return plain.eval()


def _atomic_dir(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_pretrained(model: nn.Module, tokenizer: Any, target: str | Path) -> Path:
    """Save the baked model + tokenizer to ``target`` atomically; returns the path."""
    target = Path(target)
    plain = plain_model(model)

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _atomic_dir(target, write)
    return target


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
