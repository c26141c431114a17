"""First-order structured pruning (CAP-f): heads and FFN neurons ranked by accumulated |dL/dgate|.

While accumulating, every unit gets a gate of ones in the forward (heads: on the attention output projection's
input, one gate per head's columns; neurons: on the FFN output dense's input, i.e. after the activation), and the
backward of each batch ADDS |dL/dgate| to an importance buffer (Michel et al. 2019 / DynaBERT; the reference's
Σ_batches |∂L/∂m|). Gates are plain tensors, not parameters: nothing changes for the optimizer or ZeRO. Masks live
in the ``first_order`` slots of ``MaskedLinear`` (head mask on the output projection, row mask on
``intermediate.dense``), so forward, statistics and ``redundancy_clean`` treat them like any structured mask.
Importance is summed across ranks (all_reduce) and the chosen masks broadcast from rank 0: every rank prunes alike.
``StageSchedule`` is CAP-f's pruning schedule (stages at epoch starts), ``ImportancePass`` its data pass and
``structured_sparsity`` how much of the encoder a clean removes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_ds.compression.compress import init_compression, stored_config
from cap_ds.compression.config import (
    HEAD_PRUNING,
    ROW_PRUNING,
    CompressionConfig,
    CompressionConfigError,
    as_compression_config,
)
from cap_ds.compression.groups import linear_modules, resolve, unwrap
from cap_ds.compression.layers import MaskedLinear
from cap_ds.compression.scheduler import PruningSchedule
from cap_ds.compression.zero import model_is_zero3
from cap_ds.runtime.collectives import broadcast_from_rank0, sum_in_place
from cap_ds.runtime.errors import TrainingFailed
from cap_ds.runtime.monitor import PassReport
from cap_ds.runtime.transfer import to_device

logger = logging.getLogger(__name__)

HEADS, NEURONS = "heads", "neurons"


def first_order_section(num_heads: int, head_modules: str = r"attention\.output\.dense",
                        head_related: tuple[str, ...] = (r"self\.query", r"self\.key", r"self\.value"),
                        neuron_modules: str = r"intermediate\.dense",
                        neuron_related: str = r"layer\.\d+\.output\.dense") -> dict[str, Any]:
    """The ``compression_training`` entries for CAP-f on BERT/RoBERTa (merge with a sparse section if any)."""
    return {
        HEAD_PRUNING: {"shared_parameters": {"enabled": True, "method": "first_order", "num_heads": num_heads},
                       "different_groups": {"fo_heads": {"modules": [head_modules],
                                                         "related_modules": [list(head_related)]}}},
        ROW_PRUNING: {"shared_parameters": {"enabled": True, "method": "first_order"},
                      "different_groups": {"fo_neurons": {"modules": [neuron_modules],
                                                          "related_modules": [[neuron_related]]}}},
    }


@dataclass
class _Units:
    kind: str  # heads | neurons
    owner: str  # module holding the mask
    gate: str  # module whose input carries the gates
    count: int
    unit_size: int  # input columns per unit on the gate module


class FirstOrderPruner:
    """Accumulate first-order importance of heads and FFN neurons and prune them globally, step by step.

    ``config``: a DeepSpeed config (dict/path/parsed) whose ``head_pruning`` / ``row_pruning`` use method
    ``first_order`` (see ``first_order_section``); default: the config ``init_compression`` applied to the model.
    Works on a plain model or a DeepSpeed engine (its ``module``); under ZeRO-3 ``init_compression`` must have run
    before ``deepspeed.initialize``.
    """

    def __init__(self, model: nn.Module, config: str | Path | dict[str, Any] | CompressionConfig | None = None):
        self.model = unwrap(model)
        cfg = as_compression_config(config) if config is not None else stored_config(self.model)
        if cfg is None:
            raise CompressionConfigError("FirstOrderPruner needs a compression_training config with head_pruning "
                                         "and/or row_pruning method first_order (see first_order_section)")
        techs = [t for t in (cfg.head_pruning, cfg.row_pruning) if t.enabled and t.strategy.fixed_units]
        if not techs:
            raise CompressionConfigError(f"{cfg.head_pruning.key} / {cfg.row_pruning.key}: FirstOrderPruner needs "
                                         "at least one of them enabled with method first_order")
        plan = resolve(self.model, CompressionConfig(head_pruning=cfg.head_pruning, row_pruning=cfg.row_pruning))
        owners = [a.name for t in techs for a in plan[t.technique]]
        modules = linear_modules(self.model)
        if not all(isinstance(modules[n], MaskedLinear) for n in owners):
            if model_is_zero3(self.model):
                raise RuntimeError("run init_compression with the first_order config before deepspeed.initialize "
                                   "(ZeRO-3 modules cannot be swapped afterwards)")
            init_compression(self.model, cfg)
            modules = linear_modules(self.model)
        self.units: list[_Units] = []
        for tech in techs:
            for a in plan[tech.technique]:
                m = modules[a.name]
                if tech.technique == HEAD_PRUNING:
                    if m.head_strategy is not tech.strategy:
                        raise CompressionConfigError(
                            f"{a.name!r} has head method {m.head_method!r}, not {tech.method}")
                    self.units.append(_Units(HEADS, a.name, a.name, m.num_heads, m.head_size))
                else:
                    if m.row_strategy is not tech.strategy:
                        raise CompressionConfigError(
                            f"{a.name!r} has row method {m.row_method!r}, not {tech.method}")
                    if not a.related:
                        raise CompressionConfigError(
                            f"{tech.key}.different_groups.{a.group}.related_modules is required for first_order: "
                            "the neuron gates sit on the input of the FFN output dense")
                    self.units.append(_Units(NEURONS, a.name, a.related[0], m.out_features, 1))
        self.importance = {u.owner: torch.zeros(u.count) for u in self.units}
        self._local: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.batches = 0

    # ---- masks
    def _module(self, name: str) -> MaskedLinear:
        return self.model.get_submodule(name)

    def mask(self, unit: _Units) -> torch.Tensor:
        m = self._module(unit.owner)
        return (m.head_mask_fixed if unit.kind == HEADS else m.row_mask_fixed).detach().float().cpu().clone()

    def _set_mask(self, unit: _Units, mask: torch.Tensor) -> None:
        m = self._module(unit.owner)
        buf = m.head_mask_fixed if unit.kind == HEADS else m.row_mask_fixed
        buf.copy_(mask.to(buf.device, buf.dtype))

    # ---- accumulation
    @property
    def accumulating(self) -> bool:
        return bool(self._handles)

    def start_accumulation(self, reset: bool = True) -> None:
        """Put gates into the forward; every backward adds |dL/dgate| (``reset``: start from zero)."""
        if self.accumulating:
            return
        if reset:
            for imp in self.importance.values():
                imp.zero_()
            self.batches = 0
        self._local = {}
        for unit in self.units:
            gate_module = self.model.get_submodule(unit.gate)
            self._handles.append(gate_module.register_forward_pre_hook(self._gate_hook(unit)))

    def _gate_hook(self, unit: _Units):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not torch.is_grad_enabled():
                return None
            x = args[0]
            gate = torch.ones(unit.count, dtype=x.dtype, device=x.device, requires_grad=True)
            gate.register_hook(lambda grad: self._accumulate(unit, grad))
            return (x * gate.repeat_interleave(unit.unit_size), *args[1:])

        return hook

    def _accumulate(self, unit: _Units, grad: torch.Tensor) -> None:
        value = grad.detach().abs().float()
        if unit.owner in self._local:
            self._local[unit.owner] += value
        else:
            self._local[unit.owner] = value.clone()
        if unit is self.units[0]:
            self.batches += 1

    def stop_accumulation(self) -> None:
        """Remove the gates and sum this rank's importance into the global buffers (collective if world > 1)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        local = [self._local.get(u.owner, torch.zeros(u.count)).cpu() for u in self.units]
        sum_in_place(local)
        for unit, value in zip(self.units, local):
            self.importance[unit.owner] += value
        self._local = {}

    # ---- pruning
    def normalized_importance(self) -> dict[str, torch.Tensor]:
        """Importance L2-normalised per layer (per mask-owning module), as the reference does."""
        return {k: v / (v.pow(2).sum().sqrt() + 1e-20) for k, v in self.importance.items()}

    @torch.no_grad()
    def prune_step(self, target_fraction: float) -> dict[str, Any]:
        """Prune the lowest-importance remaining heads and neurons until ⌊units·p⌋ of each kind are pruned.

        Cumulative: ``target_fraction`` is the total pruned fraction after this step (same for heads and
        neurons). The most important remaining unit of every layer is never pruned (≥1 head and ≥1 neuron stay).
        """
        if not 0.0 <= target_fraction < 1.0:
            raise ValueError(f"target_fraction must be in [0, 1), got {target_fraction}")
        if self.accumulating:
            self.stop_accumulation()
        norm = self.normalized_importance()
        result: dict[str, Any] = {}
        for kind in (HEADS, NEURONS):
            units = [u for u in self.units if u.kind == kind]
            if not units:
                continue
            masks = [self.mask(u) for u in units]
            total = sum(u.count for u in units)
            target = math.floor(total * target_fraction + 1e-9)
            pruned = int(sum(u.count - int(m.sum()) for u, m in zip(units, masks)))
            need = target - pruned
            if need > 0:
                scores, allowed = [], []
                for u, m in zip(units, masks):
                    imp = norm[u.owner].clone()
                    ok = m > 0
                    if ok.any():
                        protected = torch.where(ok, imp, torch.full_like(imp, -math.inf)).argmax()
                        ok[protected] = False
                    scores.append(imp)
                    allowed.append(ok)
                flat, ok = torch.cat(scores), torch.cat(allowed)
                # One sort per pruning stage (not per forward): stable, so ties fall to the lower index everywhere.
                order = torch.sort(torch.where(ok, flat, torch.full_like(flat, math.inf)), stable=True).indices
                chosen = order[:min(need, int(ok.sum()))]
                flat_mask = torch.cat(masks)
                flat_mask[chosen] = 0.0
                broadcast_from_rank0(flat_mask)  # identical masks on every rank, whatever the float noise
                offset = 0
                for u in units:
                    self._set_mask(u, flat_mask[offset:offset + u.count])
                    offset += u.count
            kept = sum(int(self.mask(u).sum()) for u in units)
            result[kind] = {"total": total, "target_pruned": target, "pruned": total - kept, "kept": kept}
        return result

    # ---- state and reporting
    def kept_units(self, kind: str = HEADS) -> dict[str, list[int]]:
        """Indices of the kept heads (or neurons) per mask-owning module."""
        return {u.owner: torch.nonzero(self.mask(u)).flatten().tolist() for u in self.units if u.kind == kind}

    def report(self) -> dict[str, Any]:
        """Kept heads / neurons per layer (module name -> count) and totals."""
        out: dict[str, Any] = {}
        for kind in (HEADS, NEURONS):
            units = [u for u in self.units if u.kind == kind]
            if not units:
                continue
            per_layer = {u.owner: int(self.mask(u).sum()) for u in units}
            out[kind] = per_layer
            out[f"{kind}_kept"] = sum(per_layer.values())
            out[f"{kind}_total"] = sum(u.count for u in units)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"importance": {k: v.clone() for k, v in self.importance.items()},
                "masks": {u.owner + (":heads" if u.kind == HEADS else ":neurons"): self.mask(u) for u in self.units},
                "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["importance"].items():
            self.importance[k].copy_(v)
        for u in self.units:
            self._set_mask(u, state["masks"][u.owner + (":heads" if u.kind == HEADS else ":neurons")])
        self.batches = int(state.get("batches", 0))


