"""Mask math shared by the pruning methods: exact top-k, N:M blocks, the sigmoid threshold and the
straight-through binarizers that carry a mask's gradient to learned scores.

Which method uses what lives in the method modules (``magnitude.py``, ``movement.py``, ...); this module only
computes. Movement and soft movement learn scores through a straight-through estimator (STE): the
mask's gradient is passed to the scores unchanged, so d loss / d score = (d loss / d W') * W (Sanh et al. 2020).
Top-k selection is exact, with one tie rule, and chosen per device type (``topk.py``: the sync-free ``radix``
search by default, ``kthvalue`` for small CPU inputs; never a full sort per forward: DeepSpeed's old binarizer
sorted every forward).
N:M masks keep the top N of every M consecutive entries along the input dim (the last one).
Structured masks (rows of a weight, groups of input columns = heads) rank a per-unit vector the same way.
"""

from __future__ import annotations

import torch

from cap_ds.compression.topk import (  # noqa: F401  (re-exported: the top-k candidates used to live here)
    DEFAULT_TOPK,
    DEFAULT_TOPK_OTHER,
    ENV_TOPK,
    SMALL_TOPK,
    TOPK_IMPLS,
    _keep_from_kth,
    topk_impl,
    topk_keep,
    topk_keep_batched,
)


def num_kept(numel: int, keep_ratio: float) -> int:
    """Entries kept at ``keep_ratio``; the reference's ``int(th * numel)`` with a float guard."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in [0, 1], got {keep_ratio}")
    return min(numel, int(keep_ratio * numel + 1e-6))


def topk_mask(values: torch.Tensor, keep_ratio: float, impl: str | None = None) -> torch.Tensor:
    """Mask (same dtype as ``values``) keeping exactly the ``num_kept`` largest entries (``impl``: see
    :data:`TOPK_IMPLS`; default :func:`topk_impl` for ``values``' device type)."""
    k = num_kept(values.numel(), keep_ratio)
    if k >= values.numel():
        return torch.ones_like(values)
    if k == 0:
        return torch.zeros_like(values)
    return topk_keep(values.detach().flatten(), k, impl).view_as(values).to(values.dtype)


def nm_mask(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along the last dim (needs ``size(-1) % m == 0``)."""
    if n >= m:
        return torch.ones_like(values)
    blocks = values.detach().reshape(*values.shape[:-1], values.shape[-1] // m, m)
    mask = torch.zeros_like(blocks)
    if n > 0:
        mask.scatter_(-1, torch.topk(blocks, n, dim=-1, sorted=False).indices, 1.0)
    return mask.reshape(values.shape)


def nm_kept(keep_ratio: float, n: int, m: int) -> int:
    """Entries kept per block of ``m`` at ``keep_ratio`` along the schedule: from ``m`` (dense) down to ``n``."""
    return max(n, min(m, int(round(keep_ratio * m))))


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


class NMBinarizer(torch.autograd.Function):
    """N:M of scores in the forward, straight-through in the backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        return nm_mask(scores, n, m)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


class ThresholdBinarizer(torch.autograd.Function):
    """Sigmoid threshold in the forward, straight-through in the backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return sigmoid_threshold_mask(scores, threshold)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


class CachedBinarizer(torch.autograd.Function):
    """A mask computed earlier (in the same optimizer step) in the forward, straight-through to the scores in the
    backward: the same gradient as the binarizer that made it."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None
