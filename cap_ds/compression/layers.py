"""The compressed linear layer: a ``nn.Linear`` whose weight is multiplied by keep-masks in every forward.

Three masks, applied in DeepSpeed's order: sparse (per weight, optionally N:M) -> row (output rows and their
bias, e.g. FFN neurons of ``intermediate.dense``) -> head (input columns grouped per head, on the attention output
projection: zeroing a head's columns is exactly zeroing that head's context). Masking happens inside ``forward``
(never by editing ``weight.data``), which keeps it correct under ZeRO 2/3: the fp32 master copy owned by the
optimizer would overwrite in-place edits at the next step, and under ZeRO-3 parameters only hold data inside their
module's forward. Masks are built in the weight's dtype (bf16 safe); fixed masks are non-persistent buffers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cap_ds.compression.methods import SPARSE, UNITS, CachedBinarizer, PruningMethod, get_method, num_kept
from cap_ds.compression.methods.scores import MASK_INITS  # noqa: F401  (re-exported: the CLI's --mask_init choices)
from cap_ds.ops import kernel_wanted, masked_linear, recomputed_masked_linear

# Resolution of the sigmoid(score) histogram behind soft movement's quantile threshold (width 1.5e-5).
SCORE_HISTOGRAM_BINS = 1 << 16

# Layer -> (weakly) the scheduler method that fills many layers' mask caches with one batched top-k
# (CompressionScheduler.prefill_masks); called at a layer's cache miss. Weak both ways: a copied or pickled model
# carries none of it, and the layer then computes its own mask.
_MASK_PREFILL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_mask_prefill(module: MaskedLinear, prefill: Callable[[], None]) -> None:
    """Let ``prefill`` (a bound method) fill ``module``'s mask cache, batched with other layers, at a cache miss."""
    _MASK_PREFILL[module] = weakref.WeakMethod(prefill)


def is_score_parameter(name: str) -> bool:
    """Pruning scores (``mask_scores``, ``row_mask_scores``, ``head_mask_scores``): trained, never exported."""
    return name.endswith("mask_scores")


