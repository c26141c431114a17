"""Checks that need files (data, configs, tokenizers, weight file headers, the DeepSpeed config, the output folder,
checkpoints) but no model weights or processes, run before any distributed setup: a bad run fails in seconds with
one line naming the problem. Every check that can fail on user input runs before the output folder is locked,
read for the resume/overwrite decision, or touched."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cap_ds.compression.config import load_ds_config
from cap_ds.data.glue import count_local_rows, get_task
from cap_ds.data.models import (
    check_model_folder,
    check_teacher,
    check_tokenizer_loads,
    check_tokenizers,
    check_weights,
    default_model_path,
    load_config,
    max_positions,
)
from cap_ds.run.rundir import RunDirPlan, plan_output_dir, run_config
from cap_ds.run.runlock import RunLock
from cap_ds.runtime.errors import UserError
from cap_ds.training.ds_config import build_ds_config, check_diagnostic, validate_ds_config
from cap_ds.training.plan import StepPlan, plan_steps


@dataclass
class Preflight:
    """What the checks before any process group or weights found out."""

    model_path: str
    run_config: dict
    rundir: RunDirPlan
    plan: StepPlan | None  # (None: training rows unknown until the hub data is loaded)
    num_train: int | None
    ds_source: dict | None  # the loaded --deepspeed JSON (None: the built-in ZeRO-2)
    lock: RunLock | None = None  # the output folder's run lock (rank 0 of a run that asked for it)


def announced_world_size() -> int | None:
    """The world size a launcher announced in the environment (None: discovered later, or a single process)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def launcher_world_size() -> int:
    """The world size a launcher announced in the environment (1 when it will be discovered later)."""
    return announced_world_size() or 1


def launcher_rank() -> int:
    """This process's global rank as its launcher announced it (0 for a plain ``python cap_ds/train.py``): only
    rank 0 takes the output folder's run lock, before the process group exists."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def preflight(margs, dargs, rargs, pargs, cargs, *, lock: bool = False) -> Preflight:
    """Checks that need files (data, configs, tokenizers, weight headers, the DeepSpeed config, the output folder,
    checkpoints) but no model weights or processes, so a bad run fails in seconds with one line naming the problem,
    before any distributed setup. With ``lock`` (rank 0 of a real run) the output folder's run lock is taken after
    every input check and before the folder is read for the resume/overwrite decision (RunLockError: in use)."""
    task = get_task(dargs.task_name)
    num_train = None
    if dargs.data_dir is not None:
        num_train = count_local_rows(task, "train", dargs.data_dir, dargs.max_train_samples)
        count_local_rows(task, "validation", dargs.data_dir, dargs.max_eval_samples)
    model_path = margs.model_name_or_path or default_model_path()
    check_model_folder(model_path, "--model_name_or_path")
    # the student's config as load_student builds it: a --config_overrides key or value it cannot take fails here
    s_cfg = load_config(model_path, task.num_labels, task.label_names, margs.config_overrides)
    limit = max_positions(s_cfg)
    if limit is not None and dargs.max_seq_length > limit:
        raise UserError(f"--max_seq_length {dargs.max_seq_length} is longer than the {limit} positions of "
                        f"{model_path} (max_position_embeddings); use at most {limit}")
    student_tok = check_tokenizer_loads(model_path, "--model_name_or_path")
    check_weights(model_path, "--model_name_or_path")
    if rargs.mode == "prune" and margs.teacher_name_or_path:
        from transformers import AutoConfig

        teacher = margs.teacher_name_or_path
        check_model_folder(teacher, "--teacher_name_or_path", ("config",))
        check_teacher(AutoConfig.from_pretrained(teacher), task.num_labels, task.label_names, teacher)
        check_model_folder(teacher, "--teacher_name_or_path", ("tokenizer",))
        check_tokenizers(student_tok, check_tokenizer_loads(teacher, "--teacher_name_or_path"), model_path, teacher)
        check_model_folder(teacher, "--teacher_name_or_path", ("weights",))
        check_weights(teacher, "--teacher_name_or_path")
    ds_source = load_ds_config(rargs.deepspeed) if rargs.deepspeed is not None else None
    if isinstance(ds_source, dict) and (ds_source.get("checkpoint") or {}).get("load_universal"):
        raise UserError(f"--deepspeed {rargs.deepspeed}: checkpoint.load_universal is not supported (DeepSpeed loads "
                        "universal checkpoints with weights_only=False); remove it")
    plan = None
    if num_train is not None:
        compression = (ds_source or {}).get("compression_training")
        plan = plan_steps(num_train, launcher_world_size(), rargs, pargs, prune=rargs.mode == "prune",
                          compression=compression, source=str(rargs.deepspeed))
    if rargs.deepspeed is not None:  # (the built-in config is known to be valid)
        ds_config, _ = build_ds_config(
            rargs.deepspeed, micro_batch=rargs.per_device_train_batch_size,
            grad_accum=rargs.gradient_accumulation_steps, world_size=announced_world_size(),
            max_grad_norm=rargs.max_grad_norm, output_dir=rargs.output_dir, learning_rate=rargs.learning_rate,
            adam_epsilon=rargs.adam_epsilon, weight_decay=rargs.weight_decay)
        check_diagnostic(ds_config, rargs.grad_norm_steps, rargs.deepspeed)
        validate_ds_config(ds_config, rargs.deepspeed)
    config = run_config((margs, dargs, rargs, pargs, cargs), ds_source, model_path)
    # ---- every input is checked: now the output folder, under its lock
    out = Path(rargs.output_dir)
    existed = out.exists()
    run_lock = RunLock(out).acquire() if lock and not (existed and not out.is_dir()) else None
    try:
        rundir = plan_output_dir(rargs.output_dir, rargs.resume, rargs.overwrite_output_dir, config, existed=existed)
    except BaseException:
        if run_lock is not None:
            run_lock.release()
            if run_lock.created_dir:  # a refused run leaves no folder behind
                shutil.rmtree(out, ignore_errors=True)
        raise
    if run_lock is not None and run_lock.previous is not None:
        rundir.notes.insert(0, f"took over the lock of {out} from {run_lock.previous.describe()}, which is gone")
    return Preflight(model_path, config, rundir, plan, num_train, ds_source, run_lock)
