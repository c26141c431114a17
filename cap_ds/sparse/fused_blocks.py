"""The fused replacements of a BERT-style layer's blocks (the attention block, the FFN, a residual-output block),
each one CSR kernel call (what they fuse and why: ``cap_ds.sparse.fusion``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from cap_ds.sparse.fused_base import (
    ACT_NAMES,
    Fusion,
    activation_code,
    below,
    csr_kernel,
    layer_norm_args,
    normalized,
    submodule,
)
from cap_ds.sparse.linear import SparseLinear


class FusedFeedForward(Fusion):
    """A layer's ``feed_forward_chunk`` as one ``csr_ffn`` call where it applies (module docstring)."""

    method, op = "feed_forward_chunk", "csr_ffn"

    def __init__(self, layer: nn.Module, activation: int) -> None:
        super().__init__(layer)
        self.layer, self.activation = layer, activation

    def norm(self) -> nn.Module:
        return submodule(self.layer, "output", "LayerNorm")

    def prepare(self) -> SimpleNamespace:
        p = super().prepare()
        first, second = p.layers
        act = submodule(self.layer, "intermediate", "intermediate_act_fn")
        p.fits = (isinstance(first, SparseLinear) and isinstance(second, SparseLinear)
                  and second.out_features == first.in_features and first.out_features == second.in_features
                  and act is not None and activation_code(act) == self.activation)  # e.g. GELU now tanh
        if p.fits:
            p.in_features = first.in_features
            p.first = (first.row_ptr, first.col_idx, first.values, first.bias, first.out_features)
            p.second = (second.row_ptr, second.col_idx, second.values, second.bias, second.out_features,
                        second.in_features)
            p.ln = layer_norm_args(self.norm(), second.out_features)
        return p

    def check(self, p: SimpleNamespace, x: torch.Tensor) -> bool:
        """The module-side conditions of the fused path (the kernel's own: :func:`csr_kernel`)."""
        # x is also the residual: it has the FFN's input and output width
        return p.fits and not submodule(self.layer, "output").training and x.shape[-1] == p.in_features

    def skipped(self) -> list[nn.Module]:
        """The FFN's modules (``intermediate``, ``output`` and what they hold): the layer's other modules run."""
        return below(submodule(self.layer, "intermediate"), submodule(self.layer, "output"))

    def plan(self, x: torch.Tensor) -> tuple | None:
        """(op module, prepared arguments) this call runs on, or None (the original path)."""
        p = self.prepared()
        ok = self.check(p, x) and self.free(p)
        module = csr_kernel(x, self.op, p.layers, p.formats) if ok else None
        return None if module is None else (module, p)

    def compute(self, module, p: SimpleNamespace, x2: torch.Tensor) -> torch.Tensor:
        """The fused FFN of 2-D x2 (also the residual), normalized."""
        y = module.csr_ffn(x2, *p.first, self.activation, *p.second, x2, **(p.ln or {}))
        return y if p.ln is not None else self.norm()(y)

    def applies(self, x: torch.Tensor) -> bool:
        return self.plan(x) is not None

    def run(self, plan: tuple, attention_output: torch.Tensor) -> torch.Tensor:
        """The fused computation (``plan`` from :meth:`plan`). In eval mode the dropout before the norm is the
        identity (the probe checked)."""
        module, p = plan
        return self.compute(module, p, attention_output.reshape(-1, p.in_features)).reshape(attention_output.shape)

    def __call__(self, attention_output: torch.Tensor) -> torch.Tensor:
        plan = self.plan(attention_output)
        if plan is None:
            return self.original(attention_output)
        return self.run(plan, attention_output)

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(1, tokens, self.layer.intermediate.dense.in_features, generator=g),)

    def layers(self) -> tuple[SparseLinear, ...]:
        return submodule(self.layer, "intermediate", "dense"), submodule(self.layer, "output", "dense")

    def __repr__(self) -> str:
        first, second = self.layers()
        norm = ", LayerNorm" if layer_norm_args(self.layer.output.LayerNorm, second.out_features) else ""
        return (f"FusedFeedForward({first.in_features} -> {first.out_features} -> {second.out_features}, "
                f"{ACT_NAMES[self.activation]}, + residual{norm})")


