"""GLUE data for cap_ds: task specs, readers, tokenisation, collation and metrics.

Everything task-specific lives here so the trainer never special-cases a GLUE task:

* :class:`TaskSpec` / :data:`TASKS` / :func:`get_task` describe the eight GLUE tasks (text columns, label
  order identical to the HF hub ``nyu-mll/glue`` so local files and the hub agree, primary metric).
* :func:`load_glue_split` reads a split either from an original GLUE TSV folder (``--data_dir``) or from the
  HF hub, and returns a ``datasets.Dataset`` with canonical columns plus ``idx`` = the example's global index
  (0..n-1, after ``max_samples`` truncation). CAP keeps per-example state (e.g. memory-bank features), so
  every example must carry a stable index through shuffling and distributed sampling.
* :func:`tokenize_dataset` and :class:`GlueCollator` turn it into dynamically padded tensor batches that
  still carry ``idx``.
* :func:`compute_metrics` computes the standard GLUE metrics as plain python floats.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cap_ds.cap.shards import ShardSampler

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "validation")


# --------------------------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """Static description of one GLUE task.

    ``label_names`` follow the label order of the HF hub ``nyu-mll/glue`` so that class ids are the same
    whether the data comes from local TSV files or from the hub. ``None`` means regression (STS-B).
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

    @property
    def is_regression(self) -> bool:
        """True for STS-B-like tasks with a single real-valued target."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Size of the model head: 1 for regression, else the number of classes."""
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
        "cola", "CoLA", "cola", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation"
    ),
    "stsb": TaskSpec("stsb", "STS-B", "stsb", _PAIR, None, "pearson", score_range=(0.0, 5.0)),
    "mrpc": TaskSpec("mrpc", "MRPC", "mrpc", _PAIR, ("not_equivalent", "equivalent"), "accuracy"),
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
    "qqp": TaskSpec("qqp", "QQP", "qqp", _PAIR, ("not_duplicate", "duplicate"), "accuracy"),
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


# --------------------------------------------------------------------------------------------------------
# Local GLUE TSV layouts
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TsvLayout:
    """Where the text and label columns live in an original GLUE TSV file.

    With a header, columns are header names; without one (CoLA), 0-based positions and ``num_columns``.
    ``skip_malformed``: rows with the wrong number of columns are skipped with a warning instead of failing
    (the real QQP files contain a few such rows).
    """

    text_columns: tuple[str | int, ...]
    label_column: str | int
    has_header: bool = True
    num_columns: int | None = None
    skip_malformed: bool = False


_LAYOUTS: dict[str, _TsvLayout] = {
    "sst2": _TsvLayout(("sentence",), "label"),
    "cola": _TsvLayout((3,), 1, has_header=False, num_columns=4),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality"),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label"),
    "qnli": _TsvLayout(("question", "sentence"), "label"),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label"),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate", skip_malformed=True),
}

# Hub column name -> canonical column name (identity entries omitted).
_HUB_RENAMES: dict[str, dict[str, str]] = {
    "qnli": {"question": "sentence1", "sentence": "sentence2"},
    "qqp": {"question1": "sentence1", "question2": "sentence2"},
    "mnli": {"premise": "sentence1", "hypothesis": "sentence2"},
}


def _features(task: TaskSpec) -> datasets.Features:
    feats: dict[str, Any] = {f: datasets.Value("string") for f in task.text_fields}
    feats["label"] = datasets.Value("float32" if task.is_regression else "int64")
    feats["idx"] = datasets.Value("int64")
    return datasets.Features(feats)


def resolve_local_file(task: TaskSpec, split: str, data_dir: str | os.PathLike) -> Path:
    """Public: the local TSV ``load_glue_split`` would read (raises the same FileNotFoundError)."""
    return _resolve_local_file(task, split, data_dir)


def _split_file(task: TaskSpec, split: str) -> str:
    return "train.tsv" if split == "train" else task.eval_file


