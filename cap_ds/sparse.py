"""Pruned-model inference: ``sparsify(model)`` makes the zeros that pruning produced pay off.

An exported cap_ds model is a plain transformers model whose encoder linears are mostly zeros; dense GEMMs still
multiply every zero. ``sparsify`` swaps each ``nn.Linear`` whose weight is at least ``min_sparsity`` zeros for a
:class:`SparseLinear`: the weight packed as CSR (int32 row pointers and column indices, values in the weight's
dtype) and multiplied by the ``cap_masked_gemm`` kernels (CPU: x packed as x^T tiles and one register-blocked
axpy per nonzero, multithreaded; CUDA: a warp-per-row CSR kernel, or torch's 2:4 semi-structured GEMM when the
weight is 2:4 and the GPU supports it). Without the compiled op it falls back to PyTorch (``torch.sparse.mm`` on
the same CSR, or the densified weight), with the same numbers.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .ops import kernels_support, load_kernels

__all__ = ["SparseLinear", "pack_csr", "sparsify", "densify", "weight_sparsity"]

logger = logging.getLogger(__name__)

_SEMI_DTYPES = (torch.float16, torch.bfloat16)


def weight_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return 1.0 - float(torch.count_nonzero(weight.detach())) / max(1, weight.numel())


@torch.no_grad()
def pack_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of a dense [out, in] weight: (row_ptr int32 [out + 1], col_idx int32 [nnz], values [nnz]).

    Zeros are dropped (NaNs are kept); values keep the weight's dtype and device.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_csr expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach()
    nonzero = w != 0
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    if rows.numel() >= 2**31:
        raise ValueError("pack_csr: more than 2^31 nonzeros do not fit int32 indices")
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(nonzero.sum(1), 0)
    return row_ptr.to(torch.int32), cols.to(torch.int32), w[rows, cols].contiguous()


def _is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (what 2:4 sparse tensor cores need)."""
    if weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