# ---------------------------------------------------------------------------------------------------- CAP-f
def structured_sparsity(config, report: dict[str, Any]) -> float:
    """Fraction of encoder linear weights a clean removes (``config``: the model's; ``report``: the pruner's): heads
    take Q/K/V rows and O columns, neurons take FFN-in rows and FFN-out columns."""
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = h // heads
    layers = config.num_hidden_layers
    kept_heads = report.get("heads_kept", heads * layers)
    kept_neurons = report.get("neurons_kept", inter * layers)
    dense = layers * (4 * h * h + 2 * h * inter)
    kept = 4 * h * head_dim * kept_heads + 2 * h * kept_neurons
    return 1.0 - kept / dense


@dataclass(frozen=True)
class ImportancePass:
    """Sum of |dL/dgate| over the training data with the full training loss, in eval mode (the reference's).

    ``loss(batch, forward)`` returns (loss, terms); ``stop.pass_check(n, device)`` gives the per-batch stop check;
    ``batches`` limits the pass (0: the whole loader)."""

    engine: Any
    loader: Any
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    stop: Any
    batches: int = 0
    show_progress: bool = False
    report: bool = False

    def __call__(self, pruner: FirstOrderPruner) -> None:
        engine, limit = self.engine, self.batches
        device = engine.device
        engine.eval()
        pruner.start_accumulation(reset=True)
        batches = min(limit, len(self.loader)) if limit else len(self.loader)
        check = self.stop.pass_check(batches, device)
        report = PassReport("CAP-f importance", batches * (self.loader.batch_size or 1), enabled=self.report)
        try:
            for i, batch in enumerate(tqdm(self.loader, desc="importance", leave=False,
                                           disable=not self.show_progress)):
                if limit and i >= limit:
                    break
                check(i)
                loss, _ = self.loss(to_device(batch, device), engine)
                engine.backward(loss)
                engine.zero_grad()
                report.update(int(batch["idx"].shape[0]))
        finally:
            pruner.stop_accumulation()
            engine.train()


