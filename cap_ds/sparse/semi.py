"""The ``2:4`` format: torch's semi-structured sparse GEMM (CUDA sm80+, fp16/bf16), called without its tensor
subclass' per-call Python dispatch.

Two backends: ``cusparselt`` (optional at torch build time) and ``cutlass``. :func:`matmul` calls the aten ops
directly with the operands torch's own dispatch would pass; the callers reach these functions through this module
(``semi.convert(...)``), so a test can stand in for torch's conversion and GEMM on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("cusparselt", "cutlass")
DTYPES = (torch.float16, torch.bfloat16)
#: Dense-operand rows (tokens) must be a multiple of this for fp16/bf16 in both backends: inputs are padded.
MIN_ROWS = 8


def _capability(device: torch.device | None) -> tuple[int, int] | None:
    if device is None or device.type != "cuda":
        return None
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (RuntimeError, AssertionError):
        return None


def _has_cusparselt() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


def backends(device: torch.device | None = None) -> tuple[str, ...]:
    """The 2:4 backends this torch build has for ``device``, preferred first. cuSPARSELt (optional at torch build
    time) runs on sm80 and later; torch's CUTLASS 2:4 kernels exist for compute capability 8.x only (on sm90 they
    fail with "Supported only on GPUs with compute capability 8.x"). Without a device: every backend built in."""
    cap = _capability(device)
    found = []
    if _has_cusparselt() and (cap is None or cap >= (8, 0)):
        found.append("cusparselt")
    if cap is None or (8, 0) <= cap < (9, 0):
        found.append("cutlass")
    return tuple(found)


def unavailable(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> str | None:
    """Why torch's 2:4 GEMM cannot run this layer here (None: it can): the reason sparsify's summary gives."""
    if device.type != "cuda":
        return "2:4 runs on CUDA only"
    if dtype not in DTYPES:
        return f"2:4 needs fp16/bf16, not {str(dtype).replace('torch.', '')}"
    if out_features % 64 or in_features % 64:
        return f"2:4 needs both weight dims to be multiples of 64, not {out_features}x{in_features}"
    cap = _capability(device)
    if cap is None or cap < (8, 0):
        return "2:4 sparse tensor cores need compute capability 8.0 or later"
    if not backends(device):
        return (f"on compute capability {cap[0]}.{cap[1]} only cuSPARSELt runs 2:4 (torch's CUTLASS kernels are for "
                "8.x), and this torch build has no cuSPARSELt")
    return None


def supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """True where a torch 2:4 GEMM backend can run: CUDA sm80+ with a backend for its compute capability,
    fp16/bf16, both weight dims multiples of 64."""
    return unavailable(device, dtype, out_features, in_features) is None


def convert(dense: torch.Tensor, backend: str) -> Any:
    """Compress a 2:4 [out, in] weight for ``backend`` (a one-time cost per weight version)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(dense.contiguous())


def matmul(semi: Any, backend: str, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [tokens, out] = x2 @ W^T + b with the compressed W: the aten op directly, as torch's own dispatch would.

    The dense operand is ``x2.t()`` (a free view of the row-major activations); tokens are padded to a multiple
    of 8 as torch requires. cuSPARSELt writes the [tokens, out] result directly (``transpose_result``); the
    output is always contiguous, so a measured time includes any copy the next layer would otherwise pay.
    """
    tokens = x2.shape[0]
    x2 = x2.contiguous()
    pad = (-tokens) % MIN_ROWS
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    if backend == "cusparselt":
        y = torch._cslt_sparse_mm(semi.packed, x2.t(), bias=bias, transpose_result=True)
    elif bias is None:  # CUTLASS computes W @ x^T: [out, tokens]
        y = torch._sparse_semi_structured_mm(semi.packed, semi.meta, x2.t()).t()
    else:
        y = torch._sparse_semi_structured_addmm(bias, semi.packed, semi.meta, x2.t()).t()
    if pad:
        y = y[:tokens]
    return y.contiguous()  # a no-op for cuSPARSELt; the transposed CUTLASS result is copied, as torch does
