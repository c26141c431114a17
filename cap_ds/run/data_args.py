"""The data flags (HF ``run_glue`` / ``run_classification`` / ``run_qa`` conventions): a GLUE task, the user's own
files or hub dataset, and question answering's windows and spans; their checks, and the ``DataSource`` the data
layer reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cap_ds.data.files import DataFiles
from cap_ds.data.qa import QaPredictionSettings
from cap_ds.data.sources import DataSource
from cap_ds.data.tasks import KINDS, get_task
from cap_ds.runtime.errors import UserError

# [CLS] a [SEP] b [SEP]: a pair's special tokens and a token of each sentence. Below that the tokenizer ignores
# the limit (a pair truncated to 2 comes out whole).
MIN_SEQ_LENGTH = 5
FILE_FLAGS = ("train_file", "validation_file", "test_file", "dataset_name")


class ArgumentError(UserError, ValueError):
    """A flag value that cannot work; raised before training starts."""


@dataclass(frozen=True)
class DataArguments:
    task_name: str | None = field(default=None, metadata={
        "help": "GLUE task: sst2, cola, stsb, mrpc, rte, qnli, mnli, qqp (default sst2 when no --train_file or "
                "--dataset_name is given)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Local GLUE folder (with SST-2/, CoLA/, ... or the task folder itself). Default: the hub."})
    train_file: str | None = field(default=None, metadata={
        "help": "Your training data: .csv, .tsv, .json, .jsonl or .parquet (QA: SQuAD JSON, flat JSON or JSON "
                "Lines, .gz allowed)."})
    validation_file: str | None = field(default=None, metadata={"help": "Your evaluation data (same formats)."})
    test_file: str | None = field(default=None, metadata={
        "help": "Rows to predict after training (classification/regression): predict_results.jsonl."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A hub dataset with train and validation splits (its local cache when offline)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    text_column_names: str | None = field(default=None, metadata={
        "help": "One or two text columns, comma-separated (default: sentence1,sentence2 or the first of sentence, "
                "text, review, content)."})
    label_column_name: str | None = field(default=None, metadata={"help": "The label column (default: label)."})
    task_type: str | None = field(default=None, metadata={
        "help": "classification, regression or question_answering. Default: inferred from the labels (strings or "
                "integers: classification; fractional numbers: regression).", "choices": list(KINDS)})
    metric_name: str | None = field(default=None, metadata={
        "help": "Primary metric of your classification (accuracy, macro_f1, matthews_correlation) or regression "
                "(pearson, spearmanr) data; accuracy and macro_f1 are always reported."})
    max_seq_length: int = field(default=128, metadata={
        "help": "Truncate inputs to this many tokens, special tokens included (at least 5; QA: the window length, "
                "e.g. 384)."})
    doc_stride: int = field(default=128, metadata={
        "help": "QA: tokens shared by consecutive windows of a long context (0: one window, truncated)."})
    n_best_size: int = field(default=20, metadata={"help": "QA: start and end candidates per window."})
    max_answer_length: int = field(default=30, metadata={"help": "QA: longest answer span, in tokens."})
    version_2_with_negative: bool = field(default=False, metadata={
        "help": "QA: some questions have no answer (SQuAD 2.0); the null answer is the [CLS] span."})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "QA with --version_2_with_negative: predict no answer when null score - best span score exceeds it."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation rows."})

    @property
    def uses_files(self) -> bool:
        """A user's files or hub dataset rather than a GLUE task."""
        return any(getattr(self, name) is not None for name in FILE_FLAGS)

    @property
    def is_qa(self) -> bool:
        return self.task_type == "question_answering"

    def source(self) -> DataSource:
        """What the data layer reads."""
        files = None
        if self.uses_files or self.is_qa:
            columns = tuple(c.strip() for c in self.text_column_names.split(",")) if self.text_column_names else None
            files = DataFiles(train_file=self.train_file, validation_file=self.validation_file,
                              test_file=self.test_file, dataset_name=self.dataset_name,
                              dataset_config_name=self.dataset_config_name, text_column_names=columns,
                              label_column_name=self.label_column_name, task_type=self.task_type,
                              metric_name=self.metric_name)
        qa = QaPredictionSettings(n_best_size=self.n_best_size, max_answer_length=self.max_answer_length,
                                  version_2_with_negative=self.version_2_with_negative,
                                  null_score_diff_threshold=self.null_score_diff_threshold)
        return DataSource(task_name=self.task_name, data_dir=self.data_dir, files=files,
                          max_seq_length=self.max_seq_length, max_train_samples=self.max_train_samples,
                          max_eval_samples=self.max_eval_samples, doc_stride=self.doc_stride, qa=qa)


def validate_data(dargs: DataArguments) -> None:
    """Every data flag alone and together; an ArgumentError-like one line naming the flag."""
    if dargs.task_name is not None:
        try:
            get_task(dargs.task_name)
        except ValueError as err:
            raise ArgumentError(f"--task_name: {err}") from err
        given = [f"--{n}" for n in FILE_FLAGS if getattr(dargs, n) is not None]
        if given or dargs.task_type is not None:
            raise ArgumentError(f"--task_name {dargs.task_name} names a GLUE task, and {', '.join(given) or '--task_type'}"
                                    " your own data: give one of them")
    if dargs.data_dir is not None and dargs.uses_files:
        raise ArgumentError("--data_dir is a GLUE folder; with --train_file/--validation_file/--dataset_name "
                                "leave it out")
    if dargs.data_dir is not None and not os.path.isdir(dargs.data_dir):
        raise ArgumentError(f"--data_dir {dargs.data_dir!r} is not a directory")
    if dargs.task_type is not None and not dargs.uses_files:
        raise ArgumentError(f"--task_type {dargs.task_type} needs your data: --train_file and --validation_file, "
                                "or --dataset_name")
    if dargs.uses_files and dargs.dataset_name is None:
        for name in ("train_file", "validation_file"):
            if getattr(dargs, name) is None:
                raise ArgumentError(f"--{name} is missing: your own data needs --train_file and "
                                        "--validation_file (or --dataset_name)")
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(dargs, name)
        if path is not None and not os.path.isfile(path):
            raise ArgumentError(f"--{name} {path!r}: file not found")
    if dargs.is_qa and dargs.test_file is not None:
        raise ArgumentError("--test_file: question answering runs evaluate --validation_file; predictions for "
                                "it are written to eval_predictions.json")
    if dargs.text_column_names is not None:
        columns = [c.strip() for c in dargs.text_column_names.split(",")]
        if not 1 <= len(columns) <= 2 or not all(columns):
            raise ArgumentError(f"--text_column_names {dargs.text_column_names!r}: give one or two column names, "
                                    "comma-separated")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(dargs, name)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {value}")
    if dargs.max_seq_length < MIN_SEQ_LENGTH:
        raise ArgumentError(f"--max_seq_length must be >= {MIN_SEQ_LENGTH}, got {dargs.max_seq_length} (tokens "
                                "per input, [CLS] and [SEP] included; 128 is the usual GLUE value)")
    if dargs.doc_stride < 0:
        raise ArgumentError(f"--doc_stride must be >= 0, got {dargs.doc_stride} (0: no windows)")
    for name in ("n_best_size", "max_answer_length"):
        if getattr(dargs, name) < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {getattr(dargs, name)}")
