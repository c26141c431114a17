"""What a task is: its kind (classification, regression, extractive question answering), text columns, label
names and metrics. The GLUE tasks are fixed specs (label order identical to the HF hub ``nyu-mll/glue``, so local
files and the hub agree; ``get_task`` resolves a ``--task_name``); a user's own data gets a spec built from its
files (``data/files.py``, ``data/squad.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------------------------
KINDS = ("classification", "regression", "question_answering")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task.

    ``label_names`` follow the label order of the HF hub ``nyu-mll/glue`` for GLUE, so that class ids are the same
    whether the data comes from local TSV files or from the hub; the sorted label values for a user's files.
    ``None`` means regression (STS-B) or question answering (``question_answering`` set). ``metrics``: the
    metrics reported besides accuracy (classification), e.g. ``matthews_correlation``, ``f1`` (binary, positive
    class 1), ``macro_f1``.
    """

    name: str
    glue_dir: str
    hub_config: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    primary_metric: str
    eval_file: str = "dev.tsv"
    eval_split: str = "validation"
    score_range: tuple[float, float] | None = None  # regression: the documented range of the gold scores
    metrics: tuple[str, ...] = ()
    question_answering: bool = False

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        if self.question_answering:
            return "question_answering"
        return "regression" if self.label_names is None else "classification"

    @property
    def is_regression(self) -> bool:
        """True for STS-B-like tasks with a single real-valued target."""
        return self.kind == "regression"

    @property
    def is_qa(self) -> bool:
        """True for extractive question answering (start and end logits over the tokens)."""
        return self.question_answering

    @property
    def num_labels(self) -> int:
        """Size of the model head: 1 for regression, 2 for QA (start, end), else the number of classes."""
        if self.question_answering:
            return 2
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def label2id(self) -> dict[str, int]:
        """Label name -> class id (``{"score": 0}`` for regression, consistent with ``num_labels == 1``)."""
        if self.label_names is None:
            return {"score": 0}
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> label name, e.g. for a HF model config (``{0: "score"}`` for regression)."""
        return {i: name for name, i in self.label2id.items()}


_PAIR = ("sentence1", "sentence2")

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "SST-2", "sst2", ("sentence",), ("negative", "positive"), "accuracy"),
    "cola": TaskSpec(
        "cola", "CoLA", "cola", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation",
        metrics=("matthews_correlation",),
    ),
    "stsb": TaskSpec("stsb", "STS-B", "stsb", _PAIR, None, "pearson", score_range=(0.0, 5.0)),
    "mrpc": TaskSpec("mrpc", "MRPC", "mrpc", _PAIR, ("not_equivalent", "equivalent"), "accuracy", metrics=("f1",)),
    "rte": TaskSpec("rte", "RTE", "rte", _PAIR, ("entailment", "not_entailment"), "accuracy"),
    "qnli": TaskSpec("qnli", "QNLI", "qnli", _PAIR, ("entailment", "not_entailment"), "accuracy"),
    "mnli": TaskSpec(
        "mnli",
        "MNLI",
        "mnli",
        _PAIR,
        ("entailment", "neutral", "contradiction"),
        "accuracy",
        eval_file="dev_matched.tsv",
        eval_split="validation_matched",
    ),
    "qqp": TaskSpec("qqp", "QQP", "qqp", _PAIR, ("not_duplicate", "duplicate"), "accuracy", metrics=("f1",)),
}


def _normalise_task_name(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case-insensitively and ignoring ``-``/``_`` (so ``SST-2`` == ``sst2``)."""
    if not isinstance(name, str):
        raise ValueError(f"task name must be a string, got {name!r}; allowed: {', '.join(TASKS)}")
    key = _normalise_task_name(name)
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[key]


