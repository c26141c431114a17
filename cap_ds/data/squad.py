"""Reading extractive question answering data (HF ``run_qa.py`` conventions): the nested SQuAD JSON
(``data -> paragraphs -> qas``, optionally ``.gz``), the flat layout (a JSON list of records, ``{"data":
[records]}`` or JSON Lines, optionally ``.gz``) or a hub dataset, into one ``datasets.Dataset`` shape with
columns ``id, title, context, question, answers`` (``{"text": [...], "answer_start": [...]}``) and a dense
``idx``, as the GLUE splits have (``glue.py``). Every answer is checked against its context here, so a bad
offset is one line naming the question instead of a silently wrong training label later."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from cap_ds.data.glue import hub_offline
from cap_ds.data.tasks import TaskSpec
from cap_ds.runtime.errors import Fault, UserError

logger = logging.getLogger(__name__)

COLUMNS = ("id", "title", "context", "question", "answers")
FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": {"text": datasets.Sequence(datasets.Value("string")),
                "answer_start": datasets.Sequence(datasets.Value("int32"))},
    "idx": datasets.Value("int64"),
})
_LAYOUTS = ('nested SQuAD JSON ({"data": [{"title", "paragraphs": [{"context", "qas"}]}]}), a JSON list of '
            'records, {"data": [records]} or JSON Lines (records with id, question, context, answers)')


class QaDataError(UserError, ValueError):
    """Question answering data or flags are unusable; the message is one line naming the file/flag/value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def qa_task(name: str = "squad") -> TaskSpec:
    """The spec of an extractive QA task: question then context, F1 as the primary metric, EM reported too."""
    return TaskSpec(name, "", "", ("question", "context"), None, "f1", question_answering=True,
                    metrics=("exact_match", "f1"))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(obj: Any) -> str:
    return ", ".join(map(str, obj)) if isinstance(obj, dict) and obj else "none"


# --------------------------------------------------------------------------------------------------------
# Files to items
# --------------------------------------------------------------------------------------------------------
def _read_text(path: Path, where: str) -> str:
    """The file's text (``.gz`` decompressed); unreadable bytes are a one-line error."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise QaDataError(f"{where}: not a readable gzip file ({err}); allowed: {_LAYOUTS}, optionally "
                              ".gz") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise QaDataError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          f"expected {_LAYOUTS}") from None


def _parse_json(text: str, where: str) -> list[Any]:
    """Top-level items: a whole JSON document's list (or ``data`` list), else one JSON object per line."""
    try:
        top = json.loads(text)
    except json.JSONDecodeError as whole:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                if not items:  # not JSON Lines either: report the whole-document error
                    raise QaDataError(f"{where}: not valid JSON ({whole.msg} at line {whole.lineno} column "
                                      f"{whole.colno}); expected {_LAYOUTS}") from None
                raise QaDataError(f"{where}: JSON Lines line {lineno} is not valid JSON ({err.msg} at column "
                                  f"{err.colno})") from None
        return items
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        return top["data"]
    if isinstance(top, list):
        return top
    if isinstance(top, dict) and {"question", "context"} <= set(top):  # JSON Lines holding a single record
        return [top]
    what = f"one JSON object with keys {_fields(top)}" if isinstance(top, dict) else f"a JSON {type(top).__name__}"
    raise QaDataError(f"{where}: {what}; expected {_LAYOUTS}")


def _read_items(path: str | None, flag: str) -> tuple[list[Any], str]:
    if not path:
        raise QaDataError(f"{flag}: no file given; pass {flag} <SQuAD .json/.jsonl[.gz]> or --dataset_name")
    file = Path(path).expanduser()
    where = f"{flag} {path}"
    if not file.is_file():
        kind = "a directory, not a file" if file.is_dir() else "file not found"
        raise QaDataError(f"{where}: {kind} (resolved: {file.resolve()})")
    text = _read_text(file, where)
    if not text.strip():
        raise QaDataError(f"{where}: the file is empty; expected {_LAYOUTS}")
    items = _parse_json(text, where)
    if not items:
        raise QaDataError(f"{where}: no questions in the file (its data list is empty)")
    return items, where


# --------------------------------------------------------------------------------------------------------
# Items to flat records
# --------------------------------------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _answers(raw: Any, qid: str, where: str) -> dict[str, list[Any]]:
    """``{"text": [...], "answer_start": [...]}`` from either the flat dict or the nested list of dicts."""
    if isinstance(raw, dict) and "text" in raw and "answer_start" in raw:
        texts, starts = _as_list(raw["text"]), _as_list(raw["answer_start"])
    elif isinstance(raw, list | tuple) and all(isinstance(a, dict) and "text" in a and "answer_start" in a
                                                for a in raw):
        texts, starts = [a["text"] for a in raw], [a["answer_start"] for a in raw]
    else:
        raise QaDataError(f"{where}: question id {qid!r}: answers {_short(raw)} is neither "
                          '{"text": [...], "answer_start": [...]} nor [{"text": ..., "answer_start": ...}]')
    if len(texts) != len(starts):
        raise QaDataError(f"{where}: question id {qid!r}: {len(texts)} answer texts but {len(starts)} "
                          "answer_start values; they must pair up")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise QaDataError(f"{where}: question id {qid!r}: answer {_short(text)} at {_short(start)}; allowed: "
                              "a string text and an integer answer_start")
    return {"text": list(texts), "answer_start": list(starts)}


