"""Movement pruning (Sanh et al. 2020; DeepSpeed's ``topk``): keep the top-k of learned scores, which the mask's
straight-through gradient trains (d loss / d score = d loss / d W' * W). Rows/heads: top-k of per-unit scores."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cap_ds.compression.methods import masks
from cap_ds.compression.methods.base import SPARSE, UNITS, PruningMethod


class Movement(PruningMethod):
    name = "movement"
    ds_name = "topk"
    kinds = frozenset({SPARSE, UNITS})
    learns_scores = True
    exact_topk = True
    supports_blocks = True

    def keep_mask(self, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
        """Top-k of the scores at the kept fraction ``threshold`` (N:M: within blocks), straight-through."""
        if scores is None:
            raise ValueError(f"method {self.name!r} needs mask scores")
        if block is not None:
            return masks.NMBinarizer.apply(scores, masks.nm_kept(threshold, *block), block[1])
        return masks.TopKBinarizer.apply(scores, threshold)

    def unit_mask(self, norms: Callable[[], torch.Tensor], scores: torch.Tensor | None, keep_ratio: float,
                  fixed: torch.Tensor | None) -> torch.Tensor:
        if scores is None:
            raise ValueError(f"{self.unit_name} needs unit scores")
        return masks.TopKBinarizer.apply(scores.reshape(-1), keep_ratio)

    def topk_source(self, weight: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        return scores
