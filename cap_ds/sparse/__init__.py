"""Pruned-model inference: ``sparsify(model)`` makes the zeros that pruning produced pay off, and never costs speed.

An exported cap_ds model is a plain transformers model whose encoder linears are mostly zeros; dense GEMMs still
multiply every zero. Whether skipping them is faster depends on the device, dtype, shape, sparsity and batch: on a
CPU our CSR kernel beats MKL's dense GEMM at 90 % sparsity; on an H200 in bf16 dense cuBLAS beat every sparse path
we had (CSR 0.06-0.5x, torch's 2:4 0.01-0.1x, ../shared/gpu/README.md). So ``sparsify`` decides per layer between

- ``dense``: the ``nn.Linear`` is left in place (untouched module, same ``state_dict``, zero overhead; a plain
  ``nn.Linear`` in the printed model therefore means "dense won or was not eligible");
- ``csr``: a :class:`SparseLinear` multiplying the CSR weight with the ``cap_masked_gemm`` kernels (CPU: x packed
  as x^T tiles, one register-blocked axpy per nonzero; CUDA: warp per row), else ``torch.sparse.mm``;
- ``2:4``: a :class:`SparseLinear` running torch's semi-structured GEMM (CUDA, fp16/bf16, sm80+, weights with at
  most 2 nonzeros per 4 inputs), backend ``cusparselt`` or ``cutlass``.

The decision (``policy``) is either measured once on the actual device (``"measure"``, the default), taken from a
rule (``"rule"``), or forced (``"csr"``, ``"2:4"``, ``"dense"``); see :func:`sparsify`. Every :class:`SparseLinear`
keeps its weight as CSR buffers (the ``state_dict`` format), and builds what its chosen paths need (dense weight,
2:4 packed weight) once per device/dtype/weight version, not per call.

Why the 2:4 path was 10-100x slower than dense (H200, 0.40-0.83 ms where dense took 0.009-0.05 ms):

1. torch's ``_cslt_sparse_mm`` (cuSPARSELt, the default backend of ``to_sparse_semi_structured``) creates its
   cuSPARSELt descriptors, plan and workspace on every call. pytorch/pytorch#153825 reports 2:4 slower than dense
   on H100; pytorch/pytorch#177866 (a proposed fix) measured ~0.46 ms of host time between kernel launches for
   ``F.linear(x, W_semi)`` (0.60 ms vs 0.25 ms dense, 3072x10240 -> 3072, fp16) and 1.15x dense once descriptors
   were cached; pytorch/pytorch#179642 (April 2026) adds such a plan cache. Whether the GPU machines' torch 2.11
   has it is not verified. A constant host cost per call fits the flat 0.4-0.8 ms whatever the shape. It is
   inside torch: we can only route around it (the CUTLASS backend has no plan; dense when neither wins). CUTLASS's
   2:4 kernels on Hopper are Ampere kernels (NVIDIA/cutlass#1335), so >= 1.25x on RoBERTa-large FFN shapes is not
   expected from torch's kernels; ``bench_inference.py --layers --device cuda`` measures it.
2. The old ``F.linear(x2, W_semi, bias)`` went through the tensor subclass' Python ``__torch_dispatch__`` chain
   on every call (in torch 2.13's source: ``linear`` -> ``t``, a new wrapper subclass -> ``addmm`` -> ``t`` -> a
   ``torch.library`` custom op; torch 2.11's may differ), host work where the dense GEMM takes ~10 us.
   :func:`_semi_matmul` calls the aten ops (``_cslt_sparse_mm`` / ``_sparse_semi_structured_(add)mm``) directly
   with the operands torch itself passes (``x.t()`` as the dense operand; ``transpose_result`` writes [tokens,
   out]). How much this saves is not measured (``--layers`` times both routes).
3. 2:4 was taken unconditionally whenever the weight was 2:4, never compared with dense.
4. The conversion cache was keyed by ``values.data_ptr()``: it did not re-convert per call, but it also did not
   notice an in-place update (``load_state_dict`` copies into the same storage), so it could serve a stale weight.
   Caches are now keyed by the buffers' version counters too.

Not measured on GPU (no GPU in the session that wrote this): the cost of (1) and (2) on the GPU machines, whether
the direct call or the CUTLASS backend bring 2:4 to >= 1.25x dense on RoBERTa-large FFN shapes at 4096 tokens in
bf16 (``policy="measure"`` then picks it, else dense), and the time the measurement itself takes on a GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from cap_ds.ops import kernels_support, load_kernels
from cap_ds.runtime.atomic import publish_modes

__all__ = ["SparseLinear", "SparsifySummary", "pack_csr", "sparsify", "densify", "weight_sparsity", "rule_format",
           "FORMATS", "POLICIES", "SMALL_BATCH_TOKENS", "clear_decision_cache", "time_candidates"]

logger = logging.getLogger(__name__)

FORMATS = ("dense", "csr", "2:4")
POLICIES = ("measure", "rule", "dense", "csr", "2:4")
SEMI_BACKENDS = ("cusparselt", "cutlass")
#: Batch classes: a forward with at most this many tokens (rows of x) is "small" (memory-bound on a GPU for
#: BERT-base shapes), more is "large". Without a ``batch_tokens`` hint each class is measured at its
#: representative size below.
SMALL_BATCH_TOKENS = 256
REPRESENTATIVE_TOKENS = {"small": 128, "large": 1024}

_SEMI_DTYPES = (torch.float16, torch.bfloat16)
_SEMI_MIN_ROWS = 8  # dense operand rows (tokens) must be a multiple of 8 for fp16/bf16 in both torch backends
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (decision key) -> {"format": str, "backend": str | None, "times_ms": {candidate: ms}}
_DECISIONS: dict[str, dict[str, Any]] = {}


def clear_decision_cache() -> None:
    """Forget this process's measured decisions (e.g. after changing the thread count)."""
    _DECISIONS.clear()