def _resolve_local_file(task: TaskSpec, split: str, data_dir: str | os.PathLike) -> Path:
    """Find the TSV for ``split`` under a GLUE root (``<root>/<glue_dir>/``) or directly in a task folder."""
    root = Path(data_dir).expanduser()
    fname = _split_file(task, split)
    nested = root / task.glue_dir / fname
    if nested.is_file():
        return nested
    # Tolerate a differently-cased task folder (e.g. "sst-2").
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.lower() == task.glue_dir.lower() and (child / fname).is_file():
                return child / fname
    direct = root / fname
    if direct.is_file():
        if root.name.lower() != task.glue_dir.lower():
            logger.warning(
                "reading %s for task %r directly from %s, whose name is not %r; is --data_dir the right "
                "task folder?",
                fname,
                task.name,
                root,
                task.glue_dir,
            )
        return direct
    where = "" if root.is_dir() else f" (directory {root} does not exist)"
    raise FileNotFoundError(
        f"GLUE task {task.name!r}: {split} file not found: {nested.resolve()}{where}. Expected "
        f"{task.glue_dir}/train.tsv and {task.glue_dir}/{task.eval_file} under --data_dir (or --data_dir "
        f"pointing at the {task.glue_dir} folder itself, also tried {direct.resolve()}); without --data_dir "
        f"the data is loaded from the HF hub ({HUB_DATASET}, config {task.hub_config!r})."
    )


def _label_parser(task: TaskSpec, path: Path):
    """Return ``parse(value, lineno)`` mapping a raw TSV label to a class id (or float score)."""
    if task.label_names is None:

        def parse_score(value: str, lineno: int) -> float:
            try:
                score = float(value)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise ValueError(
                    f"{path}:{lineno}: invalid label {value!r} for task {task.name!r}; "
                    "allowed: a finite real-valued score"
                ) from None
            low, high = task.score_range or (-math.inf, math.inf)
            if not low <= score <= high:
                raise ValueError(
                    f"{path}:{lineno}: label {value!r} for task {task.name!r} is outside its range; "
                    f"allowed: a score from {low:g} to {high:g}"
                )
            return score

        return parse_score

    mapping = dict(task.label2id)
    mapping.update({str(i): i for i in range(len(task.label_names))})
    allowed = ", ".join(repr(k) for k in mapping)

    def parse_class(value: str, lineno: int) -> int:
        try:
            return mapping[value]
        except KeyError:
            raise ValueError(
                f"{path}:{lineno}: invalid label {value!r} for task {task.name!r}; allowed: {allowed}"
            ) from None

    return parse_class


