"""The run folder (``--output_dir``): what a new run, a resumed run and ``--overwrite_output_dir`` may find and do
there (HF ``run_glue`` conventions).

- Run files are what cap_ds writes (:data:`RUN_FILES`); anything else (a log, notes) belongs to the user and is
  never touched, nor does it make the folder "a run".
- ``--resume none`` (default) refuses a folder that holds run files; ``--overwrite_output_dir`` replaces them.
- ``--resume auto`` continues from the newest complete checkpoint; with none it starts a new run (replacing the
  run files of an unfinished one), but refuses a completed run or one whose checkpoints are all broken.
- Replacing is a move, not a delete: the old run files go into ``<output_dir>/.replaced-<time>/`` (a rename) and
  come back if the new run fails or stops before it *started cleanly*; they are deleted when it did. "Started
  cleanly" is :meth:`RunDirPlan.started`, which the recipe calls just before training begins (the model,
  engine, data, banks and teacher outputs are all built by then). A run killed (SIGKILL) before that leaves the folder named in
  a warning of the next run.
- The folder is decided on and prepared under the run lock (``runlock.py``) by rank 0 alone.
- A resumed run must compute what the checkpoint's run computed: its flags (``run_config.json`` in each
  checkpoint) are compared and a difference is refused, naming the flags, except for :data:`MAY_CHANGE_ON_RESUME`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cap_ds.runtime.errors import UserError
from cap_ds.training.checkpoint import CheckpointError, read_run_config, resolve_resume
from cap_ds.training.ds_config import MONITOR_KEYS

logger = logging.getLogger(__name__)

RUN_FILES = ("checkpoints", "final", "metrics.json", "train_state.json", "eval_logits.npy", "runs",
             "run_config.json", "eval_predictions.json", "predict_results.jsonl")
# Flags that do not change what the optimizer steps compute: they may differ when a run is resumed.
MAY_CHANGE_ON_RESUME = frozenset({
    "output_dir", "overwrite_output_dir", "resume", "local_rank", "max_steps", "num_train_epochs",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "disable_tqdm", "dataloader_num_workers",
    "per_device_eval_batch_size", "grad_norm_steps", "max_nonfinite_steps", "check_steps", "test_file",
    "n_best_size", "max_answer_length", "null_score_diff_threshold",
    "deepspeed",  # its path: the content is compared instead
})
PATH_FLAGS = ("model_name_or_path", "teacher_name_or_path", "data_dir")
ASIDE_PREFIX = ".replaced-"  # hidden, and not a run file: a folder holding only an aside is not "a run"


class RunDirError(UserError, ValueError):
    """An --output_dir / --resume combination that would mix or lose runs; names what to do instead."""


def run_config(all_args, deepspeed_config: dict[str, Any] | None, model_path: str) -> dict[str, Any]:
    """What identifies the computation of a run: every flag (paths made absolute, the default model resolved)
    and the DeepSpeed config's content without its monitoring keys."""
    flags: dict[str, Any] = {}
    for args in all_args:
        for f in fields(args):
            flags[f.name] = getattr(args, f.name)
    flags["model_name_or_path"] = model_path
    for name in PATH_FLAGS:
        value = flags.get(name)
        if isinstance(value, str) and os.path.exists(value):
            flags[name] = os.path.abspath(value)
    ds = None
    if deepspeed_config is not None:
        ds = {k: v for k, v in deepspeed_config.items() if k not in MONITOR_KEYS}
    return json.loads(json.dumps({"flags": flags, "deepspeed": ds}, default=str))


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``--flag old -> new`` for each flag that may not change on resume (and the DeepSpeed config)."""
    out = []
    old_flags, new_flags = old.get("flags", {}), new.get("flags", {})
    for name in sorted(set(old_flags) | set(new_flags)):
        if name in MAY_CHANGE_ON_RESUME or name not in old_flags or name not in new_flags:
            continue  # flags added or removed by a cap_ds version change are not compared
        if old_flags[name] != new_flags[name]:
            out.append(f"--{name} {old_flags[name]!r} -> {new_flags[name]!r}")
    old_ds, new_ds = old.get("deepspeed"), new.get("deepspeed")
    if old_ds != new_ds:
        keys = sorted(k for k in set(old_ds or {}) | set(new_ds or {}) if (old_ds or {}).get(k) != (new_ds or {}).get(k))
        out.append(f"--deepspeed config content (keys {', '.join(keys)})")
    return out


def present_run_files(output_dir: str | os.PathLike) -> list[str]:
    out = Path(output_dir)
    return [name for name in RUN_FILES if (out / name).exists()]


def read_status(output_dir: str | os.PathLike) -> str | None:
    try:
        return json.loads((Path(output_dir) / "train_state.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class RunDirPlan:
    """What the run does with its folder: resume from ``resume_tag`` (None: a new run) after replacing ``clear``."""

    output_dir: Path
    resume_tag: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # newer checkpoints passed over, and why
    clear: list[str] = field(default_factory=list)
    existed: bool = False  # the folder was there before this run
    present: list[str] = field(default_factory=list)  # run files there before this run
    notes: list[str] = field(default_factory=list)
    aside: Path | None = None  # where prepare() moved the replaced run files (until started() or restore())

    def apply(self) -> None:
        """Delete the run files in ``clear`` at once (no way back; :meth:`prepare` moves them aside instead)."""
        for name in self.clear:
            _remove(self.output_dir / name)

    def prepare(self) -> None:
        """Rank 0, under the run lock, after every input check: log the notes and passed-over checkpoints, create
        the folder, move the run files in ``clear`` aside (restored at exit unless :meth:`started` is called)."""
        for note in self.notes:
            logger.warning(note)
        for tag, problem in self.skipped:
            logger.warning("checkpoint %s skipped: %s", tag, problem)
        os.makedirs(self.output_dir, exist_ok=True)
        clear = [name for name in self.clear if os.path.lexists(self.output_dir / name)]
        if not clear:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = self.output_dir / f"{ASIDE_PREFIX}{stamp}-{os.getpid()}"
        aside.mkdir()
        moved = []
        try:
            for name in clear:
                os.rename(self.output_dir / name, aside / name)  # same folder, same filesystem: instant, atomic
                moved.append(name)
        except BaseException:
            for name in moved:
                os.rename(aside / name, self.output_dir / name)
            aside.rmdir()
            raise
        self.aside = aside
        atexit.register(self.restore)
        logger.info("moved the replaced run's %s to %s (deleted when training begins, put back if this run ends "
                    "before)", ", ".join(clear), aside)

    def started(self) -> None:
        """This run started cleanly: delete the run files it replaced."""
        aside, self.aside = self.aside, None
        if aside is None:
            return
        atexit.unregister(self.restore)
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("training began: deleted the replaced run's files (%s)", aside)

    def restore(self) -> None:
        """This run ended before it started cleanly: delete its run files and put the replaced ones back."""
        aside, self.aside = self.aside, None
        if aside is None:
            return
        atexit.unregister(self.restore)
        names = sorted(p.name for p in aside.iterdir())
        for name in RUN_FILES:
            if name not in self.present or name in names:
                _remove(self.output_dir / name)
        for name in names:
            os.rename(aside / name, self.output_dir / name)
        aside.rmdir()
        logger.warning("this run ended before training: put the earlier run's %s back in %s", ", ".join(names),
                       self.output_dir)

    def remove_new_files(self) -> None:
        """After a failure before any training: delete what this run created, and the folder if it made it; put
        back the run files it replaced."""
        if not self.output_dir.is_dir():
            return
        if self.aside is not None:
            self.restore()
            return
        if not self.existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for name in RUN_FILES:
            if name not in self.present or name in self.clear:
                _remove(self.output_dir / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def leftover_asides(output_dir: str | os.PathLike) -> list[Path]:
    """``.replaced-*`` folders of runs that were killed before they started cleanly (their replaced run)."""
    out = Path(output_dir)
    return sorted(p for p in out.glob(f"{ASIDE_PREFIX}*") if p.is_dir()) if out.is_dir() else []


def plan_output_dir(output_dir: str, resume: str, overwrite: bool, new_config: dict[str, Any],
                    existed: bool | None = None) -> RunDirPlan:
    """Decide (reading only) what the run will do with ``output_dir``; RunDirError/CheckpointError if refused.
    ``existed``: whether the folder was there before this run (when taking the run lock just created it)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output_dir {output_dir!r} is a file; give a folder (created if missing)")
    present = present_run_files(out) if out.is_dir() else []
    plan = RunDirPlan(out, existed=out.exists() if existed is None else existed, present=present)
    for aside in leftover_asides(out):
        plan.notes.append(f"{aside} holds the files of a run that another run replaced and then was killed before "
                          "its training began; move them back into the folder, or delete it")
    if overwrite:
        plan.clear = list(present)
        if present:
            plan.notes.append(f"--overwrite_output_dir: replacing the earlier run's {', '.join(present)} in {out}")
        return plan
    checkpoints = out / "checkpoints"
    if resume == "none":
        if present:
            what = "a completed run" if read_status(out) == "completed" else "an earlier run"
            raise RunDirError(f"--output_dir {output_dir} already holds {what} ({', '.join(present)}); use "
                              "--resume auto to continue it, --overwrite_output_dir to replace it, or another "
                              "--output_dir")
        return plan
    tag, skipped = resolve_resume(checkpoints, resume)
    plan.skipped = skipped
    if tag is None:  # --resume auto with nothing to resume
        if skipped:
            problems = "; ".join(f"{t}: {p}" for t, p in skipped)
            raise RunDirError(f"--resume auto: no complete checkpoint in {checkpoints} ({problems}); delete the "
                              "broken checkpoints to start over there, or use --overwrite_output_dir")
        if read_status(out) == "completed":
            raise RunDirError(f"--resume auto: {output_dir} holds a completed run with no checkpoint to continue "
                              "from; use --overwrite_output_dir to run it again, or another --output_dir")
        plan.clear = list(present)  # the files of a run that ended before its first checkpoint
        if present:
            plan.notes.append(f"--resume auto: no checkpoint in {out}; starting a new run (replacing "
                              f"{', '.join(present)})")
        return plan
    plan.resume_tag = tag
    old = read_run_config(checkpoints, tag)
    if old is None:
        plan.notes.append(f"checkpoint {tag} has no run_config.json (written by an older cap_ds): its flags are "
                          "not compared with this run's")
    else:
        diffs = config_differences(old, new_config)
        if diffs:
            raise RunDirError(f"--resume {resume}: checkpoint {tag} was written by a run with other settings: "
                              f"{'; '.join(diffs)}. A resumed run must compute the same thing: use the old values, "
                              "or start a new run (--overwrite_output_dir or another --output_dir)")
    return plan


__all__ = ["ASIDE_PREFIX", "CheckpointError", "MAY_CHANGE_ON_RESUME", "RUN_FILES", "RunDirError", "RunDirPlan",
           "config_differences", "leftover_asides", "plan_output_dir", "present_run_files", "run_config"]
