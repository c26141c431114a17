"""The gradient diagnostic (``--grad_norm_steps``): how strongly, and in which direction, each loss term pulls
the student's weights. A callback the loop runs before a step's first micro-batch; training is unchanged."""

from __future__ import annotations

import math

import torch

from cap_ds.cap import CapObjective
from cap_ds.compression import is_score_parameter
from cap_ds.runtime.monitor import RunLog, ScalarLogger
from cap_ds.runtime.rng import rng_state, set_rng_state
from cap_ds.training.losses import TrainingLoss


class GradientDiagnostic:
    """Every ``every`` optimizer steps: per-term gradient norms and cosines, logged under ``Grad/`` and kept in
    the run log (``grad_diagnostics`` in metrics.json). Runs on every rank (the CAP loss gathers across ranks);
    each reports its own batch, rank 0 logs."""

    def __init__(self, loss: TrainingLoss, model: torch.nn.Module, every: int, scalars: ScalarLogger,
                 log: RunLog) -> None:
        self.loss, self.model, self.every, self.scalars, self.log = loss, model, every, scalars, log

    def before_step(self, batch: dict[str, torch.Tensor], step: int) -> None:
        """``step``: the optimizer step this batch starts (1-based)."""
        if step % self.every != 0:
            return
        grads = term_gradients(self.loss, self.model, batch)
        self.scalars.log("Grad", grads, step)
        self.log.grad_history.append({"step": step, **grads})


def term_gradients(loss: TrainingLoss, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norm of each weighted term's gradient over the student's weights (pruning scores excluded) on this rank's
    batch, and its cosine with the KD gradient (or CE's without a teacher); ``cap`` is PrC + SnC + FiC together.
    Shows whether a term steers training at all.

    It runs its own forward on the bare module: the engine's backward hooks would take ``autograd.grad`` for
    the step's backward and reduce gradients. The RNG states (dropout, the bank sampler) are restored after,
    so the step that follows draws exactly what it would have drawn: training is unchanged."""
    objective: CapObjective | None = loss.objective
    rng = rng_state()
    sampler = objective.generator.get_state() if objective is not None else None
    try:
        weighted, _ = loss.parts(batch, model)
        params = [p for n, p in model.named_parameters() if p.requires_grad and not is_score_parameter(n)]

        def grads_of(value: torch.Tensor) -> list[torch.Tensor]:
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]

        # Held at once: the reference gradient, the CAP sum and the current term (3 x the weights).
        ref_name = "kd" if "kd" in weighted else "ce"
        ref = grads_of(weighted[ref_name])
        ref_sq = _dot(ref, ref)
        out: dict[str, float] = {}
        cap = None
        for name, value in weighted.items():
            grads = ref if name == ref_name else grads_of(value)
            out.update(_norm_and_cos(name, grads, ref, ref_sq, ref_name))
            if name in ("prc", "snc", "fic"):
                cap = grads if cap is None else [a + b for a, b in zip(cap, grads)]
            del grads
        if cap is not None:
            out.update(_norm_and_cos("cap", cap, ref, ref_sq, ref_name))
    finally:
        set_rng_state(rng)
        if sampler is not None:
            objective.generator.set_state(sampler)
    return out


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Dot product of two gradient lists, accumulated in float64 one tensor at a time."""
    return sum(float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())) for x, y in zip(a, b))


def _norm_and_cos(name: str, grads: list[torch.Tensor], ref: list[torch.Tensor], ref_sq: float,
                  ref_name: str) -> dict[str, float]:
    sq = _dot(grads, grads)
    cos = _dot(grads, ref) / math.sqrt(sq * ref_sq) if sq > 0 and ref_sq > 0 else 0.0
    return {f"{name}_norm": math.sqrt(sq), f"{name}_cos_{ref_name}": max(-1.0, min(1.0, cos))}
