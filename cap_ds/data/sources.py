"""Where a run's rows come from, as one choice: a GLUE task (TSV folder or hub), the user's own files or hub
dataset for classification/regression (``files``), or extractive question answering (``squad``, ``qa``).

``inspect_source`` reads and checks the data before anything else happens (the task and, where it is known
without tokenising, the training-set size); ``load_task_data`` returns the tokenised training rows, the dev rows
the model reads, the dev scorer and the test rows to predict."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets

from cap_ds.data.batches import tokenize_dataset
from cap_ds.data.files import DataFiles, UserData, data_name, load_user_data
from cap_ds.data.glue import count_local_rows, load_glue_split
from cap_ds.data.qa import QaPredictionSettings, prepare_features
from cap_ds.data.scoring import QaEvalSet, Scorer
from cap_ds.data.squad import load_qa_split, qa_task
from cap_ds.data.tasks import TaskSpec, get_task
from cap_ds.runtime.errors import UserError

logger = logging.getLogger(__name__)

QA_MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "idx")


@dataclass(frozen=True)
class DataSource:
    """The data flags of a run: ``task_name`` (GLUE, with ``data_dir`` or the hub) or ``files`` (a user's files
    or hub dataset; ``files.task_type`` "question_answering" for QA), the sequence length and sample limits, and
    QA's windows (``doc_stride``, 0: none) and span settings."""

    task_name: str | None = None
    data_dir: str | None = None
    files: DataFiles | None = None
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    doc_stride: int = 128
    qa: QaPredictionSettings = QaPredictionSettings()

    @property
    def is_qa(self) -> bool:
        return self.files is not None and self.files.task_type == "question_answering"


@dataclass(frozen=True)
class TaskData:
    """A run's rows: ``train`` (tokenised, ``labels`` + ``idx``: one row per example, or per window for QA),
    ``evaluate`` (the dev rows the model reads), ``scorer`` (their metrics) and ``test`` (rows to predict, or
    None); ``eval_examples`` counts dev examples (questions for QA)."""

    task: TaskSpec
    train: datasets.Dataset
    evaluate: datasets.Dataset
    scorer: Scorer
    test: datasets.Dataset | None = None
    eval_examples: int = 0


def _qa_split(source: DataSource, split: str) -> datasets.Dataset:
    files = source.files
    path = files.train_file if split == "train" else files.validation_file
    if path is None and files.dataset_name is None:
        flag = "--train_file" if split == "train" else "--validation_file"
        raise UserError(f"{flag} is missing: question answering needs a training and a validation file "
                        "(SQuAD JSON, flat JSON or JSON Lines) or --dataset_name")
    return load_qa_split(path, split=split, dataset_name=None if path else files.dataset_name,
                         dataset_config_name=files.dataset_config_name,
                         version_2_with_negative=source.qa.version_2_with_negative,
                         max_samples=source.max_train_samples if split == "train" else source.max_eval_samples,
                         flag="--train_file" if split == "train" else "--validation_file")


# The last user data this process read, keyed by the flags and each local file's size and modification time:
# the preflight check and the run read a user's files once, and a file changed in between is read again.
_LAST_READ: dict[tuple, UserData] = {}


def _file_stamps(files: DataFiles) -> tuple:
    stamps = []
    for path in (files.train_file, files.validation_file, files.test_file):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None  # load_user_data names the missing file
        stamps.append(None if st is None else (path, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _user_data(source: DataSource) -> UserData:
    """``load_user_data`` for ``source``, read once per process while the files are unchanged."""
    key = (source.files, source.max_train_samples, source.max_eval_samples, _file_stamps(source.files))
    if key not in _LAST_READ:
        data = load_user_data(source.files, source.max_train_samples, source.max_eval_samples)
        _LAST_READ.clear()
        _LAST_READ[key] = data
    return _LAST_READ[key]


def inspect_source(source: DataSource) -> tuple[TaskSpec, int | None]:
    """The task and the training-set size (None: known once loaded, e.g. hub GLUE data or QA windows), after
    reading and checking what can be read now; bad data is a one-line UserError."""
    if source.is_qa:
        for split in ("train", "validation"):
            _qa_split(source, split)
        return qa_task(data_name(source.files)), None
    if source.files is not None:
        data = _user_data(source)
        return data.task, len(data.train)
    task = get_task(source.task_name or "sst2")
    if source.data_dir is None:
        return task, None
    num_train = count_local_rows(task, "train", source.data_dir, source.max_train_samples)
    count_local_rows(task, "validation", source.data_dir, source.max_eval_samples)
    return task, num_train


def load_task_data(source: DataSource, tokenizer: Any) -> TaskData:
    """The run's tokenised rows and dev scorer (see :class:`TaskData`)."""
    if source.is_qa:
        return _load_qa(source, tokenizer)
    if source.files is not None:
        data = _user_data(source)
        task, splits = data.task, {"train": data.train, "validation": data.validation, "test": data.test}
    else:
        task = get_task(source.task_name or "sst2")
        splits = {split: load_glue_split(task, split, source.data_dir, limit) for split, limit in
                  (("train", source.max_train_samples), ("validation", source.max_eval_samples))}
        splits["test"] = None
    train, dev = (tokenize_dataset(splits[s], task, tokenizer, source.max_seq_length) for s in ("train", "validation"))
    test = splits["test"]
    if test is not None:
        if "label" not in test.column_names:  # unlabelled rows: a placeholder the collator carries, never scored
            test = test.add_column("label", [0.0 if task.is_regression else 0] * len(test))
        test = tokenize_dataset(test, task, tokenizer, source.max_seq_length)
    return TaskData(task, train, dev, Scorer(task), test, eval_examples=len(dev))


def _load_qa(source: DataSource, tokenizer: Any) -> TaskData:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"question answering maps answers through the tokenizer's character offsets, which only "
                        f"a fast tokenizer gives; {type(tokenizer).__name__} is not one (save a tokenizer.json "
                        "with the model)")
    task = qa_task(data_name(source.files))
    train_examples, dev_examples = _qa_split(source, "train"), _qa_split(source, "validation")
    train = prepare_features(train_examples, tokenizer, source.max_seq_length, source.doc_stride)
    dev = prepare_features(dev_examples, tokenizer, source.max_seq_length, source.doc_stride, for_eval=True)
    logger.info("question answering: %d training questions -> %d windows, %d dev questions -> %d windows "
                "(max_seq_length %d, doc_stride %d)", len(train_examples), len(train), len(dev_examples), len(dev),
                source.max_seq_length, source.doc_stride)
    keep = [c for c in QA_MODEL_COLUMNS if c in train.column_names]
    scorer = Scorer(task, QaEvalSet(dev_examples, dev, source.qa))
    return TaskData(task, train.select_columns(keep), dev.select_columns(keep), scorer,
                    eval_examples=len(dev_examples))
