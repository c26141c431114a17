"""Training op: ``y = x @ (W*M)^T + b`` with the gradients the pruning methods need, and where it runs.

Semantics (identical to ``F.linear(x, W * M, b)`` under autograd): dL/dx = g @ (W*M); dL/dW = (g^T x) * M;
dL/dM = (g^T x) * W, which the straight-through binarizers pass on to the mask scores. The kernel keeps W*M only
as a temporary: autograd through the PyTorch expression holds W*M from forward to backward and builds dW and dM
with two separate multiplies; here dW and dM come out of one fused pass (dW in place of g^T x).

Where it runs: the kernel only with ``CAP_DS_KERNELS=on`` (and where it applies: matching fp32/fp16/bf16 tensors
on one device, no autocast, an op built for that device); otherwise the PyTorch expression, or
:func:`recomputed_masked_linear` in ``MaskedLinear``. The default (``auto``) leaves the kernel out because it
was not measured faster than the expression on any device or dtype (H200 and CPU, fwd+bwd on BERT-base and
RoBERTa-large shapes: docs/results.md, "GPU performance, training half"); its one advantage is memory (~1/3 less
kept for the backward), which ``on`` gives to whoever wants it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cap_ds.ops import loader


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


class RecomputedMaskedLinear(torch.autograd.Function):
    """``F.linear(x, W * keep, b)`` for a boolean ``keep`` mask, with the straight-through gradient to ``scores``
    (dL/dscores = dL/d(W*M) * W, what ``CachedBinarizer`` passes on), keeping only ``x``, ``W`` and the boolean mask
    for the backward.

    Autograd through the expression keeps W*M (a full-size copy of every masked weight, in its dtype) and the mask
    converted to the weight's dtype from forward to backward; here W*M is a temporary of the forward and is built
    again in the backward (one extra elementwise multiply per layer), and the mask is the layer's cached one (one
    byte per entry, held anyway). Gradients are those of the expression (the same products and sums)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor,
                scores: torch.Tensor | None) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, keep)
        return F.linear(x, weight * keep, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, keep = ctx.saved_tensors
        want_x, want_w, want_b, _, want_s = ctx.needs_input_grad
        dx = dw = db = ds = None
        if want_x:
            dx = grad.matmul(weight * keep)
        if want_w or want_s:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            d_masked = g2.t().mm(x2)  # dL/d(W*M)
            if want_s:
                ds = d_masked * weight
            if want_w:
                dw = d_masked.mul_(keep)
        if want_b and ctx.has_bias:
            db = grad.reshape(-1, grad.shape[-1]).sum(0)
        return dx, dw, db, None, ds


def recomputed_masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor,
                             scores: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`RecomputedMaskedLinear` (``scores``: the learned scores the mask came from, None for a fixed mask).
    Not under autocast (it would not recast inside): callers keep the expression there."""
    return RecomputedMaskedLinear.apply(x, weight, bias, keep, scores)


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


def kernel_wanted() -> bool:
    """Whether the switch asks for the training kernel (``CAP_DS_KERNELS=on``), before checking that it applies:
    masked layers otherwise take :func:`recomputed_masked_linear`."""
    return loader.kernel_mode() == "on"


def use_kernel(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`masked_linear` takes the kernel for these tensors: the switch, applicability and a built op.
    Unless the switch is ``on`` the op is not even built for training."""
    return kernel_wanted() and _kernel_usable(x, weight, mask, bias) and loader.kernels_support(x.device)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)``: through the kernel where :func:`use_kernel` says so, else PyTorch."""
    if use_kernel(x, weight, mask, bias):
        return MaskedLinearFunction.apply(x, weight, mask, bias, loader.load_kernels())
    return masked_linear_reference(x, weight, mask, bias)
