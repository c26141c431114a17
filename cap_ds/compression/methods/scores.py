"""Initial values of learned pruning scores (``mask_init`` / ``mask_scale``), shared by every method that learns
scores: the init decides which weights the first score-based masks keep, so it lives with the methods."""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_INITS = ("magnitude", "constant", "uniform", "kaiming")
# mask_scale when none is given: magnitude priors have mean 1 (about 100 full-LR Adam steps of the scores at the
# reference score LR 1e-2); constant 0 is the reference movement init (Sanh et al., CAP's scripts).
DEFAULT_MASK_SCALE = {"magnitude": 1.0, "constant": 0.0, "uniform": 0.0, "kaiming": 0.0}


def default_mask_scale(mask_init: str, mask_scale: float | None) -> float:
    """``mask_scale``, or the init's default when None."""
    return DEFAULT_MASK_SCALE.get(mask_init, 0.0) if mask_scale is None else float(mask_scale)


def fill_scores(scores: torch.Tensor, mask_init: str, mask_scale: float | None,
                magnitude: torch.Tensor | None = None) -> None:
    """Fill ``scores`` in place. ``magnitude`` (same shape as ``scores``) is what the ``magnitude`` init ranks by:
    scores = mask_scale * |magnitude| / mean|magnitude|, so the first top-k masks are the magnitude masks and
    movement then moves scores away from them only as fast as its evidence accumulates."""
    scale = default_mask_scale(mask_init, mask_scale)
    if mask_init == "magnitude":
        if magnitude is None:
            raise ValueError("mask_init 'magnitude' needs the weight to rank by")
        mag = magnitude.detach().abs().float()
        with torch.no_grad():
            scores.copy_(scale * mag / mag.mean().clamp_min(torch.finfo(torch.float32).tiny))
    elif mask_init == "constant":
        nn.init.constant_(scores, scale)
    elif mask_init == "uniform":
        nn.init.uniform_(scores, -scale, scale)
    elif mask_init == "kaiming":
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
    else:
        raise ValueError(f"unknown mask_init {mask_init!r}; allowed: {', '.join(MASK_INITS)}")