def weight_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return 1.0 - float(torch.count_nonzero(weight.detach())) / max(1, weight.numel())


@torch.no_grad()
def pack_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of a dense [out, in] weight: (row_ptr int32 [out + 1], col_idx int32 [nnz], values [nnz]).

    Zeros are dropped (NaNs are kept); values keep the weight's dtype and device.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_csr expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach()
    nonzero = w != 0
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    if rows.numel() >= 2**31:
        raise ValueError("pack_csr: more than 2^31 nonzeros do not fit int32 indices")
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(nonzero.sum(1), 0)
    return row_ptr.to(torch.int32), cols.to(torch.int32), w[rows, cols].contiguous()


def _is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (what 2:4 sparse tensor cores need)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


# ---- torch's 2:4 semi-structured GEMM, called without the tensor subclass' per-call Python dispatch
def _semi_supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """True where torch's 2:4 GEMM can run: CUDA sm80+, fp16/bf16, both weight dims multiples of 64."""
    if device.type != "cuda" or dtype not in _SEMI_DTYPES or out_features % 64 or in_features % 64:
        return False
    try:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    except (RuntimeError, AssertionError):
        return False


def _semi_backends() -> tuple[str, ...]:
    """The 2:4 backends this torch build has (cuSPARSELt is optional at build time)."""
    backends = ["cutlass"]
    try:
        if torch.backends.cusparselt.is_available():
            backends.insert(0, "cusparselt")
    except AttributeError:
        pass
    return tuple(backends)


def _semi_convert(dense: torch.Tensor, backend: str) -> Any:
    """Compress a 2:4 [out, in] weight for ``backend`` (one-time cost; tests count the calls)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(dense.contiguous())


def _semi_matmul(semi: Any, backend: str, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [tokens, out] = x2 @ W^T + b with the compressed W: the aten op directly, as torch's own dispatch would.

    The dense operand is ``x2.t()`` (a free view of the row-major activations); tokens are padded to a multiple
    of 8 as torch requires. cuSPARSELt writes the [tokens, out] result directly (``transpose_result``); the
    output is always contiguous, so the measured time includes any copy the next layer would otherwise pay.
    """
    tokens = x2.shape[0]
    x2 = x2.contiguous()
    pad = (-tokens) % _SEMI_MIN_ROWS
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


