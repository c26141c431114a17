"""The ``csr`` format: a weight stored as its nonzeros (compressed sparse rows) and multiplied by them only.

The product runs on the ``cap_masked_gemm`` CSR kernel where it has the device and dtype (CPU: fp32/fp16/bf16;
CUDA: the same when compiled in), else on ``torch.sparse.mm`` (fp32/fp64), else on the densified weight: every
path computes ``F.linear``'s numbers, the kernel is only faster.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from cap_ds.ops import kernels_for, load_kernels

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes ``torch.sparse.mm`` multiplies a CSR tensor in (the others fall back to the densified weight)
TORCH_CSR_DTYPES = (torch.float32, torch.float64)


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


@torch.no_grad()
def unpack_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, in_features: int
               ) -> torch.Tensor:
    """The dense [out, in] weight of a CSR triple (a new tensor; the inverse of :func:`pack_csr`)."""
    out_features = row_ptr.numel() - 1
    w = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(out_features, device=w.device), counts)
    w[rows, col_idx.long()] = values
    return w


def kernel_applies(x: torch.Tensor) -> bool:
    """True where the loaded op has a CSR kernel for ``x``'s device and dtype (False when kernels are off)."""
    return kernel_for(x) is not None


def torch_csr_linear(x2: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                     shape: tuple[int, int]) -> torch.Tensor | None:
    """``x2 @ W^T`` (no bias) with ``torch.sparse.mm`` on the CSR weight of ``shape`` [out, in], or None where
    torch cannot run it (other dtypes, no rows)."""
    if x2.dtype not in TORCH_CSR_DTYPES or x2.shape[0] == 0:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            w = torch.sparse_csr_tensor(row_ptr, col_idx, values, shape)
            return torch.sparse.mm(w, x2.t()).t()
    except (RuntimeError, NotImplementedError):
        return None


def kernel_for(x: torch.Tensor):
    """The loaded op where it has a CSR kernel for ``x``'s device and dtype, else None."""
    return kernels_for(x.device) if x.dtype in KERNEL_DTYPES else None


def kernel_linear(x2: torch.Tensor, layer: nn.Module, module=None) -> torch.Tensor:
    """``x2 @ W^T + b`` on the CSR kernel (``module``: the loaded op, looked up when not given) for a
    ``SparseLinear``-like ``layer`` (``row_ptr``, ``col_idx``, ``values``, ``bias``, ``out_features``,
    ``cached_dense_weight()``); differentiable in ``x2`` when needed."""
    if torch.is_grad_enabled() and x2.requires_grad:
        return CSRLinearFunction.apply(x2, layer)
    return (module or load_kernels()).csr_linear(x2, layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                                                 layer.out_features)


class CSRLinearFunction(torch.autograd.Function):
    """The CSR kernel with a gradient for the input only (dx = g @ W; the packed weight is not trainable)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return load_kernels().csr_linear(x2, layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                                         layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.mm(ctx.layer.cached_dense_weight()), None
