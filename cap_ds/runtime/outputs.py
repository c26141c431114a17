"""A model's output as one logits tensor, whatever its head: what training, evaluation, export checks and serving
all compare."""

from __future__ import annotations

from typing import Any

import torch


def output_logits(outputs: Any) -> torch.Tensor:
    """The head's logits as one tensor: ``[B, C]`` for sequence tasks, ``[B, 2, L]`` (start, end) for QA, so
    KD, the cached teacher logits, evaluation and serving treat both alike."""
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    return torch.stack((outputs.start_logits, outputs.end_logits), dim=1)
