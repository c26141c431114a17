"""Reading a user's own classification or regression data (HF ``run_classification.py`` conventions: CSV, TSV,
JSON Lines, JSON, Parquet files or a hub dataset) into the shapes the GLUE path already returns (``glue.py``): a
``TaskSpec`` built from the data, and splits with the text columns, ``label`` (int64 class id or float32 score)
and a dense ``idx`` (CAP keeps per-example state). Every bad input is a one-line :class:`DataFileError` naming
the flag, file or value and what is allowed, so a user fixes it without reading a traceback."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from cap_ds.data.glue import hub_offline
from cap_ds.data.tasks import TaskSpec
from cap_ds.runtime.errors import Fault, UserError

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "regression")
METRICS = {"classification": ("accuracy", "macro_f1", "matthews_correlation"), "regression": ("pearson", "spearmanr")}
TEXT_GUESSES = ("sentence", "text", "review", "content")
# extension -> (datasets builder, builder options); a trailing ".gz" is read through the same builder.
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"sep": ","}), ".tsv": ("csv", {"sep": "\t"}), ".json": ("json", {}), ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
ALLOWED_EXTENSIONS = (*FORMATS, *(f"{e}.gz" for e in FORMATS if e != ".parquet"))


@dataclass(frozen=True)
class DataFiles:
    """Where a user's data is (files or a hub dataset) and how to read it: the ``--train_file``... flags."""

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset_name: str | None = None  # hub dataset (or local cache when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)
    dataset_config_name: str | None = None
    text_column_names: tuple[str, ...] | None = None  # one or two columns; None: infer
    label_column_name: str | None = None  # None: "label"
    task_type: str | None = None  # "classification" | "regression" | None (infer from the labels)
    metric_name: str | None = None  # None, or an extra / primary metric to report


class DataFileError(UserError, ValueError):
    """A user's data or data flags are unusable; the message is one line naming the flag/file/value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()) if "\n" in str(message) else str(message))


@dataclass(frozen=True)
class UserData:
    """A user's task and its splits, shaped like the GLUE splits (``test`` is None without ``--test_file``)."""

    task: TaskSpec
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset | None


@dataclass(frozen=True)
class _Split:
    """One raw split and how to name it in messages (``--train_file data/train.csv``)."""

    role: str  # train | validation | test
    where: str
    ds: datasets.Dataset


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(values: list[str] | tuple[str, ...], limit: int = 20) -> str:
    shown = ", ".join(_short(v, 40) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "") if values else "(none)"


