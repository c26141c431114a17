"""Reading a GLUE split, from an original GLUE TSV folder (``--data_dir``) or from the HF hub, into a
``datasets.Dataset`` with canonical columns plus ``idx``, the example's global index (0..n-1 after
``max_samples`` truncation): CAP keeps per-example state (memory-bank rows), so every example carries a stable
index through shuffling and distributed sampling."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from cap_ds.data.tasks import TaskSpec

logger = logging.getLogger(__name__)


HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "validation")


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


# GLUE folders a checkout is commonly run beside (the README's and examples' default first), relative to the
# working directory: an offline run without --data_dir names the one that holds the task's files.
LOCAL_GLUE_GUESSES = ("../shared/data/glue", "data/glue", "glue", "../glue")


def local_glue_guess(task: TaskSpec) -> str | None:
    """A GLUE folder near the working directory (or in ``$GLUE_DIR`` / ``$DATA_DIR``) that holds ``task``'s
    training file, to suggest as --data_dir; None if there is none."""
    guesses = [os.environ.get(v, "") for v in ("GLUE_DIR", "DATA_DIR")] + list(LOCAL_GLUE_GUESSES)
    return next((g for g in guesses if g and os.path.isfile(os.path.join(g, task.glue_dir, "train.tsv"))), None)


def hub_unavailable(task: TaskSpec, hub_split: str, err: BaseException) -> Exception:
    """One line for a split the hub could not give: offline and not cached is the user's setup (UserError, exit
    2), naming the cache folders looked in and how to give --data_dir (with a local GLUE folder when there is
    one); online it is a fault (exit 1) naming the cause."""
    from cap_ds.runtime.errors import Fault, UserError

    where = f"{HUB_DATASET}/{task.hub_config} split {hub_split!r}"
    files = f"{task.glue_dir}/train.tsv and {task.glue_dir}/{task.eval_file}"
    guess = local_glue_guess(task)
    how = f"pass --data_dir <GLUE folder holding {files}>" + (f" (here: --data_dir {guess})" if guess else "")
    offline = hub_offline()
    if offline:
        from huggingface_hub import constants

        return UserError(f"no --data_dir and the HF hub is offline ({offline}=1): looked for {where} in the "
                         f"datasets cache {datasets.config.HF_DATASETS_CACHE} and the hub cache "
                         f"{constants.HF_HUB_CACHE}, not there; {how}, or unset {offline} to download it")
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    cause = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return Fault(f"could not load {where} from the HF hub ({cause}); {how} to work offline")


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


