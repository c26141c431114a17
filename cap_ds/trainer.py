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

from .cap import CapObjective, Shard, encode_dataset, kd_loss
from .cap.distributed import all_gather_cat, rank, world_size
from .compression import CompressionScheduler, is_score_parameter, sparsity_report
from .data import TaskSpec, compute_metrics
from .models import SentenceVectorHook
from .monitor import PassReport, ScalarLogger
from .signals import StopRequested, StopSignals
from .steptimer import StepTimer  # issue 15

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The run cannot produce a valid result (diverged, non-finite outputs, schedule not completed)."""


@dataclass
class LoopSettings:
    total_steps: int
    num_epochs: int
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    snapshot_steps: int = 0
    snapshot_mode: str = "train"
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 0
    structured_stages: list[float] = field(default_factory=list)  # CAP-f cumulative pruned fractions
    epochs_per_stage: int = 2
    importance_batches: int = 0
    log_sparsity: bool = False
    show_progress: bool = True
    grad_norm_steps: int = 0  # diagnostic: per-term gradient norms every N steps (0: off)
    max_nonfinite_steps: int = 10  # consecutive NaN/inf-loss or skipped steps tolerated before failing
    history: list[dict[str, Any]] = field(default_factory=list)
    grad_history: list[dict[str, Any]] = field(default_factory=list)


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
                 is_rank0: bool = True, checkpointer=None, pruner=None, importance_loader=None,
                 stop: StopSignals | None = None) -> None:
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
        self.train_time = 0.0  # optimizer steps only (forward, losses, backward, step)
        self.timed_examples = 0  # examples and optimizer steps train_time covers (throughput, step time)
        self.timed_steps = 0
        self.step_timer = StepTimer()  # issue 15: steady-state step time (cap_ds/steptimer.py)
        self.snapshot_time = 0.0  # SnC encode passes, reported apart
        self.last_eval_logits: np.ndarray | None = None
        self.shard = Shard(num_train, rank(), world_size())
        self.checkpointer = checkpointer
        self.pruner = pruner  # CAP-f (compression.FirstOrderPruner)
        self.importance_loader = importance_loader
        self.stage_done = -1
        self.stage_reports: list[dict[str, Any]] = []
        # Loop position (restored on resume): micro-batches consumed in the current epoch.
        self.epoch = 0
        self.batch_in_epoch = 0
        self.snapshot_epoch = 0
        self.teacher_metrics: dict[str, float] | None = None
        self.stop = stop if stop is not None else StopSignals()
        self.preempted = False
        self.pending_snapshot = False  # a step snapshot a stop interrupted: taken first on resume
        self.encode_pool: torch.Tensor | None = None  # rows a short run encodes (None: all; cap.Shard.restrict)
        self.nonfinite_run = 0  # consecutive optimizer steps with a non-finite loss or skipped by DeepSpeed

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
            return encode_dataset(encode_batch, self.encode_loader, self.num_train, desc=desc,
                                  show_progress=self.s.show_progress and self.is_rank0, shard=self.shard,
                                  check=self.stop.pass_check(len(self.encode_loader), self.device),
                                  report=self.is_rank0)
        finally:
            model.train(was_training)

    def snapshot(self) -> None:
        """Append the current student as a new SnC column. A stop request aborts it with the RNG (dropout) as
        before it started, so the checkpoint written next retakes exactly this snapshot on resume."""
        from .checkpoint import rng_state, set_rng_state

        bank = self.objective.banks["snc"]
        t0 = time.perf_counter()
        rng = rng_state()
        try:
            vecs = self.encode_vectors(self.model, self.hook, train_mode=self.s.snapshot_mode == "train",
                                       desc=f"SnC snapshot {bank.num_columns + 1}")["vectors"]
        except StopRequested:
            set_rng_state(rng)
            raise
        bank.add_column(vecs)
        self.snapshot_time += time.perf_counter() - t0
        logger.info("SnC snapshot %d taken at step %d", bank.num_columns, self.global_step)

    @property
    def snc_enabled(self) -> bool:
        return self.objective is not None and "snc" in self.objective.banks

    # ---------------------------------------------------------------- one step
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss (through the engine) and the raw value of every term."""
        parts, terms = self.loss_parts(batch, self.engine)
        loss = sum(parts.values())
        terms["loss"] = loss
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def loss_parts(self, batch: dict[str, torch.Tensor],
                   forward) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each term as it enters the total (e.g. 0.1 * CE), and each term's raw value, both on the graph."""
        idx, labels = batch["idx"], batch["labels"]
        logits = forward(**model_inputs(batch)).logits
        terms: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        if self.task.is_regression:
            terms["ce"] = F.mse_loss(logits.view(-1).float(), labels.float())
        else:
            terms["ce"] = F.cross_entropy(logits.float(), labels)
        parts["ce"] = self.s.ce_weight * terms["ce"]
        if self.s.kd_weight > 0:
            if self.live_teacher is not None:
                with torch.no_grad():
                    t_logits = self.live_teacher(**model_inputs(batch)).logits
            else:
                t_logits = self.teacher_logits.index_select(0, self.shard.local_rows(idx)).to(logits.device)
            terms["kd"] = kd_loss(logits, t_logits, self.s.kd_temperature, self.task.is_regression)
            parts["kd"] = self.s.kd_weight * terms["kd"]
        if self.objective is not None:
            anchors = F.normalize(self.hook.anchor.float(), dim=-1)
            sup_labels = None if self.task.is_regression else labels
            for name, value in self.objective(anchors, idx, sup_labels).items():
                terms[name] = parts[name] = value
        if self.scheduler is not None:
            reg = self.scheduler.regularization()
            if reg is not None:
                terms["regularizer"] = parts["regularizer"] = reg
        return parts, terms

    def term_gradients(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Diagnostic: norm of each weighted term's gradient over the student's weights (pruning scores excluded)
        on this rank's batch, and its cosine with the KD gradient (or CE's without a teacher); ``cap`` is
        PrC + SnC + FiC together. Shows whether a term steers training at all.

        It runs its own forward on the bare module: the engine's backward hooks would take ``autograd.grad`` for
        the step's backward and reduce gradients. The RNG states (dropout, the bank sampler) are restored after,
        so the step that follows draws exactly what it would have drawn: training is unchanged."""
        from .checkpoint import rng_state, set_rng_state

        rng = rng_state()
        sampler = self.objective.generator.get_state() if self.objective is not None else None
        try:
            weighted, _ = self.loss_parts(batch, self.model)
            params = [p for n, p in self.model.named_parameters() if p.requires_grad and not is_score_parameter(n)]

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
                self.objective.generator.set_state(sampler)
        return out

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
        # DistributedSampler pads shards to equal length; gather, then dedupe by idx below.
        idx, logits, labels = (all_gather_cat(t) for t in (idx, logits, labels))
        order = np.unique(idx.cpu().numpy(), return_index=True)[1]  # dedupe sampler padding, sort by idx
        preds = logits.cpu().numpy()[order]
        gold = labels.cpu().numpy()[order]
        bad = int((~np.isfinite(preds)).any(axis=-1).sum()) if preds.ndim > 1 else int((~np.isfinite(preds)).sum())
        if bad:
            raise TrainingFailed(f"evaluation at step {self.global_step}: {bad} of {len(preds)} examples got non-finite "
                                 "logits (the model diverged); no metrics are computed from them")
        self.last_eval_logits = preds
        if not self.task.is_regression:
            gold = gold.astype(np.int64)
        else:
            preds = preds.reshape(-1)
        return compute_metrics(self.task, preds, gold)

    # ---------------------------------------------------------------- the loop
    def request_stop(self, *_args) -> None:
        """Ask for a checkpoint at the next optimizer step and a stop (what SIGTERM/SIGUSR1 do)."""
        self.stop.request()

    def _stop_agreed(self) -> bool:
        return self.stop.agreed(self.device)

    def _check_step_finite(self, step_nonfinite: bool, loss: float) -> None:
        """Count consecutive optimizer steps whose loss was NaN/inf on any rank or that DeepSpeed skipped; fail
        past ``max_nonfinite_steps`` (every rank agrees: one all-reduce)."""
        bad = torch.tensor([1.0 if step_nonfinite or not self.engine.was_step_applied() else 0.0],
                           device=self.device)
        if world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() == 0:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        if self.is_rank0:
            logger.warning("step %d: loss %s%s (%d consecutive)", self.global_step, loss,
                           "" if self.engine.was_step_applied() else ", step skipped by DeepSpeed", self.nonfinite_run)
        if self.nonfinite_run > self.s.max_nonfinite_steps:
            raise TrainingFailed(
                f"training diverged: {self.nonfinite_run} consecutive optimizer steps up to step {self.global_step} "
                f"had a NaN/inf loss or were skipped by DeepSpeed (last loss {loss}); lower --learning_rate (now "
                f"{self.engine.get_lr()[0]:g} at this step) or check the data; --max_nonfinite_steps "
                f"{self.s.max_nonfinite_steps} is how many such steps are tolerated")

    def train(self) -> dict[str, float]:
        engine, s = self.engine, self.s
        engine.train()
        sampler = self.train_loader.sampler
        bs = self.train_loader.batch_size
        progress = tqdm(total=s.total_steps, initial=self.global_step, desc="train",
                        disable=not (s.show_progress and self.is_rank0))
        window_t0, window_examples = time.perf_counter(), 0
        last_eval: dict[str, float] = {}
        start_epoch, skip = self.epoch, self.batch_in_epoch
        step_nonfinite = False
        if self.pending_snapshot:  # a resumed run whose last step's snapshot was interrupted
            try:
                self.snapshot()
            except StopRequested:
                return self._preempt(progress, last_eval)
            self.pending_snapshot = False
        for epoch in range(start_epoch, s.num_epochs):
            if self.global_step >= s.total_steps:
                break
            self.epoch = epoch
            self.batch_in_epoch = skip if epoch == start_epoch else 0
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if hasattr(sampler, "start_index"):
                sampler.start_index = self.batch_in_epoch * bs
            try:
                if self.pruner is not None:
                    stage = epoch // s.epochs_per_stage
                    if epoch % s.epochs_per_stage == 0 and stage > self.stage_done and stage < len(s.structured_stages):
                        self.structured_stage(stage)
                elif self.snc_enabled and s.snapshot_steps == 0 and epoch >= 1 and self.snapshot_epoch < epoch:
                    self.snapshot()
                    self.snapshot_epoch = epoch
            except StopRequested:  # the epoch-start pass is redone on resume
                return self._preempt(progress, last_eval)
            for batch in self.train_loader:
                if self.global_step >= s.total_steps:
                    break
                t0 = time.perf_counter()
                batch = to_device(batch, self.device)
                # every rank (the CAP loss gathers across ranks); each reports its own batch, rank 0 logs
                if s.grad_norm_steps and (self.global_step + 1) % s.grad_norm_steps == 0 \
                        and self.batch_in_epoch % engine.gradient_accumulation_steps() == 0:
                    d0 = time.perf_counter()
                    grads = self.term_gradients(batch)
                    self.scalars.log("Grad", grads, self.global_step + 1)
                    s.grad_history.append({"step": self.global_step + 1, **grads})
                    t0 += time.perf_counter() - d0  # not part of the step time
                loss, terms = self.compute_loss(batch)
                step_nonfinite = step_nonfinite or not math.isfinite(terms["loss"])
                engine.backward(loss)
                before = engine.global_steps
                engine.step()
                self.batch_in_epoch += 1
                dt = time.perf_counter() - t0  # issue 15: one reading for train_time and the step timer
                self.train_time += dt
                n = int(batch["idx"].shape[0]) * world_size()
                self.step_timer.add_micro(dt, n)  # issue 15
                self.examples_seen += n
                self.timed_examples += n
                window_examples += n
                if engine.global_steps == before:
                    continue  # inside gradient accumulation
                self.global_step += 1
                self.timed_steps += 1
                self.step_timer.end_step()  # issue 15
                progress.update(1)
                self._check_step_finite(step_nonfinite, terms["loss"])
                step_nonfinite = False
                if self.scheduler is not None and engine.was_step_applied():
                    self.scheduler.step()
                if self.global_step % s.logging_steps == 0 or self.global_step == s.total_steps:
                    elapsed = time.perf_counter() - window_t0
                    terms["examples_per_second"] = window_examples / max(elapsed, 1e-9)
                    terms["lr"] = engine.get_lr()[0]
                    if self.scheduler is not None:
                        terms["threshold"] = self.scheduler.threshold
                    if s.log_sparsity:
                        terms["sparsity"] = self.current_sparsity()
                    self.scalars.log("Train", terms, self.global_step)
                    s.history.append({"step": self.global_step, **terms})
                    progress.set_postfix(loss=f"{terms['loss']:.4f}")
                    window_t0, window_examples = time.perf_counter(), 0
                if s.eval_steps and self.global_step % s.eval_steps == 0:
                    last_eval = self._eval_and_log()
                if self.snc_enabled and s.snapshot_steps and self.global_step % s.snapshot_steps == 0 \
                        and self.global_step < s.total_steps:
                    try:
                        self.snapshot()
                    except StopRequested:
                        self.pending_snapshot = True
                        return self._preempt(progress, last_eval)
                if self._stop_agreed():
                    return self._preempt(progress, last_eval)
                if s.save_steps and self.global_step % s.save_steps == 0 and self.global_step < s.total_steps:
                    self.save_checkpoint()
            if not s.eval_steps and self.global_step > 0:
                last_eval = self._eval_and_log()
        progress.close()
        if (s.eval_steps and self.global_step % s.eval_steps != 0) or (not last_eval and self.global_step > 0):
            last_eval = self._eval_and_log()  # also a run resumed from a checkpoint of its last step
        self.scalars.flush()
        return last_eval

    def _preempt(self, progress, last_eval: dict[str, float]) -> dict[str, float]:
        """Stop on a signal: checkpoint the current step (every rank) and leave the loop."""
        self.save_checkpoint()
        self.preempted = True
        progress.close()
        self.scalars.flush()
        return last_eval

    # ---------------------------------------------------------------- CAP-f (structured, iterative)
    def structured_stage(self, stage: int) -> None:
        """Snapshot (stage >= 1, before the new mask, eval mode as the reference), importance, prune."""
        if stage >= 1 and self.snc_enabled:
            bank = self.objective.banks["snc"]
            vecs = self.encode_vectors(self.model, self.hook, train_mode=False,
                                       desc=f"SnC snapshot {bank.num_columns + 1}")["vectors"]
            bank.add_column(vecs)
        self.first_order_importance()
        fraction = self.s.structured_stages[stage]
        result = self.pruner.prune_step(fraction)
        self.stage_done = stage
        report = {"stage": stage, "fraction": fraction, "step": self.global_step, **result,
                  "structured_sparsity": self.structured_sparsity()}
        self.stage_reports.append(report)
        self.scalars.log("Prune", {"fraction": fraction, "structured_sparsity": report["structured_sparsity"]},
                         self.global_step)
        if self.is_rank0:
            logger.info("CAP-f stage %d: pruned %.0f%% of heads/neurons %s", stage, 100 * fraction, result)

    def first_order_importance(self) -> None:
        """Sum of |dL/dgate| over the training data with the full loss (incl. contrastive terms), eval mode."""
        engine = self.engine
        engine.eval()
        self.pruner.start_accumulation(reset=True)
        limit = self.s.importance_batches
        batches = min(limit, len(self.importance_loader)) if limit else len(self.importance_loader)
        check = self.stop.pass_check(batches, self.device)
        report = PassReport("CAP-f importance", batches * (self.importance_loader.batch_size or 1),
                            enabled=self.is_rank0)
        try:
            for i, batch in enumerate(tqdm(self.importance_loader, desc="importance", leave=False,
                                           disable=not (self.s.show_progress and self.is_rank0))):
                if limit and i >= limit:
                    break
                check(i)
                loss, _ = self.compute_loss(to_device(batch, self.device))
                engine.backward(loss)
                engine.zero_grad()
                report.update(int(batch["idx"].shape[0]))
        finally:
            self.pruner.stop_accumulation()
            engine.train()

    def structured_sparsity(self) -> float:
        """Fraction of encoder linear weights a clean removes: heads take Q/K/V rows and O columns, neurons
        take FFN-in rows and FFN-out columns."""
        cfg = self.model.config
        h, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
        head_dim = h // heads
        rep = self.pruner.report()
        layers = cfg.num_hidden_layers
        kept_heads = rep.get("heads_kept", heads * layers)
        kept_neurons = rep.get("neurons_kept", inter * layers)
        dense = layers * (4 * h * h + 2 * h * inter)
        kept = 4 * h * head_dim * kept_heads + 2 * h * kept_neurons
        return 1.0 - kept / dense

    def current_sparsity(self) -> float:
        if self.pruner is not None:
            return self.structured_sparsity()
        return sparsity_report(self.model)["sparsity"]

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        from .checkpoint import rng_state

        return {
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "snapshot_epoch": self.snapshot_epoch, "examples_seen": self.examples_seen, "history": self.s.history,
            "train_time": self.train_time, "timed_examples": self.timed_examples, "timed_steps": self.timed_steps,
            "step_timer": self.step_timer.state_dict(),  # issue 15
            "snapshot_time": self.snapshot_time,
            "pending_snapshot": self.pending_snapshot, "nonfinite_run": self.nonfinite_run,
            "encode_pool": self.encode_pool,
            "grad_history": self.s.grad_history,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "objective": self.objective.state_dict() if self.objective is not None else None,
            "teacher_logits": self.teacher_logits, "teacher_metrics": self.teacher_metrics,
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "stage_done": self.stage_done, "stage_reports": self.stage_reports,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything but the RNG (call :meth:`restore_rng` last, right before :meth:`train`)."""
        self.global_step = state["global_step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.snapshot_epoch, self.examples_seen = state["snapshot_epoch"], state["examples_seen"]
        # Throughput and step time cover every step of the run, before and after the resume (a checkpoint
        # written before cap_ds saved the timing: only this process's steps).
        self.train_time = float(state.get("train_time", 0.0))
        self.timed_examples = int(state.get("timed_examples", 0))
        self.timed_steps = int(state.get("timed_steps", 0))
        self.step_timer.load_state_dict(state.get("step_timer"))  # issue 15
        self.snapshot_time = float(state.get("snapshot_time", 0.0))
        self.pending_snapshot = bool(state.get("pending_snapshot", False))
        self.nonfinite_run = int(state.get("nonfinite_run", 0))
        self.encode_pool = state.get("encode_pool")
        self.s.history[:] = state["history"]
        self.s.grad_history[:] = state.get("grad_history", [])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.objective is not None:
            self.objective.load_state_dict(state["objective"])
        self.teacher_logits = state["teacher_logits"]
        self.teacher_metrics = state["teacher_metrics"]
        if self.pruner is not None:
            self.pruner.load_state_dict(state["pruner"])
        self.stage_done, self.stage_reports = state["stage_done"], state["stage_reports"]
        self._rng = state["rng"]

    def restore_rng(self) -> None:
        from .checkpoint import set_rng_state

        if getattr(self, "_rng", None) is not None:
            set_rng_state(self._rng)

    def save_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        path = self.checkpointer.save(f"step{self.global_step}", self.state_dict())
        if self.is_rank0:
            logger.info("checkpoint written: %s", path)

    def _eval_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.scalars.log("Eval", metrics, self.global_step)
        if self.is_rank0:
            logger.info("step %d eval %s", self.global_step, metrics)
        return metrics


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Dot product of two gradient lists, accumulated in float64 one tensor at a time."""
    return sum(float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())) for x, y in zip(a, b))


def _norm_and_cos(name: str, grads: list[torch.Tensor], ref: list[torch.Tensor], ref_sq: float,
                  ref_name: str) -> dict[str, float]:
    sq = _dot(grads, grads)
    cos = _dot(grads, ref) / math.sqrt(sq * ref_sq) if sq > 0 and ref_sq > 0 else 0.0
    return {f"{name}_norm": math.sqrt(sq), f"{name}_cos_{ref_name}": max(-1.0, min(1.0, cos))}


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(num_batches / grad_accum))
