"""The compressed linear layer: a ``nn.Linear`` whose weight is multiplied by a keep-mask in every forward.

Masking happens inside ``forward`` (never by editing ``weight.data``), which keeps it correct under ZeRO 2/3:
the fp32 master copy owned by the optimizer would overwrite in-place edits at the next step, and under ZeRO-3
parameters only hold data inside their module's forward. The mask is built in the weight's dtype (bf16 safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .methods import SCORE_METHODS, canonical_method, compute_mask


class MaskedLinear(nn.Linear):
    """Linear layer with an unstructured keep-mask from weights (magnitude) or learned scores (movement).

    ``threshold`` is set by the compression scheduler: kept fraction for magnitude/movement, sigmoid
    threshold for soft movement. ``mask_scores`` (if any) is a regular parameter so DeepSpeed shards and
    updates it like any other (with its own learning rate group).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: str = "movement",
        mask_init: str = "constant",
        mask_scale: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(method, mask_init, mask_scale)

    def _setup(self, method: str, mask_init: str, mask_scale: float) -> None:
        self.method = canonical_method(method)
        # Dense until the scheduler says otherwise (kept fraction 1 / sigmoid threshold 0 keep everything).
        self.threshold = 1.0 if self.method != "soft_movement" else 0.0
        self.pruning_enabled = True
        self.last_regularization: torch.Tensor | None = None
        if self.method in SCORE_METHODS:
            scores = torch.empty_like(self.weight, requires_grad=True)
            if mask_init == "constant":
                nn.init.constant_(scores, mask_scale)
            elif mask_init == "uniform":
                nn.init.uniform_(scores, -mask_scale, mask_scale)
            elif mask_init == "kaiming":
                nn.init.kaiming_uniform_(scores, a=5**0.5)
            else:
                raise ValueError(f"unknown mask_init {mask_init!r}; allowed: constant, uniform, kaiming")
            self.mask_scores = nn.Parameter(scores.detach())
        else:
            self.register_parameter("mask_scores", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, mask_init: str = "constant", mask_scale: float = 0.0):
        """Wrap an existing linear, sharing its weight and bias parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(method, mask_init, mask_scale)
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}, threshold={self.threshold:.4f}"

    def get_mask(self) -> torch.Tensor:
        """Current keep-mask in the weight's dtype (differentiable w.r.t. scores for learned methods)."""
        if not self.pruning_enabled:
            return torch.ones_like(self.weight)
        scores = self.mask_scores
        mask = compute_mask(self.method, self.weight, scores, self.threshold)
        return mask.to(self.weight.dtype)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.get_mask()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.method == "soft_movement" and self.training:
            # Stashed here (inside forward) so the regulariser is ZeRO-3 safe: scores hold data only now.
            self.last_regularization = torch.sigmoid(self.mask_scores.float()).mean()
        if not self.pruning_enabled:
            return F.linear(input, self.weight, self.bias)
        return F.linear(input, self.masked_weight(), self.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask baked into the weight (what gets exported)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.masked_weight())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out
