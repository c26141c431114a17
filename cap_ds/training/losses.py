"""The training loss of one batch: CE (or MSE) + KD + the CAP contrastive terms + the pruning regulariser.

One object computes it for the loop's step, CAP-f's importance pass and the gradient diagnostic, so the three
can never disagree on what "the loss" is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cap_ds.cap import CapObjective, Shard, kd_loss
from cap_ds.data.batches import model_inputs
from cap_ds.data.models import SentenceVectorHook
from cap_ds.data.tasks import TaskSpec
from cap_ds.runtime.outputs import output_logits
from cap_ds.runtime.transfer import host_to_device


@dataclass(frozen=True)
class TrainingLoss:
    """``teacher_logits`` (cached, rows of this rank's ``shard``) or ``live_teacher`` (a forward per batch) feed
    KD when ``kd_weight > 0``; ``objective`` + ``hook`` add the CAP terms; ``regularizer`` (soft movement's L1)
    is asked for a term after the forward."""

    task: TaskSpec
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    shard: Shard | None = None
    teacher_logits: torch.Tensor | None = None
    live_teacher: torch.nn.Module | None = None
    objective: CapObjective | None = None
    hook: SentenceVectorHook | None = None
    regularizer: Callable[[], torch.Tensor | None] | None = None

    def parts(self, batch: dict[str, torch.Tensor],
              forward) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each term as it enters the total (e.g. 0.1 * CE), and each term's raw value, both on the graph."""
        idx, labels = batch["idx"], batch["labels"]
        logits = output_logits(forward(**model_inputs(batch)))
        terms: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        if self.task.is_regression:
            terms["ce"] = F.mse_loss(logits.view(-1).float(), labels.float())
        elif self.task.is_qa:  # [B, 2, L] against [B, 2]: the mean of the start and end losses (CAP's SQuAD CE)
            terms["ce"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.reshape(-1))
        else:
            terms["ce"] = F.cross_entropy(logits.float(), labels)
        parts["ce"] = self.ce_weight * terms["ce"]
        if self.kd_weight > 0:
            if self.live_teacher is not None:
                with torch.no_grad():
                    t_logits = output_logits(self.live_teacher(**model_inputs(batch)))
            else:  # cached on the host: rows picked there by the host-side idx, copied without a sync
                t_logits = host_to_device(self.teacher_logits.index_select(0, self.shard.local_rows(idx)),
                                          logits.device)
            # QA: start and end are two distributions over tokens; batchmean over both = (KL_start + KL_end) / 2
            terms["kd"] = kd_loss(logits.flatten(0, -2), t_logits.flatten(0, -2), self.kd_temperature,
                                  self.task.is_regression)
            parts["kd"] = self.kd_weight * terms["kd"]
        if self.objective is not None:
            anchors = F.normalize(self.hook.anchor.float(), dim=-1)
            sup_labels = labels if self.task.kind == "classification" else None  # QA, regression: unsupervised
            for name, value in self.objective(anchors, idx, sup_labels).items():
                terms[name] = parts[name] = value
        if self.regularizer is not None:
            reg = self.regularizer()
            if reg is not None:
                terms["regularizer"] = parts["regularizer"] = reg
        return parts, terms

    def __call__(self, batch: dict[str, torch.Tensor], forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (through ``forward``, e.g. the engine) and the raw value of every term, detached and still
        on the device: reading them is a host sync, so the loop reads them only at logging steps
        (:func:`read_terms`)."""
        parts, terms = self.parts(batch, forward)
        loss = sum(parts.values())
        terms["loss"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}


def read_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The terms as floats through one device-to-host copy (one sync instead of one per term)."""
    if not terms:
        return {}
    values = torch.stack([v.reshape(()).float() for v in terms.values()]).tolist()
    return dict(zip(terms, values))
