"""Sparsity accounting over compressed linear weights (the paper's denominator: encoder linear weights)."""

from __future__ import annotations

import re

import torch
from torch import nn

from .layers import MaskedLinear

ENCODER_LINEAR_PATTERN = r"encoder\.layer\.\d+\."


@torch.no_grad()
def sparsity_report(model: nn.Module, pattern: str = ENCODER_LINEAR_PATTERN) -> dict:
    """Fraction of zero weights per matched linear and overall.

    A ``MaskedLinear`` counts its mask; a plain ``nn.Linear`` (e.g. an exported model) counts exact zeros, so
    the same function measures the training model and its export.
    """
    regex = re.compile(pattern)
    per_module: dict[str, float] = {}
    zeros = total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not regex.search(name):
            continue
        if isinstance(module, MaskedLinear):
            kept = int(module.get_mask().count_nonzero())
        else:
            kept = int(module.weight.count_nonzero())
        numel = module.weight.numel()
        per_module[name] = 1.0 - kept / numel
        zeros += numel - kept
        total += numel
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total, "per_module": per_module}
