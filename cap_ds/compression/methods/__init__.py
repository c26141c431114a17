"""Pruning methods as objects (``base.PruningMethod``), one module each, registered once (``registry``), plus the
mask math they share (``masks``: top-k, N:M, binarizers) and the score inits (``scores``).

The rest of ``compression`` and the layers above it hold a method object (``get_method(name)``) and call its
hooks; no name of a method is compared outside this package. ``docs/methods.md`` shows how to add one.
"""

from __future__ import annotations

import torch

from cap_ds.compression.methods.base import KINDS, SPARSE, UNITS, PruningMethod, Ramp
from cap_ds.compression.methods.first_order import FirstOrder
from cap_ds.compression.methods.magnitude import Magnitude
from cap_ds.compression.methods.masks import (
    DEFAULT_TOPK,
    DEFAULT_TOPK_OTHER,
    ENV_TOPK,
    SMALL_TOPK,
    TOPK_IMPLS,
    CachedBinarizer,
    NMBinarizer,
    ThresholdBinarizer,
    TopKBinarizer,
    _keep_from_kth,
    nm_kept,
    nm_mask,
    num_kept,
    sigmoid_threshold_mask,
    topk_impl,
    topk_keep,
    topk_keep_batched,
    topk_mask,
)
from cap_ds.compression.methods.movement import Movement
from cap_ds.compression.methods.registry import (
    BUILTIN_METHODS,
    UnknownMethodError,
    find_method,
    get_method,
    method_names,
    register_method,
    registered_methods,
    unregister_method,
)
from cap_ds.compression.methods.scores import DEFAULT_MASK_SCALE, MASK_INITS, default_mask_scale, fill_scores
from cap_ds.compression.methods.soft_movement import SoftMovement


def compute_mask(method: str | PruningMethod, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float,
                 block: tuple[int, int] | None = None) -> torch.Tensor:
    """The sparse keep-mask of ``method`` (any spelling) for one weight: ``get_method(method).keep_mask``."""
    return get_method(method, SPARSE).keep_mask(weight, scores, threshold, block)


__all__ = [
    "BUILTIN_METHODS", "DEFAULT_MASK_SCALE", "DEFAULT_TOPK", "DEFAULT_TOPK_OTHER", "ENV_TOPK", "KINDS",
    "MASK_INITS", "SMALL_TOPK", "SPARSE", "TOPK_IMPLS", "UNITS", "CachedBinarizer", "FirstOrder",
    "Magnitude", "Movement", "NMBinarizer", "PruningMethod", "Ramp", "SoftMovement", "ThresholdBinarizer",
    "TopKBinarizer", "UnknownMethodError", "_keep_from_kth", "compute_mask", "default_mask_scale",
    "fill_scores", "find_method", "get_method", "method_names", "nm_kept", "nm_mask", "num_kept",
    "register_method", "registered_methods", "sigmoid_threshold_mask", "topk_impl", "topk_keep",
    "topk_keep_batched", "topk_mask", "unregister_method",
]
