"""``sparsify`` / ``densify``: walk a model and give each pruned ``nn.Linear`` its format, or take them back.

(Not named ``sparsify.py``: the package re-exports the function ``sparsify``, which would shadow the module.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from cap_ds.sparse import semi
from cap_ds.sparse.formats import (
    POLICIES,
    REPRESENTATIVE_TOKENS,
    SMALL_BATCH_TOKENS,
    is_2to4,
    weight_sparsity,
)
from cap_ds.sparse.fusion import fuse, unfuse
from cap_ds.sparse.linear import SparseLinear
from cap_ds.sparse.measure import DecisionCache, MeasureFn, choosable, measured_times, time_candidates
from cap_ds.sparse.policy import Plan, extra_bytes, forced_format, plan_layer, rule_format
from cap_ds.sparse.summary import SparsifySummary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparsifyOptions:
    """What :func:`sparsify` does; each field can also be passed to it as a keyword (``sparsify(m, policy="rule")``).

    min_sparsity: a linear with fewer zeros than this fraction is left alone.
    allow_2to4: False keeps 2:4 out of every decision.
    policy: ``"measure"`` (default): time dense, CSR and (2:4 weights on CUDA fp16/bf16 sm80+) both torch 2:4
      backends with the layer's real weights on a random input of the representative size, the fastest of
      ``reps`` interleaved rounds (:func:`~cap_ds.sparse.measure.time_candidates`), and keep the fastest, a
      sparse path only if ``min_speedup`` x faster than dense. Layers sharing shape, dtype, device, thread count,
      5 % sparsity bucket, 2:4-ness, bias, batch class and torch version share one measurement, kept in this
      process and, with ``cache_path``, in a JSON file reused by later runs. ``"rule"``:
      :func:`~cap_ds.sparse.policy.rule_format`, no timing. ``"csr"``, ``"2:4"``, ``"dense"``: forced; ``"2:4"``
      converts the layers whose weight is 2:4 (the others stay dense) and runs them on CSR where 2:4 cannot run.
    batch_tokens: the rows per forward you will run (batch x sequence). Given, each layer is decided at exactly
      that size and holds one format. ``None``: both batch classes (<= ``SMALL_BATCH_TOKENS`` rows, measured at
      128; more, at 1024) are decided, and a layer whose winner differs holds both formats if that costs at most
      ``max_extra_memory`` x its dense weight in extra memory, else dense or one format that beats dense by
      ``min_speedup`` in both classes.
    measure_fn: your own timer instead of ``time_candidates`` (``(candidates, x) -> seconds per candidate``; x is
      the representative input), e.g. one timing with CUDA events, or a fixed table for reproducible decisions.
    fuse: True (default): on the CPU, a BERT-style layer whose two FFN linears both became CSR runs them, the GELU
      between, the residual add and the LayerNorm in one kernel call, and a CSR ``dense -> LayerNorm(h + input)``
      block adds its residual and normalizes in the kernel (:mod:`cap_ds.sparse.fusion`; same numbers, fewer
      passes over memory). False: never.
    """

    min_sparsity: float = 0.5
    allow_2to4: bool = True
    policy: str = "measure"
    batch_tokens: int | None = None
    cache_path: str | os.PathLike | None = None
    reps: int = 15
    min_speedup: float = 1.05
    max_extra_memory: float = 0.5
    measure_fn: MeasureFn | None = None
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"sparsify: policy={self.policy!r} is not supported; allowed: "
                             f"{', '.join(map(repr, POLICIES))}")
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {self.min_sparsity}")
        tokens = self.batch_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"sparsify: batch_tokens must be None or a positive int, got {tokens!r}")
        if self.reps < 1:
            raise ValueError(f"sparsify: reps must be >= 1, got {self.reps}")
        if self.min_speedup < 1.0:
            raise ValueError(f"sparsify: min_speedup must be >= 1.0 (never slower than dense), got {self.min_speedup}")
        if self.max_extra_memory < 0:
            raise ValueError(f"sparsify: max_extra_memory must be >= 0, got {self.max_extra_memory}")

    @property
    def classes(self) -> dict[str, int]:
        """Batch class -> the tokens it is decided at."""
        return {"only": self.batch_tokens} if self.batch_tokens is not None else dict(REPRESENTATIVE_TOKENS)

    @property
    def small_tokens(self) -> int:
        """The most rows a forward may have to run the small-batch format."""
        return self.batch_tokens if self.batch_tokens is not None else SMALL_BATCH_TOKENS


def _options(options: SparsifyOptions | None, kwargs: dict[str, Any]) -> SparsifyOptions:
    if options is not None and not isinstance(options, SparsifyOptions):
        raise TypeError(f"sparsify: the second argument is a SparsifyOptions, got {options!r}; pass "
                        "min_sparsity=... and the other options as keywords")
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(SparsifyOptions)})
    if unknown:
        raise TypeError(f"sparsify: unknown option(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(f.name for f in dataclasses.fields(SparsifyOptions))}")
    return dataclasses.replace(options or SparsifyOptions(), **kwargs)


def _linears(model: nn.Module, min_sparsity: float) -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, qualified name, linear) of every linear with at least ``min_sparsity`` zeros."""
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            # nn.MultiheadAttention reads out_proj.weight itself instead of calling it: leave those alone.
            if isinstance(child, nn.Linear) and not isinstance(child, NonDynamicallyQuantizableLinear):
                weight = child.masked_weight() if hasattr(child, "masked_weight") else child.weight
                if weight.dim() == 2 and weight.numel() > 0 and weight_sparsity(weight) >= min_sparsity:
                    yield module, child_name, f"{name}.{child_name}" if name else child_name, child


