"""CAP's memory-bank contrastive loss (as the reference code computes it) and the distillation loss.

Per module and step the candidate keys are: the batch's detached current vectors, their bank rows, and the bank
rows of sampled extra examples. Log-softmax at temperature tau masks only the anchor's own detached copy.
Positives: same example (unsupervised), same label (supervised, classification only). Keys carry no gradient.
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
    self_index: torch.Tensor  # B, position of each anchor's own detached copy in keys


def build_candidates(anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None,
                     batch_rows: torch.Tensor, extra_idx: torch.Tensor, extra_rows: torch.Tensor,
                     extra_labels: torch.Tensor | None) -> Candidates:
    """Assemble [sg(anchors); batch bank rows (B*R); extra bank rows (E*R)] as in the reference code.

    ``batch_rows``: B x R x H, ``extra_rows``: E x R x H (rows of the same bank).
    """
    b, r, h = batch_rows.shape
    e = extra_rows.shape[0]
    keys = torch.cat([anchors.detach(), batch_rows.reshape(b * r, h), extra_rows.reshape(e * r, h)], dim=0)
    src = torch.cat([idx, idx.repeat_interleave(r), extra_idx.to(idx.device).repeat_interleave(r)])
    key_labels = None
    if labels is not None and extra_labels is not None:
        key_labels = torch.cat([labels, labels.repeat_interleave(r), extra_labels.to(labels.device).repeat_interleave(r)])
    return Candidates(keys=keys, src=src, labels=key_labels, self_index=torch.arange(b, device=anchors.device))


def _reduce(log_prob: torch.Tensor, positives: torch.Tensor, reduction: str) -> torch.Tensor:
    counts = positives.sum(dim=1)
    per_anchor = (log_prob * positives).sum(dim=1) / counts.clamp(min=1)
    valid = counts > 0
    if not valid.any():
        return log_prob.sum() * 0.0
    if reduction == "reference":
        # Reference: sum_b mean_{k in P(b)} log p / sum_b |P(b)|  (= SupCon mean divided by the mean |P|).
        return -per_anchor[valid].sum() / counts[valid].sum()
    if reduction == "supcon":
        return -per_anchor[valid].mean()
    raise ValueError(f"unknown contrastive reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")


def contrastive_terms(anchors: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None, cand: Candidates,
                      temperature: float, reduction: str = "reference") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unweighted (unsupervised, supervised) losses of one module; supervised is None without labels."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown contrastive reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    logits = anchors.float() @ cand.keys.float().t() / temperature  # B x K
    b = anchors.shape[0]
    rows = torch.arange(b, device=anchors.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, cand.self_index] = True
    logits = logits.masked_fill(self_mask, MASK_VALUE)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_u = (cand.src.unsqueeze(0) == idx.unsqueeze(1)) & ~self_mask
    loss_u = _reduce(log_prob, pos_u.float(), reduction)
    loss_s = None
    if labels is not None and cand.labels is not None:
        pos_s = (cand.labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
        loss_s = _reduce(log_prob, pos_s.float(), reduction)
    return loss_u, loss_s


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            is_regression: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) with batchmean (classification); MSE for regression."""
    if is_regression:
        return F.mse_loss(student_logits.float().view(-1), teacher_logits.float().view(-1))
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean") * t * t
