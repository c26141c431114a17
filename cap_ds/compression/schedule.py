"""Cubic sparsity schedule with initial/final warm-up (Zhu & Gupta 2017, as in Sanh et al.'s movement pruning).

The schedule is written in terms of two step offsets, as in DeepSpeed's compression config:
``schedule_offset`` (end of the dense warm-up) and ``schedule_offset_end`` (from here on the final value holds).
The reference code's (initial_warmup, final_warmup, warmup_steps) map to
``offset = initial_warmup * warmup_steps`` and ``offset_end = total_steps - final_warmup * warmup_steps``.
"""

from __future__ import annotations


def cubic_schedule(step: int, offset: int, offset_end: int, initial: float, final: float) -> float:
    """Value at ``step``: ``initial`` up to ``offset``, cubic ramp, ``final`` from ``offset_end`` on."""
    if step <= offset:
        return float(initial)
    if step >= offset_end:
        return float(final)
    progress = (step - offset) / (offset_end - offset)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


def warmup_offsets(total_steps: int, warmup_steps: int, initial_warmup: float, final_warmup: float) -> tuple[int, int]:
    """Reference-code offsets; clipped so that the ramp is never negative on short runs."""
    offset = int(round(initial_warmup * warmup_steps))
    offset_end = int(round(total_steps - final_warmup * warmup_steps))
    if offset_end <= offset:
        raise ValueError(
            f"pruning schedule is empty: total steps {total_steps} leave no room for the ramp between "
            f"initial_warmup*warmup_steps={offset} and total-final_warmup*warmup_steps={offset_end}; "
            "lower --warmup_steps/--warmup_ratio or raise --num_train_epochs/--max_steps"
        )
    return offset, offset_end