class MaskedLinear(nn.Linear):
    """Linear layer with optional sparse, row and head keep-masks.

    Each mask follows a method object (``strategy``, ``row_strategy``, ``head_strategy``: a registered
    :class:`PruningMethod`), which computes it; ``method`` / ``row_method`` / ``head_method`` are their names.
    ``threshold`` (sparse), ``row_threshold`` and ``head_threshold`` are set by the compression scheduler: kept
    fraction for magnitude/movement/l1/topk, sigmoid threshold for soft movement. Learned scores
    (``mask_scores``, ``row_mask_scores`` [out, 1], ``head_mask_scores`` [1, heads]) are regular parameters so
    DeepSpeed shards and updates them like any other; their names all end in ``mask_scores``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: str | PruningMethod | None = "movement",
        mask_init: str = "constant",
        mask_scale: float | None = None,
        *,
        block: tuple[int, int] | None = None,
        **factory_kwargs,  # device, dtype (as nn.Linear)
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **factory_kwargs)
        self._setup(method, mask_init, mask_scale, block)

    def _setup(self, method: str | PruningMethod | None, mask_init: str, mask_scale: float | None,
               block: tuple[int, int] | None = None) -> None:
        self.strategy: PruningMethod | None = get_method(method, SPARSE) if method is not None else None
        # Dense until the scheduler says otherwise (kept fraction 1 / sigmoid threshold 0 keep everything).
        self.threshold = self.strategy.dense_threshold if self.strategy is not None else 1.0
        self.block = block
        if block is not None and self.in_features % block[1]:
            raise ValueError(f"block pattern {block[0]}:{block[1]} needs in_features ({self.in_features}) "
                             f"divisible by {block[1]}")
        self.pruning_enabled = True
        # Reuse the sparse mask until the scheduler says weights, scores or thresholds changed (one top-k per layer
        # and optimizer step instead of one per forward: micro-steps, eval, bank and snapshot passes). Turned on by
        # CompressionScheduler, which invalidates it at every step; off, the mask is recomputed in every forward.
        self.mask_cache_enabled = False
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        self.last_regularization: torch.Tensor | None = None
        self.track_scores = False  # set by CompressionScheduler when it sets soft movement's threshold by quantile
        self.last_histogram: torch.Tensor | None = None
        self.group: str | None = None
        self.row_strategy: PruningMethod | None = None
        self.row_group: str | None = None
        self.row_threshold = 1.0
        self.head_strategy: PruningMethod | None = None
        self.head_group: str | None = None
        self.head_threshold = 1.0
        self.num_heads = 0
        self.register_parameter("row_mask_scores", None)
        self.register_parameter("head_mask_scores", None)
        self.register_buffer("row_mask_fixed", None, persistent=False)
        self.register_buffer("head_mask_fixed", None, persistent=False)
        if self.strategy is not None and self.strategy.learns_scores:
            scores = torch.empty_like(self.weight, requires_grad=False)
            self.strategy.init_scores(scores, mask_init, mask_scale, self.weight)
            self.mask_scores = nn.Parameter(scores)
        else:
            self.register_parameter("mask_scores", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str | PruningMethod | None, mask_init: str = "constant",
                    mask_scale: float | None = None,
                    block: tuple[int, int] | None = None) -> MaskedLinear:
        """Wrap an existing linear, sharing its weight and bias parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(method, mask_init, mask_scale, block)
        new.train(linear.training)
        return new

    # ---- names of the masks' methods (None: no such mask)
    @property
    def method(self) -> str | None:
        return self.strategy.name if self.strategy is not None else None

    @property
    def row_method(self) -> str | None:
        return self.row_strategy.unit_name if self.row_strategy is not None else None

    @property
    def head_method(self) -> str | None:
        return self.head_strategy.unit_name if self.head_strategy is not None else None

    # ---- structured pruning switches (DeepSpeed's ``enable_*_pruning`` names)
    def enable_row_pruning(self, method: str | PruningMethod, mask_init: str = "kaiming",
                           mask_scale: float | None = None) -> None:
        """Mask whole output rows (and their bias): ``l1`` by row L1 norm, ``topk`` by learned [out, 1] scores,
        ``first_order`` by a fixed mask the first-order pruner writes."""
        strategy = self.row_strategy = get_method(method, UNITS)
        self.row_threshold = 1.0
        if strategy.learns_scores:
            scores = self.weight.new_empty(self.out_features, 1)
            strategy.init_scores(scores, mask_init, mask_scale, self.weight.detach().abs().sum(1, keepdim=True))
            self.row_mask_scores = nn.Parameter(scores)
        if strategy.fixed_units:
            self.register_buffer("row_mask_fixed", torch.ones(self.out_features, device=self.weight.device),
                                 persistent=False)

    def enable_head_pruning(self, method: str | PruningMethod, num_heads: int, mask_init: str = "kaiming",
                            mask_scale: float | None = None) -> None:
        """Mask groups of input columns, one group per attention head (``in_features // num_heads`` each)."""
        strategy = get_method(method, UNITS)
        if num_heads < 1 or self.in_features % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide in_features {self.in_features}")
        self.head_strategy = strategy
        self.num_heads = int(num_heads)
        self.head_threshold = 1.0
        if strategy.learns_scores:
            scores = self.weight.new_empty(1, self.num_heads)
            strategy.init_scores(scores, mask_init, mask_scale, self._head_l1().unsqueeze(0))
            self.head_mask_scores = nn.Parameter(scores)
        if strategy.fixed_units:
            self.register_buffer("head_mask_fixed", torch.ones(self.num_heads, device=self.weight.device),
                                 persistent=False)

    @property
    def head_size(self) -> int:
        return self.in_features // self.num_heads if self.num_heads else 0

    def _row_l1(self) -> torch.Tensor:
        return self.weight.detach().abs().sum(1)

    def _head_l1(self) -> torch.Tensor:
        return self.weight.detach().abs().reshape(self.out_features, self.num_heads, -1).sum((0, 2))

    def extra_repr(self) -> str:
        out = f"{super().extra_repr()}, method={self.method}, threshold={self.threshold:.4f}"
        if self.block is not None:
            out += f", block={self.block[0]}:{self.block[1]}"
        if self.row_method:
            out += f", row={self.row_method}@{self.row_threshold:.4f}"
        if self.head_method:
            out += f", heads={self.num_heads} {self.head_method}@{self.head_threshold:.4f}"
        return out

    # ---- masks (all in the weight's dtype; differentiable w.r.t. scores where a method learns them)
    def invalidate_masks(self) -> None:
        """Forget the cached sparse mask (weights, scores or the threshold changed)."""
        self._mask_cache = None

    def _mask_cache_key(self) -> tuple:
        """The key guards against a threshold or placement changed by hand; weights and scores only change at
        optimizer steps, after which the scheduler invalidates the cache."""
        return (self.threshold, self.block, self.weight.shape, self.weight.device)

    def _mask_cached(self) -> bool:
        return self._mask_cache is not None and self._mask_cache[0] == self._mask_cache_key()

    def topk_request(self) -> tuple[int, int, torch.dtype, torch.device] | None:
        """(entries, kept, dtype, device) of the top-k this layer's cached sparse mask still needs, when a batched
        top-k may compute it instead (:meth:`store_mask`): unstructured magnitude/movement, cache on and stale,
        weight and scores whole (not ZeRO-3 partitioned: those hold data only inside forward). Else None."""
        if (self.strategy is None or not self.strategy.exact_topk or self.block is not None
                or not self.pruning_enabled
                or not self.mask_cache_enabled or self.weight.numel() == 0
                or hasattr(self.weight, "ds_id") or hasattr(self.mask_scores, "ds_id") or self._mask_cached()):
            return None
        values = self.strategy.topk_source(self.weight, self.mask_scores)
        return values.numel(), num_kept(values.numel(), self.threshold), values.dtype, values.device

    @torch.no_grad()
    def topk_values(self, out: torch.Tensor) -> torch.Tensor:
        """Write what the sparse mask ranks (|W| for magnitude, the scores for movement), flattened, into ``out``."""
        return self.strategy.write_topk_values(self.weight, self.mask_scores, out)

    def store_mask(self, keep: torch.Tensor) -> None:
        """Cache ``keep`` (bool, the weight's numel) as this step's sparse mask, as :meth:`sparse_mask` would."""
        self._mask_cache = (self._mask_cache_key(), keep.view(self.weight.shape))

    def cached_keep(self) -> torch.Tensor | None:
        """This step's boolean sparse mask from the per-step cache (filled by the scheduler's batched prefill or
        computed here), or None when the cache is not in use (no sparse method, pruning off, cache off)."""
        if self.strategy is None or not self.pruning_enabled or not self.mask_cache_enabled \
                or self.weight.numel() == 0:
            return None
        if not self._mask_cached():
            ref = _MASK_PREFILL.get(self)
            prefill = ref() if ref is not None else None  # None too once its scheduler is gone
            if prefill is not None:
                prefill()  # may fill this layer's cache (and its size group's) with one batched top-k
        if not self._mask_cached():
            with torch.no_grad():
                mask = self.strategy.keep_mask(self.weight, self.mask_scores, self.threshold, self.block)
            self._mask_cache = (self._mask_cache_key(), mask.bool())
        return self._mask_cache[1]

    def _learning_scores(self) -> torch.Tensor | None:
        """The scores the mask's straight-through gradient goes to in this forward, if any."""
        if self.mask_scores is not None and self.mask_scores.requires_grad and torch.is_grad_enabled():
            return self.mask_scores
        return None

    def sparse_mask(self) -> torch.Tensor | None:
        if self.strategy is None or not self.pruning_enabled:
            return None
        keep = self.cached_keep()
        if keep is None:
            return self.strategy.keep_mask(self.weight, self.mask_scores, self.threshold,
                                           self.block).to(self.weight.dtype)
        mask = keep.to(self.weight.dtype)
        scores = self._learning_scores()
        return CachedBinarizer.apply(scores, mask) if scores is not None else mask

    def row_mask(self) -> torch.Tensor | None:
        """[out] keep-mask over output rows, or None."""
        if self.row_strategy is None or not self.pruning_enabled:
            return None
        return self.row_strategy.unit_mask(self._row_l1, self.row_mask_scores, self.row_threshold,
                                           self.row_mask_fixed).to(self.weight.dtype)

    def head_mask(self) -> torch.Tensor | None:
        """[num_heads] keep-mask over heads (input column groups), or None."""
        if self.head_strategy is None or not self.pruning_enabled:
            return None
        return self.head_strategy.unit_mask(self._head_l1, self.head_mask_scores, self.head_threshold,
                                            self.head_mask_fixed).to(self.weight.dtype)

    def _apply_masks(self, weight: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse_mask()
        if sparse is not None:
            weight = weight * sparse
        row = self.row_mask()
        if row is not None:
            weight = weight * row.unsqueeze(1)
        head = self.head_mask()
        if head is not None:
            weight = weight * head.repeat_interleave(self.head_size).unsqueeze(0)
        return weight

    def _scores_partitioned(self) -> bool:
        """ZeRO-3 holds the scores' data only inside this layer's forward."""
        return hasattr(self.mask_scores, "ds_id")

    def score_histogram(self) -> torch.Tensor:
        """Counts of sigmoid(scores) in SCORE_HISTOGRAM_BINS equal bins over [0, 1] (soft movement)."""
        return torch.histc(torch.sigmoid(self.mask_scores.detach().float()), bins=SCORE_HISTOGRAM_BINS,
                           min=0.0, max=1.0)

    def latest_score_histogram(self) -> torch.Tensor | None:
        """The histogram of the current scores, or under ZeRO-3 the one stashed by the last training forward
        (None if there was none); the stash is consumed."""
        if not self._scores_partitioned():
            return self.score_histogram()
        hist, self.last_histogram = self.last_histogram, None
        return hist

    def get_mask(self) -> torch.Tensor:
        """Combined keep-mask (sparse x row x head) over the weight, in the weight's dtype."""
        return self._apply_masks(torch.ones_like(self.weight))

    def masked_weight(self) -> torch.Tensor:
        return self._apply_masks(self.weight)

    def masked_bias(self) -> torch.Tensor | None:
        """The bias with pruned rows zeroed (a pruned row's output is then exactly 0)."""
        row = self.row_mask()
        if self.bias is None or row is None:
            return self.bias
        return self.bias * row

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.strategy is not None:
            self.strategy.in_forward(self)  # e.g. soft movement's regulariser: ZeRO-3 scores hold data only now
        if not self.pruning_enabled:
            return F.linear(input, self.weight, self.bias)
        if self.row_method is None and self.head_method is None:
            keep = self.cached_keep()
            if keep is not None and not kernel_wanted() and not torch.is_autocast_enabled(input.device.type):
                # The cached mask, and the straight-through gradient to the scores, without keeping W*M (nor
                # the mask in the weight's dtype) from forward to backward (ops.RecomputedMaskedLinear).
                return recomputed_masked_linear(input, self.weight, self.bias, keep, self._learning_scores())
            # Only a sparse mask: masked_linear routes x @ (W*M)^T + b to the cap_masked_gemm op with
            # CAP_DS_KERNELS=on (same numbers; W*M not kept for the backward), else to F.linear(x, W*M, b).
            sparse = self.sparse_mask()
            if sparse is not None:
                return masked_linear(input, self.weight, sparse, self.bias)
        return F.linear(input, self.masked_weight(), self.masked_bias())

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the masks baked into weight and bias (what gets exported)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.masked_weight())
        if self.bias is not None:
            out.bias.copy_(self.masked_bias())
        out.train(self.training)
        return out
