"""Checks that need files (data, configs, tokenizers, the output folder, checkpoints) but no model weights or
processes, run before any distributed setup: a bad run fails in seconds with one line naming the problem."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .compression.config import load_ds_config
from .data import count_local_rows, get_task
from .errors import UserError
from .models import (
    check_model_folder,
    check_teacher,
    check_tokenizers,
    default_model_path,
    load_tokenizer,
    max_positions,
    parse_config_overrides,
)
from .plan import StepPlan, plan_steps
from .rundir import RunDirPlan, plan_output_dir, run_config


@dataclass
class Preflight:
    """What the checks before any process group or weights found out."""

    model_path: str
    run_config: dict
    rundir: RunDirPlan
    plan: StepPlan | None  # (None: training rows unknown until the hub data is loaded)
    num_train: int | None
    ds_source: dict | None  # the loaded --deepspeed JSON (None: the built-in ZeRO-2)


def launcher_world_size() -> int:
    """The world size a launcher announced in the environment (1 when it will be discovered later)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def preflight(margs, dargs, rargs, pargs, cargs) -> Preflight:
    """Checks that need files (data, configs, tokenizers, the output folder, checkpoints) but no model weights or
    processes, so a bad run fails in seconds with one line naming the problem, before any distributed setup."""
    from transformers import AutoConfig

    task = get_task(dargs.task_name)
    num_train = None
    if dargs.data_dir is not None:
        num_train = count_local_rows(task, "train", dargs.data_dir, dargs.max_train_samples)
        count_local_rows(task, "validation", dargs.data_dir, dargs.max_eval_samples)
    model_path = margs.model_name_or_path or default_model_path()
    check_model_folder(model_path, "--model_name_or_path")
    s_cfg = AutoConfig.from_pretrained(model_path)
    overrides = parse_config_overrides(margs.config_overrides)
    limit = max_positions(s_cfg) if "max_position_embeddings" not in overrides else overrides["max_position_embeddings"]
    if limit is not None and dargs.max_seq_length > limit:
        raise UserError(f"--max_seq_length {dargs.max_seq_length} is longer than the {limit} positions of "
                        f"{model_path} (max_position_embeddings); use at most {limit}")
    if rargs.mode == "prune" and margs.teacher_name_or_path:
        teacher = margs.teacher_name_or_path
        check_model_folder(teacher, "--teacher_name_or_path", ("config",))
        check_teacher(AutoConfig.from_pretrained(teacher), task.num_labels, task.label_names, teacher)
        check_model_folder(teacher, "--teacher_name_or_path", ("tokenizer",))
        check_tokenizers(load_tokenizer(model_path), load_tokenizer(teacher), model_path, teacher)
        check_model_folder(teacher, "--teacher_name_or_path", ("weights",))
    ds_source = load_ds_config(rargs.deepspeed) if rargs.deepspeed is not None else None
    if isinstance(ds_source, dict) and (ds_source.get("checkpoint") or {}).get("load_universal"):
        raise UserError(f"--deepspeed {rargs.deepspeed}: checkpoint.load_universal is not supported (DeepSpeed loads "
                        "universal checkpoints with weights_only=False); remove it")
    plan = None
    if num_train is not None:
        compression = (ds_source or {}).get("compression_training")
        plan = plan_steps(num_train, launcher_world_size(), rargs, pargs, prune=rargs.mode == "prune",
                          compression=compression, source=str(rargs.deepspeed))
    config = run_config((margs, dargs, rargs, pargs, cargs), ds_source, model_path)
    rundir = plan_output_dir(rargs.output_dir, rargs.resume, rargs.overwrite_output_dir, config)
    return Preflight(model_path, config, rundir, plan, num_train, ds_source)
