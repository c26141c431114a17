"""Checks that need files (data, configs, tokenizers, weight file headers, the DeepSpeed config, the output folder,
checkpoints) but no model weights or processes, run before any distributed setup: a bad run fails in seconds with
one line naming the problem. Every check that can fail on user input runs before the output folder is locked,
read for the resume/overwrite decision, or touched."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
from cap_ds.data.sources import inspect_source
from cap_ds.run.args import Flags
from cap_ds.run.rundir import RunDirPlan, plan_output_dir
from cap_ds.run.runlock import RunLock
from cap_ds.run.spec import RunSpec, resolve
from cap_ds.runtime.errors import UserError


@dataclass
class Preflight:
    """What the checks found: the resolved run spec, the output folder's plan and (rank 0) its run lock."""

    spec: RunSpec
    rundir: RunDirPlan
    lock: RunLock | None = None  # the output folder's run lock (rank 0 of a run that asked for it)


def announced_world_size() -> int | None:
    """The world size a launcher announced in the environment (None: discovered later, or a single process)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def launcher_rank() -> int:
    """This process's global rank as its launcher announced it (0 for a plain ``python cap_ds/train.py``): only
    rank 0 takes the output folder's run lock, before the process group exists."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def preflight(flags: Flags, *, lock: bool = False) -> Preflight:
    """Checks that need files (data, configs, tokenizers, weight headers, the DeepSpeed config, the output folder,
    checkpoints) but no model weights or processes, so a bad run fails in seconds with one line naming the problem,
    before any distributed setup; then the run spec is resolved. With ``lock`` (rank 0 of a real run) the output
    folder's run lock is taken after every input check and before the folder is read for the resume/overwrite
    decision (RunLockError: in use)."""
    margs, dargs, rargs = flags.model, flags.data, flags.run
    task, num_train = inspect_source(dargs.source())  # reads and checks the data files
    model_path = margs.model_name_or_path or default_model_path()
    check_model_folder(model_path, "--model_name_or_path")
    # the student's config as load_student builds it: a --config_overrides key or value it cannot take fails here
    s_cfg = load_config(model_path, task.num_labels, task.label_names, margs.config_overrides,
                        question_answering=task.is_qa)
    limit = max_positions(s_cfg)
    if limit is not None and dargs.max_seq_length > limit:
        raise UserError(f"--max_seq_length {dargs.max_seq_length} is longer than the {limit} positions of "
                        f"{model_path} (max_position_embeddings); use at most {limit}")
    student_tok = check_tokenizer_loads(model_path, "--model_name_or_path")
    check_weights(model_path, "--model_name_or_path")
    if rargs.mode == "prune" and margs.teacher_name_or_path:
        check_teacher_folder(margs.teacher_name_or_path, task, student_tok, model_path)
    spec = resolve(flags, model_path=model_path, num_train=num_train, world_size=announced_world_size(), task=task)
    # ---- every input is checked: now the output folder, under its lock
    out = Path(rargs.output_dir)
    existed = out.exists()
    run_lock = RunLock(out).acquire() if lock and not (existed and not out.is_dir()) else None
    try:
        rundir = plan_output_dir(rargs.output_dir, rargs.resume, rargs.overwrite_output_dir, spec.identity,
                                 existed=existed)
    except BaseException:
        if run_lock is not None:
            run_lock.release()
            if run_lock.created_dir:  # a refused run leaves no folder behind
                shutil.rmtree(out, ignore_errors=True)
        raise
    if run_lock is not None and run_lock.previous is not None:
        rundir.notes.insert(0, f"took over the lock of {out} from {run_lock.previous.describe()}, which is gone")
    return Preflight(spec, rundir, run_lock)


def check_teacher_folder(teacher: str, task, student_tokenizer, model_path: str) -> None:
    """The teacher's config fits the task, its tokenizer matches the student's, its weights are readable."""
    from transformers import AutoConfig

    check_model_folder(teacher, "--teacher_name_or_path", ("config",))
    check_teacher(AutoConfig.from_pretrained(teacher), task.num_labels, task.label_names, teacher,
                  question_answering=task.is_qa)
    check_model_folder(teacher, "--teacher_name_or_path", ("tokenizer",))
    check_tokenizers(student_tokenizer, check_tokenizer_loads(teacher, "--teacher_name_or_path"), model_path, teacher)
    check_model_folder(teacher, "--teacher_name_or_path", ("weights",))
    check_weights(teacher, "--teacher_name_or_path")
