"""Sparsity accounting over compressed linear weights (the paper's denominator: encoder linear weights).

Under ZeRO-3 each module's weights/scores are gathered for the count, so every rank must call this (collective)
and every rank gets the same numbers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cap_ds.compression.groups import unwrap
from cap_ds.compression.layers import MaskedLinear
from cap_ds.compression.zero import gathered, module_params

ENCODER_LINEAR_PATTERN = r"encoder\.layer\.\d+\."


@torch.no_grad()
def sparsity_report(model: nn.Module, pattern: str = ENCODER_LINEAR_PATTERN) -> dict:
    """Fraction of zero weights per matched linear and overall, plus kept rows/heads of structured masks.

    A ``MaskedLinear`` counts its combined mask (sparse x row x head); a plain ``nn.Linear`` (e.g. an exported
    model) counts exact zeros, so the same function measures the training model and its export. Every count stays
    on the device until one read at the end (one host sync for the whole model, not one per layer).
    """
    regex = re.compile(pattern)
    names: list[str] = []
    numels: list[int] = []
    counts: list[torch.Tensor] = []  # kept entries per module, then structured (kept, total) pairs
    units: list[tuple[str, str, int]] = []  # (module, "rows" | "heads", total) of each structured count
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, nn.Linear) or not regex.search(name):
            continue
        with gathered(module_params(module)):
            if isinstance(module, MaskedLinear):
                counts.append(module.get_mask().count_nonzero())
                for kind, mask in (("rows", module.row_mask()), ("heads", module.head_mask())):
                    if mask is not None:
                        units.append((name, kind, mask.numel()))
                        counts.append(mask.count_nonzero())
            else:
                counts.append(module.weight.count_nonzero())
            names.append(name)
            numels.append(module.weight.numel())
    device = counts[0].device if counts else None
    counts = [c if c.device == device else c.to(device) for c in counts]
    values = [int(v) for v in torch.stack([c.reshape(()) for c in counts]).tolist()] if counts else []
    per_module: dict[str, float] = {}
    structured: dict[str, dict[str, list[int]]] = {}
    zeros = total = 0
    it = iter(values)
    unit_iter = iter(units)
    pending = next(unit_iter, None)
    for name, numel in zip(names, numels):
        kept = next(it)
        while pending is not None and pending[0] == name:
            structured.setdefault(name, {})[pending[1]] = [next(it), pending[2]]
            pending = next(unit_iter, None)
        per_module[name] = 1.0 - kept / numel if numel else 0.0
        zeros += numel - kept
        total += numel
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total, "per_module": per_module,
            "structured": structured}
