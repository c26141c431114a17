"""Sparsity accounting over compressed linear weights (the paper's denominator: encoder linear weights).

Under ZeRO-3 each module's weights/scores are gathered for the count, so every rank must call this (collective)
and every rank gets the same numbers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .groups import unwrap
from .layers import MaskedLinear
from .zero import gathered, module_params

ENCODER_LINEAR_PATTERN = r"encoder\.layer\.\d+\."


@torch.no_grad()
def sparsity_report(model: nn.Module, pattern: str = ENCODER_LINEAR_PATTERN) -> dict:
    """Fraction of zero weights per matched linear and overall, plus kept rows/heads of structured masks.

    A ``MaskedLinear`` counts its combined mask (sparse x row x head); a plain ``nn.Linear`` (e.g. an exported
    model) counts exact zeros, so the same function measures the training model and its export.
    """
    regex = re.compile(pattern)
    per_module: dict[str, float] = {}
    structured: dict[str, dict[str, list[int]]] = {}
    zeros = total = 0
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, nn.Linear) or not regex.search(name):
            continue
        with gathered(module_params(module)):
            if isinstance(module, MaskedLinear):
                kept = int(module.get_mask().count_nonzero())
                info = {}
                row = module.row_mask()
                if row is not None:
                    info["rows"] = [int(row.count_nonzero()), int(row.numel())]
                head = module.head_mask()
                if head is not None:
                    info["heads"] = [int(head.count_nonzero()), int(head.numel())]
                if info:
                    structured[name] = info
            else:
                kept = int(module.weight.count_nonzero())
            numel = module.weight.numel()
        per_module[name] = 1.0 - kept / numel if numel else 0.0
        zeros += numel - kept
        total += numel
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total, "per_module": per_module,
            "structured": structured}