class SparseLinear(nn.Module):
    """Inference-only linear layer with a CSR weight; ``y = x @ W^T + b`` for x of shape [..., in_features].

    Buffers (moved by ``.to()``/``.cuda()``, cast by ``.half()``/``.to(dtype)`` like a weight): ``row_ptr``,
    ``col_idx``, ``values`` and ``bias``. Inputs must have the values' dtype, as with ``F.linear``.
    With autograd recording a graph that needs gradients, the differentiable PyTorch path is used.
    """

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None = None, allow_2to4: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if row_ptr.numel() != self.out_features + 1 or col_idx.numel() != values.numel():
            raise ValueError("inconsistent CSR arrays for SparseLinear")
        self.register_buffer("row_ptr", row_ptr.to(torch.int32).contiguous())
        self.register_buffer("col_idx", col_idx.to(torch.int32).contiguous())
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().to(values.dtype))
        self.allow_2to4 = allow_2to4
        self._semi: tuple[tuple, object] | None = None  # cached 2:4 weight, keyed by (device, dtype)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, allow_2to4: bool = True) -> SparseLinear:
        """Pack ``linear``'s weight (masks baked in first for cap_ds's MaskedLinear)."""
        if hasattr(linear, "masked_weight") and hasattr(linear, "to_linear"):
            linear = linear.to_linear()
        row_ptr, col_idx, values = pack_csr(linear.weight)
        return cls(linear.in_features, linear.out_features, row_ptr, col_idx, values, linear.bias,
                   allow_2to4=allow_2to4)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=csr, sparsity={self.sparsity:.4f}")

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight with its zeros back."""
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device), counts)
        w[rows, self.col_idx.long()] = self.values
        return w

    def to_linear(self) -> nn.Linear:
        """A plain dense ``nn.Linear`` with the same weight and bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    # ---- forward paths
    def torch_csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.row_ptr, self.col_idx, self.values,
                                       (self.out_features, self.in_features))

    def reference_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch on [tokens, in]: ``torch.sparse.mm`` on the CSR (fp32/fp64), else the densified weight."""
        if x2.dtype in (torch.float32, torch.float64) and x2.shape[0] > 0:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    y = torch.sparse.mm(self.torch_csr(), x2.t()).t()
                return y + self.bias if self.bias is not None else y
            except (RuntimeError, NotImplementedError):
                pass
        return F.linear(x2, self.dense_weight(), self.bias)

    def _semi_weight(self, x: torch.Tensor):
        """torch's 2:4 semi-structured weight on x's GPU, or None where not applicable (cached)."""
        if not (self.allow_2to4 and x.is_cuda and self.values.dtype in _SEMI_DTYPES):
            return None
        key = (x.device, self.values.dtype, self.values.data_ptr())
        if self._semi is not None and self._semi[0] == key:
            return self._semi[1]
        semi = None
        try:
            if torch.cuda.get_device_capability(x.device) >= (8, 0):
                dense = self.dense_weight()
                if _is_2to4(dense):
                    semi = torch.sparse.to_sparse_semi_structured(dense)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError) as err:
            logger.info("2:4 semi-structured path unavailable (%s); using the CSR kernel", err)
            semi = None
        self._semi = (key, semi)
        return semi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise RuntimeError(f"SparseLinear: input dtype {x.dtype} differs from the weight dtype "
                               f"{self.values.dtype} (as F.linear, no implicit cast)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = None
        semi = self._semi_weight(x2)
        if semi is not None:
            try:
                y = F.linear(x2, semi, self.bias)
            except (RuntimeError, NotImplementedError) as err:
                logger.info("2:4 semi-structured linear failed (%s); using the CSR kernel", err)
                self._semi = (self._semi[0], None) if self._semi else None
        if y is None and x2.dtype in (torch.float32, torch.float16, torch.bfloat16) and kernels_support(x2.device):
            if torch.is_grad_enabled() and x2.requires_grad:
                y = _CSRLinearFunction.apply(x2, self)
            else:
                y = load_kernels().csr_linear(x2, self.row_ptr, self.col_idx, self.values, self.bias,
                                              self.out_features)
        if y is None:
            y = self.reference_forward(x2)
        return y.reshape(*lead, self.out_features)


class _CSRLinearFunction(torch.autograd.Function):
    """The CSR kernel with a gradient for the input only (dx = g @ W; the packed weight is not trainable)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: SparseLinear) -> torch.Tensor:
        ctx.layer = layer
        return load_kernels().csr_linear(x2, layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                                         layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.mm(ctx.layer.dense_weight()), None


def _modules_to_replace(model: nn.Module, min_sparsity: float):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            # nn.MultiheadAttention reads out_proj.weight itself instead of calling it: leave those alone.
            if isinstance(child, nn.Linear) and not isinstance(child, NonDynamicallyQuantizableLinear):
                weight = child.masked_weight() if hasattr(child, "masked_weight") else child.weight
                if weight.dim() == 2 and weight.numel() > 0 and weight_sparsity(weight) >= min_sparsity:
                    yield module, child_name, f"{name}.{child_name}" if name else child_name, child


@torch.no_grad()
def sparsify(model: nn.Module, min_sparsity: float = 0.5, allow_2to4: bool = True) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` with at least ``min_sparsity`` zeros by a :class:`SparseLinear`.

    Works on any model (e.g. a pruned export reloaded with ``from_pretrained``); returns the model. Meant for
    inference (``model.eval()``): the sparse layers hold no trainable parameters. ``allow_2to4`` lets 2:4 weights
    use torch's semi-structured GEMM on GPUs that have it.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    targets = list(_modules_to_replace(model, min_sparsity))
    for parent, child_name, _, child in targets:
        sparse = SparseLinear.from_linear(child, allow_2to4=allow_2to4)
        sparse.train(child.training)
        setattr(parent, child_name, sparse)
    logger.info("sparsify: %d linear layers -> SparseLinear (min_sparsity %.2f)", len(targets), min_sparsity)
    return model


def densify(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify`: every :class:`SparseLinear` back to a dense ``nn.Linear`` (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SparseLinear):
                dense = child.to_linear()
                dense.train(child.training)
                setattr(module, child_name, dense)
    return model
