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
call computes in the kernel are not called, so a call whose skipped modules have a forward hook or pre-hook (a
user's feature capture on a projection or a LayerNorm; HF's output capture while it collects), or while a global
module hook is registered, takes the original path: every hook sees every call, and the blocks without hooks stay
fused (``fused_base.unobserved``: one dict check per module per call). Before a module is fused, the fused and the
original computation run on a random probe in eval mode and must agree, so a module that computes something else
(another activation, a pre-LayerNorm block) stays as it is. A call the kernel cannot run (gradient needed,
training mode, not the CPU, another format than ``csr`` for this token count, no kernel) takes the original path.
The kernels' arguments are prepared once and rebuilt when a module's tensors change (``to()``, a replaced
module); the token counts each layer runs as csr are remembered with them. A submodule replaced after fusing by
one of another type than the probe saw (an activation, an attention module), or an activation of the same type
computing another function, sends its block down the original path (``fusion.fuse`` probes again).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from cap_ds.sparse import csr
from cap_ds.sparse.fused_base import (
    ACT_GELU,
    ACT_NAMES,
    ACT_NONE,
    ACT_RELU,
    Fusion,
    activation_code,
    layer_norm_args,
)
from cap_ds.sparse.fused_blocks import FusedFeedForward, FusedResidualOutput, FusedSelfAttention
from cap_ds.sparse.fused_stack import FusedEncoder, FusedLayer
from cap_ds.sparse.linear import SparseLinear

__all__ = ["ACT_GELU", "ACT_NAMES", "ACT_NONE", "ACT_RELU", "KINDS", "FusedEncoder", "FusedFeedForward", "FusedLayer",
           "FusedResidualOutput", "FusedSelfAttention", "activation_code", "describe", "fuse", "fused_modules",
           "layer_norm_args", "unfuse"]

logger = logging.getLogger(__name__)

#: probe agreement, relative to the largest output. Half types: the fused FFN keeps its intermediate in fp32, the
#: unfused one rounds it
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
PROBE_TOKENS = 48  # three 16-token tiles: more than one tile, and a partial one, on up to 3 threads


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


def _agrees(fused: Fusion, module: nn.Module) -> bool:
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


def fused_modules(model: nn.Module) -> list[tuple[str, Fusion]]:
    """(module name, fusion) for every fused method of ``model``'s modules."""
    return [(name, value) for name, module in model.named_modules() for value in list(module.__dict__.values())
            if isinstance(value, Fusion) and value.module is module]


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse` (each module's own methods again); returns how many were undone."""
    done = fused_modules(model)
    for _, fused in done:
        fused.remove()
    return len(done)
