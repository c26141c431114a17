"""First-order structured pruning (CAP-f): heads and FFN neurons whose masks ``compression.first_order`` sets in
stages from accumulated |dL/dgate| (importance passes). The layer only applies the fixed mask it is given: no
scores, no cubic schedule; a run with it exports a cleaned (smaller) model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cap_ds.compression.methods.base import UNITS, PruningMethod


class FirstOrder(PruningMethod):
    name = "first_order"
    kinds = frozenset({UNITS})
    structured = True
    fixed_units = True

    def ratio_optional(self, tech) -> bool:
        return True  # the stages set how much is pruned; dense_ratio is unused

    def unit_mask(self, norms: Callable[[], torch.Tensor], scores: torch.Tensor | None, keep_ratio: float,
                  fixed: torch.Tensor | None) -> torch.Tensor:
        if fixed is None:
            raise ValueError(f"{self.name} needs a fixed mask")
        return fixed
