"""What a run leaves in its output folder besides checkpoints and the model: ``metrics.json`` (built by
:func:`run_results`, the one place that decides its fields), ``eval_logits.npy`` and ``train_state.json``
(completed, preempted or failed, with the step)."""

from __future__ import annotations

import logging
import os
import resource
from typing import Any

import numpy as np
import torch

from cap_ds.runtime.atomic import atomic_file, write_json
from cap_ds.runtime.collectives import all_gather_cat

logger = logging.getLogger(__name__)


def write_state(output_dir: str, status: str, step: int, error: BaseException | str | None = None) -> None:
    """``train_state.json``: how the run ended (rank 0 writes it). ``error``: the one-line cause
    (``faults.settle``), or an exception."""
    state: dict[str, Any] = {"status": status, "step": step}
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {str(error)}"
    if error is not None:
        state["error"] = error[:1000]
    write_json(os.path.join(output_dir, "train_state.json"), state)


def record_failure(output_dir: str, step: int, cause: BaseException | str) -> None:
    """``train_state.json`` status failed with its cause, if the disk still takes it: on a full or read-only
    disk the write fails too, and that must not hide the original error (only a warning says so)."""
    try:
        write_state(output_dir, "failed", step, cause)
    except OSError as err:
        logger.warning("could not record the failure in %s: %s", os.path.join(output_dir, "train_state.json"),
                       err.strerror or err)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak host RSS of every rank (and peak CUDA allocation on GPUs), gathered to every rank (collective)."""
    local = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if device.type == "cuda":
        local.append(torch.cuda.max_memory_allocated(device) / 2**20)
    per_rank = all_gather_cat(torch.tensor([local], dtype=torch.float64, device=device)).cpu().tolist()
    out = {"peak_rss_mb": per_rank[0][0], "peak_rss_mb_per_rank": [r[0] for r in per_rank]}
    if device.type == "cuda":
        out["peak_gpu_mb_per_rank"] = [r[1] for r in per_rank]
        out["gpu_name"] = torch.cuda.get_device_name(device)
    return out


def run_results(spec, trainer, *, eval_metrics: dict[str, float], timings: dict[str, float], banks: dict,
                eval_examples: int, optimizer: str, sparsity: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json's content (``peak_memory`` inside: collective, every rank calls this). ``spec``: the run's
    ``RunSpec``; ``timings``: ``train_runtime_s`` and ``bank_encode_s``; ``sparsity``: the measured mask report of
    a pruning run (None: fine-tuning)."""
    log, task, shard, plan = trainer.log, trainer.task, trainer.shard, spec.plan
    ce_weight, kd_weight = spec.loss_weights()
    result = {
        "task": task.name, "mode": spec.training.mode, "eval": eval_metrics, "primary_metric": task.primary_metric,
        "steps": trainer.global_step, "epochs": plan.num_epochs, "eval_examples": eval_examples,
        "train_runtime_s": timings["train_runtime_s"], "train_time_s": log.train_time,
        "train_examples": log.examples_seen, "bank_encode_s": timings["bank_encode_s"],
        "snapshot_s": log.snapshot_time, "world_size": shard.world,
        **log.step_timer.metrics(),  # step_time_s: steady-state median; train_examples_per_second follows it
        "bank_bytes_per_rank": sum(b.memory_bytes() for b in banks.values()),
        "bank_rows_per_rank": len(shard.encoded) if banks else 0, "optimizer": optimizer,
        **peak_memory(trainer.device),
        "model_name_or_path": spec.model_path, "teacher_name_or_path": spec.model.teacher_name_or_path,
        "teacher_eval": trainer.teacher_metrics, "cap_modules": spec.modules, "ce_weight": ce_weight,
        "kd_weight": kd_weight,
    }
    if log.grad_history:
        result["grad_diagnostics"] = log.grad_history
    if sparsity is not None:
        result.update({"pruning_method": spec.pruning.pruning_method, "target_sparsity": spec.pruning.target_sparsity,
                       "sparsity": sparsity["sparsity"], "sparsity_per_module": sparsity["per_module"],
                       "snapshots": banks["snc"].num_columns if "snc" in banks else 0})
        extra = trainer.schedule.results()
        if "sparsity" in extra:  # CAP-f: sparsity counts removed heads/neurons; the masked weights' share apart
            result["masked_weight_sparsity"] = sparsity["sparsity"]
        result.update(extra)
    return result


def write_results(output_dir: str, result: dict[str, Any], eval_logits: np.ndarray | None, step: int) -> None:
    """eval_logits.npy, metrics.json and a completed train_state.json (rank 0)."""
    if eval_logits is not None:  # atomic, like the rest: a full disk leaves no truncated file
        atomic_file(os.path.join(output_dir, "eval_logits.npy"), lambda tmp: np.save(tmp, eval_logits))
    write_json(os.path.join(output_dir, "metrics.json"), result)
    write_state(output_dir, "completed", step)
