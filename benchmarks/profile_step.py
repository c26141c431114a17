"""A ``torch.profiler`` table of training steps of a real ``cap_ds/train.py`` run (issue 22).

Runs the trainer in this process (``cap_ds.train.cli``) and profiles optimizer steps ``--step`` to
``--step + --active - 1`` (after a warm-up, so masks, caches and the allocator are settled): the profiler's schedule
advances at each optimizer step (``StepTimer.end_step``). Writes the operator table (sorted by device time on CUDA,
by CPU time otherwise) and, with ``--trace``, a Chrome trace.

    python benchmarks/profile_step.py --out profile.txt [--step 8 --active 1 --rows 40 --trace t.json] -- <train.py flags>
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.launch import split_train_argv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    own, train_argv = split_train_argv(sys.argv[1:] if argv is None else argv,
                                       "profile_step.py --out FILE [--step N --active K] -- <train.py flags>")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="text file for the operator table")
    ap.add_argument("--step", type=int, default=8, help="first profiled optimizer step (1-based)")
    ap.add_argument("--active", type=int, default=1, help="profiled optimizer steps")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--trace", default=None, help="also write a Chrome trace here")
    args = ap.parse_args(own)
    if args.step < 2 or args.active < 1:
        raise SystemExit("--step must be >= 2 (one warm-up step at least) and --active >= 1")

    from cap_ds.runtime import steptimer
    from cap_ds.train import cli

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, record_shapes=False,
                   schedule=schedule(wait=args.step - 2, warmup=1, active=args.active, repeat=1))
    end_step = steptimer.StepTimer.end_step

    def stepping(self, *a, **k):
        out = end_step(self, *a, **k)
        prof.step()
        return out

    steptimer.StepTimer.end_step = stepping
    with prof:
        code = cli(train_argv)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    header = (f"torch.profiler: optimizer steps {args.step}..{args.step + args.active - 1} of "
              f"{' '.join(train_argv)}\nexit code {code}; device "
              f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}; sorted by {key}\n")
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    Path(args.out).write_text(header + table + "\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(header + table)
    return code


if __name__ == "__main__":
    sys.exit(main())