class FusedResidualOutput(Fusion):
    """A ``dense -> dropout -> LayerNorm(h + input)`` block's ``forward`` with the residual added in the CSR
    kernel's write-back where it applies (module docstring)."""

    method, op = "forward", "csr_linear"

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.block = block

    def norm(self) -> nn.Module:
        return submodule(self.block, "LayerNorm")

    def prepare(self) -> SimpleNamespace:
        p = super().prepare()
        (dense,) = p.layers
        p.fits = isinstance(dense, SparseLinear)  # a replaced dense layer: the original path
        if p.fits:
            p.weight = (dense.row_ptr, dense.col_idx, dense.values, dense.bias, dense.out_features)
            p.ln = layer_norm_args(self.norm(), dense.out_features)
        return p

    def plan(self, x: torch.Tensor, residual: torch.Tensor) -> tuple | None:
        """(op module, prepared arguments) this call runs on, or None (the original path)."""
        block = self.block
        dense = block.dense
        if (block.training or x.shape[-1] != dense.in_features or residual.dtype != x.dtype
                or residual.shape != (*x.shape[:-1], dense.out_features)
                or (torch.is_grad_enabled() and residual.requires_grad)):
            return None
        p = self.prepared()
        module = csr_kernel(x, self.op, p.layers, p.formats) if p.fits and self.free(p) else None
        return None if module is None else (module, p)

    def applies(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return self.plan(x, residual) is not None

    def __call__(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        plan = self.plan(hidden_states, input_tensor)
        if plan is None:
            return self.original(hidden_states, input_tensor)
        module, p = plan
        out_features = p.weight[-1]
        y = module.csr_linear(hidden_states.reshape(-1, hidden_states.shape[-1]), *p.weight,
                              input_tensor.reshape(-1, out_features), **(p.ln or {}))
        return normalized(y, input_tensor.shape, self.norm(), p.ln is not None)

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        dense = self.block.dense
        return (torch.randn(1, tokens, dense.in_features, generator=g),
                torch.randn(1, tokens, dense.out_features, generator=g))

    def layers(self) -> tuple[SparseLinear, ...]:
        return (self.block.dense,)

    def __repr__(self) -> str:
        dense = self.block.dense
        norm = ", LayerNorm" if layer_norm_args(self.block.LayerNorm, dense.out_features) else ""
        return f"FusedResidualOutput({dense.in_features} -> {dense.out_features}, + residual{norm})"


class FusedSelfAttention(Fusion):
    """A BERT-style attention block's ``forward`` (self-attention, output projection, residual, LayerNorm) as one
    ``csr_attention`` call where it applies: plain self-attention through SDPA (no cache, no cross-attention,
    no causal mask), a 4-D mask or none, eval mode. Returns what the block returns, ``(output, None)`` (SDPA
    gives no attention weights)."""

    method, op = "forward", "csr_attention"

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.block = block

    def layers(self) -> tuple[SparseLinear, ...]:
        attn = submodule(self.block, "self")
        return (submodule(attn, "query"), submodule(attn, "key"), submodule(attn, "value"),
                submodule(self.block, "output", "dense"))

    def norm(self) -> nn.Module:
        return submodule(self.block, "output", "LayerNorm")

    def prepare(self) -> SimpleNamespace:
        p = super().prepare()
        attn, layers = submodule(self.block, "self"), p.layers
        q, out = layers[0], layers[3]
        p.fits = all(isinstance(m, SparseLinear) for m in layers) and out.out_features == q.in_features
        if p.fits:
            p.in_features = q.in_features
            p.weights = tuple((m.row_ptr, m.col_idx, m.values, m.bias, m.out_features, m.in_features) for m in layers)
            p.heads = attn.num_attention_heads
            p.scale = float(getattr(attn, "scaling", attn.attention_head_size ** -0.5))
            p.ln = layer_norm_args(self.norm(), out.out_features)
        return p

    def check(self, p: SimpleNamespace, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
              extra: dict) -> bool:
        """The module-side conditions of the fused path (the kernel's own: :func:`csr_kernel`)."""
        block = self.block
        attn = submodule(block, "self")
        if (not p.fits or block.training or attn.training or hidden_states.dim() != 3
                or hidden_states.shape[-1] != p.in_features
                or any(value is not None and value is not False for value in extra.values())
                or getattr(attn.config, "_attn_implementation", None) != "sdpa"):
            return False
        return attention_mask is None or (attention_mask.dim() == 4 and attention_mask.device == hidden_states.device
                                          and attention_mask.shape[-1] == hidden_states.shape[1])

    def plan(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict) -> tuple | None:
        """(op module, prepared arguments) this call runs on, or None (the original path)."""
        p = self.prepared()
        ok = self.check(p, hidden_states, attention_mask, extra) and self.free(p)
        module = csr_kernel(hidden_states, self.op, p.layers, p.formats) if ok else None
        return None if module is None else (module, p)

    def compute(self, module, p: SimpleNamespace, x2: torch.Tensor, batch: int,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The fused block on 2-D x2 (batch sequences of equal length; also the residual), normalized."""
        y = module.csr_attention(x2, batch, *p.weights, p.heads, p.scale, mask=attention_mask, residual=x2,
                                 **(p.ln or {}))
        return y if p.ln is not None else self.norm()(y)

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **extra) -> bool:
        return self.plan(hidden_states, attention_mask, extra) is not None

    def run(self, plan: tuple, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The fused computation (``plan`` from :meth:`plan`): the block's output tensor."""
        module, p = plan
        x2 = hidden_states.reshape(-1, p.in_features)
        return self.compute(module, p, x2, hidden_states.shape[0], attention_mask).reshape(hidden_states.shape)

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **extra):
        plan = None if any(a is not None for a in args) else self.plan(hidden_states, attention_mask, extra)
        if plan is None:
            return self.original(hidden_states, attention_mask, *args, **extra)
        return self.run(plan, hidden_states, attention_mask), None

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        # two sequences: on 2 threads or 1 the kernel's one-sequence-per-task path, else its phased one
        hidden = self.block.self.query.in_features
        mask = torch.rand(2, 1, tokens // 2, tokens // 2, generator=g) > 0.2
        mask[..., 0] = True  # no row masked out entirely
        return torch.randn(2, tokens // 2, hidden, generator=g), mask

    def output_of(self, result: tuple) -> torch.Tensor:
        return result[0]

    def __repr__(self) -> str:
        q, _, _, out = self.layers()
        norm = ", LayerNorm" if layer_norm_args(self.block.output.LayerNorm, out.out_features) else ""
        return (f"FusedSelfAttention({q.in_features} -> 3 x {q.out_features}, {self.block.self.num_attention_heads} "
                f"heads, SDPA -> {out.out_features}, + residual{norm})")
