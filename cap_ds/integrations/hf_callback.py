"""What CAP does around the Trainer's own loop: the bank passes before the first step, the pruning schedule and SnC
snapshots after every optimizer step, the loss terms and sparsity into the Trainer's log, and CAP's state in the
Trainer's checkpoint folders.

The Trainer owns the loop, the optimizer, the LR schedule, the data order, the model checkpoint and the RNG; this
callback owns only what cap_ds/train.py's loop adds (``training/trainer.py``), through the same objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from cap_ds.cap import CapObjective, MemoryBank
from cap_ds.compression import PruningSchedule, sparsity_report
from cap_ds.data.models import SentenceVectorHook
from cap_ds.runtime.atomic import atomic_file
from cap_ds.runtime.collectives import rank, summed, world_size
from cap_ds.training.encode import Encoder, Snapshots, fill_prc, fill_teacher_outputs
from cap_ds.training.losses import TrainingLoss, read_terms
from cap_ds.training.plan import StepPlan

logger = logging.getLogger(__name__)

STATE_FILE = "cap_state_rank{rank}.pt"  # one per rank, beside the Trainer's files in checkpoint-N/


class HeldTeacher(nn.Module):
    """A frozen teacher in the shape the encode passes expect of cap_ds/train.py's teacher engine (``.module``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **inputs: Any) -> Any:
        return self.module(**inputs)


@dataclass
class CapRun:
    """CAP's side of one ``train()`` call: the loss, banks and schedule, and where a resumed run reads its state."""

    loss: TrainingLoss
    banks: dict[str, MemoryBank]
    objective: CapObjective | None
    hook: SentenceVectorHook | None
    schedule: PruningSchedule | None
    encoder: Encoder
    plan: StepPlan
    teacher: nn.Module | None = None
    sentence_vector: str = "pooler"
    snapshots: Snapshots | None = None
    snapshot_steps: int = 0
    snapshot_train_mode: bool = True
    resume_dir: str | None = None
    snapshot_epoch: int = 0  # the last epoch whose start took its SnC snapshot


def state_path(folder: str | Path) -> Path:
    return Path(folder) / STATE_FILE.format(rank=rank())


def checked_state_path(folder: str | Path) -> Path:
    """This rank's state file in a checkpoint to resume from, or a one-line error saying why there is none."""
    path = state_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"resume_from_checkpoint {folder}: no {path.name} (CAP's banks and schedule); the "
                                "checkpoint was not written by CapHfTrainer, or with another number of processes")
    return path


def save_state(run: CapRun, folder: str | Path) -> None:
    """This rank's banks, extra-negative RNG, cached teacher logits and schedule position into ``folder``."""
    state = {"world": world_size(), "snapshot_epoch": run.snapshot_epoch,
             "teacher_logits": run.loss.teacher_logits,
             "objective": run.objective.state_dict() if run.objective is not None else None,
             "schedule": run.schedule.state_dict() if run.schedule is not None else None}
    path = state_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, lambda tmp: torch.save(state, tmp))


def load_state(run: CapRun, folder: str | Path) -> None:
    """Restore what :func:`save_state` wrote (tensors only: ``weights_only=True``)."""
    path = checked_state_path(folder)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["world"] != world_size():
        raise ValueError(f"resume_from_checkpoint {folder}: written by {state['world']} processes, resumed with "
                         f"{world_size()}; resume with the same number of processes")
    run.snapshot_epoch = int(state["snapshot_epoch"])
    run.loss = replace(run.loss, teacher_logits=state["teacher_logits"])
    if run.objective is not None:
        run.objective.load_state_dict(state["objective"])
    if run.schedule is not None:
        run.schedule.load_state_dict(state["schedule"])


class CapCallback(TrainerCallback):
    """Drives CAP from the Trainer's events (see the module docstring); ``record`` hears each micro-batch's terms."""

    def __init__(self, run: CapRun) -> None:
        self.run = run
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}  # per term: SnC is absent before its first snapshot

    # ---- before the first step: banks filled (PrC, FiC + teacher logits) or restored from the checkpoint
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        run = self.run
        if run.resume_dir is not None:
            load_state(run, run.resume_dir)
            logger.info("CAP state restored from %s (step %d)", run.resume_dir, state.global_step)
        else:
            if run.teacher is not None:
                kd = run.loss.kd_weight > 0
                logits = fill_teacher_outputs(run.encoder, HeldTeacher(run.teacher), run.banks,
                                              run.sentence_vector, cache_logits=kd)
                run.loss = replace(run.loss, teacher_logits=logits if kd else None)
            if run.hook is not None:
                fill_prc(run.encoder, run.banks, model, run.hook)
        run.teacher = None  # its outputs are cached: release it
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        """SnC at the start of every epoch from the second on (reference), unless snapshots go by steps."""
        run = self.run
        epoch = state.global_step // run.plan.steps_per_epoch
        if run.snapshots is not None and run.snapshot_steps == 0 and epoch >= 1 and epoch > run.snapshot_epoch \
                and state.global_step < state.max_steps:
            run.snapshots.take(train_mode=run.snapshot_train_mode)
            run.snapshot_epoch = epoch
        return control

    def on_step_end(self, args, state, control, **kwargs):
        """The optimizer step was applied: move the pruning schedule (and take a step-based snapshot)."""
        run = self.run
        if run.schedule is not None:
            run.schedule.step()
        if run.snapshots is not None and run.snapshot_steps and state.global_step % run.snapshot_steps == 0 \
                and state.global_step < state.max_steps:
            run.snapshots.take(train_mode=run.snapshot_train_mode)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        run = self.run
        if run.schedule is not None:
            report = sparsity_report(model)  # collective under ZeRO-3: every rank is here
            try:
                run.schedule.check_reached(state.global_step, report["sparsity"])
            except Exception as err:  # the Trainer may be stopped early on purpose: say so, keep the run
                logger.warning("%s", err)
        return control

    # ---- logging
    def record(self, terms: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's raw terms (detached, on the device; read only at logging steps)."""
        for name, value in terms.items():
            if name == "loss":
                continue
            value = value.reshape(()).float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1

    def scalars(self, model: nn.Module) -> dict[str, float]:
        """Mean of each term since the last log over the micro-batches that had it (a term absent in some, SnC
        before its first snapshot, is not diluted by them) and over processes, sparsity and the schedule's values.
        A collective: every process calls it (``Trainer.log`` runs on all of them; every process sees the same
        terms, the banks being whole on each)."""
        out: dict[str, float] = {}
        if self._sums:
            names = sorted(self._sums)
            counts = torch.tensor([self._counts[n] * world_size() for n in names], dtype=torch.float32)
            means = summed(torch.stack([self._sums[n] for n in names])) / counts.to(self._sums[names[0]].device)
            out.update(read_terms(dict(zip(names, means))))
        self._sums, self._counts = {}, {}
        if self.run.schedule is not None:
            out["sparsity"] = sparsity_report(model)["sparsity"]
            out.update(self.run.schedule.scalars())
        return out
