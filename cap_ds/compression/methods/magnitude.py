"""Gradual magnitude pruning (DeepSpeed's ``l1``): keep the largest |W|, or the rows/heads with the largest L1
norms. No scores and no gradient through the mask, so pruned weights get no update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cap_ds.compression.methods import masks
from cap_ds.compression.methods.base import SPARSE, UNITS, PruningMethod


class Magnitude(PruningMethod):
    name = "magnitude"
    ds_name = "l1"
    kinds = frozenset({SPARSE, UNITS})
    exact_topk = True
    supports_blocks = True

    def keep_mask(self, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
        """Top-k of |W| at the kept fraction ``threshold``; N:M: the top N of every M (N ramps from M down)."""
        if block is not None:
            return masks.nm_mask(weight.detach().abs(), masks.nm_kept(threshold, *block), block[1])
        return masks.topk_mask(weight.detach().abs(), threshold)

    def unit_mask(self, norms: Callable[[], torch.Tensor], scores: torch.Tensor | None, keep_ratio: float,
                  fixed: torch.Tensor | None) -> torch.Tensor:
        return masks.topk_mask(norms().detach(), keep_ratio)

    def topk_source(self, weight: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        return weight

    def write_topk_values(self, weight: torch.Tensor, scores: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        return torch.abs(weight.detach().reshape(-1), out=out)
