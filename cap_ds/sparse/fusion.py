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

All three normalize each token tile's outputs in the kernel while they are in cache when the LayerNorm is a plain
``nn.LayerNorm`` over the output features (another normalization runs as its module, after the kernel).

Each replaces a method on the module instance (``feed_forward_chunk`` of the layer, ``forward`` of the attention
or output block) with a plain callable object: the module tree, parameters and state dict do not change, and
``deepcopy``, ``to()`` and ``unfuse`` see the same model. The submodules a fused call computes in the kernel are
not called, so forward hooks on them do not run (``unfuse`` first to inspect them). Before a module is fused, the fused and the original computation run
on a random probe in eval mode and must agree, so a module that computes something else (another activation, a
pre-LayerNorm block) stays as it is. A call the kernel cannot run (gradient needed, training mode, not the CPU,
another format than ``csr`` for this token count, no kernel) takes the original path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

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


def _kernel(x: torch.Tensor, op: str, layers: tuple[nn.Module, ...]):
    """The loaded op module when its ``op`` can run these CSR layers on x now (inference, CPU, their dtype and the
    csr format for this many tokens), else None. One op lookup per call: this runs on every forward."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    tokens = x.numel() // max(1, x.shape[-1])
    for m in layers:
        if not isinstance(m, SparseLinear) or m.values.dtype != x.dtype or m.format_for(tokens) != "csr":
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

    def kernel(self, x: torch.Tensor):
        """The op module this call runs on, or None (the original path)."""
        first, second = layers = self.layers()
        if (self.layer.output.training or x.shape[-1] != first.in_features  # x is also the residual:
                or second.out_features != first.in_features or first.out_features != second.in_features):
            return None
        return _kernel(x, self.op, layers)

    def applies(self, x: torch.Tensor) -> bool:
        return self.kernel(x) is not None

    def __call__(self, attention_output: torch.Tensor) -> torch.Tensor:
        module = self.kernel(attention_output)
        if module is None:
            return self.original(attention_output)
        norm = self.layer.output.LayerNorm  # in eval mode the dropout before it is the identity (the probe checked)
        first, second = self.layers()
        x2 = attention_output.reshape(-1, first.in_features)
        ln = layer_norm_args(norm, second.out_features)
        y = module.csr_ffn(x2, first.row_ptr, first.col_idx, first.values, first.bias, first.out_features,
                           self.activation, second.row_ptr, second.col_idx, second.values, second.bias,
                           second.out_features, second.in_features, x2, **(ln or {}))
        return _normalized(y, attention_output.shape, norm, ln is not None)

    def probe_inputs(self, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(1, tokens, self.layer.intermediate.dense.in_features, generator=g),)

    def layers(self) -> tuple[SparseLinear, ...]:
        return self.layer.intermediate.dense, self.layer.output.dense

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
        attn = self.block.self
        return attn.query, attn.key, attn.value, self.block.output.dense

    def kernel(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict):
        """The op module this call runs on, or None (the original path)."""
        block, attn = self.block, self.block.self
        q, k, v, out = self.layers()
        if (block.training or attn.training or hidden_states.dim() != 3 or hidden_states.shape[-1] != q.in_features
                or out.out_features != q.in_features or any(value is not None and value is not False
                                                          for value in extra.values())
                or getattr(attn.config, "_attn_implementation", None) != "sdpa"):
            return None
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.device != hidden_states.device
                                           or attention_mask.shape[-1] != hidden_states.shape[1]):
            return None
        return _kernel(hidden_states, self.op, (q, k, v, out))

    def applies(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **extra) -> bool:
        return self.kernel(hidden_states, attention_mask, extra) is not None

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **extra):
        module = None if args else self.kernel(hidden_states, attention_mask, extra)
        if module is None:
            return self.original(hidden_states, attention_mask, *args, **extra)
        attn, norm = self.block.self, self.block.output.LayerNorm
        q, k, v, out = self.layers()
        batch, seq, hidden = hidden_states.shape
        x2 = hidden_states.reshape(-1, hidden)
        ln = layer_norm_args(norm, out.out_features)
        y = module.csr_attention(x2, batch, *(_csr_tuple(m) for m in (q, k, v, out)), attn.num_attention_heads,
                                 float(getattr(attn, "scaling", attn.attention_head_size ** -0.5)),
                                 mask=attention_mask, residual=x2, **(ln or {}))
        return _normalized(y, hidden_states.shape, norm, ln is not None), None

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


def _csr_tuple(m: SparseLinear) -> tuple:
    return m.row_ptr, m.col_idx, m.values, m.bias, m.out_features, m.in_features


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


def _agrees(fused: _Fusion, module: nn.Module) -> bool:
    """The fused and the original computation agree on a random probe (eval mode; modes restored after)."""
    layers = fused.layers()
    # a token count every layer runs as csr (a measured layer may keep another format for small batches)
    counts = [n for n in (PROBE_TOKENS, max(m.small_tokens for m in layers) + PROBE_TOKENS)
              if all(m.format_for(n) == "csr" for m in layers)]
    if not counts:
        return False
    dtype, device = layers[0].values.dtype, layers[0].values.device
    inputs = [t.to(device, dtype) for t in fused.probe_inputs(counts[0], torch.Generator().manual_seed(0))]
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        if not fused.applies(*inputs):
            return False
        got, want = fused.output_of(fused(*inputs)).float(), fused.output_of(fused.original(*inputs)).float()
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
    (``{"feed_forward": 6, "residual_output": 12}``). Re-fusing first undoes earlier fusions."""
    unfuse(model)
    counts = {"self_attention": 0, "feed_forward": 0, "residual_output": 0}
    if not any(m.values.device.type == "cpu" and hasattr(csr.kernel_for(m.values), "csr_ffn")
               for m in model.modules() if isinstance(m, SparseLinear)):
        return counts  # the fused kernels are CPU kernels
    for kind, make in (("self_attention", _self_attention), ("feed_forward", _feed_forward),
                       ("residual_output", _residual_output)):
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


def describe(counts: dict[str, int]) -> str:
    """``{"feed_forward": 6, "residual_output": 12}`` as ``6 feed forward, 12 residual output`` (zeros left out)."""
    return ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items() if n)


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