def _cause(err: BaseException) -> str:
    """The innermost cause's first line (datasets wraps reader errors in a generic DatasetGenerationError)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# --------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------
def _check_args(files: DataFiles, max_train_samples: int | None, max_eval_samples: int | None) -> None:
    for flag, value in (("--max_train_samples", max_train_samples), ("--max_eval_samples", max_eval_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataFileError(f"{flag} {value!r}: allowed: an integer >= 1, or none for all rows")
    if files.task_type not in (None, *TASK_TYPES):
        raise DataFileError(f"--task_type {files.task_type!r}: allowed: {', '.join(TASK_TYPES)} (or none: inferred "
                            "from the labels)")
    every = tuple(m for kind in TASK_TYPES for m in METRICS[kind])
    if files.metric_name is not None and files.metric_name not in every:
        raise DataFileError(f"--metric_name {files.metric_name!r}: allowed: {', '.join(every)}")
    names = files.text_column_names
    if names is not None and (not 1 <= len(names) <= 2 or not all(isinstance(n, str) and n for n in names)):
        raise DataFileError(f"--text_column_names {_short(tuple(names))}: allowed: one or two column names")
    label = files.label_column_name or "label"
    if names is not None and (label in names or {"label", "idx"} & set(names)):
        raise DataFileError(f"--text_column_names {', '.join(names)}: a text column cannot be the label column "
                            f"{label!r}, 'label' or 'idx'")
    if files.dataset_name and (files.train_file or files.validation_file or files.test_file):
        raise DataFileError(f"--dataset_name {files.dataset_name} given together with data files; allowed: either "
                            "--dataset_name or --train_file/--validation_file (and --test_file)")
    if not files.dataset_name:
        for flag, path in (("--train_file", files.train_file), ("--validation_file", files.validation_file)):
            if not path:
                raise DataFileError(f"{flag} is required with your own data (or pass --dataset_name)")


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
def _format(flag: str, path: str) -> tuple[str, dict[str, Any]]:
    name = path.lower()
    for ext in sorted(ALLOWED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext.removesuffix(".gz")]
    raise DataFileError(f"{flag} {path}: unknown file extension; allowed: {', '.join(ALLOWED_EXTENSIONS)}")


def read_table(flag: str, path: str, label: str = "label") -> datasets.Dataset:
    """One file (any allowed format, ``.gz`` too) as a Dataset, or a one-line :class:`DataFileError` naming ``flag``
    and the file (``cap_ds.run.speed --validation_file`` reads with it too); empty text stays "" (not NaN) while an
    empty label cell is a missing label."""
    builder, options = _format(flag, path)
    if not os.path.isfile(path):
        raise DataFileError(f"{flag} {path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{flag} {path}: the file is empty; allowed: a file with a header and rows")
    options = dict(options)
    if builder == "csv":
        options.update(keep_default_na=False, na_values={label: [""]})
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", **options)
        if builder == "json" and ds.column_names == ["data"] and len(ds) == 1:  # {"data": [records]}
            ds = datasets.load_dataset(builder, data_files=path, split="train", field="data")
    except Exception as err:
        if "corresponds to no data" in str(err):
            raise DataFileError(f"{flag} {path}: no rows in the file") from None
        raise DataFileError(f"{flag} {path}: could not read it as {builder} ({_cause(err)})") from None
    if len(ds) == 1 and ds.column_names and all(isinstance(ds.features[c], datasets.List) for c in ds.column_names):
        raise DataFileError(f"{flag} {path}: one JSON object with keys {_listing(ds.column_names)}; allowed: JSON "
                            'Lines, a list of records, or {"data": [records]}')
    if len(ds) == 0:
        raise DataFileError(f"{flag} {path}: no rows in the file")
    return ds


def _hub_error(files: DataFiles, err: BaseException) -> Exception:
    name = files.dataset_name + (f" (config {files.dataset_config_name})" if files.dataset_config_name else "")
    offline = hub_offline()
    if offline:
        return DataFileError(f"--dataset_name {name}: not in the local datasets cache and the HF hub is offline "
                             f"({offline}=1); pass --train_file and --validation_file, or unset {offline}")
    if isinstance(err, (ValueError, FileNotFoundError)) or type(err).__name__ == "DatasetNotFoundError":
        return DataFileError(f"--dataset_name {name}: could not load it ({_cause(err)})")
    return Fault(f"could not load --dataset_name {name} from the HF hub ({_cause(err)}); pass --train_file and "
                 "--validation_file to work from local files")


def _read_splits(files: DataFiles, label: str) -> list[_Split]:
    if files.dataset_name:
        try:
            found = datasets.load_dataset(files.dataset_name, files.dataset_config_name)
        except Exception as err:
            raise _hub_error(files, err) from None
        missing = [s for s in ("train", "validation") if s not in found]
        if missing:
            raise DataFileError(f"--dataset_name {files.dataset_name}: no {' or '.join(map(repr, missing))} split; "
                                f"its splits: {_listing(list(found))}; pass --train_file/--validation_file instead")
        out = [_Split(s, f"--dataset_name {files.dataset_name} split {s!r}", found[s]) for s in ("train", "validation")]
        for split in out:
            if len(split.ds) == 0:
                raise DataFileError(f"{split.where}: no rows")
        return out
    roles = (("train", "--train_file", files.train_file), ("validation", "--validation_file", files.validation_file),
             ("test", "--test_file", files.test_file))
    return [_Split(role, f"{flag} {path}", read_table(flag, path, label)) for role, flag, path in roles if path]


# --------------------------------------------------------------------------------------------------------
# Columns and labels
# --------------------------------------------------------------------------------------------------------
def guess_text_columns(columns: list[str], label: str) -> tuple[str, ...] | None:
    """The text column(s) of a table when none are named: sentence1 + sentence2, else the first of
    ``TEXT_GUESSES`` present (never the label); None when there is none."""
    if "sentence1" in columns and "sentence2" in columns:
        return ("sentence1", "sentence2")
    return next(((c,) for c in TEXT_GUESSES if c in columns and c != label), None)


def _text_columns(files: DataFiles, splits: list[_Split], label: str) -> tuple[str, ...]:
    train = splits[0]
    names = files.text_column_names
    if names is None:
        cols = train.ds.column_names
        names = guess_text_columns(cols, label)
        if names is None:
            raise DataFileError(f"{train.where}: no text column found (looked for sentence1+sentence2, "
                                f"{', '.join(TEXT_GUESSES)}); its columns: {_listing(cols)}; pass --text_column_names")
    for split in splits:
        for name in names:
            if name not in split.ds.column_names:
                raise DataFileError(f"--text_column_names: column {name!r} not in {split.where}; its columns: "
                                    f"{_listing(split.ds.column_names)}")
    return tuple(names)


def _label_values(split: _Split, label: str) -> list[Any]:
    """The label column as Python values; ClassLabel ids become their names (so the hub's order is kept)."""
    feature = split.ds.features[label]
    values = split.ds[label]
    if isinstance(feature, datasets.ClassLabel):
        return [None if v is None or v < 0 else feature.names[v] for v in values]
    return list(values)


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else type(value).__name__


def _check_values(split: _Split, label: str, values: list[Any]) -> str:
    """Fail on a missing or mixed label; return the split's label type (string, bool or number)."""
    first: dict[str, tuple[int, Any]] = {}
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise DataFileError(f"{split.where}: data row {row + 1} has no value in the label column {label!r}; "
                                "allowed: every row labelled")
        if isinstance(value, float) and math.isinf(value):
            raise DataFileError(f"{split.where}: data row {row + 1} has label {value}; allowed: finite numbers")
        first.setdefault(_value_type(value), (row, value))
    odd = [t for t in first if t not in ("string", "bool", "number")]
    if odd:
        row, value = first[odd[0]]
        raise DataFileError(f"{split.where}: data row {row + 1} has label {_short(value)} ({odd[0]}); allowed: one "
                            "string or number per row")
    if len(first) > 1:
        examples = ", ".join(f"{t} {_short(v)} (data row {r + 1})" for t, (r, v) in first.items())
        raise DataFileError(f"{split.where}: the label column {label!r} mixes value types: {examples}; allowed: "
                            "all strings, all booleans, or all numbers")
    return next(iter(first))


def _infer_kind(split: _Split, values: list[Any], value_type: str, task_type: str | None) -> str:
    """HF ``run_classification``: string/bool/int labels classify, float labels regress (unless told otherwise)."""
    floats = [v for v in values if isinstance(v, float)]
    fraction = next((v for v in floats if not float(v).is_integer()), None)
    if task_type == "regression" and value_type != "number":
        raise DataFileError(f"--task_type regression but {split.where} has {value_type} labels (e.g. "
                            f"{_short(values[0])}); allowed: numbers, or --task_type classification")
    if task_type == "classification" and fraction is not None:
        raise DataFileError(f"--task_type classification but {split.where} has a fractional label ({fraction}); "
                            "allowed: strings or whole numbers, or --task_type regression")
    if task_type is not None:
        return task_type
    return "regression" if floats else "classification"


def _class_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_names(split: _Split, label: str, values: list[Any]) -> tuple[str, ...]:
    feature = split.ds.features[label]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    distinct = set(values)
    ordered = sorted(distinct, key=float) if all(isinstance(v, (int, float)) for v in distinct) else sorted(distinct)
    return tuple(dict.fromkeys(_class_key(v) for v in ordered))


def _encode(split: _Split, values: list[Any], kind: str, label_ids: dict[str, int], train_where: str) -> list[Any]:
    if kind == "regression":
        return [float(v) for v in values]
    ids = []
    for row, value in enumerate(values):
        key = _class_key(value)
        if key not in label_ids:
            raise DataFileError(f"{split.where}: label {_short(value)} (data row {row + 1}) never occurs in the "
                                f"training data ({train_where}); labels seen in training: {_listing(list(label_ids))}")
        ids.append(label_ids[key])
    return ids


# --------------------------------------------------------------------------------------------------------
# Building the task and the splits
# --------------------------------------------------------------------------------------------------------
def _metrics(files: DataFiles, kind: str) -> tuple[str, tuple[str, ...]]:
    """(primary metric, extra metrics) for ``kind``; a metric of the other kind is a DataFileError."""
    name = files.metric_name
    if name is not None and name not in METRICS[kind]:
        raise DataFileError(f"--metric_name {name!r} does not fit a {kind} task; allowed: {', '.join(METRICS[kind])}")
    if kind == "regression":
        return name or "pearson", ()
    extra = ("macro_f1", "matthews_correlation") if name == "matthews_correlation" else ("macro_f1",)
    return name or "accuracy", extra


GENERIC_STEMS = ("train", "training", "data", "dataset", "all")


def data_name(files: DataFiles) -> str:
    """The name a user's data goes by in metrics.json and the model card: the hub dataset's name, else the
    training file's name without its extension, or its folder's name when that is generic (``reviews/train.csv``
    -> ``reviews``)."""
    if files.dataset_name:
        return Path(files.dataset_name.rstrip("/")).name or files.dataset_name
    path = Path(str(files.train_file))
    name = path.name.split(".")[0] or path.name
    folder = path.resolve().parent.name
    if name.lower() in GENERIC_STEMS and folder and folder.lower() not in GENERIC_STEMS:
        return folder
    return name



def _build(split: _Split, text_fields: tuple[str, ...], labels: list[Any] | None, limit: int | None,
           kind: str) -> datasets.Dataset:
    """The split with ``text_fields``, ``label`` (when labelled) and ``idx`` 0..n-1 after truncation."""
    ds = split.ds if limit is None or limit >= len(split.ds) else split.ds.select(range(limit))
    feats: dict[str, Any] = {f: datasets.Value("string") for f in text_fields}
    columns: dict[str, list[Any]] = {}
    for name in text_fields:
        columns[name] = ["" if v is None else v if isinstance(v, str) else str(v) for v in ds[name]]
    if labels is not None:
        feats["label"] = datasets.Value("float32" if kind == "regression" else "int64")
        columns["label"] = labels[: len(ds)]
    feats["idx"] = datasets.Value("int64")
    columns["idx"] = list(range(len(ds)))
    return datasets.Dataset.from_dict(columns, features=datasets.Features(feats))


def load_user_data(files: DataFiles, max_train_samples: int | None = None,
                   max_eval_samples: int | None = None) -> UserData:
    """Read a user's train/validation (and optional test) data into a ``TaskSpec`` and GLUE-shaped splits.

    Labels are checked on whole splits (a short debug run fails on the same bad row a full run would, and the
    label set, hence the model head, does not depend on ``max_*_samples``); the first ``max_*_samples`` rows are
    kept (the test split is never truncated: every row gets a prediction) and ``idx`` is assigned afterwards.
    """
    _check_args(files, max_train_samples, max_eval_samples)
    label = files.label_column_name or "label"
    splits = _read_splits(files, label)
    text_fields = _text_columns(files, splits, label)
    for split in splits:
        if split.role != "test" and label not in split.ds.column_names:
            default = "" if files.label_column_name else " (the default of --label_column_name)"
            raise DataFileError(f"--label_column_name: column {label!r}{default} not in {split.where}; its columns: "
                                f"{_listing(split.ds.column_names)}")

    train = splits[0]
    train_values = _label_values(train, label)
    kind = _infer_kind(train, train_values, _check_values(train, label, train_values), files.task_type)
    primary, extra = _metrics(files, kind)
    names = _label_names(train, label, train_values) if kind == "classification" else None
    label_ids = {name: i for i, name in enumerate(names or ())}

    built: dict[str, datasets.Dataset] = {}
    for split in splits:
        values: list[Any] | None = None
        if label in split.ds.column_names:
            values = _label_values(split, label)
            if split.role == "test" and all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
                values = None  # an unlabelled test file with an empty label column
        if values is not None:
            value_type = _check_values(split, label, values)
            if kind == "regression" and value_type != "number":
                raise DataFileError(f"{split.where}: {value_type} labels (e.g. {_short(values[0])}) in a regression "
                                    f"task (inferred from {train.where}); allowed: numbers")
            values = _encode(split, values, kind, label_ids, train.where)
        limit = {"train": max_train_samples, "validation": max_eval_samples}.get(split.role)  # every test row
        built[split.role] = _build(split, text_fields, values, limit, kind)

    task = TaskSpec(
        name=data_name(files), glue_dir="", hub_config=files.dataset_config_name or "", text_fields=text_fields,
        label_names=names, primary_metric=primary, eval_file=Path(files.validation_file or "").name, metrics=extra,
    )
    logger.info("user data %r (%s%s): %s", task.name, kind, f", labels {list(names)}" if names else "",
                ", ".join(f"{len(ds)} {role}" for role, ds in built.items()))
    return UserData(task, built["train"], built["validation"], built.get("test"))
