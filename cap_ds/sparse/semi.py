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


def supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """True where torch's 2:4 GEMM can run: CUDA sm80+, fp16/bf16, both weight dims multiples of 64."""
    if device.type != "cuda" or dtype not in DTYPES or out_features % 64 or in_features % 64:
        return False
    try:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    except (RuntimeError, AssertionError):
        return False


def backends() -> tuple[str, ...]:
    """The 2:4 backends this torch build has, preferred first (cuSPARSELt is optional at build time)."""
    found = ["cutlass"]
    try:
        if torch.backends.cusparselt.is_available():
            found.insert(0, "cusparselt")
    except AttributeError:
        pass
    return tuple(found)


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