def _read_utf8(path: Path) -> str:
    """The file's text; a non-UTF-8 byte is a ValueError naming ``file:line`` and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start - (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        lineno = body[:offset].count(b"\n") + 1
        column = offset - (body.rfind(b"\n", 0, offset) + 1) + 1
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{body[offset]:02x} at column {column}); GLUE "
                         "files are UTF-8: re-encode the file (e.g. iconv -f latin1 -t utf-8)") from None


def count_local_rows(task: TaskSpec, split: str, data_dir: str | os.PathLike,
                     max_samples: int | None = None) -> int:
    """Rows ``load_glue_split`` would return from the local TSV (parsing and checking it: same errors)."""
    _check_args(split, max_samples)
    path = _resolve_local_file(task, split, data_dir)
    _, labels = _read_local_tsv(task, path)
    if not labels:
        raise ValueError(f"GLUE task {task.name!r}: no examples in {path}")
    return len(labels) if max_samples is None else min(len(labels), max_samples)


def _read_local_tsv(task: TaskSpec, path: Path) -> tuple[list[list[str]], list[int | float]]:
    """Parse one original GLUE TSV file into per-field text lists and labels.

    Split on tabs ourselves (no CSV quoting): STS-B/MNLI sentences contain ``"`` characters that csv's default
    quoting would swallow, silently merging rows.
    """
    layout = _LAYOUTS[task.name]
    # utf-8-sig: the original MRPC files start with a byte-order mark.
    lines = _read_utf8(path).split("\n")
    start = 0
    if layout.has_header:
        header = lines[0].rstrip("\r").split("\t") if lines else []
        missing = [c for c in (*layout.text_columns, layout.label_column) if c not in header]
        if missing:
            raise ValueError(
                f"{path}:1: header of the {task.name!r} file lacks column(s) {missing}; found {header}"
            )
        text_pos = [header.index(c) for c in layout.text_columns]
        label_pos = header.index(layout.label_column)
        num_columns = len(header)
        start = 1
    else:
        text_pos = [int(c) for c in layout.text_columns]
        label_pos = int(layout.label_column)
        num_columns = int(layout.num_columns or 0)

    parse = _label_parser(task, path)
    texts: list[list[str]] = [[] for _ in text_pos]
    labels: list[int | float] = []
    bad_lines: list[int] = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != num_columns:
            if layout.skip_malformed:
                bad_lines.append(lineno)
                continue
            raise ValueError(
                f"{path}:{lineno}: expected {num_columns} tab-separated columns for task {task.name!r}, "
                f"found {len(cols)}"
            )
        labels.append(parse(cols[label_pos].strip(), lineno))
        for out, pos in zip(texts, text_pos):
            out.append(cols[pos].strip())
    if bad_lines:
        logger.warning(
            "%s: skipped %d malformed row(s) with a column count other than %d (first lines: %s)",
            path,
            len(bad_lines),
            num_columns,
            ", ".join(map(str, bad_lines[:5])),
        )
    return texts, labels


def _check_args(split: str, max_samples: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)):
        raise ValueError(f"max_samples must be an int or None, got {max_samples!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all rows), got {max_samples}")


def hub_offline() -> str | None:
    """The variable that keeps the HF hub offline (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``), None if unset."""
    return next((v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                 if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")), None)


def hub_unavailable(task: TaskSpec, hub_split: str, err: BaseException) -> Exception:
    """One line for a split the hub could not give: offline and not cached is the user's setup (UserError, exit
    2), naming the cache folders looked in and --data_dir; online it is a fault (exit 1) naming the cause."""
    from cap_ds.runtime.errors import Fault, UserError

    where = f"{HUB_DATASET}/{task.hub_config} split {hub_split!r}"
    files = f"{task.glue_dir}/train.tsv and {task.glue_dir}/{task.eval_file}"
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    cause = f"{type(err).__name__}: {first}" if first else type(err).__name__
    offline = hub_offline()
    if offline:
        from huggingface_hub import constants

        return UserError(f"no --data_dir and the HF hub is offline ({offline}=1): {where} is not in the "
                         f"datasets cache {datasets.config.HF_DATASETS_CACHE} nor the hub cache "
                         f"{constants.HF_HUB_CACHE} ({cause}); pass --data_dir <folder holding {files}> (the "
                         f"GLUE TSV files), or unset {offline} to download it")
    return Fault(f"could not load {where} from the HF hub ({cause}); pass --data_dir <folder holding {files}> to "
                 "work offline")


def load_glue_split(
    task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None, max_samples: int | None = None
) -> datasets.Dataset:
    """Load one split of a GLUE task with canonical columns ``text_fields + label + idx``.

    ``split`` is ``"train"`` or ``"validation"`` (MNLI: matched dev). With ``data_dir`` the original GLUE TSV
    files are read (``data_dir/<glue_dir>/`` or ``data_dir`` itself being the task folder); without it the
    split comes from the HF hub. ``max_samples`` keeps the first rows (HF ``run_glue`` style) and ``idx`` is
    assigned afterwards, so it is always ``0..n-1`` - a dense index CAP can use for per-example memory.
    """
    _check_args(split, max_samples)
    if data_dir is not None:
        path = _resolve_local_file(task, split, data_dir)
        texts, labels = _read_local_tsv(task, path)
        if max_samples is not None:
            texts = [t[:max_samples] for t in texts]
            labels = labels[:max_samples]
        if not labels:
            raise ValueError(f"GLUE task {task.name!r}: no examples in {path}")
        columns: dict[str, list[Any]] = dict(zip(task.text_fields, texts))
        columns["label"] = labels
        columns["idx"] = list(range(len(labels)))
        ds = datasets.Dataset.from_dict(columns, features=_features(task))
        logger.info("loaded %d %s examples of %s from %s", len(ds), split, task.name, path)
        return ds

    hub_split = "train" if split == "train" else task.eval_split
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    except Exception as err:
        raise hub_unavailable(task, hub_split, err) from err
    if max_samples is not None and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    renames = _HUB_RENAMES.get(task.name, {})
    # text_fields are canonical names; translate back to the hub names to check presence.
    inverse = {v: k for k, v in renames.items()}
    missing = [
        c for c in (*(inverse.get(f, f) for f in task.text_fields), "label") if c not in ds.column_names
    ]
    if missing:
        raise ValueError(
            f"hub dataset {HUB_DATASET}/{task.hub_config} split {hub_split!r} lacks column(s) {missing}; "
            f"found {ds.column_names}"
        )
    keep = [inverse.get(f, f) for f in task.text_fields] + ["label"]
    ds = ds.select_columns(keep)
    if renames:
        ds = ds.rename_columns({k: v for k, v in renames.items() if k in keep})
    if len(ds) == 0:
        raise ValueError(f"GLUE task {task.name!r}: hub split {hub_split!r} is empty")
    ds = ds.add_column("idx", list(range(len(ds))))
    ds = ds.cast(_features(task))
    logger.info("loaded %d %s examples of %s from the hub", len(ds), split, task.name)
    return ds


# --------------------------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------------------------
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_dataset(
    ds: datasets.Dataset, task: TaskSpec, tokenizer: Any, max_seq_length: int = 128
) -> datasets.Dataset:
    """Tokenise the text fields (truncation only; :class:`GlueCollator` pads per batch, which is cheaper).

    Keeps ``idx``, renames ``label`` -> ``labels`` (the HF model keyword) and drops every other column.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    required = (*task.text_fields, "label", "idx")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset for task {task.name!r} lacks column(s) {missing}; found {ds.column_names}")
    fields = task.text_fields

    def _encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        enc = tokenizer(
            *(batch[f] for f in fields), truncation=True, max_length=max_seq_length, padding=False
        )
        return {k: enc[k] for k in _MODEL_INPUTS if k in enc}

    remove = [c for c in ds.column_names if c not in ("label", "idx")]
    out = ds.map(_encode, batched=True, remove_columns=remove, desc=f"tokenizing {task.name}")
    out = out.rename_column("label", "labels")
    order = [c for c in _MODEL_INPUTS if c in out.column_names] + ["labels", "idx"]
    return out.select_columns(order)


