"""Count host syncs per training step of a real ``cap_ds/train.py`` run, by phase of the loop and by call site.

Runs the trainer in this process (``cap_ds.train.cli``) and attributes every sync to the loop's phase at that
moment (``step``: everything inside ``CapTrainer.train`` outside the phases below; ``check``, ``log``, ``eval``,
``snapshot``, ``save``, ``epoch_start``; ``setup`` before the loop) and to its innermost caller outside torch:
``cap_ds`` (our code), ``deepspeed``, ``dataloader`` (anything under torch's DataLoader: samplers and collate work
on host data) or ``other`` (transformers, ...).

Two ways to see a sync:
- ``--mode reads`` (any device; the CPU check of issue 22): every host read of a tensor, seen through a
  ``TorchFunctionMode``: ``item``, ``tolist``, ``bool``/``int``/``float``/``index`` of a tensor, ``nonzero``,
  ``cpu``/``numpy``/``.to(cpu)``, and indexing with a boolean tensor (its output size is a read). On the CPU these
  are not syncs, but each one is one on CUDA when the tensor lives there: the step keeps host-side data (``idx``,
  sampled rows) in host tensors it never reads, so a zero here means zero on CUDA for the same code path (force the
  device-path selection with ``CAP_DS_TOPK=radix``).
  Over-counts in one way: on the CPU a ``.to(device)`` bound for the accelerator is a ``.to(cpu)`` too, so
  DeepSpeed's figure there (its per-tensor norms move each norm to the accelerator) is an upper bound.
- ``--mode cuda``: ``torch.cuda.set_sync_debug_mode("warn")``, which reports each synchronizing CUDA call.

    python benchmarks/count_syncs.py --out syncs.json [--mode reads|cuda] -- <train.py flags>

Writes a JSON summary: optimizer steps, syncs per steady step by source, counts per (phase, source, site).
Steady steps are the loop's steps after its first optimizer step (the first builds masks and caches).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

MODE = "reads"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.launch import split_train_argv  # noqa: E402

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "cpu", "numpy",
         "masked_select", "unique", "unique_consecutive"}
PHASES = {"_check_agreed": "check", "_log_train": "log", "_eval_and_log": "eval", "_snapshot": "snapshot",
          "save_checkpoint": "save", "_epoch_start": "epoch_start", "_preempt": "save"}
TORCH_DIR = os.path.dirname(torch.__file__)
HERE = os.path.abspath(__file__)


class Recorder:
    def __init__(self) -> None:
        self.trainer = None
        self.phase: list[str] = ["setup"]
        self.counts: collections.Counter = collections.Counter()
        self.step_counts: collections.Counter = collections.Counter()  # (source, global_step) in phase "step"

    def site(self) -> tuple[str, str]:
        """(source, file:line function) of the innermost caller outside torch and this file."""
        frame = sys._getframe(2)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if not path.startswith(TORCH_DIR) and path != HERE and "/torch/" not in path \
                    and not path.endswith("warnings.py"):
                break
            frame = frame.f_back
        outer = sys._getframe(2)
        while outer is not None:  # the data loader works on host data by design (samplers, collate)
            if "torch/utils/data/" in outer.f_code.co_filename:
                where = frame or outer
                return "dataloader", f"{os.path.basename(where.f_code.co_filename)}:{where.f_lineno}"
            outer = outer.f_back
        if frame is None:
            return "other", "?"
        path = frame.f_code.co_filename
        if "/cap_ds/" in path:
            source = "cap_ds"
            path = path[path.index("/cap_ds/") + 1:]
        elif "/deepspeed/" in path:
            source = "deepspeed"
            path = path[path.index("/deepspeed/") + 1:]
        else:
            source = "other"
            path = os.path.basename(path)
        return source, f"{path}:{frame.f_lineno} {frame.f_code.co_name}"

    def record(self) -> None:
        source, site = self.site()
        phase = self.phase[-1]
        self.counts[(phase, source, site)] += 1
        if phase == "step" and self.trainer is not None:
            self.step_counts[(source, self.trainer.global_step)] += 1


def is_read(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name in READS:
        return True
    if name == "to":  # a copy to the host (on the CPU every tensor is there: counted all the same)
        targets = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
        return any(t is not None and torch.device(t).type == "cpu" for t in targets)
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        index = args[1] if len(args) > 1 else None
        items = index if isinstance(index, (tuple, list)) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)
    return False



class ReadCounter(TorchFunctionMode):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_read(func, args, kwargs):
            self.recorder.record()
        return func(*args, **kwargs)


def instrument(recorder: Recorder) -> None:
    """Follow the trainer's phases: remember the trainer, and name the phase while each of its methods runs."""
    from cap_ds.training import trainer as trainer_module

    cls = trainer_module.CapTrainer
    init = cls.__init__

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        recorder.trainer = self

    cls.__init__ = patched_init
    train = cls.train

    def patched_train(self, *args, **kwargs):
        recorder.phase.append("step")
        try:
            return train(self, *args, **kwargs)
        finally:
            recorder.phase.pop()

    cls.train = patched_train
    for method, phase in PHASES.items():
        original = getattr(cls, method)

        def wrapped(self, *args, _original=original, _phase=phase, **kwargs):
            recorder.phase.append(_phase)
            try:
                return _original(self, *args, **kwargs)
            finally:
                recorder.phase.pop()

        setattr(cls, method, wrapped)


def summarize(recorder: Recorder, exit_code: int) -> dict:
    steps = recorder.trainer.global_step if recorder.trainer is not None else 0
    steady = list(range(1, steps))  # reads attributed to step g: the tail of step g and the body of step g + 1
    per_step = {}
    for source in ("cap_ds", "deepspeed", "other", "dataloader"):
        counts = [recorder.step_counts[(source, g)] for g in steady]
        per_step[source] = {"mean": sum(counts) / len(counts) if counts else 0.0, "max": max(counts, default=0)}
    by_phase: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (phase, source, site), n in sorted(recorder.counts.items(), key=lambda kv: -kv[1]):
        by_phase[phase][f"{source} {site}"] = n
    return {"mode": MODE, "exit_code": exit_code, "steps": steps, "steady_steps": len(steady),
            "syncs_per_steady_step": per_step,
            "step_sites": {f"{src} step{g}": n for (src, g), n in sorted(recorder.step_counts.items())
                           if g >= 1 and n},
            "by_phase": by_phase}


def main(argv: list[str] | None = None) -> dict:
    global MODE
    own, train_argv = split_train_argv(sys.argv[1:] if argv is None else argv,
                                       "count_syncs.py --out FILE [--mode reads|cuda] -- <train.py flags>")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON summary to write")
    ap.add_argument("--mode", choices=["reads", "cuda"], default="reads")
    args = ap.parse_args(own)
    MODE = args.mode
    from cap_ds.train import cli

    recorder = Recorder()
    instrument(recorder)
    if args.mode == "cuda":
        def showwarning(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" in str(message).lower():
                recorder.record()
            else:
                _showwarning(message, category, filename, lineno, file, line)

        _showwarning = warnings.showwarning
        warnings.showwarning = showwarning
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        code = cli(train_argv)
        torch.cuda.set_sync_debug_mode("default")
    else:
        with ReadCounter(recorder):
            code = cli(train_argv)
    summary = summarize(recorder, code)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({"mode": MODE, "exit_code": code, "steps": summary["steps"],
                      "syncs_per_steady_step": summary["syncs_per_steady_step"]}))
    return summary


if __name__ == "__main__":
    main()
