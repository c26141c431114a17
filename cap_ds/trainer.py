"""The CAP training loop: CE + KD + CAP contrastive modules (+ soft-movement regulariser) on a DeepSpeed engine,
with the compression scheduler stepped after each applied optimizer step, SnC snapshots, evaluation and logging.

The trainer calls concepts (compression, cap, data metrics); none of them imports the trainer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cap import CapObjective, MemoryBank, encode_dataset, kd_loss
from .cap.distributed import all_gather_cat, is_distributed
from .compression import CompressionScheduler, sparsity_report
from .data import TaskSpec, compute_metrics
from .models import SentenceVectorHook
from .monitor import ScalarLogger

logger = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    total_steps: int
    num_epochs: int
    steps_per_epoch: int
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    snapshot_steps: int = 0
    snapshot_mode: str = "train"
    logging_steps: int = 10
    eval_steps: int = 0
    show_progress: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in ("idx", "labels")}


class CapTrainer:
    """Runs the loop on an initialised DeepSpeed engine; banks and teacher outputs are prepared by the caller."""

    def __init__(self, *, engine, task: TaskSpec, train_loader, eval_loader, encode_loader, num_train: int,
                 settings: LoopSettings, scheduler: CompressionScheduler | None = None,
                 objective: CapObjective | None = None, hook: SentenceVectorHook | None = None,
                 teacher_logits: torch.Tensor | None = None, live_teacher: torch.nn.Module | None = None,
                 is_rank0: bool = True) -> None:
        self.engine = engine
        self.model = engine.module
        self.task = task
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.encode_loader = encode_loader
        self.num_train = num_train
        self.s = settings
        self.scheduler = scheduler
        self.objective = objective
        self.hook = hook
        self.teacher_logits = teacher_logits
        self.live_teacher = live_teacher
        self.is_rank0 = is_rank0
        self.scalars = ScalarLogger(engine, is_rank0)
        self.global_step = 0
        self.examples_seen = 0
        self.train_time = 0.0
        self.last_eval_logits: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # ---------------------------------------------------------------- encode passes (banks)
    def encode_vectors(self, model: torch.nn.Module, hook: SentenceVectorHook, train_mode: bool,
                       with_logits: bool = False, desc: str = "encode") -> dict[str, torch.Tensor]:
        """Normalised sentence vectors (and logits) of every training example, placed by ``idx``."""
        was_training = model.training
        model.train(train_mode)

        def encode_batch(batch):
            batch = to_device(batch, self.device)
            logits = model(**model_inputs(batch)).logits
            out = {"vectors": F.normalize(hook.vector.float(), dim=-1)}
            if with_logits:
                out["logits"] = logits.float()
            return out

        try:
            out = encode_dataset(encode_batch, self.encode_loader, self.num_train, desc=desc,
                                 show_progress=self.s.show_progress and self.is_rank0)
        finally:
            model.train(was_training)
        return gather_bank_rows(out)

    def snapshot(self) -> None:
        """Append the current student as a new SnC column."""
        bank = self.objective.banks["snc"]
        vecs = self.encode_vectors(self.model, self.hook, train_mode=self.s.snapshot_mode == "train",
                                   desc=f"SnC snapshot {bank.num_columns + 1}")["vectors"]
        bank.add_column(vecs)
        logger.info("SnC snapshot %d taken at step %d", bank.num_columns, self.global_step)

    @property
    def snc_enabled(self) -> bool:
        return self.objective is not None and "snc" in self.objective.banks

    # ---------------------------------------------------------------- one step
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        idx, labels = batch["idx"], batch["labels"]
        logits = self.engine(**model_inputs(batch)).logits
        terms: dict[str, torch.Tensor] = {}
        if self.task.is_regression:
            terms["ce"] = F.mse_loss(logits.view(-1).float(), labels.float())
        else:
            terms["ce"] = F.cross_entropy(logits.float(), labels)
        loss = self.s.ce_weight * terms["ce"]
        if self.s.kd_weight > 0:
            if self.live_teacher is not None:
                with torch.no_grad():
                    t_logits = self.live_teacher(**model_inputs(batch)).logits
            else:
                t_logits = self.teacher_logits.index_select(0, idx.cpu()).to(logits.device)
            terms["kd"] = kd_loss(logits, t_logits, self.s.kd_temperature, self.task.is_regression)
            loss = loss + self.s.kd_weight * terms["kd"]
        if self.objective is not None:
            anchors = F.normalize(self.hook.anchor.float(), dim=-1)
            sup_labels = None if self.task.is_regression else labels
            for name, value in self.objective(anchors, idx, sup_labels).items():
                terms[name] = value
                loss = loss + value
        if self.scheduler is not None:
            reg = self.scheduler.regularization()
            if reg is not None:
                terms["regularizer"] = reg
                loss = loss + reg
        terms["loss"] = loss
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        all_idx, all_logits, all_labels = [], [], []
        for batch in self.eval_loader:
            batch = to_device(batch, self.device)
            logits = model(**model_inputs(batch)).logits.float()
            all_idx.append(batch["idx"])
            all_logits.append(logits)
            all_labels.append(batch["labels"].float())
        model.train(was_training)
        idx = torch.cat(all_idx)
        logits = torch.cat(all_logits)
        labels = torch.cat(all_labels)
        idx, logits, labels = (gather_padded(t) for t in (idx, logits, labels))
        order = np.unique(idx.cpu().numpy(), return_index=True)[1]  # dedupe sampler padding, sort by idx
        preds = logits.cpu().numpy()[order]
        gold = labels.cpu().numpy()[order]
        self.last_eval_logits = preds
        if not self.task.is_regression:
            gold = gold.astype(np.int64)
        else:
            preds = preds.reshape(-1)
        return compute_metrics(self.task, preds, gold)

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, float]:
        engine, s = self.engine, self.s
        engine.train()
        progress = tqdm(total=s.total_steps, desc="train", disable=not (s.show_progress and self.is_rank0))
        window_t0, window_examples = time.perf_counter(), 0
        last_eval: dict[str, float] = {}
        for epoch in range(s.num_epochs):
            if hasattr(self.train_loader.sampler, "set_epoch"):
                self.train_loader.sampler.set_epoch(epoch)
            if self.snc_enabled and s.snapshot_steps == 0 and epoch >= 1:
                self.snapshot()
            for batch in self.train_loader:
                if self.global_step >= s.total_steps:
                    break
                t0 = time.perf_counter()
                batch = to_device(batch, self.device)
                loss, terms = self.compute_loss(batch)
                engine.backward(loss)
                before = engine.global_steps
                engine.step()
                self.train_time += time.perf_counter() - t0
                n = int(batch["idx"].shape[0]) * (dist_world())
                self.examples_seen += n
                window_examples += n
                if engine.global_steps == before:
                    continue  # inside gradient accumulation
                self.global_step += 1
                progress.update(1)
                if self.scheduler is not None and engine.was_step_applied():
                    self.scheduler.step()
                if self.global_step % s.logging_steps == 0 or self.global_step == s.total_steps:
                    elapsed = time.perf_counter() - window_t0
                    terms["examples_per_second"] = window_examples / max(elapsed, 1e-9)
                    terms["lr"] = engine.get_lr()[0]
                    if self.scheduler is not None:
                        terms["threshold"] = self.scheduler.threshold
                        terms["sparsity"] = sparsity_report(self.model)["sparsity"]
                    self.scalars.log("Train", terms, self.global_step)
                    s.history.append({"step": self.global_step, **terms})
                    progress.set_postfix(loss=f"{terms['loss']:.4f}")
                    window_t0, window_examples = time.perf_counter(), 0
                if s.eval_steps and self.global_step % s.eval_steps == 0:
                    last_eval = self._eval_and_log()
                if self.snc_enabled and s.snapshot_steps and self.global_step % s.snapshot_steps == 0 \
                        and self.global_step < s.total_steps:
                    self.snapshot()
            if not s.eval_steps and self.global_step > 0:
                last_eval = self._eval_and_log()
            if self.global_step >= s.total_steps:
                break
        progress.close()
        if s.eval_steps and self.global_step % s.eval_steps != 0:
            last_eval = self._eval_and_log()
        self.scalars.flush()
        return last_eval

    def _eval_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.scalars.log("Eval", metrics, self.global_step)
        if self.is_rank0:
            logger.info("step %d eval %s", self.global_step, metrics)
        return metrics


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def gather_padded(t: torch.Tensor) -> torch.Tensor:
    """All-gather per-rank results of equal length (DistributedSampler pads shards to equal size)."""
    return all_gather_cat(t)


def gather_bank_rows(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge per-rank encode results (NaN where another rank owns the row) into full tensors on every rank."""
    if not is_distributed():
        return out
    merged = {}
    for key, value in out.items():
        stacked = all_gather_cat(value.unsqueeze(0))
        merged[key] = torch.nan_to_num(stacked, nan=0.0).sum(0) / torch.isfinite(stacked).float().sum(0).clamp(min=1)
    return merged


def build_bank(name: str, num_examples: int, dim: int, dtype: torch.dtype, max_columns: int | None = None) -> MemoryBank:
    return MemoryBank(name, num_examples, dim, dtype=dtype, max_columns=max_columns)


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(num_batches / grad_accum))
