"""The CAP contrastive objective: one memory-bank loss per module (PrC, SnC, FiC), each with its own
candidate set and softmax, summed with weight 1 each (as the reference code does).

Module total = w_unsup * L_unsup + w_sup * L_sup. Per step each rank looks up its batch's bank rows and draws
``extra_negatives // (R * world)`` extra examples from its own shard; keys, indices and labels of all ranks are
gathered so every rank scores its anchors against the same global candidate set. At world size 1 this is
exactly the reference: ``extra_negatives // R`` extras drawn from the whole training set.
"""

from __future__ import annotations

from typing import Any

import torch

from cap_ds.cap.banks import MemoryBank
from cap_ds.cap.loss import build_candidates, positive_stats, reduce_stats
from cap_ds.runtime.collectives import all_gather_equal, min_over_ranks, rank, summed, world_size
from cap_ds.runtime.transfer import host_index, host_to_device

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
        self._pool_floor: int | None = None  # the smallest pool of extra-negative rows over ranks

    @classmethod
    def from_settings(cls, banks: dict[str, MemoryBank], dataset_labels: torch.Tensor | None, settings: Any,
                      seed: int) -> CapObjective:
        """Built from the CAP flags as every entry point names them (``contrastive_temperature``,
        ``extra_negatives``, ``cap_unsup_weight``, ``cap_sup_weight``, ``cap_reduction``): cap_ds/train.py's
        run spec and the Trainer integration's ``CapArguments`` build the same objective from one place."""
        return cls(banks, dataset_labels, temperature=settings.contrastive_temperature,
                   extra_negatives=settings.extra_negatives, unsup_weight=settings.cap_unsup_weight,
                   sup_weight=settings.cap_sup_weight, reduction=settings.cap_reduction, seed=seed)

    def sample_extra(self, bank: MemoryBank) -> torch.Tensor:
        """This rank's extra examples (global indices from its own shard, on the host). Every rank draws the same
        count (capped by the smallest rank's pool: a collective, once), so the keys gather without a size
        exchange."""
        per_rank = self.extra_negatives // max(bank.num_columns, 1) // world_size()
        if self._pool_floor is None:
            self._pool_floor = min_over_ranks(len(bank.shard.encoded))
        return bank.shard.sample(min(per_rank, self._pool_floor), self.generator)

    def module_loss(self, bank: MemoryBank, anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None,
                    extra_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unsup/sup terms and the weighted total of one module for this rank's anchors (a collective call).

        ``idx`` and ``extra_idx`` are host tensors (the banks live there); nothing here reads a device tensor on
        the host. Every rank has the same batch size (``ShardSampler`` pads) and draws the same number of extras,
        so the gathers need no size exchange."""
        device = anchors.device
        if extra_idx is None:
            extra_idx = self.sample_extra(bank)
        idx, extra_idx = host_index(idx), host_index(extra_idx)
        use_labels = labels is not None and self.dataset_labels is not None
        extra_labels = host_to_device(self.dataset_labels.index_select(0, extra_idx), device) if use_labels else None
        # Gather everything the candidate set needs from all ranks (detached keys; identity at world 1).
        idx_dev = host_to_device(idx, device)
        current = all_gather_equal(anchors.detach())
        all_idx = all_gather_equal(idx_dev)
        all_rows = all_gather_equal(bank.lookup(idx, device=device))
        all_extra_idx = all_gather_equal(host_to_device(extra_idx, device))
        all_extra_rows = all_gather_equal(bank.lookup(extra_idx, device=device))
        all_labels = all_gather_equal(labels) if use_labels else None
        all_extra_labels = all_gather_equal(extra_labels) if use_labels else None
        self_index = torch.arange(anchors.shape[0], device=device) + rank() * anchors.shape[0]
        cand = build_candidates(current, all_idx, all_labels, all_rows, all_extra_idx, all_extra_rows,
                                all_extra_labels, self_index)
        unsup, sup = positive_stats(anchors, idx_dev, labels if use_labels else None, cand, self.temperature)
        world = world_size()
        parts = [unsup] + ([sup] if sup is not None else [])
        totals = summed(torch.stack([torch.stack([p.positives.float(), p.anchors.float()]) for p in parts]))
        loss_u = reduce_stats(unsup, self.reduction, totals[0, 0], totals[0, 1], world)
        out = {"unsup": loss_u}
        total = self.unsup_weight * loss_u
        if sup is not None:
            loss_s = reduce_stats(sup, self.reduction, totals[1, 0], totals[1, 1], world)
            out["sup"] = loss_s
            total = total + self.sup_weight * loss_s
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