def _record(raw: Any, title: Any, context: Any, place: str, where: str) -> dict[str, Any]:
    """One checked flat record from a nested ``qas`` entry or a flat row (``place`` names it in messages)."""
    if not isinstance(raw, dict):
        raise QaDataError(f"{where}: {place} is a {type(raw).__name__}, not a JSON object with id, question, "
                          "context, answers")
    impossible = raw.get("is_impossible") is True
    needed = ["id", "question"] + ([] if impossible else ["answers"]) + (["context"] if context is None else [])
    missing = [f for f in needed if f not in raw or raw[f] is None]
    qid = raw.get("id")
    if missing:
        name = f"question id {qid!r}" if qid is not None else place
        raise QaDataError(f"{where}: {name} lacks field(s) {', '.join(missing)}; fields present: {_fields(raw)}")
    qid = str(qid)
    context = raw["context"] if context is None else context
    title = raw.get("title", "") if title is None else title
    for field, value in (("question", raw["question"]), ("context", context), ("title", title or "")):
        if not isinstance(value, str):
            raise QaDataError(f"{where}: question id {qid!r}: {field} is {_short(value)}; allowed: a string")
    answers = {"text": [], "answer_start": []} if impossible else _answers(raw["answers"], qid, where)
    return {"id": qid, "title": title or "", "context": context, "question": raw["question"], "answers": answers}


def _article_records(article: Any, number: int, where: str) -> list[dict[str, Any]]:
    """The flat records of one nested article (``title``, ``paragraphs -> context, qas``)."""
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
        raise QaDataError(f"{where}: article {number} has no 'paragraphs' list (fields present: "
                          f"{_fields(article)}); every item of a nested SQuAD file is an article")
    title = article.get("title", "")
    out = []
    for p, para in enumerate(article["paragraphs"]):
        if not isinstance(para, dict) or not isinstance(para.get("qas"), list) or "context" not in para:
            raise QaDataError(f"{where}: article {number} ({_short(title, 40)}) paragraph {p} lacks 'context' "
                              f"or a 'qas' list; fields present: {_fields(para)}")
        for q, qa in enumerate(para["qas"]):
            out.append(_record(qa, title, para["context"], f"article {number} paragraph {p} question {q}", where))
    return out


def _is_nested(items: list[Any]) -> bool:
    return any(isinstance(it, dict) and "paragraphs" in it for it in items)


def _articles(items: list[Any], where: str) -> list[list[dict[str, Any]]]:
    """Records grouped by article; a flat file's records are each their own group."""
    if _is_nested(items):
        return [_article_records(a, n, where) for n, a in enumerate(items)]
    return [[_record(row, None, None, f"record {n} (row {n + 1})", where)] for n, row in enumerate(items)]


# --------------------------------------------------------------------------------------------------------
# Checks on the whole split
# --------------------------------------------------------------------------------------------------------
def _check_offsets(records: list[dict[str, Any]], where: str) -> None:
    for rec in records:
        context = rec["context"]
        for text, start in zip(rec["answers"]["text"], rec["answers"]["answer_start"]):
            held = context[start:start + len(text)] if 0 <= start <= len(context) else None
            if held != text:
                there = f"holds {_short(held, 80)}" if held is not None else f"is {len(context)} characters long"
                found = context.find(text)
                hint = f" (the answer occurs at {found})" if found >= 0 else " (the answer is not in the context)"
                raise QaDataError(f"{where}: question id {rec['id']!r}: answer_start {start} does not index the "
                                  f"answer {_short(text)}: the context there {there}{hint}")


def _check_records(records: list[dict[str, Any]], where: str, allow_impossible: bool | None) -> None:
    """Non-empty, unique ids, answers that index their context, unanswerable questions only when allowed."""
    if not records:
        raise QaDataError(f"{where}: no questions in the data")
    counts = Counter(rec["id"] for rec in records)
    dups = [qid for qid, n in counts.items() if n > 1]
    if dups:
        raise QaDataError(f"{where}: {len(dups)} duplicate question id(s), e.g. {dups[0]!r} ({counts[dups[0]]} "
                          "times); ids must be unique (predictions are keyed by id)")
    _check_offsets(records, where)
    empty = sum(1 for rec in records if not rec["answers"]["text"])
    if empty and allow_impossible is False:
        raise QaDataError(f"{where}: {empty} of {len(records)} questions have no answer (SQuAD 2.0 "
                          "unanswerable); pass --version_2_with_negative to train and evaluate with them")


