"""A layer and an encoder of fused blocks run without Python between their kernels (why: ``cap_ds.sparse.fusion``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from cap_ds.sparse.fused_base import Fusion, csr_kernel, unobserved
from cap_ds.sparse.fused_blocks import FusedFeedForward, FusedSelfAttention
from cap_ds.sparse.linear import SparseLinear


class FusedLayer(Fusion):
    """A BERT-style layer's ``forward`` as its fused attention block and its fused FFN called directly, where both
    apply: without HF's module calls, argument wrappers, FFN chunking and reshapes between them (at batch 1 that
    Python took longer than the layer's attention). Hooks on the layer itself still run (it is called as
    before); a hook on a module below it sends the call down the original path."""

    method, op = "forward", "csr_attention"

    def __init__(self, layer: nn.Module, attention: FusedSelfAttention, feed_forward: FusedFeedForward) -> None:
        super().__init__(layer)
        self.layer, self.attention, self.feed_forward = layer, attention, feed_forward

    def layers(self) -> tuple[SparseLinear, ...]:
        return (*self.attention.layers(), *self.feed_forward.layers())

    def norms(self) -> tuple[nn.Module, ...]:
        return (*self.attention.norms(), *self.feed_forward.norms())

    def prepare(self) -> SimpleNamespace:
        p = super().prepare()
        p.attention, p.feed_forward = self.attention.prepare(), self.feed_forward.prepare()
        return p

    def plan(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, args: tuple,
             extra: dict) -> tuple | None:
        """(op module, prepared arguments) this call runs on, or None (the original path)."""
        # HF's encoder passes encoder_hidden_states by position (None in an encoder)
        if self.layer.training or any(a is not None for a in args):
            return None
        p = self.prepared()
        if not (self.free(p) and self.attention.check(p.attention, hidden_states, attention_mask, extra)
                and self.feed_forward.check(p.feed_forward, hidden_states)):
            return None
        module = csr_kernel(hidden_states, self.op, p.layers, p.formats)
        return None if module is None or not hasattr(module, "csr_ffn") else (module, p)

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                **extra) -> bool:
        return self.plan(hidden_states, attention_mask, args, extra) is not None

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **extra):
        plan = self.plan(hidden_states, attention_mask, args, extra)
        if plan is None:
            return self.original(hidden_states, attention_mask, *args, **extra)
        x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.compute(plan, x2, hidden_states.shape[0], attention_mask).reshape(hidden_states.shape)

    def compute(self, plan: tuple, x2: torch.Tensor, batch: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The layer on 2-D x2 (``plan`` from :meth:`plan`): the fused attention block, then the fused FFN."""
        module, p = plan
        h = self.attention.compute(module, p.attention, x2, batch, attention_mask)
        return self.feed_forward.compute(module, p.feed_forward, h)

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.attention.probe_inputs(tokens, g)

    def output_of(self, result) -> torch.Tensor:
        if not isinstance(result, torch.Tensor):  # a layer returning a tuple (older transformers): not fused
            raise TypeError(f"the layer returns {type(result).__name__}, not a tensor")
        return result

    def __repr__(self) -> str:
        return f"FusedLayer({self.attention!r}, {self.feed_forward!r})"


class FusedEncoder(Fusion):
    """A BERT-style encoder's ``forward`` as a loop over its fused layers' kernels, with no module call between
    them. At batch 1 on the CPU the Python between two kernel calls runs with its code and data evicted from the
    caches by the kernel before: there, HF's per-layer calls and our checks cost about a sixth of the forward.
    Every layer is checked first (one pass, in cache), then the kernels run back to back. It applies only where
    no hook would notice (:func:`unobserved`: on the layers here, below them in each layer's plan); otherwise the
    encoder runs as before (each layer through :class:`FusedLayer`)."""

    method, op = "forward", "csr_attention"

    def __init__(self, encoder: nn.Module, layers: list[FusedLayer]) -> None:
        super().__init__(encoder)
        self.encoder, self.fused_layers = encoder, layers
        self.output_type: type | None = None  # the encoder's output class, from the probe

    def layers(self) -> tuple[SparseLinear, ...]:
        return tuple(m for layer in self.fused_layers for m in layer.layers())

    def norms(self) -> tuple[nn.Module, ...]:
        return tuple(m for layer in self.fused_layers for m in layer.norms())

    def skipped(self) -> tuple[nn.Module, ...]:
        """The layers, which the fused encoder does not call (what is below them: each layer's :meth:`plan`)."""
        layer_list = self.encoder._modules.get("layer")
        return tuple(layer_list) if layer_list is not None else ()

    def plans(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, args: tuple,
              extra: dict) -> list | None:
        """Each layer's (op module, prepared arguments), or None (the original path)."""
        if self.output_type is None or self.encoder.training or any(a is not None for a in args):
            return None
        layer_list = self.encoder._modules.get("layer")
        if layer_list is None or len(layer_list) != len(self.fused_layers):
            return None
        if not unobserved(self.skipped()):
            return None
        plans = []
        for module, fused in zip(layer_list, self.fused_layers):
            if module.__dict__.get("forward") is not fused:
                return None
            plan = fused.plan(hidden_states, attention_mask, (), extra)
            if plan is None:
                return None
            plans.append(plan)
        return plans

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                **extra) -> bool:
        return self.plans(hidden_states, attention_mask, args, extra) is not None

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **extra):
        plans = self.plans(hidden_states, attention_mask, args, extra)
        if plans is None:
            return self.original(hidden_states, attention_mask, *args, **extra)
        batch = hidden_states.shape[0]
        x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
        for fused, plan in zip(self.fused_layers, plans):
            x2 = fused.compute(plan, x2, batch, attention_mask)
        return self.output_type(last_hidden_state=x2.reshape(hidden_states.shape))

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.fused_layers[0].probe_inputs(tokens, g)

    def output_of(self, result) -> torch.Tensor:
        hidden = getattr(result, "last_hidden_state", None)
        if not isinstance(hidden, torch.Tensor):  # a tuple (older transformers): not fused
            raise TypeError(f"the encoder returns {type(result).__name__}, not an output with last_hidden_state")
        if self.output_type is None:
            self.output_type = type(result)
        return hidden

    def __repr__(self) -> str:
        return f"FusedEncoder({len(self.fused_layers)} x FusedLayer)"