class SparseLinear(nn.Module):
    """Inference-only linear layer with a CSR weight; ``y = x @ W^T + b`` for x of shape [..., in_features].

    Buffers (moved by ``.to()``/``.cuda()``, cast by ``.half()``/``.to(dtype)`` like a weight, and the whole
    ``state_dict``): ``row_ptr``, ``col_idx``, ``values`` and ``bias``. Inputs must have the values' dtype, as with
    ``F.linear``. The execution format is ``format_small`` for forwards of at most ``small_tokens`` rows and
    ``format_large`` above (the same unless ``sparsify`` found that the batch size changes the winner); ``dense``
    and ``2:4`` build their weight from the CSR buffers once per (device, dtype, buffer version). A format the
    current device cannot run (2:4 off CUDA) falls back to the CSR path. With autograd recording a graph that
    needs gradients, a differentiable path is used (gradient for the input only).
    """

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None = None, allow_2to4: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if row_ptr.numel() != self.out_features + 1 or col_idx.numel() != values.numel():
            raise ValueError("inconsistent CSR arrays for SparseLinear")
        self.register_buffer("row_ptr", row_ptr.to(torch.int32).contiguous())
        self.register_buffer("col_idx", col_idx.to(torch.int32).contiguous())
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().to(values.dtype))
        self.allow_2to4 = allow_2to4
        self.format_small = self.format_large = "csr"
        self.small_tokens = SMALL_BATCH_TOKENS
        self.semi_backend: str | None = None  # None: the first of _semi_backends()
        self._dense_cache: tuple[tuple, torch.Tensor] | None = None
        self._semi_cache: tuple[tuple, Any] | None = None  # (key, compressed weight or None if unavailable)
        self._semi_direct = True  # False once the direct aten call failed: torch's public route from then on
        self._fallback_logged = False

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, allow_2to4: bool = True) -> SparseLinear:
        """Pack ``linear``'s weight (masks baked in first for cap_ds's MaskedLinear); format ``csr``."""
        if hasattr(linear, "masked_weight") and hasattr(linear, "to_linear"):
            linear = linear.to_linear()
        row_ptr, col_idx, values = pack_csr(linear.weight)
        return cls(linear.in_features, linear.out_features, row_ptr, col_idx, values, linear.bias,
                   allow_2to4=allow_2to4)

    def set_format(self, fmt: str, large: str | None = None, small_tokens: int = SMALL_BATCH_TOKENS,
                   semi_backend: str | None = None) -> SparseLinear:
        """Run ``fmt`` for every batch, or ``fmt`` up to ``small_tokens`` rows and ``large`` above."""
        for name, value in (("fmt", fmt), ("large", large)):
            if value is not None and value not in FORMATS:
                raise ValueError(f"SparseLinear.set_format: {name}={value!r}; allowed: {', '.join(FORMATS)}")
        if semi_backend is not None and semi_backend not in SEMI_BACKENDS:
            raise ValueError(f"SparseLinear.set_format: semi_backend={semi_backend!r}; allowed: "
                             f"{', '.join(SEMI_BACKENDS)} or None")
        self.format_small, self.format_large = fmt, large or fmt
        self.small_tokens = int(small_tokens)
        if semi_backend != self.semi_backend:
            self._semi_cache = None
        self.semi_backend = semi_backend
        return self

    def format_for(self, tokens: int) -> str:
        return self.format_small if tokens <= self.small_tokens else self.format_large

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.in_features * self.out_features)

    @property
    def format(self) -> str:
        """``csr``, ``dense`` or ``2:4``; ``csr|dense`` style when small and large batches differ."""
        if self.format_small == self.format_large:
            return self.format_small
        return f"{self.format_small}(tokens<={self.small_tokens})|{self.format_large}"

    def extra_repr(self) -> str:
        backend = ""
        if "2:4" in (self.format_small, self.format_large):
            backend = f", backend={self.semi_backend or _semi_backends()[0]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}{backend}, sparsity={self.sparsity:.4f}")

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight with its zeros back (a new tensor)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device), counts)
        w[rows, self.col_idx.long()] = self.values
        return w

    def _weight_key(self) -> tuple:
        """Changes when the weight may have: other device/dtype/storage, or an in-place write (load_state_dict)."""
        v = self.values
        return (v.device, v.dtype, v.data_ptr(), _version(v), _version(self.row_ptr), _version(self.col_idx))

    def cached_dense_weight(self) -> torch.Tensor:
        """The dense weight, built once per weight version (what the ``dense`` format multiplies)."""
        key = self._weight_key()
        if self._dense_cache is None or self._dense_cache[0] != key:
            with torch.inference_mode(False):  # a normal tensor: usable later in a graph that needs gradients
                self._dense_cache = (key, self.dense_weight())
        return self._dense_cache[1]

    def semi_weight(self) -> Any:
        """torch's compressed 2:4 weight, converted once per weight version and backend; None where unavailable."""
        if not self.allow_2to4:
            return None
        backend = self.semi_backend or _semi_backends()[0]
        key = (*self._weight_key(), backend)
        if self._semi_cache is not None and self._semi_cache[0] == key:
            return self._semi_cache[1]
        semi = None
        v = self.values
        if _semi_supported(v.device, v.dtype, self.out_features, self.in_features):
            dense = self.dense_weight()
            if _is_2to4(dense):
                try:
                    with torch.inference_mode(False):
                        semi = _semi_convert(dense, backend)
                except (RuntimeError, ValueError, NotImplementedError, AttributeError) as err:
                    logger.info("2:4 %s conversion failed (%s); using the CSR path", backend, err)
        self._semi_cache = (key, semi)
        return semi

    def to_linear(self) -> nn.Linear:
        """A plain dense ``nn.Linear`` with the same weight and bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    # ---- forward paths
    def torch_csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.row_ptr, self.col_idx, self.values,
                                       (self.out_features, self.in_features))

    def reference_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch on [tokens, in]: ``torch.sparse.mm`` on the CSR (fp32/fp64), else the densified weight."""
        if x2.dtype in (torch.float32, torch.float64) and x2.shape[0] > 0:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    y = torch.sparse.mm(self.torch_csr(), x2.t()).t()
                return y + self.bias if self.bias is not None else y
            except (RuntimeError, NotImplementedError):
                pass
        return F.linear(x2, self.cached_dense_weight(), self.bias)

    def csr_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The CSR path on [tokens, in]: our kernel where it has this device/dtype, else PyTorch."""
        if x2.dtype in _KERNEL_DTYPES and kernels_support(x2.device):
            if torch.is_grad_enabled() and x2.requires_grad:
                return _CSRLinearFunction.apply(x2, self)
            return load_kernels().csr_linear(x2, self.row_ptr, self.col_idx, self.values, self.bias,
                                             self.out_features)
        return self.reference_forward(x2)

    def semi_forward(self, x2: torch.Tensor) -> torch.Tensor | None:
        """The 2:4 path on [tokens, in], or None where it cannot run here (the caller takes the CSR path)."""
        if torch.is_grad_enabled() and x2.requires_grad:
            return None
        semi = self.semi_weight()
        if semi is None:
            return None
        backend = self._semi_cache[0][-1]
        if self._semi_direct:
            try:
                return _semi_matmul(semi, backend, x2, self.bias)
            except (RuntimeError, NotImplementedError, TypeError, AttributeError) as err:
                # A private aten op changed in this torch: torch's public (slower) route, still correct.
                logger.info("2:4 %s direct call failed (%s); using F.linear on the semi-structured tensor",
                            backend, err)
                self._semi_direct = False
        return F.linear(x2, semi, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise RuntimeError(f"SparseLinear: input dtype {x.dtype} differs from the weight dtype "
                               f"{self.values.dtype} (as F.linear, no implicit cast)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        fmt = self.format_for(x2.shape[0])
        y = None
        if fmt == "dense":
            y = F.linear(x2, self.cached_dense_weight(), self.bias)
        elif fmt == "2:4":
            y = self.semi_forward(x2)
            if y is None and not self._fallback_logged:
                self._fallback_logged = True
                logger.info("SparseLinear %dx%d: 2:4 cannot run on %s/%s here; using the CSR path",
                            self.out_features, self.in_features, x2.device, x2.dtype)
        if y is None:
            y = self.csr_forward(x2)
        return y.reshape(*lead, self.out_features)


class _CSRLinearFunction(torch.autograd.Function):
    """The CSR kernel with a gradient for the input only (dx = g @ W; the packed weight is not trainable)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: SparseLinear) -> torch.Tensor:
        ctx.layer = layer
        return load_kernels().csr_linear(x2, layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                                         layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.mm(ctx.layer.cached_dense_weight()), None


# ---- the per-layer decision
#: (candidates: name -> no-argument call, the representative input x) -> seconds per call of each candidate
MeasureFn = Callable[[dict[str, Callable[[], object]], torch.Tensor], dict[str, float]]


def time_candidates(candidates: dict[str, Callable[[], object]], device: torch.device, reps: int = 15,
                    target_s: float = 1e-3) -> dict[str, float]:
    """Seconds per call of each candidate: the fastest of ``reps`` interleaved rounds.

    In each round every candidate runs a batch of calls lasting ~``target_s`` (between CUDA syncs, so GPU work
    plus the host overhead eager inference pays is timed, not the sync). Load from other processes only ever
    adds time, so the least-disturbed round estimates each path's own cost; the median (what the benchmarks
    report) swung 2-5x between identical dense GEMMs on this project's loaded 2-core CPU and flipped decisions.
    Many short rounds beat few long ones there: over 8 small layer cases run twice, 7 rounds of ~5 ms put CSR on
    different sides of dense in 4 (e.g. 0.30x then 1.56x), 15 rounds of ~1 ms in none (mostly within 5 %).
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inner: dict[str, int] = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            fn()  # warm-up: kernels built, caches filled
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            single = max(time.perf_counter() - t0, 1e-7)
            inner[name] = max(1, min(100, int(target_s / single)))
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(reps):
            for name, fn in candidates.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                sync()
                times[name].append(max((time.perf_counter() - t0) / inner[name], 1e-12))
    return {name: min(ts) for name, ts in times.items()}


def _device_desc(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(device)
            return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}"
        except (RuntimeError, AssertionError):
            return "cuda"
    if device.type == "cpu":
        return f"cpu:{torch.get_num_threads()}threads"
    return device.type


def _decision_key(layer: SparseLinear, tokens: int, is_2to4: bool) -> str:
    bucket = math.floor(layer.sparsity * 20 + 1e-9) / 20  # 5 % buckets: layers of one shape share a measurement
    return (f"{layer.out_features}x{layer.in_features}|{str(layer.values.dtype).replace('torch.', '')}|"
            f"{_device_desc(layer.values.device)}|tokens={tokens}|sparsity>={bucket:.2f}|2:4={int(is_2to4)}|"
            f"bias={int(layer.bias is not None)}|torch={torch.__version__}")


def rule_format(device_type: str, dtype: torch.dtype, sparsity: float, is_2to4: bool, tokens: int) -> str:
    """The ``policy="rule"`` choice, from the figures the benchmark measured (no timing at sparsify time).

    CPU, fp32, with the cap_masked_gemm kernels: ``csr`` from 70 % zeros (the kernel ran 2.7-3.8x faster than
    MKL at 90 % on MiniLM and loses below ~50 %); other CPU dtypes: ``dense`` (MKL's bf16/fp16 GEMMs vary too much
    by CPU to rule on). CUDA: ``dense`` for every layer: on an H200 in bf16 the CSR kernel ran at 0.06-0.5x and
    torch's 2:4 at 0.01-0.1x of dense, and no faster GPU figure exists yet; use ``policy="measure"`` to try the
    sparse paths on your GPU. ``tokens`` and ``is_2to4`` are part of the signature for rules that need them.
    """
    del tokens, is_2to4
    if device_type == "cpu" and dtype == torch.float32 and sparsity >= 0.7 and kernels_support("cpu"):
        return "csr"
    return "dense"


@dataclass
class SparsifySummary:
    """What :func:`sparsify` chose, per layer and in total (also ``model.sparsify_summary``)."""

    policy: str
    device: str
    dtype: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    measured_keys: int = 0
    cached_keys: int = 0
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.layers:
            out[row["format"]] = out.get(row["format"], 0) + 1
        return dict(sorted(out.items()))

    @property
    def replaced(self) -> list[dict[str, Any]]:
        return [r for r in self.layers if r["format"] != "dense"]

    @property
    def sparsity(self) -> float:
        """Zeros over weights of all considered layers (dense ones included)."""
        total = sum(r["numel"] for r in self.layers)
        return sum(r["sparsity"] * r["numel"] for r in self.layers) / total if total else 0.0

    @property
    def extra_bytes(self) -> int:
        return sum(r.get("extra_bytes", 0) for r in self.layers)

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items()) or "none"
        return (f"sparsify(policy={self.policy}, {self.device}, {self.dtype}): {len(self.layers)} linears considered,"
                f" formats: {counts}; weight sparsity {self.sparsity:.3f}; {len(self.replaced)} replaced by "
                f"SparseLinear; measured {self.measured_keys} keys ({self.cached_keys} from cache) in "
                f"{self.seconds:.2f} s")

    def __str__(self) -> str:
        return self.line()


def _modules_to_replace(model: nn.Module, min_sparsity: float):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            # nn.MultiheadAttention reads out_proj.weight itself instead of calling it: leave those alone.
            if isinstance(child, nn.Linear) and not isinstance(child, NonDynamicallyQuantizableLinear):
                weight = child.masked_weight() if hasattr(child, "masked_weight") else child.weight
                if weight.dim() == 2 and weight.numel() > 0 and weight_sparsity(weight) >= min_sparsity:
                    yield module, child_name, f"{name}.{child_name}" if name else child_name, child


def _candidates(layer: SparseLinear, dense: torch.Tensor, x: torch.Tensor, is_2to4: bool
                ) -> dict[str, Callable[[], object]]:
    """The paths that can run this layer on x's device: name -> no-argument call."""
    bias = layer.bias
    out: dict[str, Callable[[], object]] = {"dense": lambda: F.linear(x, dense, bias)}
    if x.dtype in _KERNEL_DTYPES and kernels_support(x.device) or x.dtype in (torch.float32, torch.float64):
        out["csr"] = lambda: layer.csr_forward(x)
    if is_2to4 and layer.allow_2to4 and _semi_supported(x.device, x.dtype, layer.out_features, layer.in_features):
        for backend in _semi_backends():
            try:
                semi = _semi_convert(dense, backend)
                _semi_matmul(semi, backend, x, bias)
            except (RuntimeError, ValueError, NotImplementedError, AttributeError, TypeError) as err:
                logger.info("2:4 %s unavailable for %s (%s)", backend, tuple(dense.shape), err)
                continue
            out[f"2:4/{backend}"] = lambda semi=semi, backend=backend: _semi_matmul(semi, backend, x, bias)
    return out


def _choose(times: dict[str, float], min_speedup: float) -> str:
    """Fastest candidate, but a sparse one only if it beats dense by ``min_speedup`` (dense is the safe default)."""
    best = min(times, key=times.get)
    if best != "dense" and times[best] * min_speedup > times["dense"]:
        return "dense"
    return best


def _load_cache_file(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as err:
        logger.warning("sparsify: ignoring unreadable decision cache %s (%s)", path, err)
        return {}


def _write_cache_file(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    publish_modes(tmp)  # the modes a plain open() would give under the umask
    os.replace(tmp, path)


def _check_args(policy: str, min_sparsity: float, batch_tokens: int | None, reps: int, min_speedup: float,
                max_extra_memory: float) -> None:
    if policy not in POLICIES:
        raise ValueError(f"sparsify: policy={policy!r} is not supported; allowed: {', '.join(map(repr, POLICIES))}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    if batch_tokens is not None and (isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int)
                                     or batch_tokens < 1):
        raise ValueError(f"sparsify: batch_tokens must be None or a positive int, got {batch_tokens!r}")
    if reps < 1:
        raise ValueError(f"sparsify: reps must be >= 1, got {reps}")
    if min_speedup < 1.0:
        raise ValueError(f"sparsify: min_speedup must be >= 1.0 (never slower than dense), got {min_speedup}")
    if max_extra_memory < 0:
        raise ValueError(f"sparsify: max_extra_memory must be >= 0, got {max_extra_memory}")


def _format_bytes(layer: SparseLinear, fmt: str) -> int:
    elt = layer.values.element_size()
    dense = layer.in_features * layer.out_features * elt
    if fmt == "dense":
        return dense
    if fmt == "2:4":
        return dense // 2 + dense // 8  # kept values + metadata (upper bound of both backends)
    return layer.nnz * (elt + 4) + (layer.out_features + 1) * 4


def _extra_bytes(layer: SparseLinear, fmts: set[str]) -> int:
    """Bytes a SparseLinear running ``fmts`` holds (CSR buffers + derived weights) minus the dense weight's."""
    held = _format_bytes(layer, "csr") + sum(_format_bytes(layer, f) for f in fmts if f != "csr")
    return held - _format_bytes(layer, "dense")


def _plan_layer(layer: SparseLinear, classes: dict[str, int], per_class: dict[str, dict[str, float]],
                max_extra_memory: float, min_speedup: float) -> tuple[str, str, str | None]:
    """(format_small, format_large, 2:4 backend) from the measured times per batch class.

    Each class gets its fastest path (sparse only with ``min_speedup`` over dense). If the two classes want
    different formats and holding both costs more than ``max_extra_memory`` x the dense weight on top of the CSR
    buffers, one format serves both: dense, or one that beats dense by ``min_speedup`` in every class (the least
    total time relative to dense among those).
    """
    picks = {c: _choose(per_class[c], min_speedup) for c in classes}
    if len(classes) == 1 or picks["small"] == picks["large"]:
        pick = next(iter(picks.values()))
        fmt, backend = (pick.split("/") + [None])[:2]
        return fmt, fmt, backend
    fmts = {p.split("/")[0] for p in picks.values()}
    if _extra_bytes(layer, fmts) <= max_extra_memory * _format_bytes(layer, "dense"):
        backends = [p.split("/")[1] for p in picks.values() if "/" in p]
        return picks["small"].split("/")[0], picks["large"].split("/")[0], (backends[0] if backends else None)
    common = set.intersection(*(set(per_class[c]) for c in classes))
    ok = ["dense"] + [n for n in sorted(common - {"dense"})
                      if all(per_class[c][n] * min_speedup <= per_class[c]["dense"] for c in classes)]
    best = min(ok, key=lambda n: sum(per_class[c][n] / per_class[c]["dense"] for c in classes))
    fmt, backend = (best.split("/") + [None])[:2]
    return fmt, fmt, backend


@torch.no_grad()
def sparsify(model: nn.Module, min_sparsity: float = 0.5, allow_2to4: bool = True, *, policy: str = "measure",
             batch_tokens: int | None = None, cache_path: str | os.PathLike | None = None, reps: int = 15,
             min_speedup: float = 1.05, max_extra_memory: float = 0.5, measure_fn: MeasureFn | None = None
             ) -> nn.Module:
    """Give every ``nn.Linear`` with at least ``min_sparsity`` zeros the fastest format on its device (in place).

    Run it on the device and dtype you will infer with (``model.to(device, dtype)`` first): decisions are made
    there. Layers whose format is ``dense`` stay the original ``nn.Linear``; the others become
    :class:`SparseLinear` (``extra_repr`` shows ``format=``). Returns the model, with ``model.sparsify_summary``
    (:class:`SparsifySummary`) attached and its one-line summary logged at INFO.

    policy:
      ``"measure"`` (default): time dense, CSR and (2:4 weights, CUDA fp16/bf16 sm80+) both torch 2:4 backends
      with the layer's real weights on a random input of the representative size, the fastest of ``reps``
      interleaved rounds (see :func:`time_candidates`); keep the fastest, a sparse path only if ``min_speedup``
      x faster than dense. Layers of the same
      (shape, dtype, device, thread count, 5 % sparsity bucket, 2:4-ness, bias, batch class, torch version)
      share one measurement, cached in this process and, with ``cache_path``, in a JSON file reused by later
      runs. Cost (2-core loaded CPU, 1 thread, fp32): 1.7 s for a 2-layer tiny BERT, 3.7 s for MiniLM at 90 %,
      18 s for MiniLM at 2:4 (CSR at 50 % zeros is slow to time at 1024 tokens); roughly 15 rounds x (dense +
      each sparse path) per key, and BERT-like models have 3 linear shapes, so ~6 keys (both batch classes)
      or ~3 (with ``batch_tokens``). Not measured on GPU.
      ``"rule"``: :func:`rule_format`, no timing (CPU fp32 -> CSR from 70 % zeros; CUDA -> dense).
      ``"csr"``, ``"2:4"``, ``"dense"``: forced. ``"2:4"`` converts the layers whose weight is 2:4 (others stay
      dense); where 2:4 cannot run (CPU) those layers take the CSR path.
    batch_tokens: the rows per forward you will run (batch x sequence). Given, the layer is measured at exactly
      that size and holds one format. ``None``: both batch classes (<= ``SMALL_BATCH_TOKENS`` rows, measured at
      128; more, measured at 1024) are measured, and a layer whose winner differs holds both formats if that
      costs at most ``max_extra_memory`` x its dense weight in extra memory, else dense or one format that beats
      dense by ``min_speedup`` in both classes.
    measure_fn: replaces the timer (``(candidates, x) -> seconds per candidate``; x is the representative
      input), e.g. for deterministic tests.
    allow_2to4: False keeps 2:4 out of every decision.
    """
    _check_args(policy, min_sparsity, batch_tokens, reps, min_speedup, max_extra_memory)
    t_start = time.perf_counter()
    targets = list(_modules_to_replace(model, min_sparsity))
    first = next((c.weight for *_, c in targets), None)
    summary = SparsifySummary(policy=policy, device=str(first.device) if first is not None else "-",
                              dtype=str(first.dtype).replace("torch.", "") if first is not None else "-")
    classes = ({"only": batch_tokens} if batch_tokens is not None else dict(REPRESENTATIVE_TOKENS))
    path = Path(cache_path) if cache_path is not None else None
    file_cache = _load_cache_file(path) if policy == "measure" else {}
    file_dirty = False
    measure = measure_fn or (lambda cands, x: time_candidates(cands, x.device, reps=reps))

    for parent, child_name, name, child in targets:
        layer = SparseLinear.from_linear(child, allow_2to4=allow_2to4)
        layer.train(child.training)
        dense = layer.dense_weight()
        is_2to4 = _is_2to4(dense)
        row: dict[str, Any] = {"name": name, "shape": [layer.out_features, layer.in_features],
                               "numel": dense.numel(), "sparsity": layer.sparsity, "is_2to4": is_2to4}
        backend = None
        if policy in ("dense", "csr"):
            small = large = policy
        elif policy == "2:4":
            small = large = "2:4" if is_2to4 and allow_2to4 else "dense"
        elif policy == "rule":
            picks = {c: rule_format(dense.device.type, dense.dtype, layer.sparsity, is_2to4, t)
                     for c, t in classes.items()}
            small, large = picks.get("small", picks.get("only")), picks.get("large", picks.get("only"))
        else:
            per_class: dict[str, dict[str, float]] = {}
            for cls_name, tokens in classes.items():
                key = _decision_key(layer, tokens, is_2to4 and allow_2to4)
                hit = _DECISIONS.get(key) or file_cache.get(key)
                if hit is None:
                    gen = torch.Generator(device=dense.device).manual_seed(0)
                    x = torch.randn(tokens, layer.in_features, generator=gen, device=dense.device).to(dense.dtype)
                    times = measure(_candidates(layer, dense, x, is_2to4 and allow_2to4), x)
                    hit = {"times_ms": {k: v * 1e3 for k, v in times.items()}}
                    summary.measured_keys += 1
                    file_cache[key] = hit
                    file_dirty = True
                else:
                    summary.cached_keys += 1
                _DECISIONS[key] = hit
                per_class[cls_name] = hit["times_ms"]
            small, large, backend = _plan_layer(layer, classes, per_class, max_extra_memory, min_speedup)
            row["times_ms"] = per_class
        row["format"] = small if small == large else f"{small}|{large}"
        if small == large == "dense":
            summary.layers.append(row)
            continue  # the nn.Linear stays: nothing to gain, nothing to pay
        small_tokens = batch_tokens if batch_tokens is not None else SMALL_BATCH_TOKENS
        layer.set_format(small, large, small_tokens=small_tokens, semi_backend=backend)
        row["extra_bytes"] = _extra_bytes(layer, {small, large})
        if "2:4" in (small, large):
            row["backend"] = backend or _semi_backends()[0]
        setattr(parent, child_name, layer)
        summary.layers.append(row)

    if path is not None and file_dirty:
        try:
            _write_cache_file(path, file_cache)
        except OSError as err:
            logger.warning("sparsify: could not write the decision cache %s (%s)", path, err)
    summary.seconds = time.perf_counter() - t_start
    model.sparsify_summary = summary
    logger.info("%s", summary.line())
    return model


def densify(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify`: every :class:`SparseLinear` back to a dense ``nn.Linear`` (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SparseLinear):
                dense = child.to_linear()
                dense.train(child.training)
                setattr(module, child_name, dense)
    return model