def _is_float_label(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, np.ndarray | np.generic):
        return np.issubdtype(np.asarray(value).dtype, np.floating)
    return isinstance(value, float)


class GlueCollator:
    """Dynamic-padding collator: pads model inputs with ``tokenizer.pad`` and adds ``labels``/``idx`` tensors.

    ``labels`` become float32 for regression (auto-detected from float label values unless ``is_regression``
    is given) and int64 otherwise; ``idx`` is int64 so per-example state can be gathered with it.
    """

    def __init__(
        self, tokenizer: Any, pad_to_multiple_of: int | None = None, *, is_regression: bool | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.is_regression = is_regression

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("GlueCollator got an empty batch")
        inputs = [{k: f[k] for k in _MODEL_INPUTS if k in f} for f in features]
        batch = dict(
            self.tokenizer.pad(
                inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
            )
        )
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            regression = self.is_regression
            if regression is None:
                regression = any(_is_float_label(v) for v in labels)
            dtype = torch.float32 if regression else torch.long
            batch["labels"] = torch.as_tensor(
                [float(v) if regression else int(v) for v in labels], dtype=dtype
            )
        if "idx" in features[0]:
            batch["idx"] = torch.as_tensor([int(f["idx"]) for f in features], dtype=torch.long)
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collated batch minus what the model must not see (``idx`` for banks, ``labels`` for our losses)."""
    return {k: v for k, v in batch.items() if k not in ("idx", "labels")}


@dataclass
class Loaders:
    """The run's four views of the data. ``train`` draws this rank's shard (bank rows stay local,
    ``cap/shards.py``), ``encode`` walks it in order for the bank passes (``restrict`` narrows it to a short run's
    rows), ``evaluate`` splits the dev set, ``importance`` walks the shard in order for CAP-f (None otherwise)."""

    train: DataLoader
    encode: DataLoader
    evaluate: DataLoader
    importance: DataLoader | None


def make_loaders(train_ds: datasets.Dataset, eval_ds: datasets.Dataset, collate: GlueCollator, *, rank: int,
                 world: int, seed: int, train_batch: int, eval_batch: int, num_workers: int,
                 importance: bool, pin_memory: bool = False) -> Loaders:
    """Every loader is seeded with its own generator: creating a loader iterator must not draw from the global RNG
    (dropout), or a resumed run would diverge from an uninterrupted one. ``pin_memory`` (on CUDA) lets batches
    reach the device by asynchronous copies (``transfer.to_device``)."""

    def loader(ds: datasets.Dataset, batch: int, sampler) -> DataLoader:
        return DataLoader(ds, batch_size=batch, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                          collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory)

    n = len(train_ds)
    return Loaders(
        train=loader(train_ds, train_batch, ShardSampler(n, rank, world, shuffle=True, seed=seed)),
        encode=loader(train_ds, eval_batch, ShardSampler(n, rank, world, shuffle=False, pad=False)),
        evaluate=loader(eval_ds, eval_batch, DistributedSampler(eval_ds, num_replicas=world, rank=rank,
                                                                shuffle=False)),
        importance=loader(train_ds, train_batch, ShardSampler(n, rank, world, shuffle=False)) if importance else None,
    )


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------
def _correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    """Pearson/Spearman as a float; NaN (with a warning) when undefined, e.g. constant predictions."""
    from scipy import stats

    if (
        len(x) < 2
        or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)))
        or np.ptp(x) == 0
        or np.ptp(y) == 0
    ):
        logger.warning(
            "%s correlation is undefined (constant, non-finite or < 2 values): returning nan", kind
        )
        return float("nan")
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(x, y)[0])


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics for ``task`` as plain floats; ``task.primary_metric`` is always among the keys.

    ``predictions`` are logits ``[N, C]`` (argmax is taken; ``[N]`` class ids are accepted too) for
    classification, or ``[N]`` / ``[N, 1]`` scores for regression.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(predictions)
    gold = np.asarray(labels).reshape(-1)
    if task.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"regression predictions must be [N] or [N, 1], got shape {preds.shape}")
    else:
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        elif preds.ndim != 1:
            raise ValueError(f"predictions must be logits [N, C] or class ids [N], got shape {preds.shape}")
    if preds.shape[0] != gold.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {gold.shape[0]} labels")
    if gold.shape[0] == 0:
        raise ValueError("compute_metrics needs at least one example")

    if task.is_regression:
        x, y = preds.astype(np.float64), gold.astype(np.float64)
        pearson = _correlation("pearson", x, y)
        spearman = _correlation("spearman", x, y)
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2.0}

    preds = preds.astype(np.int64)
    gold = gold.astype(np.int64)
    out = {"accuracy": float(accuracy_score(gold, preds))}
    if task.name == "cola":
        # sklearn returns 0.0 when either side is constant (denominator 0), the conventional value.
        out["matthews_correlation"] = float(matthews_corrcoef(gold, preds))
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
    return out
