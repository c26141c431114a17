"""CAP's memory-bank contrastive loss (as the reference code computes it) and the distillation loss.

Per module and step the candidate keys are: the batch's detached current vectors, their bank rows, and the bank
rows of sampled extra examples. Log-softmax at temperature tau masks only the anchor's own detached copy.
Positives: same example (unsupervised), same label (supervised, classification only). Keys carry no gradient.

Reductions over anchors b with positive sets P(b) (m_b = mean log p over P(b)):
- ``reference`` (the CAP code): -sum_b m_b / sum_b |P(b)|
- ``supcon`` (standard SupCon mean): -sum_b m_b / #anchors
With ranks, each rank sums its own anchors and divides by the *global* normaliser (see ``distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REDUCTIONS = ("reference", "supcon")
MASK_VALUE = -1e6


@dataclass
class Candidates:
    """Keys of one module's candidate set with their source example and label."""

    keys: torch.Tensor  # K x H, detached, L2-normalised
    src: torch.Tensor  # K, dataset index of the example each key encodes
    labels: torch.Tensor | None  # K
    self_index: torch.Tensor  # B, position of each local anchor's own detached copy in keys


@dataclass
class PositiveStats:
    """Per-rank pieces of one loss term, to be combined with global normalisers."""

    sum_mean_log_prob: torch.Tensor  # sum over anchors with |P|>0 of mean log p over P (with grad)
    positives: torch.Tensor  # sum of |P(b)| (detached)
    anchors: torch.Tensor  # number of anchors with |P|>0 (detached)


def build_candidates(current: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None,
                     batch_rows: torch.Tensor, extra_idx: torch.Tensor, extra_rows: torch.Tensor,
                     extra_labels: torch.Tensor | None, self_index: torch.Tensor | None = None) -> Candidates:
    """Assemble [sg(current); their bank rows (B*R); extra bank rows (E*R)] as in the reference code.

    ``current``: B x H vectors of the (possibly all-rank) batch, ``batch_rows``: B x R x H, ``extra_rows``:
    E x R x H, all on one device. ``self_index``: where the local anchors sit in ``current`` (default: all of it, single process).
    """
    b, r, h = batch_rows.shape
    e = extra_rows.shape[0]
    keys = torch.cat([current.detach(), batch_rows.reshape(b * r, h), extra_rows.reshape(e * r, h)], dim=0)
    src = torch.cat([idx, idx.repeat_interleave(r), extra_idx.repeat_interleave(r)])
    key_labels = None
    if labels is not None and extra_labels is not None:
        key_labels = torch.cat([labels, labels.repeat_interleave(r), extra_labels.repeat_interleave(r)])
    if self_index is None:
        self_index = torch.arange(b, device=current.device)
    return Candidates(keys=keys, src=src, labels=key_labels, self_index=self_index)


def _stats(log_prob: torch.Tensor, positives: torch.Tensor) -> PositiveStats:
    """Sums over the anchors that have a positive, by masking instead of boolean indexing (whose output size
    is a device-to-host read on CUDA); an anchor without positives contributes exactly 0 either way."""
    counts = positives.sum(dim=1)
    valid = counts > 0
    per_anchor = (log_prob * positives).sum(dim=1) / counts.clamp(min=1)
    return PositiveStats(torch.where(valid, per_anchor, 0.0).sum(), counts.sum().detach(),
                         valid.sum().to(counts.dtype))


def positive_stats(anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None, cand: Candidates,
                   temperature: float) -> tuple[PositiveStats, PositiveStats | None]:
    """(unsupervised, supervised) pieces for the local anchors; supervised is None without labels."""
    logits = anchors.float() @ cand.keys.float().t() / temperature  # B x K
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, cand.self_index] = True
    logits = logits.masked_fill(self_mask, MASK_VALUE)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_u = ((cand.src.unsqueeze(0) == idx.unsqueeze(1)) & ~self_mask).float()
    sup = None
    if labels is not None and cand.labels is not None:
        sup = _stats(log_prob, ((cand.labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask).float())
    return _stats(log_prob, pos_u), sup


def reduce_stats(stats: PositiveStats, reduction: str, positives_total: torch.Tensor | None = None,
                 anchors_total: torch.Tensor | None = None, world: int = 1) -> torch.Tensor:
    """The loss from per-rank pieces; totals default to the local ones (single process)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown contrastive reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    denom = stats.positives if reduction == "reference" else stats.anchors
    total = positives_total if reduction == "reference" else anchors_total
    denom = denom if total is None else total
    # Normalisers count positives or anchors: 0 or >= 1. At 0 the sum is 0 too, and so is the loss (its gradient
    # is 0), with no host read of the count.
    return -stats.sum_mean_log_prob * world / denom.clamp(min=1)


def contrastive_terms(anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None, cand: Candidates,
                      temperature: float, reduction: str = "reference") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Single-process (unsupervised, supervised) losses of one module; supervised is None without labels."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown contrastive reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    unsup, sup = positive_stats(anchors, idx, labels, cand, temperature)
    return reduce_stats(unsup, reduction), (reduce_stats(sup, reduction) if sup is not None else None)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            is_regression: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) with batchmean (classification); MSE for regression."""
    if is_regression:
        return F.mse_loss(student_logits.float().view(-1), teacher_logits.float().view(-1))
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean") * t * t
