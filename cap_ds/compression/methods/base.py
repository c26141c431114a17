"""The pruning-method interface, one class per method as in ``torch.ao.pruning``: everything that differs between
magnitude, movement, soft movement and first-order pruning is a class attribute or a hook of
:class:`PruningMethod`, so masked layers, the scheduler, the config parser and the run's flags ask the method
object instead of comparing names. A new method subclasses it, overrides what differs and is registered once
(``registry.register_method``); ``docs/methods.md`` walks through one.

Method objects are stateless: the registry holds one per name, layers and configs refer to it, and copies
(``deepcopy``, pickle) resolve back to the registered object, so ``is`` compares methods. Per-run state (the
step, soft movement's controlled threshold, CAP-f's importance) stays in the scheduler or pruner using the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cap_ds.compression.methods.scores import fill_scores

if TYPE_CHECKING:
    from cap_ds.compression.config import TechniqueConfig
    from cap_ds.compression.layers import MaskedLinear

SPARSE = "sparse"  # masks single weights: compression_training.sparse_pruning
UNITS = "units"  # masks whole output rows or heads: row_pruning, head_pruning
KINDS = (SPARSE, UNITS)

# The schedule at the current step: ramp(before, after) is ``before`` until schedule_offset, then the cubic ramp
# to ``after`` at schedule_offset_end (the scheduler owns offsets, stride and the curve; a method picks the ends).
Ramp = Callable[[float, float], float]


class PruningMethod:
    """One pruning method. Class attributes state facts the rest of the code branches on; the hooks below have
    working defaults except the mask hooks of the ``kinds`` a method claims, which it must implement."""

    # ---- identity
    name: ClassVar[str] = ""  # canonical: --pruning_method, MaskedLinear.method, config files
    ds_name: ClassVar[str | None] = None  # DeepSpeed's schema spelling (l1, topk); row/head pruning accept only it
    kinds: ClassVar[frozenset[str]] = frozenset({SPARSE})  # what it masks: SPARSE, UNITS or both

    # ---- facts (defaults: a plain scheduled, unstructured method without scores)
    structured: ClassVar[bool] = False  # a --pruning_method run prunes heads/FFN neurons in CAP-f stages
    learns_scores: ClassVar[bool] = False  # the layer gets trained ``*mask_scores`` parameters
    fixed_units: ClassVar[bool] = False  # row/head masks are buffers a pruner writes: no schedule, no scores
    exact_topk: ClassVar[bool] = False  # the unstructured mask is exactly top-k of topk_source(): batched prefill
    supports_blocks: ClassVar[bool] = False  # block_pattern "N:M" is allowed (keep_mask gets ``block``)
    supports_threshold_control: ClassVar[bool] = False  # threshold_control: one global sigmoid(score) quantile
    regularizes: ClassVar[bool] = False  # adds a loss term, from values in_forward() stashes on each layer
    dense_threshold: ClassVar[float] = 1.0  # a new layer's threshold (keeps everything until the schedule moves)

    @property
    def unit_name(self) -> str:
        """How ``row_pruning`` / ``head_pruning`` spell the method (DeepSpeed's schema names)."""
        return self.ds_name or self.name

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name sparse pruning and the CLI resolve to this method: canonical first, then DeepSpeed's."""
        return (self.name,) if self.ds_name is None or self.ds_name == self.name else (self.name, self.ds_name)

    # ---- config
    def default_mask_init(self, threshold_control: bool) -> str:
        """The score init when none is given: ``magnitude`` (the first masks are the magnitude masks; zero-init
        scores collapse at short budgets, README "Movement pruning"). Read only where scores are learned."""
        return "magnitude"

    def ratio_optional(self, tech: TechniqueConfig) -> bool:
        """Whether groups may omit ``dense_ratio`` (the method reaches its sparsity some other way)."""
        return False

    # ---- scores
    def init_scores(self, scores: torch.Tensor, mask_init: str, mask_scale: float | None,
                    magnitude: torch.Tensor) -> None:
        """Fill freshly allocated scores in place (sparse [out, in], rows [out, 1], heads [1, heads]); ``magnitude``
        (same shape) is what the ``magnitude`` init ranks by. Called only where ``learns_scores``."""
        fill_scores(scores, mask_init, mask_scale, magnitude)

    # ---- masks (in the values' dtype; differentiable w.r.t. learned scores, straight-through)
    def keep_mask(self, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
        """The sparse keep-mask over ``weight`` at the layer's ``threshold`` (``block``: N:M, if supported)."""
        raise NotImplementedError(f"pruning method {self.name!r} does not mask single weights")

    def unit_mask(self, norms: Callable[[], torch.Tensor], scores: torch.Tensor | None, keep_ratio: float,
                  fixed: torch.Tensor | None) -> torch.Tensor:
        """1-D keep-mask over rows or heads. ``norms()``: the units' L1 norms (computed only when called);
        ``scores``: learned unit scores; ``fixed``: the buffer a pruner writes (``fixed_units``)."""
        raise NotImplementedError(f"pruning method {self.name!r} does not mask rows or heads")

    def topk_source(self, weight: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """The tensor whose top-k is the unstructured mask (its size, dtype and device group the scheduler's batched
        top-k). Only asked where ``exact_topk``."""
        raise NotImplementedError(f"pruning method {self.name!r} is not an exact top-k")

    def write_topk_values(self, weight: torch.Tensor, scores: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """Write what the top-k ranks, flattened, into ``out`` (a row of the batched top-k); default: a copy."""
        return out.copy_(self.topk_source(weight, scores).detach().reshape(-1))

    # ---- schedule
    def sparse_threshold(self, tech: TechniqueConfig, dense_ratio: float, ramp: Ramp) -> float:
        """A sparse layer's threshold at the current step: the kept fraction, from 1 down to the group's ratio."""
        return ramp(1.0, dense_ratio)

    def regularization_lambda(self, tech: TechniqueConfig, threshold: float, ramp: Ramp) -> float:
        """Weight of the loss term the layers stashed (``regularizes``) at the current step; 0 without one."""
        return 0.0

    def reaches_target(self, tech: TechniqueConfig) -> bool:
        """Whether the masks hit the groups' ``dense_ratio`` at the schedule's end (a run short of it failed)."""
        return self.exact_topk

    def in_forward(self, layer: MaskedLinear) -> None:
        """Work due inside every forward of a layer using the method, before masking: the only place where ZeRO-3
        partitioned scores hold data (stash what the scheduler reads later). Default: nothing."""

    # ---- one object per method
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        from cap_ds.compression.methods.registry import get_method  # the registry imports this module

        return get_method, (self.name,)

    def __copy__(self) -> PruningMethod:
        return self

    def __deepcopy__(self, memo: dict) -> PruningMethod:
        return self

    def __repr__(self) -> str:
        return f"<pruning method {self.name}>"
