"""Per-optimizer-step wall time, reported as a steady-state median (issue 15).

The mean over every step overstates short runs: the first steps pay one-off costs (kernel JIT builds, cuDNN and
allocator warm-up, DeepSpeed's first-step bookkeeping). ``step_time_s`` is therefore the MEDIAN over the steady-state
steps: each process drops its first ``warmup_steps(n) = max(5, ceil(0.10 * n))`` optimizer steps, ``n`` being the
steps that process timed (whichever is more: 5 steps, or the first 10 %). After a resume the new process warms up
again, so its own first steps are dropped too; the earlier processes' steps come from the checkpoint and still
count (issue 13: throughput covers the whole run, not only the steps after the resume).

A run too short to have any steady-state step (every process timed <= its warm-up) reports the median of all its
steps but each process's first; a one-step run reports that step. ``train_examples_per_second`` is the mean
examples per optimizer step over all timed steps divided by ``step_time_s`` (the median), i.e. the steady-state rate.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

WARMUP_MIN_STEPS = 5
WARMUP_FRACTION = 0.10


def warmup_steps(n: int) -> int:
    """Steps dropped from the start of a process that timed ``n`` optimizer steps: max(5, ceil(10 % of n))."""
    return max(WARMUP_MIN_STEPS, math.ceil(WARMUP_FRACTION * n - 1e-9))


class StepTimer:
    """Records each optimizer step's duration (the sum of its micro-steps) and examples; survives a resume."""

    def __init__(self) -> None:
        # One list of step durations per process (segment); earlier segments come from checkpoints.
        self.segments: list[list[float]] = [[]]
        self.examples = 0
        self._micro_seconds = 0.0
        self._micro_examples = 0

    def add_micro(self, seconds: float, examples: int) -> None:
        """One timed micro-batch (forward, losses, backward, engine step); an optimizer step has one or more."""
        self._micro_seconds += float(seconds)
        self._micro_examples += int(examples)

    def end_step(self) -> None:
        """Close the optimizer step the micro-batches since the last call belong to."""
        self.segments[-1].append(self._micro_seconds)
        self.examples += self._micro_examples
        self._micro_seconds, self._micro_examples = 0.0, 0

    def record(self, seconds: float, examples: int) -> None:
        """A whole optimizer step at once (``add_micro`` + ``end_step``)."""
        self.add_micro(seconds, examples)
        self.end_step()

    @property
    def steps(self) -> int:
        return sum(len(seg) for seg in self.segments)

    def steady_durations(self) -> list[float]:
        """The steps the median is taken over (see the module docstring for the warm-up and short-run rule)."""
        steady = [t for seg in self.segments for t in seg[warmup_steps(len(seg)):]]
        if not steady:
            steady = [t for seg in self.segments for t in seg[1:]]
        if not steady:
            steady = [t for seg in self.segments for t in seg]
        return steady

    def metrics(self) -> dict[str, float | int]:
        """The metrics.json fields: ``step_time_s`` (steady-state median), ``first_step_time_s`` (the run's first
        step), ``step_time_mean_s`` (all steps), ``train_examples_per_step`` and ``train_examples_per_second``
        (examples per step / ``step_time_s``), and how many steps the median covers. Zeros before any step."""
        every = [t for seg in self.segments for t in seg]
        if not every:
            return {"step_time_s": 0.0, "first_step_time_s": 0.0, "step_time_mean_s": 0.0,
                    "step_time_steady_steps": 0, "train_examples_per_step": 0.0, "train_examples_per_second": 0.0}
        steady = self.steady_durations()
        median = statistics.median(steady)
        per_step = self.examples / len(every)
        return {"step_time_s": median, "first_step_time_s": every[0], "step_time_mean_s": sum(every) / len(every),
                "step_time_steady_steps": len(steady), "train_examples_per_step": per_step,
                "train_examples_per_second": per_step / max(median, 1e-12)}

    def state_dict(self) -> dict[str, Any]:
        return {"segments": [list(seg) for seg in self.segments if seg], "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the earlier processes' steps and open a new segment for this one (None: a checkpoint written
        before the timer existed; only this process's steps are timed)."""
        if state is None:
            self.__init__()
            return
        self.segments = [[float(t) for t in seg] for seg in state["segments"]] + [[]]
        self.examples = int(state["examples"])
        self._micro_seconds, self._micro_examples = 0.0, 0
