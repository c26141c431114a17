"""The execution formats a pruned linear can take, the policies that choose among them, and the batch classes.

``dense`` leaves the ``nn.Linear`` untouched; ``csr`` multiplies the nonzeros only; ``2:4`` uses the GPU's
semi-structured sparse tensor cores, which need at most 2 nonzeros in every 4 consecutive inputs.
"""

from __future__ import annotations

import torch

FORMATS = ("dense", "csr", "2:4")
POLICIES = ("measure", "rule", "dense", "csr", "2:4")

#: A forward with at most this many tokens (rows of x) is "small" (memory-bound on a GPU for BERT-base shapes),
#: more is "large": the winner may differ, so without a ``batch_tokens`` hint each class is decided on its own.
SMALL_BATCH_TOKENS = 256
#: The size each batch class is measured at.
REPRESENTATIVE_TOKENS = {"small": 128, "large": 1024}


def weight_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return 1.0 - float(torch.count_nonzero(weight.detach())) / max(1, weight.numel())


def is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (what 2:4 sparse tensor cores need)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())