class StageSchedule(PruningSchedule):
    """CAP-f's schedule: before every ``epochs_per_stage``-th epoch, one stage: ``before_stage`` (from stage 1 on:
    the SnC snapshot before the new mask), the importance pass, then heads and neurons pruned up to the stage's
    cumulative fraction. Nothing moves between stages."""

    def __init__(self, pruner: FirstOrderPruner, stages: list[float], epochs_per_stage: int,
                 importance: Callable[[FirstOrderPruner], None],
                 before_stage: Callable[[], None] | None = None) -> None:
        self.pruner, self.stages, self.epochs_per_stage = pruner, list(stages), epochs_per_stage
        self.importance, self.before_stage = importance, before_stage
        self.stage_done = -1
        self.reports: list[dict[str, Any]] = []

    def epoch_start(self, epoch: int, step: int) -> dict[str, float] | None:
        stage = epoch // self.epochs_per_stage
        if epoch % self.epochs_per_stage != 0 or stage <= self.stage_done or stage >= len(self.stages):
            return None
        if stage >= 1 and self.before_stage is not None:
            self.before_stage()
        self.importance(self.pruner)
        fraction = self.stages[stage]
        result = self.pruner.prune_step(fraction)
        self.stage_done = stage
        report = {"stage": stage, "fraction": fraction, "step": step, **result,
                  "structured_sparsity": self.sparsity()}
        self.reports.append(report)
        logger.info("CAP-f stage %d: pruned %.0f%% of heads/neurons %s", stage, 100 * fraction, result)
        return {"fraction": fraction, "structured_sparsity": report["structured_sparsity"]}

    def sparsity(self) -> float:
        return structured_sparsity(self.pruner.model.config, self.pruner.report())

    def check_reached(self, run_steps: int, measured: float) -> None:
        done, total = self.stage_done + 1, len(self.stages)
        if done < total:
            raise TrainingFailed(f"CAP-f applied {done} of its {total} pruning stages; the run did not reach "
                                 f"--target_sparsity {self.stages[-1]}")

    def results(self) -> dict[str, Any]:
        rep = self.pruner.report()
        return {"sparsity": self.sparsity(),
                "heads_kept": rep.get("heads_kept"), "heads_total": rep.get("heads_total"),
                "neurons_kept": rep.get("neurons_kept"), "neurons_total": rep.get("neurons_total"),
                "kept_per_layer": {k: rep[k] for k in ("heads", "neurons") if k in rep},
                "stages": self.reports}

    def state_dict(self) -> dict[str, Any]:
        return {"pruner": self.pruner.state_dict(), "stage_done": self.stage_done, "stage_reports": self.reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state["pruner"])
        self.stage_done, self.reports = state["stage_done"], state["stage_reports"]
