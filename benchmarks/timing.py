"""Shared timing for the benchmark scripts: round-robin (interleaved) calls, median seconds per call.

Interleaving puts every candidate under the same machine load, so ratios measured in one run stay meaningful
on a busy box.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3,
                inference: bool = False) -> dict[str, float]:
    """Median seconds per call of each fn, timed round-robin after ``warmup`` calls each."""
    with torch.inference_mode(inference):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def add_host_memory_flag(parser) -> None:
    """``--host_memory``: whether freed activations stay in the process (see cap_ds/runtime/host_memory.py)."""
    from cap_ds.runtime.host_memory import CHOICES

    parser.add_argument("--host_memory", choices=CHOICES, default="retain",
                        help="CPU: retain (default): glibc keeps freed blocks for reuse, as a serving process "
                             "should (no page faults per forward); default: glibc's own behaviour")


def apply_host_memory(args) -> str:
    """Apply ``args.host_memory`` in this process; the mode in effect, for the printed header and JSON rows."""
    from cap_ds.runtime.host_memory import apply_choice

    return apply_choice(args.host_memory)


def int_list(parser, flag: str, value: str) -> list[int]:
    """A comma list of positive integers (``--batches 1,32``), or the parser's one-line error naming ``flag``."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        parser.error(f"{flag} {value!r}: a comma list of positive integers")
    return out


def append_jsonl(path: str | None, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (``--jsonl``); nothing when no path was given."""
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
