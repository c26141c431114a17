"""Mask methods: how a binary keep-mask is derived from weights or learned scores.

``movement`` / ``topk`` and ``soft_movement`` learn scores through a straight-through estimator (STE): the
mask's gradient is passed to the scores unchanged, so d loss / d score = (d loss / d W') * W (Sanh et al. 2020).
Top-k uses ``torch.topk`` (never a full sort: DeepSpeed's old binarizer sorted every forward).
"""

from __future__ import annotations

import torch

SCORE_METHODS = ("movement", "soft_movement")
DATA_METHODS = ("magnitude",)
SPARSE_METHODS = ("magnitude", "movement", "soft_movement", "l1", "topk")
# DeepSpeed's old names map onto ours: l1 = magnitude mask, topk = learned top-k scores (movement).
METHOD_ALIASES = {"l1": "magnitude", "topk": "movement"}


def canonical_method(name: str) -> str:
    if name not in SPARSE_METHODS:
        raise ValueError(f"unknown sparse pruning method {name!r}; allowed: {', '.join(SPARSE_METHODS)}")
    return METHOD_ALIASES.get(name, name)


def num_kept(numel: int, keep_ratio: float) -> int:
    """Entries kept at ``keep_ratio``; the reference's ``int(th * numel)`` with a float guard."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in [0, 1], got {keep_ratio}")
    return min(numel, int(keep_ratio * numel + 1e-6))


def topk_mask(values: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Mask (same dtype as ``values``) keeping exactly the ``num_kept`` largest entries."""
    k = num_kept(values.numel(), keep_ratio)
    if k >= values.numel():
        return torch.ones_like(values)
    mask = torch.zeros_like(values)
    if k > 0:
        idx = torch.topk(values.detach().flatten(), k, sorted=False).indices
        mask.view(-1).index_fill_(0, idx, 1.0)
    return mask


class TopKBinarizer(torch.autograd.Function):
    """Top-k of scores in the forward, identity (straight-through) in the backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
        return topk_mask(scores, keep_ratio)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def sigmoid_threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft-movement mask: sigmoid(S) > threshold, keeping at least 0.5 % + 1 entries (reference floor)."""
    numel = scores.numel()
    mask = (torch.sigmoid(scores.detach()) > threshold).to(scores.dtype)
    nb_min = int(0.005 * numel) + 1
    if mask.sum() < nb_min:
        mask = topk_mask(scores, nb_min / numel)
    return mask


class ThresholdBinarizer(torch.autograd.Function):
    """Sigmoid threshold in the forward, straight-through in the backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return sigmoid_threshold_mask(scores, threshold)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def compute_mask(method: str, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """The keep-mask for ``method`` (canonical name); differentiable w.r.t. scores where the method learns them.

    ``threshold`` is the kept fraction for magnitude/movement, and the sigmoid threshold for soft movement.
    Magnitude masks carry no gradient (plain gradual magnitude pruning: pruned weights get no update).
    """
    if method == "magnitude":
        return topk_mask(weight.detach().abs(), threshold)
    if scores is None:
        raise ValueError(f"method {method!r} needs mask scores")
    if method == "movement":
        return TopKBinarizer.apply(scores, threshold)
    if method == "soft_movement":
        return ThresholdBinarizer.apply(scores, threshold)
    raise ValueError(f"unknown canonical method {method!r}")
