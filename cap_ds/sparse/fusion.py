"""Fused layer pieces for CSR models on the CPU: fewer passes over activations that do not fit in cache.

At batch 32 x 128 tokens a BERT layer's activations are 6-25 MB (MiniLM): every separate elementwise step streams
them through memory again. Three fusions, each into the ``cap_masked_gemm`` CSR kernels:

- **self-attention** (:class:`FusedSelfAttention`): a block's Q, K and V products, SDPA, the output product, the
  residual add and the LayerNorm in one ``csr_attention`` call. With a sequence per thread or more, each
  sequence runs whole on one core: x is packed once for the three products, Q, K, V and the context stay in its
  cache (unfused, each is a [tokens, hidden] tensor written to memory and read back by the next call); with
  fewer, three parallel phases without HF's Python between them. Only for HF's ``sdpa`` attention (weights are
  never returned) without cache, cross-attention or causal mask.
- **feed-forward** (:class:`FusedFeedForward`): both FFN linears, the GELU or ReLU between them, the residual
  add and the LayerNorm after it in one ``csr_ffn`` call, one token tile at a time. The [tokens, 4 * hidden]
  intermediate stays in the core's L2, already in the layout the second product reads; unfused it is written,
  read and written by the activation, and read again.
- **residual output** (:class:`FusedResidualOutput`): a ``dense -> dropout -> LayerNorm(h + input)`` block (BERT's
  attention output, and the FFN output where the FFN is not fused) adds the residual in the linear's write-back.

Two more cut the Python between kernel calls, which matters at batch 1, where a layer's kernels take ~0.7 ms
(MiniLM 90 %) and the Python between them runs with its code and data evicted from the caches by the kernel
before: a **layer** whose attention block and FFN are both fused (:class:`FusedLayer`) calls the two directly;
an **encoder** whose layers are all fused so (:class:`FusedEncoder`) checks every layer first and then runs their
kernels back to back, without calling the layer modules, wherever no hook on a layer would notice.

The three kernels normalize each token tile's outputs in the kernel while they are in cache when the LayerNorm is
a plain ``nn.LayerNorm`` over the output features (another normalization runs as its module, after the kernel).

Each replaces a method on the module instance (``feed_forward_chunk`` or ``forward`` of the layer, ``forward`` of
the encoder, the attention or the output block) with a plain callable object: the module tree, parameters and
state dict do not change, and ``deepcopy``, ``to()`` and ``unfuse`` see the same model. The submodules a fused
call computes in the kernel are not called, so forward hooks on them do not run (``unfuse`` first to inspect
them; a hook on a layer makes the encoder call its layers again). Before a module is fused, the fused and the
original computation run on a random probe in eval mode and must agree, so a module that computes something else
(another activation, a pre-LayerNorm block) stays as it is. A call the kernel cannot run (gradient needed,
training mode, not the CPU, another format than ``csr`` for this token count, no kernel) takes the original path.
The kernels' arguments are prepared once and rebuilt when a module's tensors change (``to()``, a replaced
module); the token counts each layer runs as csr are remembered with them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from cap_ds.sparse import csr
from cap_ds.sparse.linear import SparseLinear

logger = logging.getLogger(__name__)

#: the kernel's activation codes (cap_ops.h)
ACT_NONE, ACT_GELU, ACT_RELU = 0, 1, 2
ACT_NAMES = {ACT_NONE: "none", ACT_GELU: "gelu", ACT_RELU: "relu"}
#: probe agreement, relative to the largest output. Half types: the fused FFN keeps its intermediate in fp32, the
#: unfused one rounds it
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
PROBE_TOKENS = 48  # three 16-token tiles: more than one tile, and a partial one, on up to 3 threads


def activation_code(act: nn.Module) -> int | None:
    """The kernel's code for an activation module it computes (erf GELU, ReLU), else None."""
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # transformers is optional for cap_ds.sparse
        GELUActivation = None  # noqa: N806
    if GELUActivation is not None and type(act) is GELUActivation:  # F.gelu or its Python erf form: one function
        return ACT_GELU
    if type(act) is nn.GELU and act.approximate == "none":
        return ACT_GELU
    if type(act) is nn.ReLU:
        return ACT_RELU
    return None


