"""Training op: ``y = x @ (W*M)^T + b`` with the gradients the pruning methods need.

Semantics (identical to ``F.linear(x, W * M, b)`` under autograd): dL/dx = g @ (W*M); dL/dW = (g^T x) * M;
dL/dM = (g^T x) * W, which the straight-through binarizers pass on to the mask scores. The kernel keeps W*M only
as a temporary: autograd through the PyTorch expression holds W*M from forward to backward and builds dW and dM
with two separate multiplies; here dW and dM come out of one fused pass (dW in place of g^T x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-PyTorch path (the semantics the kernel matches)."""
    return F.linear(x, weight * mask, bias)


class MaskedLinearFunction(torch.autograd.Function):
    """Autograd wrapper of the ``cap_masked_gemm`` training kernels (``op`` is the loaded module)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, op):
        ctx.op = op
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mask)
        return op.masked_linear_forward(x, weight, mask, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        want_x, want_w, want_m, want_b = ctx.needs_input_grad[:4]
        dx, dw, dm, db = ctx.op.masked_linear_backward(grad, x, weight, mask, want_x, want_w, want_m,
                                                       bool(want_b and ctx.has_bias))
        return dx, dw, dm, db, None


def _kernel_usable(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or mask.shape != weight.shape:
        return False
    if not (x.dtype == weight.dtype == mask.dtype) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if bias is not None and bias.dtype != weight.dtype:
        return False
    if not (x.device == weight.device == mask.device):
        return False
    # Autocast would re-cast inside the op; keep its exact behaviour by using the PyTorch expression.
    return not torch.is_autocast_enabled(x.device.type)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` through the kernel when built and applicable, else in PyTorch."""
    from . import kernels_support, load_kernels

    if _kernel_usable(x, weight, mask, bias) and kernels_support(x.device):
        return MaskedLinearFunction.apply(x, weight, mask, bias, load_kernels())
    return masked_linear_reference(x, weight, mask, bias)
