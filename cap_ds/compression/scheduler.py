"""Pruning schedules: the cubic sparsity curve and the scheduler that moves every compressed module along it.

The curve (Zhu & Gupta 2017, as in Sanh et al.'s movement pruning) is written in terms of two step offsets, as in
DeepSpeed's compression config: ``schedule_offset`` (end of the dense warm-up) and ``schedule_offset_end`` (from
here on the final value holds). The reference code's (initial_warmup, final_warmup, warmup_steps) map to
``offset = initial_warmup * warmup_steps`` and ``offset_end = total_steps - final_warmup * warmup_steps``.

``CompressionScheduler`` is stepped by the training loop after each *applied* optimizer step (DeepSpeed's engine
used to do this itself). Unlike DeepSpeed's on/off switch, each technique ramps from dense at its
``schedule_offset`` to each group's ``dense_ratio`` at ``schedule_offset_end`` (no end: DeepSpeed's switch at
``schedule_offset``, no KeyError). Masks of methods with ``fixed_units`` (``first_order``) are not scheduled here:
CAP-f's stage schedule (``first_order.StageSchedule``) sets them. What moves along the ramp (a kept fraction, soft
movement's sigmoid threshold), the regulariser's weight and whether the batched top-k applies are the method
object's answers (``methods.PruningMethod``); the scheduler owns the steps, the curve and threshold_control.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cap_ds.compression.compress import masked_modules
from cap_ds.compression.config import CompressionConfig, TechniqueConfig, as_compression_config
from cap_ds.compression.layers import MaskedLinear, register_mask_prefill
from cap_ds.compression.methods import PruningMethod
from cap_ds.compression.stats import sparsity_report
from cap_ds.compression.topk import HISTOGRAM_BINS, RADIX_DTYPES, topk_impl, topk_keep_batched
from cap_ds.runtime.errors import TrainingFailed

# Batched mask prefill (issue 22): at the first sparse mask a step needs, compute the masks of every whole (not
# ZeRO-3 partitioned) unstructured magnitude/movement layer at once, one radix top-k per (entries, dtype, device)
# group, instead of one top-k per layer. Only on these device types and only where radix is the top-k in force:
# the batched call is radix's. CUDA: chosen for ~20 kernel launches per group instead of per layer, NOT measured on
# a GPU yet. Not CPU: there one radix call over 4 equal-size layers cost 1.0-2.8x per layer of one call per layer
# (bench_masks --part topk, BERT-base/RoBERTa-large shapes; its big temporaries are fresh pages each call). ()
# turns it off.
PREFILL_DEVICES: tuple[str, ...] = ("cuda",)
# At most this many entries (or histogram bins) per batched call (its transients are ~20 bytes per entry).
PREFILL_MAX_ENTRIES = 1 << 25


def cubic_schedule(step: int, offset: int, offset_end: int, initial: float, final: float) -> float:
    """Value at ``step``: ``initial`` up to ``offset``, cubic ramp, ``final`` from ``offset_end`` on."""
    if step <= offset:
        return float(initial)
    if step >= offset_end:
        return float(final)
    progress = (step - offset) / (offset_end - offset)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


def warmup_offsets(total_steps: int, warmup_steps: int, initial_warmup: float, final_warmup: float) -> tuple[int, int]:
    """Reference-code offsets; clipped so that the ramp is never negative on short runs."""
    offset = int(round(initial_warmup * warmup_steps))
    offset_end = int(round(total_steps - final_warmup * warmup_steps))
    if offset_end <= offset:
        raise ValueError(
            f"pruning schedule is empty: total steps {total_steps} leave no room for the ramp between "
            f"initial_warmup*warmup_steps={offset} and total-final_warmup*warmup_steps={offset_end}; "
            "lower --warmup_steps/--warmup_ratio or raise --num_train_epochs/--max_steps"
        )
    return offset, offset_end


def _scheduled(tech: TechniqueConfig, step: int, initial: float, final: float) -> float:
    """``initial`` before ``schedule_offset``; then the cubic ramp, or ``final`` at once when there is no ramp."""
    stride = tech.schedule_offset_stride
    step = (step // stride) * stride
    if step < tech.schedule_offset:
        return float(initial)
    if tech.offset_end <= tech.schedule_offset:
        return float(final)
    return cubic_schedule(step, tech.schedule_offset, tech.offset_end, initial, final)


def _kept_fraction(tech: TechniqueConfig, step: int, final: float) -> float:
    return _scheduled(tech, step, 1.0, final)


def _scheduled_units(method: PruningMethod | None) -> bool:
    """Whether a row/head mask follows this scheduler (methods with fixed units are set by their pruner)."""
    return method is not None and not method.fixed_units


def quantile_threshold(histogram: torch.Tensor, kept: float) -> float:
    """The lowest bin edge t of a [0, 1] histogram with at most ``kept`` of its entries above t (soft movement's
    global threshold: keep sigmoid(S) > t)."""
    if kept >= 1.0:
        return 0.0
    above = histogram.flip(0).cumsum(0).flip(0)  # above[i]: entries in bins i and up
    ok = (above <= kept * histogram.sum()).nonzero()
    return float(ok[0].item()) / histogram.numel() if ok.numel() else 1.0


def _kept_per_row(kept: list[int], device: torch.device) -> int | torch.Tensor:
    """Per-row k for a batched top-k, made on ``device`` by fills (a host-to-device copy would sync); one int when
    all rows keep the same number."""
    if len(set(kept)) == 1:
        return kept[0]
    out = torch.empty(len(kept), dtype=torch.int64, device=device)
    start = 0
    for end in range(1, len(kept) + 1):
        if end == len(kept) or kept[end] != kept[start]:
            out[start:end].fill_(kept[start])
            start = end
    return out


class PruningSchedule:
    """What the training loop asks of a pruning method, and nothing more (``torch.ao.pruning``'s split: masks are
    computed by the masked layers or a pruner, the level is moved by a schedule). The loop calls
    :meth:`epoch_start` before an epoch's first batch and :meth:`step` after every applied optimizer step."""

    def epoch_start(self, epoch: int, step: int) -> dict[str, float] | None:
        """Work due before ``epoch`` (e.g. a CAP-f stage); returns scalars to log under ``Prune/``, if any."""
        return None

    def step(self) -> None:
        """One optimizer step was applied."""

    def regularization(self) -> torch.Tensor | None:
        """A loss term the method adds to the batch just forwarded (None: none)."""
        return None

    def scalars(self) -> dict[str, float]:
        """Schedule values worth logging with the training scalars."""
        return {}

    def sparsity(self) -> float:
        """The model's sparsity as this method counts it."""
        raise NotImplementedError

    def check_reached(self, run_steps: int, measured: float) -> None:
        """Raise :class:`TrainingFailed` when the run ended short of the schedule's target."""

    def results(self) -> dict[str, Any]:
        """Fields the method adds to metrics.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_schedule_reached(config: CompressionConfig, applied_steps: int, run_steps: int, measured: float) -> None:
    """A scheduled run that ends short of its schedule (DeepSpeed skipped steps) or below the sparsity its masks
    should have (a non-finite model keeps everything) is a failed run."""
    for tech in config.techniques():
        if tech.enabled and not tech.strategy.fixed_units and applied_steps < tech.offset_end:
            raise TrainingFailed(
                f"the pruning schedule did not reach its target: {tech.key} ends at step {tech.offset_end} but "
                f"only {applied_steps} of the run's {run_steps} steps were applied (DeepSpeed "
                f"skipped the others); measured sparsity {measured:.4f}")
    sparse = config.sparse_pruning
    if sparse.enabled and sparse.strategy.reaches_target(sparse) and sparse.groups:
        target = 1.0 - max(g.dense_ratio for g in sparse.groups)
        if measured < target - 0.01:
            raise TrainingFailed(f"measured sparsity {measured:.4f} is below the schedule's target "
                                 f"{target:.4f} at its end: the masks are not what the method asks for (a "
                                 "non-finite model?)")


class CompressionScheduler(PruningSchedule):
    """Owns the pruning step counter; DeepSpeed's ``compression_scheduler(model, config)`` shape."""

    def __init__(self, model: nn.Module, deepspeed_config: str | Path | dict[str, Any] | CompressionConfig) -> None:
        self.config = as_compression_config(deepspeed_config)
        self.model = model
        self.sparse = self.config.sparse_pruning
        self.row = self.config.row_pruning
        self.head = self.config.head_pruning
        self.modules = masked_modules(model)
        self.groups = {g.name: g for g in self.sparse.groups}
        self.row_groups = {g.name: g for g in self.row.groups}
        self.head_groups = {g.name: g for g in self.head.groups}
        self.training_steps = 0
        for module in self.modules.values():
            module.mask_cache_enabled = True  # this scheduler invalidates the masks whenever they may change
        # Soft movement with threshold_control: one global threshold, re-set after every step from histograms of
        # the updated scores (under ZeRO-3, of the scores the layers stash in forward, one update old).
        self.quantile = self.sparse.enabled and self.sparse.threshold_control
        self.controlled = [m for m in self.modules.values()
                           if self.quantile and m.strategy is self.strategy and m.group in self.groups]
        for module in self.controlled:
            module.track_scores = True
        self.soft_threshold = 0.0
        self._prefill_pending = False  # set whenever the caches are invalidated; the prefill runs once after
        for module in self.modules.values():
            register_mask_prefill(module, self.prefill_masks)
        self._apply()

    @property
    def strategy(self) -> PruningMethod:
        """The sparse pruning method."""
        return self.sparse.strategy

    @property
    def method(self) -> str:
        return self.strategy.name

    def _ramp(self, initial: float, final: float) -> float:
        """The sparse schedule's value at the current step, from ``initial`` to ``final``."""
        return _scheduled(self.sparse, self.training_steps, initial, final)

    def threshold_for(self, group: str) -> float:
        """Sparse kept fraction (magnitude/movement) or sigmoid threshold (soft movement) at the current step;
        under threshold_control the global quantile threshold."""
        if self.quantile:
            return self.soft_threshold
        return self.strategy.sparse_threshold(self.sparse, self.groups[group].dense_ratio, self._ramp)

    def row_threshold_for(self, group: str) -> float:
        return _kept_fraction(self.row, self.training_steps, self.row_groups[group].dense_ratio)

    def head_threshold_for(self, group: str) -> float:
        return _kept_fraction(self.head, self.training_steps, self.head_groups[group].dense_ratio)

    @property
    def threshold(self) -> float:
        """The first sparse group's threshold (what gets logged); 1.0 without sparse pruning."""
        if self.sparse.enabled and self.groups:
            return self.threshold_for(next(iter(self.groups)))
        return 1.0

    @property
    def regularization_lambda(self) -> float:
        """The weight of the method's loss term at the current step (soft movement's L1; 0 without one)."""
        if not self.sparse.enabled:
            return 0.0
        return self.strategy.regularization_lambda(self.sparse, self.threshold, self._ramp)

    def scheduled_kept(self, step: int) -> float:
        """The kept fraction the cubic schedule asks for at ``step`` over the soft-movement weights (the groups'
        dense_ratios weighted by size)."""
        sizes = [getattr(m.weight, "ds_numel", m.weight.numel()) for m in self.controlled]
        kept = [_kept_fraction(self.sparse, step, self.groups[m.group].dense_ratio) for m in self.controlled]
        return sum(n * k for n, k in zip(sizes, kept)) / max(sum(sizes), 1)

    def _set_quantile_threshold(self) -> None:
        """The global threshold for the next step (histograms after this step's update, or of its forward)."""
        hists = [m.latest_score_histogram() for m in self.controlled]
        if not hists or any(h is None for h in hists):
            return  # ZeRO-3 and no training forward since the last step: keep the threshold
        kept = self.scheduled_kept(self.training_steps + 1)
        self.soft_threshold = quantile_threshold(torch.stack(hists).sum(0), kept)

    def prefill_masks(self) -> None:
        """Fill the mask caches of the eligible layers (see :data:`PREFILL_DEVICES`) with one batched radix top-k
        per (entries, dtype, device) group, a per-row k each; the masks are the ones each layer would compute
        (radix keeps the exact tie rule). Runs once per invalidation, lazily at the first cache miss, so it sees
        the weights and placement the forward uses; layers it leaves out compute their own masks."""
        if not self._prefill_pending:
            return
        self._prefill_pending = False
        groups: dict[tuple, list[tuple[MaskedLinear, int]]] = defaultdict(list)
        for module in self.modules.values():
            request = module.topk_request()
            if request is None:
                continue
            n, k, dtype, device = request
            if device.type not in PREFILL_DEVICES or topk_impl(device.type, n) != "radix":
                continue
            if not 0 < k < n:  # dense or empty: no selection
                module.store_mask(torch.full((n,), k > 0, dtype=torch.bool, device=device))
            elif dtype in RADIX_DTYPES:
                groups[(n, dtype, device)].append((module, k))
        for (n, dtype, device), members in groups.items():
            rows = max(1, PREFILL_MAX_ENTRIES // max(n, HISTOGRAM_BINS))  # the histograms: 65,536 bins a row
            for start in range(0, len(members), rows):
                chunk = members[start:start + rows]
                values = torch.empty(len(chunk), n, dtype=dtype, device=device)
                for i, (module, _) in enumerate(chunk):
                    module.topk_values(values[i])
                keep = topk_keep_batched(values, _kept_per_row([k for _, k in chunk], device))
                del values
                for i, (module, _) in enumerate(chunk):
                    module.store_mask(keep[i])

    def _apply(self) -> None:
        self._prefill_pending = True
        for module in self.modules.values():
            module.invalidate_masks()
            if module.strategy is not None and module.group in self.groups and self.sparse.enabled:
                module.threshold = self.threshold_for(module.group)
            if _scheduled_units(module.row_strategy) and module.row_group in self.row_groups:
                module.row_threshold = self.row_threshold_for(module.row_group)
            if _scheduled_units(module.head_strategy) and module.head_group in self.head_groups:
                module.head_threshold = self.head_threshold_for(module.head_group)

    def step(self) -> None:
        """Advance one optimizer step and update all thresholds. Call it after every applied optimizer step (and
        only then): it also drops the masks cached for the step before."""
        if self.quantile:
            self._set_quantile_threshold()
        self.training_steps += 1
        self._apply()

    def set_step(self, step: int) -> None:
        self.training_steps = int(step)
        self._apply()

    def regularization(self) -> torch.Tensor | None:
        """lambda_t * mean over modules of the term each stashed in its last forward (soft movement: mean
        sigmoid(scores)); None for methods without one."""
        if not self.sparse.enabled or not self.strategy.regularizes:
            return None
        terms = [m.last_regularization for m in self.modules.values() if m.last_regularization is not None]
        if not terms:
            return None
        return self.regularization_lambda * torch.stack(terms).mean()

    def scalars(self) -> dict[str, float]:
        out = {"threshold": self.threshold}
        if self.strategy.regularizes and self.sparse.enabled:
            out["lambda"] = self.regularization_lambda
        if self.quantile:
            out["scheduled_sparsity"] = 1.0 - self.scheduled_kept(self.training_steps)
        return out

    def sparsity(self) -> float:
        return sparsity_report(self.model)["sparsity"]

    def check_reached(self, run_steps: int, measured: float) -> None:
        check_schedule_reached(self.config, self.training_steps, run_steps, measured)

    def results(self) -> dict[str, Any]:
        return {"soft_threshold": self.soft_threshold} if self.quantile else {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"training_steps": self.training_steps}
        if self.quantile:
            state["soft_threshold"] = self.soft_threshold
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.quantile and "soft_threshold" in state:
            self.soft_threshold = float(state["soft_threshold"])
        self.set_step(state["training_steps"])


def compression_scheduler(model: nn.Module, deepspeed_config) -> CompressionScheduler:
    """DeepSpeed-compatible factory name."""
    return CompressionScheduler(model, deepspeed_config)