def _to_dataset(records: list[dict[str, Any]], max_samples: int | None) -> datasets.Dataset:
    if max_samples is not None:
        records = records[:max_samples]
    columns: dict[str, list[Any]] = {c: [rec[c] for rec in records] for c in COLUMNS}
    columns["idx"] = list(range(len(records)))
    return datasets.Dataset.from_dict(columns, features=FEATURES)


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------
def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise QaDataError(f"max_samples {max_samples!r}: allowed: an integer >= 1, or None for every question")


def _hub_records(dataset_name: str, config: str | None, split: str) -> tuple[list[dict[str, Any]], str]:
    """A hub split (or its local cache) as flat records; unavailable is one line suggesting local files."""
    name = dataset_name + (f" (config {config})" if config else "")
    where = f"--dataset_name {name} split {split!r}"
    try:
        ds = datasets.load_dataset(dataset_name, config, split=split)
    except Exception as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        cause = f"{type(err).__name__}: {first}" if first else type(err).__name__
        offline = hub_offline()
        if offline:
            raise QaDataError(f"--dataset_name {name}: split {split!r} is not in the local datasets cache and the "
                              f"HF hub is offline ({offline}=1); pass --train_file/--validation_file (SQuAD "
                              f"JSON or JSON Lines), or unset {offline}") from None
        if isinstance(err, ValueError | FileNotFoundError) or type(err).__name__ == "DatasetNotFoundError":
            raise QaDataError(f"--dataset_name {name}: could not load split {split!r} ({_short(cause, 160)}); "
                              "pass --train_file/--validation_file instead") from None
        raise Fault(f"could not load --dataset_name {name} split {split!r} from the HF hub ({_short(cause, 160)});"
                    " pass --train_file/--validation_file to work from local files") from None
    missing = [c for c in ("id", "question", "context", "answers") if c not in ds.column_names]
    if missing:
        raise QaDataError(f"{where}: lacks column(s) {', '.join(missing)}; columns present: "
                          f"{', '.join(ds.column_names)}")
    keep = [c for c in COLUMNS if c in ds.column_names]
    rows = ds.select_columns(keep).to_list()
    return [_record(row, None, None, f"row {n}", where) for n, row in enumerate(rows)], where


def load_qa_split(path: str | None, *, split: str = "train", dataset_name: str | None = None,
                  dataset_config_name: str | None = None, version_2_with_negative: bool = False,
                  max_samples: int | None = None, flag: str = "--train_file") -> datasets.Dataset:
    """One QA split with columns ``id, title, context, question, answers, idx``.

    ``path`` wins over ``dataset_name`` (a hub dataset's ``split``). The whole file is checked (ids unique,
    every ``answer_start`` indexes its text, unanswerable questions only with ``version_2_with_negative``),
    then the first ``max_samples`` questions are kept and ``idx`` is ``0..n-1`` (CAP's per-row memory).
    Nested SQuAD 2.0 questions marked ``is_impossible`` get no answers. ``flag`` names ``path`` in messages.
    """
    _check_max_samples(max_samples)
    if path or not dataset_name:
        items, where = _read_items(path, flag)
        records = [rec for group in _articles(items, where) for rec in group]
        source = path
    else:
        records, where = _hub_records(dataset_name, dataset_config_name, split)
        source = f"hub dataset {dataset_name}"
    _check_records(records, where, version_2_with_negative)
    ds = _to_dataset(records, max_samples)
    unanswerable = sum(1 for a in ds["answers"] if not a["text"])
    logger.info("loaded %d %s questions (%d unanswerable) from %s", len(ds), split, unanswerable, source)
    return ds


def split_by_article(path: str, eval_articles: int) -> tuple[list[dict], list[dict]]:
    """Split a nested SQuAD file into (train, eval) flat records with no article in both: the LAST
    ``eval_articles`` articles are the eval part, so an experiment's eval questions never share a paragraph
    (or a topic) with its training questions. Records are ``id, title, context, question, answers`` dicts,
    ready to write as JSON Lines; unanswerable questions are kept (the loader decides about them)."""
    items, where = _read_items(path, "split_by_article")
    if not _is_nested(items):
        raise QaDataError(f"split_by_article {path}: not the nested SQuAD layout (data -> paragraphs -> qas); "
                          "a flat file has no articles to split by")
    articles = _articles(items, where)
    if isinstance(eval_articles, bool) or not isinstance(eval_articles, int) or not 1 <= eval_articles < len(
            articles):
        raise QaDataError(f"split_by_article {path}: eval_articles {eval_articles!r}; allowed: an integer from 1 "
                          f"to {len(articles) - 1} (the file has {len(articles)} articles)")
    train = [rec for group in articles[:-eval_articles] for rec in group]
    evaluation = [rec for group in articles[-eval_articles:] for rec in group]
    _check_records(train + evaluation, where, None)
    return train, evaluation
