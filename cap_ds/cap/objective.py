"""The CAP contrastive objective: one memory-bank loss per module (PrC, SnC, FiC), each with its own
candidate set and softmax, summed with weight 1 each (as the reference code does).

Module total = w_unsup * L_unsup + w_sup * L_sup. Extra negatives: ``extra_negatives // R`` examples drawn
uniformly without replacement from the whole training set per module and step (R = the bank's columns).
"""

from __future__ import annotations

from typing import Any

import torch

from .banks import MemoryBank
from .loss import build_candidates, contrastive_terms

MODULES = ("prc", "snc", "fic")


class CapObjective:
    def __init__(self, banks: dict[str, MemoryBank], dataset_labels: torch.Tensor | None, temperature: float = 0.1,
                 extra_negatives: int = 4096, unsup_weight: float = 0.1, sup_weight: float = 10.0,
                 reduction: str = "reference", seed: int = 42) -> None:
        unknown = set(banks) - set(MODULES)
        if unknown:
            raise ValueError(f"unknown CAP module(s) {sorted(unknown)}; allowed: {', '.join(MODULES)}")
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        self.banks = banks
        self.dataset_labels = dataset_labels
        self.temperature = temperature
        self.extra_negatives = extra_negatives
        self.unsup_weight = unsup_weight
        self.sup_weight = sup_weight
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(seed)

    def sample_extra(self, bank: MemoryBank) -> torch.Tensor:
        n = min(bank.num_examples, self.extra_negatives // max(bank.num_columns, 1))
        return torch.randperm(bank.num_examples, generator=self.generator)[:n]

    def module_loss(self, bank: MemoryBank, anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None,
                    extra_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unweighted unsup/sup terms and the weighted total of one module."""
        if extra_idx is None:
            extra_idx = self.sample_extra(bank)
        batch_rows = bank.lookup(idx, device=anchors.device)
        extra_rows = bank.lookup(extra_idx, device=anchors.device)
        extra_labels = None
        if labels is not None and self.dataset_labels is not None:
            extra_labels = self.dataset_labels.index_select(0, extra_idx).to(anchors.device)
        else:
            labels = None
        cand = build_candidates(anchors, idx, labels, batch_rows, extra_idx, extra_rows, extra_labels)
        loss_u, loss_s = contrastive_terms(anchors, idx, labels, cand, self.temperature, self.reduction)
        total = self.unsup_weight * loss_u
        out = {"unsup": loss_u}
        if loss_s is not None:
            total = total + self.sup_weight * loss_s
            out["sup"] = loss_s
        out["total"] = total
        return out

    def __call__(self, anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Weighted loss per active module (empty banks, e.g. SnC before its first snapshot, are skipped)."""
        return {name: self.module_loss(bank, anchors, idx, labels)["total"]
                for name, bank in self.banks.items() if bank.num_columns > 0}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "banks": {k: b.state_dict() for k, b in self.banks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        for k, b in self.banks.items():
            b.load_state_dict(state["banks"][k])