def _decide(layer: SparseLinear, dense: torch.Tensor, row: dict[str, Any], opts: SparsifyOptions,
            cache: DecisionCache | None, summary: SparsifySummary) -> Plan:
    """The layer's plan under ``opts.policy``; measured times go into ``row`` and the key counts into ``summary``."""
    two_four = row["is_2to4"]
    if opts.policy in ("dense", "csr", "2:4"):
        fmt = forced_format(opts.policy, two_four, opts.allow_2to4)
        return fmt, fmt, None
    if opts.policy == "rule":
        picks = {c: rule_format(dense.device.type, dense.dtype, layer.sparsity, two_four, t)
                 for c, t in opts.classes.items()}
        return picks.get("small", picks.get("only")), picks.get("large", picks.get("only")), None
    measure = opts.measure_fn or (lambda cands, x: time_candidates(cands, x.device, reps=opts.reps))
    per_class, measured = measured_times(layer, dense, two_four and opts.allow_2to4, opts.classes, cache, measure)
    summary.measured_keys += measured
    summary.cached_keys += len(per_class) - measured
    row["times_ms"] = per_class
    return plan_layer(layer, {c: choosable(t) for c, t in per_class.items()}, opts.max_extra_memory,
                      opts.min_speedup)


@torch.no_grad()
def sparsify(model: nn.Module, options: SparsifyOptions | None = None, **kwargs: Any) -> nn.Module:
    """Give every ``nn.Linear`` with at least ``min_sparsity`` zeros the fastest format on its device (in place).

    Options: a :class:`SparsifyOptions`, and/or its fields as keywords (``sparsify(model, policy="rule",
    batch_tokens=4096)``). Run it on the device and dtype you will infer with (``model.to(device, dtype)``
    first): decisions are made there. Layers whose format is ``dense`` stay the original ``nn.Linear`` (nothing
    to gain, nothing to pay); the others become :class:`SparseLinear` (``extra_repr`` shows ``format=``).
    Returns the model, with ``model.sparsify_summary`` (:class:`SparsifySummary`) attached and its one-line
    summary logged at INFO.
    """
    opts = _options(options, kwargs)
    t_start = time.perf_counter()
    targets = list(_linears(model, opts.min_sparsity))
    first = targets[0][3].weight if targets else None
    summary = SparsifySummary(policy=opts.policy, device=str(first.device) if first is not None else "-",
                              dtype=str(first.dtype).replace("torch.", "") if first is not None else "-")
    cache = DecisionCache(opts.cache_path) if opts.policy == "measure" else None

    for parent, child_name, name, child in targets:
        layer = SparseLinear.from_linear(child, allow_2to4=opts.allow_2to4)
        layer.train(child.training)
        dense = layer.dense_weight()
        row: dict[str, Any] = {"name": name, "shape": [layer.out_features, layer.in_features],
                               "numel": dense.numel(), "sparsity": layer.sparsity, "is_2to4": is_2to4(dense)}
        if row["is_2to4"] and opts.allow_2to4:
            reason = semi.unavailable(dense.device, dense.dtype, layer.out_features, layer.in_features)
            if reason is not None:
                row["no_2to4"] = reason
        small, large, backend = _decide(layer, dense, row, opts, cache, summary)
        row["format"] = small if small == large else f"{small}|{large}"
        summary.layers.append(row)
        if small == large == "dense":
            continue  # the nn.Linear stays
        layer.set_format(small, large, small_tokens=opts.small_tokens, semi_backend=backend)
        row["extra_bytes"] = extra_bytes(layer, {small, large})
        if "2:4" in (small, large):
            row["backend"] = backend or (semi.backends(dense.device) or ("none: runs on CSR",))[0]
        setattr(parent, child_name, layer)

    if cache is not None:
        cache.save()
    if opts.fuse:
        summary.fused = fuse(model)
    else:
        unfuse(model)
    summary.seconds = time.perf_counter() - t_start
    model.sparsify_summary = summary
    logger.info("%s", summary.line())
    return model


def densify(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify`: every :class:`SparseLinear` back to a dense ``nn.Linear`` and every fused
    module back to its own methods (in place)."""
    unfuse(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SparseLinear):
                dense = child.to_linear()
                dense.train(child.training)
                setattr(module, child_name, dense)
    return model
