"""Training op: ``y = x @ (W*M)^T + b`` with the gradients the pruning methods need, and where it runs.

Semantics (identical to ``F.linear(x, W * M, b)`` under autograd): dL/dx = g @ (W*M); dL/dW = (g^T x) * M;
dL/dM = (g^T x) * W, which the straight-through binarizers pass on to the mask scores. The kernel keeps W*M only
as a temporary: autograd through the PyTorch expression holds W*M from forward to backward and builds dW and dM
with two separate multiplies; here dW and dM come out of one fused pass (dW in place of g^T x).

Dispatch (issue 15: keep a kernel only where it measurably wins, else route to the PyTorch expression).
``CAP_DS_MASKED_KERNEL`` (or :func:`set_masked_kernel_mode`) picks: ``auto`` (default) uses the kernel only where
:data:`KERNEL_WINS` lists the device and dtype, ``on`` uses it wherever it applies (benchmarks, tests), ``off`` never.
Measured fwd+bwd, 10 % kept, kernel vs ``F.linear(x, W*M)``:

- CUDA, H200 bf16: 0.400 vs 0.067 ms at 512x768->3072 (6x slower), 0.568 vs 0.217 ms at 4096x1024->4096 (2.6x
  slower); fp32 about equal (../shared/gpu/README.md, main of 2026-11-27). No win: CUDA routes to the expression.
- CPU (2 shared cores, 1 thread, load ~11, 256 tokens, ``benchmarks/bench_kernels.py --only training --threads 1
  --tokens 256 --train_reps 7``): kernel/expression fp32 0.98-1.33x, bf16 1.11-1.72x over the six BERT-base and
  RoBERTa-large shapes; the best fp32 case (0.98x) is inside the noise. No measurable win: CPU routes to the
  expression too.

The kernel's one advantage, ~9 MB less kept for the backward per 768x3072 fp32 layer, is memory, not speed; ``on``
still gives it to whoever wants it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENV_MODE = "CAP_DS_MASKED_KERNEL"
MODES = ("auto", "on", "off")
# (device type, dtype) pairs where the kernel beat the expression fwd+bwd on BERT-base and RoBERTa-large shapes.
# Empty: CUDA (H200 bf16 6x / 2.6x slower, fp32 equal) and CPU (fp32 0.98-1.33x, bf16 1.11-1.72x) both lose.
KERNEL_WINS: frozenset[tuple[str, torch.dtype]] = frozenset()

_override: str | None = None


def _check_mode(mode: str, source: str) -> str:
    value = mode.strip().lower()
    if value not in MODES:
        raise ValueError(f"{source}={mode!r} is not a masked-kernel mode; allowed: {', '.join(MODES)}")
    return value


def set_masked_kernel_mode(mode: str | None) -> None:
    """Force ``auto``/``on``/``off`` in this process (None: back to ``CAP_DS_MASKED_KERNEL``, default auto)."""
    global _override
    _override = None if mode is None else _check_mode(mode, "set_masked_kernel_mode")


def masked_kernel_mode() -> str:
    """The mode in force: the :func:`set_masked_kernel_mode` override, else ``CAP_DS_MASKED_KERNEL``, else auto."""
    if _override is not None:
        return _override
    raw = os.environ.get(ENV_MODE, "")
    return _check_mode(raw, ENV_MODE) if raw.strip() else "auto"


def kernel_wins(device_type: str, dtype: torch.dtype) -> bool:
    """True where the kernel was measured faster than the expression (the ``auto`` rule)."""
    return (device_type, dtype) in KERNEL_WINS


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


def kernel_wanted(x: torch.Tensor) -> bool:
    """Whether the mode asks for the kernel on ``x``'s device and dtype (``on``, or ``auto`` where it wins), before
    checking that it applies: masked layers otherwise take :func:`recomputed_masked_linear`."""
    mode = masked_kernel_mode()
    return mode == "on" or (mode == "auto" and kernel_wins(x.device.type, x.dtype))


def use_kernel(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`masked_linear` takes the kernel for these tensors (mode, applicability, the win table, and
    a built op). In ``auto`` mode a losing device/dtype never triggers the kernel build."""
    mode = masked_kernel_mode()
    if mode == "off" or not _kernel_usable(x, weight, mask, bias):
        return False
    if mode == "auto" and not kernel_wins(x.device.type, x.dtype):
        return False
    from cap_ds.ops import kernels_support

    return kernels_support(x.device)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)``: through the kernel where :func:`use_kernel` says so, else PyTorch."""
    if use_kernel(x, weight, mask, bias):
        from cap_ds.ops import load_kernels

        return MaskedLinearFunction.apply(x, weight, mask, bias, load_kernels())
    return masked_linear_reference(x, weight, mask, bias)