def layer_norm_args(norm: nn.Module, features: int) -> dict[str, object] | None:
    """The kernels' LayerNorm keywords (``ln_weight``, ``ln_bias``, ``ln_eps``) for a plain ``nn.LayerNorm`` over
    the last ``features`` (the kernel normalizes each token's outputs while they are in cache), else None (the
    module then runs after the kernel)."""
    if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (features,):
        return None
    return {"ln_weight": norm.weight, "ln_bias": norm.bias, "ln_eps": float(norm.eps)}


def _normalized(y: torch.Tensor, shape: torch.Size, norm: nn.Module, fused: bool) -> torch.Tensor:
    y = y.reshape(shape)
    return y if fused else norm(y)


def _sub(module: nn.Module | None, *path: str) -> nn.Module | None:
    """``module.a.b...`` through the ``_modules`` dicts, None where one is missing: no ``nn.Module.__getattr__``
    (about a microsecond each), as this runs several times per layer on every fused call."""
    for name in path:
        if module is None:
            return None
        module = module._modules.get(name)
    return module


def _csr_layers(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> bool:
    """Every layer is a SparseLinear in x's dtype that runs as csr for x's token count."""
    tokens = x.numel() // max(1, x.shape[-1])
    return all(isinstance(m, SparseLinear) and m.values.dtype == x.dtype and m.format_for(tokens) == "csr"
               for m in layers)


def _kernel(x: torch.Tensor, op: str, layers: tuple[nn.Module, ...], formats: dict | None = None):
    """The loaded op module when its ``op`` can run these CSR layers on x now (inference, CPU, their dtype and the
    csr format for this many tokens), else None. One op lookup per call: this runs on every forward.
    ``formats``: a cache of the layer checks by (token count, dtype), kept by the caller with the layers (its
    :meth:`_Fusion.prepared` arguments, rebuilt with them)."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if formats is None:
        ok = _csr_layers(x, layers)
    else:
        key = (x.numel() // max(1, x.shape[-1]), x.dtype)
        ok = formats.get(key)
        if ok is None:
            ok = formats[key] = _csr_layers(x, layers)
    if not ok:
        return None
    module = csr.kernel_for(x)
    return module if hasattr(module, op) else None


class _Fusion:
    """A fused replacement of one method (``method``) of one module instance; ``original`` is the method it
    replaced (the class's, or one the instance already had, which :meth:`remove` puts back)."""

    method = ""
    op = ""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.original: Callable = getattr(module, self.method)  # bound method (deepcopy re-binds it) or callable
        self.own = self.method in module.__dict__
        try:  # HF's apply_chunking_to_forward inspects feed_forward_chunk's signature on every call: answer at once
            self.__signature__ = inspect.signature(self.original)
        except (TypeError, ValueError):
            pass

    def output_of(self, result):
        """The tensor of a call's result that the probe compares."""
        return result

    def layers(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def norms(self) -> tuple[nn.Module, ...]:
        """The normalizations the fused call runs (their parameters are part of the kernel's arguments)."""
        return ()

    def prepare(self) -> SimpleNamespace:
        """The kernel's arguments that depend only on the modules' tensors (subclasses add to it)."""
        return SimpleNamespace(formats={}, layers=self.layers())

    def prepared(self) -> SimpleNamespace:
        """:meth:`prepare`'s arguments, built again when a layer or the norm is another module or has other
        tensors than last time (``to()``, a replaced module): a fused call costs one tuple comparison, not
        rebuilding them on every forward (at batch 1 that Python was a tenth of the model's time)."""
        layers, norms = self.layers(), self.norms()
        items = [*layers, *norms]
        for m in layers:
            if m is not None:
                items.extend(m._buffers.values())
        for m in norms:
            if m is not None:
                items.extend(m._parameters.values())
        key = tuple(map(id, items))  # the items are kept with the key, so no id is reused while it is cached
        cached = self.__dict__.get("_prepared")
        if cached is None or cached[0] != key:
            cached = self._prepared = (key, self.prepare(), items)
        return cached[1]

    def install(self) -> None:
        setattr(self.module, self.method, self)

    def remove(self) -> None:
        if self.own:
            self.module.__dict__[self.method] = self.original
        else:
            del self.module.__dict__[self.method]


class FusedFeedForward(_Fusion):
    """A layer's ``feed_forward_chunk`` as one ``csr_ffn`` call where it applies (module docstring)."""

    method, op = "feed_forward_chunk", "csr_ffn"

    def __init__(self, layer: nn.Module, activation: int) -> None:
        super().__init__(layer)
        self.layer, self.activation = layer, activation

    def norm(self) -> nn.Module:
        return _sub(self.layer, "output", "LayerNorm")

    def norms(self) -> tuple[nn.Module, ...]:
        return (self.norm(),)

    def prepare(self) -> SimpleNamespace:
        p = super().prepare()
        first, second = self.layers()
        p.fits = (isinstance(first, SparseLinear) and isinstance(second, SparseLinear)
                  and second.out_features == first.in_features and first.out_features == second.in_features)
        p.in_features = first.in_features
        if p.fits:
            p.first = (first.row_ptr, first.col_idx, first.values, first.bias, first.out_features)
            p.second = (second.row_ptr, second.col_idx, second.values, second.bias, second.out_features,
                        second.in_features)
            p.ln = layer_norm_args(self.norm(), second.out_features)
        return p

    def check(self, p: SimpleNamespace, x: torch.Tensor) -> bool:
        """The module-side conditions of the fused path (the kernel's own: :func:`_kernel`)."""
        return p.fits and not _sub(self.layer, "output").training and x.shape[-1] == p.in_features  # x: residual too

    def plan(self, x: torch.Tensor) -> tuple | None:
        """(op module, prepared arguments) this call runs on, or None (the original path)."""
        p = self.prepared()
        module = _kernel(x, self.op, p.layers, p.formats) if self.check(p, x) else None
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
        return _sub(self.layer, "intermediate", "dense"), _sub(self.layer, "output", "dense")

    def __repr__(self) -> str:
        first, second = self.layers()
        norm = ", LayerNorm" if layer_norm_args(self.layer.output.LayerNorm, second.out_features) else ""
        return (f"FusedFeedForward({first.in_features} -> {first.out_features} -> {second.out_features}, "
                f"{ACT_NAMES[self.activation]}, + residual{norm})")


class FusedResidualOutput(_Fusion):
    """A ``dense -> dropout -> LayerNorm(h + input)`` block's ``forward`` with the residual added in the CSR
    kernel's write-back where it applies (module docstring)."""

    method, op = "forward", "csr_linear"

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.block = block

    def kernel(self, x: torch.Tensor, residual: torch.Tensor):
        """The op module this call runs on, or None (the original path)."""
        block = self.block
        dense = block.dense
        if (block.training or x.shape[-1] != dense.in_features or residual.dtype != x.dtype
                or residual.shape != (*x.shape[:-1], dense.out_features)
                or (torch.is_grad_enabled() and residual.requires_grad)):
            return None
        return _kernel(x, self.op, (dense,))

    def applies(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return self.kernel(x, residual) is not None

    def __call__(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        module = self.kernel(hidden_states, input_tensor)
        if module is None:
            return self.original(hidden_states, input_tensor)
        dense, norm = self.block.dense, self.block.LayerNorm
        x2 = hidden_states.reshape(-1, dense.in_features)
        ln = layer_norm_args(norm, dense.out_features)
        y = module.csr_linear(x2, dense.row_ptr, dense.col_idx, dense.values, dense.bias, dense.out_features,
                              input_tensor.reshape(-1, dense.out_features), **(ln or {}))
        return _normalized(y, input_tensor.shape, norm, ln is not None)

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


class FusedSelfAttention(_Fusion):
    """A BERT-style attention block's ``forward`` (self-attention, output projection, residual, LayerNorm) as one
    ``csr_attention`` call where it applies: plain self-attention through SDPA (no cache, no cross-attention,
    no causal mask), a 4-D mask or none, eval mode. Returns what the block returns, ``(output, None)`` (SDPA
    gives no attention weights)."""

    method, op = "forward", "csr_attention"

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.block = block

    def layers(self) -> tuple[SparseLinear, ...]:
        attn = _sub(self.block, "self")
        return _sub(attn, "query"), _sub(attn, "key"), _sub(attn, "value"), _sub(self.block, "output", "dense")

    def norm(self) -> nn.Module:
        return _sub(self.block, "output", "LayerNorm")

    def norms(self) -> tuple[nn.Module, ...]:
        return (self.norm(),)

    def prepare(self) -> SimpleNamespace:
        p = super().prepare()
        attn, layers = self.block.self, self.layers()
        q, out = layers[0], layers[3]
        p.fits = all(isinstance(m, SparseLinear) for m in layers) and out.out_features == q.in_features
        p.in_features = q.in_features
        if p.fits:
            p.weights = tuple((m.row_ptr, m.col_idx, m.values, m.bias, m.out_features, m.in_features) for m in layers)
            p.heads = attn.num_attention_heads
            p.scale = float(getattr(attn, "scaling", attn.attention_head_size ** -0.5))
            p.ln = layer_norm_args(self.norm(), out.out_features)
        return p

    def check(self, p: SimpleNamespace, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
              extra: dict) -> bool:
        """The module-side conditions of the fused path (the kernel's own: :func:`_kernel`)."""
        block = self.block
        attn = _sub(block, "self")
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
        ok = self.check(p, hidden_states, attention_mask, extra)
        module = _kernel(hidden_states, self.op, p.layers, p.formats) if ok else None
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


class FusedLayer(_Fusion):
    """A BERT-style layer's ``forward`` as its fused attention block and its fused FFN called directly, where both
    apply: without HF's module calls, argument wrappers, FFN chunking and reshapes between them (at batch 1 that
    Python took longer than the layer's attention). Hooks on the layer itself still run (it is called as
    before)."""

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
        if not (self.attention.check(p.attention, hidden_states, attention_mask, extra)
                and self.feed_forward.check(p.feed_forward, hidden_states)):
            return None
        module = _kernel(hidden_states, self.op, p.layers, p.formats)
        return None if module is None or not hasattr(module, "csr_ffn") else (module, p)

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                **extra) -> bool:
        return self.plan(hidden_states, attention_mask, args, extra) is not None

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **extra):
        plan = self.plan(hidden_states, attention_mask, args, extra)
        if plan is None:
            return self.original(hidden_states, attention_mask, *args, **extra)
        module, p = plan
        x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
        h = self.attention.compute(module, p.attention, x2, hidden_states.shape[0], attention_mask)
        return self.feed_forward.compute(module, p.feed_forward, h).reshape(hidden_states.shape)

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.attention.probe_inputs(tokens, g)

    def output_of(self, result) -> torch.Tensor:
        if not isinstance(result, torch.Tensor):  # a layer returning a tuple (older transformers): not fused
            raise TypeError(f"the layer returns {type(result).__name__}, not a tensor")
        return result

    def __repr__(self) -> str:
        return f"FusedLayer({self.attention!r}, {self.feed_forward!r})"


def _collecting() -> bool | None:
    """Whether HF's output capture (``output_hidden_states`` / ``output_attentions``) is collecting in this call;
    None where this transformers has no such collector."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    collected = _active_collector.get()
    return bool(collected) and any(k in collected for k in ("hidden_states", "attentions"))


def _silent_hooks(module: nn.Module, collecting: bool | None) -> bool:
    """No hook on ``module`` would see a difference if its forward is not called: none at all, or only HF's
    output-capturing hooks while nothing is collected."""
    if module._forward_pre_hooks:
        return False
    return all(collecting is False and "output_capturing_hook" in getattr(h, "__qualname__", "")
               for h in module._forward_hooks.values())


class FusedEncoder(_Fusion):
    """A BERT-style encoder's ``forward`` as a loop over its fused layers' kernels, with no module call between
    them. At batch 1 on the CPU the Python between two kernel calls runs with its code and data evicted from the
    caches by the kernel before: there, HF's per-layer calls and our checks cost about a sixth of the forward.
    Every layer is checked first (one pass, in cache), then the kernels run back to back. It applies only where
    no layer hook would notice: none registered (or only HF's output capture while it collects nothing), no
    global module hooks; otherwise the encoder runs as before (each layer through :class:`FusedLayer`)."""

    method, op = "forward", "csr_attention"

    def __init__(self, encoder: nn.Module, layers: list[FusedLayer]) -> None:
        super().__init__(encoder)
        self.encoder, self.fused_layers = encoder, layers
        self.output_type: type | None = None  # the encoder's output class, from the probe

    def layers(self) -> tuple[SparseLinear, ...]:
        return tuple(m for layer in self.fused_layers for m in layer.layers())

    def norms(self) -> tuple[nn.Module, ...]:
        return tuple(m for layer in self.fused_layers for m in layer.norms())

    def plans(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, args: tuple,
              extra: dict) -> list | None:
        """Each layer's (op module, prepared arguments), or None (the original path)."""
        if self.output_type is None or self.encoder.training or any(a is not None for a in args):
            return None
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return None
        collecting = _collecting()
        layer_list = self.encoder._modules.get("layer")
        if layer_list is None or len(layer_list) != len(self.fused_layers):
            return None
        plans = []
        for module, fused in zip(layer_list, self.fused_layers):
            if module.__dict__.get("forward") is not fused or not _silent_hooks(module, collecting):
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
        for fused, (module, p) in zip(self.fused_layers, plans):
            x2 = fused.attention.compute(module, p.attention, x2, batch, attention_mask)
            x2 = fused.feed_forward.compute(module, p.feed_forward, x2)
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


def _has_modules(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _feed_forward(layer: nn.Module) -> FusedFeedForward | None:
    """A FusedFeedForward for a BERT-style layer whose FFN is two SparseLinear, else None."""
    if not (callable(getattr(layer, "feed_forward_chunk", None)) and _has_modules(layer, ("intermediate", "output"))
            and isinstance(getattr(layer.intermediate, "dense", None), SparseLinear)
            and isinstance(getattr(layer.output, "dense", None), SparseLinear)
            and _has_modules(layer.output, ("dropout", "LayerNorm"))
            and isinstance(getattr(layer.intermediate, "intermediate_act_fn", None), nn.Module)):
        return None
    code = activation_code(layer.intermediate.intermediate_act_fn)
    return FusedFeedForward(layer, code) if code is not None else None


def _residual_output(block: nn.Module) -> FusedResidualOutput | None:
    """A FusedResidualOutput for a (dense: SparseLinear, dropout, LayerNorm) block whose forward takes
    (hidden_states, input_tensor), else None."""
    if not (isinstance(getattr(block, "dense", None), SparseLinear) and _has_modules(block, ("dropout", "LayerNorm"))):
        return None
    try:
        params = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return None
    return FusedResidualOutput(block) if len(params) == 2 else None


@torch.no_grad()
def _self_attention(block: nn.Module) -> FusedSelfAttention | None:
    """A FusedSelfAttention for a BERT-style attention block (``self`` with query/key/value SparseLinear and
    heads, ``output`` a residual-output block over a SparseLinear), else None."""
    attn, output = getattr(block, "self", None), getattr(block, "output", None)
    if not (isinstance(attn, nn.Module) and isinstance(output, nn.Module)
            and all(isinstance(getattr(attn, n, None), SparseLinear) for n in ("query", "key", "value"))
            and isinstance(getattr(attn, "num_attention_heads", None), int)
            and isinstance(getattr(attn, "attention_head_size", None), int)
            and getattr(block, "is_cross_attention", False) is False and getattr(attn, "is_causal", False) is False
            and getattr(attn, "config", None) is not None and _residual_output(output) is not None):
        return None
    heads, size = attn.num_attention_heads, attn.attention_head_size
    if not all(m.out_features == heads * size for m in (attn.query, attn.key, attn.value)):
        return None
    return FusedSelfAttention(block)


def _layer(layer: nn.Module) -> FusedLayer | None:
    """A FusedLayer for a layer whose attention block and FFN are both fused, else None."""
    attention = getattr(layer, "attention", None)
    fused_attention = attention.__dict__.get("forward") if isinstance(attention, nn.Module) else None
    fused_ffn = layer.__dict__.get("feed_forward_chunk")
    if not (isinstance(fused_attention, FusedSelfAttention) and isinstance(fused_ffn, FusedFeedForward)
            and fused_attention.module is attention and fused_ffn.module is layer):
        return None
    return FusedLayer(layer, fused_attention, fused_ffn)


def _encoder(encoder: nn.Module) -> FusedEncoder | None:
    """A FusedEncoder for a module whose ``layer`` list holds only layers fused whole, else None."""
    layers = encoder._modules.get("layer") if isinstance(encoder, nn.Module) else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    fused = [layer.__dict__.get("forward") for layer in layers]
    if not all(isinstance(f, FusedLayer) for f in fused):
        return None
    return FusedEncoder(encoder, fused)


def _agrees(fused: _Fusion, module: nn.Module) -> bool:
    """The fused and the original computation agree on a random probe (eval mode; modes restored after)."""
    layers = fused.layers()
    # a token count every layer runs as csr (a measured layer may keep another format for small batches)
    counts = [n for n in (PROBE_TOKENS, max(m.small_tokens for m in layers) + PROBE_TOKENS)
              if all(m.format_for(n) == "csr" for m in layers)]
    if not counts:
        return False
    dtype, device = layers[0].values.dtype, layers[0].values.device
    inputs = [t.to(device, dtype) if t.is_floating_point() else t.to(device)  # a bool mask stays bool
              for t in fused.probe_inputs(counts[0], torch.Generator().manual_seed(0))]
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        want = fused.output_of(fused.original(*inputs)).float()  # first: an encoder learns its output type here
        if not fused.applies(*inputs):
            return False
        got = fused.output_of(fused(*inputs)).float()
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        logger.info("%s not fused: %s", type(module).__name__, err)
        return False
    finally:
        for m, training in modes:
            m.train(training)
    scale = float(want.abs().max()) + 1e-6
    return bool(float((got - want).abs().max()) <= PROBE_TOLERANCE.get(dtype, 1e-4) * scale)


def fuse(model: nn.Module) -> dict[str, int]:
    """Fuse every module of ``model`` that fits and agrees on the probe; returns counts by kind
    (``{"layer": 6, "self_attention": 6, "feed_forward": 6, "residual_output": 12}``). Re-fusing first undoes
    earlier fusions."""
    unfuse(model)
    counts = dict.fromkeys(KINDS, 0)
    if not any(m.values.device.type == "cpu" and hasattr(csr.kernel_for(m.values), "csr_ffn")
               for m in model.modules() if isinstance(m, SparseLinear)):
        return counts  # the fused kernels are CPU kernels
    for kind, make in (("self_attention", _self_attention), ("feed_forward", _feed_forward),
                       ("residual_output", _residual_output), ("layer", _layer), ("encoder", _encoder)):
        # (layers: of fused parts; encoders: of fused layers)
        for module in list(model.modules()):
            fused = make(module)
            if fused is None:
                continue
            if _agrees(fused, module):
                fused.install()
                counts[kind] += 1
            else:
                logger.info("%s not fused: the probe disagreed or the kernel does not apply", type(module).__name__)
    return counts


#: the fusion kinds, outermost first (fuse's counts, describe's order)
KINDS = ("encoder", "layer", "self_attention", "feed_forward", "residual_output")


def describe(counts: dict[str, int]) -> str:
    """``{"feed_forward": 6, "residual_output": 12}`` as ``6 feed forward, 12 residual output`` (zeros left out;
    the kinds in :data:`KINDS` order whatever the dict's, e.g. a JSON file's sorted keys)."""
    order = [k for k in KINDS if k in counts] + [k for k in counts if k not in KINDS]
    return ", ".join(f"{counts[kind]} {kind.replace('_', ' ')}" for kind in order if counts[kind])


def fused_modules(model: nn.Module) -> list[tuple[str, _Fusion]]:
    """(module name, fusion) for every fused method of ``model``'s modules."""
    return [(name, value) for name, module in model.named_modules() for value in list(module.__dict__.values())
            if isinstance(value, _Fusion) and value.module is module]


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse` (each module's own methods again); returns how many were undone."""
    done = fused_modules(model)
    for _, fused in done:
        fused.remove()
    return len(done)
