"""How a run scores its dev set from the gathered logits: the task's metrics for sequence tasks, or, for
extractive QA, text spans post-processed from the start/end logits of every window and scored with SQuAD's
exact match and F1 (``qa_metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from cap_ds.data.metrics import compute_metrics
from cap_ds.data.qa import QaPredictionSettings, postprocess
from cap_ds.data.qa_metrics import squad_metrics
from cap_ds.data.tasks import TaskSpec


@dataclass(frozen=True)
class QaEvalSet:
    """What turns window logits into answers: the dev questions, their windows (``example_idx`` and
    ``offset_mapping`` per window, in window ``idx`` order) and the span settings."""

    examples: datasets.Dataset
    features: datasets.Dataset
    settings: QaPredictionSettings


@dataclass(frozen=True)
class Scorer:
    """``scorer(logits, labels)`` -> metrics; ``logits`` in dev-set order (``[N, C]``, ``[N, 1]`` or, for QA,
    ``[windows, 2, L]``)."""

    task: TaskSpec
    qa: QaEvalSet | None = None

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        if self.qa is not None:
            return squad_metrics(self.answers(logits), self.qa.examples)
        if self.task.is_regression:
            return compute_metrics(self.task, np.asarray(logits).reshape(-1), labels)
        return compute_metrics(self.task, logits, np.asarray(labels).astype(np.int64))

    def answers(self, logits: np.ndarray) -> dict[str, str]:
        """QA: question id -> predicted answer text ("" for no answer)."""
        if self.qa is None:
            raise ValueError(f"task {self.task.name!r} has no text answers")
        logits = np.asarray(logits, dtype=np.float32)
        return postprocess(self.qa.examples, self.qa.features, logits[:, 0], logits[:, 1], self.qa.settings)
