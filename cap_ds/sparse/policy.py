"""Which format each layer gets: the fixed rule, the forced policies, and the choice from measured times.

Dense is the safe default everywhere: a sparse format is kept only where it is expected (``rule``) or measured
(``measure``) to be faster, by a margin, and a layer holds two formats only where its extra memory is bounded.
"""

from __future__ import annotations

import torch

from cap_ds.ops import kernels_support
from cap_ds.sparse.linear import SparseLinear

#: (format_small, format_large, 2:4 backend or None)
Plan = tuple[str, str, str | None]


def rule_format(device_type: str, dtype: torch.dtype, sparsity: float, is_2to4: bool, tokens: int) -> str:
    """The ``policy="rule"`` choice, without timing: ``csr`` on the CPU in fp32 from 70 % zeros (where the
    cap_masked_gemm kernels are built), ``dense`` everywhere else.

    Other CPU dtypes stay dense because MKL's bf16/fp16 GEMMs vary too much by CPU to rule on; every CUDA layer
    stays dense because no GPU measurement has found a sparse path faster than cuBLAS (docs/sparse_inference.md);
    ``policy="measure"`` tries the sparse paths on your GPU. ``tokens`` and ``is_2to4`` are part of the signature
    for rules that need them.
    """
    del tokens, is_2to4
    if device_type == "cpu" and dtype == torch.float32 and sparsity >= 0.7 and kernels_support("cpu"):
        return "csr"
    return "dense"


def forced_format(policy: str, is_2to4: bool, allow_2to4: bool) -> str:
    """The format a forcing policy (``dense``, ``csr``, ``2:4``) gives a layer: ``2:4`` only to 2:4 weights."""
    if policy == "2:4":
        return "2:4" if is_2to4 and allow_2to4 else "dense"
    return policy


def choose(times: dict[str, float], min_speedup: float) -> str:
    """Fastest candidate, but a sparse one only if it beats dense by ``min_speedup`` (dense is the safe default)."""
    best = min(times, key=times.get)
    if best != "dense" and times[best] * min_speedup > times["dense"]:
        return "dense"
    return best


def format_bytes(layer: SparseLinear, fmt: str) -> int:
    """Bytes ``layer``'s weight takes in ``fmt`` (2:4: the upper bound of both backends' values + metadata)."""
    elt = layer.values.element_size()
    dense = layer.in_features * layer.out_features * elt
    if fmt == "dense":
        return dense
    if fmt == "2:4":
        return dense // 2 + dense // 8
    return layer.nnz * (elt + 4) + (layer.out_features + 1) * 4


def extra_bytes(layer: SparseLinear, fmts: set[str]) -> int:
    """Bytes a SparseLinear running ``fmts`` holds (CSR buffers + derived weights) minus the dense weight's."""
    held = format_bytes(layer, "csr") + sum(format_bytes(layer, f) for f in fmts if f != "csr")
    return held - format_bytes(layer, "dense")


def _split(candidate: str) -> tuple[str, str | None]:
    """``"2:4/cutlass"`` -> (``"2:4"``, ``"cutlass"``); ``"csr"`` -> (``"csr"``, None)."""
    fmt, _, backend = candidate.partition("/")
    return fmt, backend or None


def plan_layer(layer: SparseLinear, per_class: dict[str, dict[str, float]], max_extra_memory: float,
               min_speedup: float) -> Plan:
    """(format_small, format_large, 2:4 backend) from the measured times per batch class.

    Each class gets its fastest path (sparse only with ``min_speedup`` over dense). If the two classes want
    different formats and holding both costs more than ``max_extra_memory`` x the dense weight on top of the CSR
    buffers, one format serves both: dense, or one that beats dense by ``min_speedup`` in every class (the least
    total time relative to dense among those).
    """
    classes = list(per_class)
    picks = {c: choose(per_class[c], min_speedup) for c in classes}
    if len(classes) == 1 or picks["small"] == picks["large"]:
        fmt, backend = _split(next(iter(picks.values())))
        return fmt, fmt, backend
    if extra_bytes(layer, {_split(p)[0] for p in picks.values()}) <= max_extra_memory * format_bytes(layer, "dense"):
        backends = [_split(p)[1] for p in picks.values() if _split(p)[1]]
        return _split(picks["small"])[0], _split(picks["large"])[0], (backends[0] if backends else None)
    common = set.intersection(*(set(per_class[c]) for c in classes))
    ok = ["dense"] + [n for n in sorted(common - {"dense"})
                      if all(per_class[c][n] * min_speedup <= per_class[c]["dense"] for c in classes)]
    best = min(ok, key=lambda n: sum(per_class[c][n] / per_class[c]["dense"] for c in classes))
    fmt, backend = _split(best)
    return fmt, fmt, backend
