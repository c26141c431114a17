"""Extractive QA features and predictions (HF ``run_qa.py`` / ``utils_qa.py`` conventions, written afresh):
a question and its context become one or more fixed-length windows (``prepare_features``), each a row of its
own with a dense ``idx`` (CAP keeps per-row memory banks, and a row is a window), and the start/end logits of
a question's windows become one answer text (``postprocess``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from cap_ds.data.squad import QaDataError

logger = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
NOT_CONTEXT = -1  # offset_mapping value of a token outside the context ([CLS], question, [SEP], padding)


# --------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------
def _check_args(examples: datasets.Dataset, tokenizer: Any, max_seq_length: int, doc_stride: int) -> None:
    missing = [c for c in ("question", "context", "answers", "idx") if c not in examples.column_names]
    if missing:
        raise QaDataError(f"QA examples lack column(s) {', '.join(missing)}; columns present: "
                          f"{', '.join(examples.column_names)} (load them with data.squad.load_qa_split)")
    if len(examples) == 0:
        raise QaDataError("no QA examples to tokenize (the split is empty)")
    if not getattr(tokenizer, "is_fast", False):
        raise QaDataError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; extractive QA needs "
                          "character offsets (return_offsets_mapping): load it with use_fast=True")
    for flag, value, low in (("--max_seq_length", max_seq_length, 1), ("--doc_stride", doc_stride, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise QaDataError(f"{flag} {value!r}: allowed: an integer >= {low}")


def _token_lengths(tokenizer: Any, texts: list[str]) -> np.ndarray:
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))


def _check_room(examples: datasets.Dataset, tokenizer: Any, max_seq_length: int, doc_stride: int) -> None:
    """Every window must hold some context beside the question, and the windows' overlap must be smaller than
    the context part of the tightest window (the longest question's), or the tokenizer cannot step."""
    questions = [q.lstrip() for q in examples["question"]]
    q_lens = _token_lengths(tokenizer, questions)
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    longest = int(q_lens.max())
    room = max_seq_length - (longest + specials)
    if room < 1:
        qid = examples[int(q_lens.argmax())].get("id", "?")
        raise QaDataError(f"--max_seq_length {max_seq_length} leaves no room for the context: question id {qid!r} "
                          f"has {longest} tokens (+{specials} special); pass a larger --max_seq_length")
    if doc_stride >= room:
        raise QaDataError(f"--doc_stride {doc_stride} must be < --max_seq_length - (longest question tokens + "
                          f"{specials}) = {max_seq_length} - ({longest} + {specials}) = {room}; pass a --doc_stride "
                          f"from 0 to {room - 1}, or a larger --max_seq_length")
    if doc_stride == 0:
        contexts = examples["context"]
        unique = list(dict.fromkeys(contexts))
        c_len = dict(zip(unique, _token_lengths(tokenizer, unique).tolist()))
        lengths = q_lens + np.fromiter((c_len[c] for c in contexts), dtype=np.int64, count=len(contexts))
        over = int((lengths + specials > max_seq_length).sum())
        if over == len(contexts):
            raise QaDataError(f"--doc_stride 0 (no windows) but all {over} questions overflow --max_seq_length "
                              f"{max_seq_length}, so every context would be cut; pass --doc_stride (e.g. 128) or "
                              "a larger --max_seq_length")
        if over:
            logger.warning("--doc_stride 0: %d of %d question+context pairs exceed --max_seq_length %d and are "
                           "truncated (answers cut off get the [CLS] label)", over, len(contexts), max_seq_length)


def _label(sequence_ids: list[int | None], offsets: np.ndarray, answers: dict[str, list[Any]]) -> list[int]:
    """``[start_token, end_token]`` of the first answer when it lies wholly in this window's context, else
    ``[0, 0]`` (the [CLS] position: no answer here, as for an unanswerable question)."""
    if not answers["text"]:
        return [0, 0]
    context = np.flatnonzero(np.array([s == 1 for s in sequence_ids]))
    if context.size == 0:
        return [0, 0]
    first, last = int(context[0]), int(context[-1])
    start_char = int(answers["answer_start"][0])
    end_char = start_char + len(answers["text"][0])
    if offsets[first, 0] > start_char or offsets[last, 1] < end_char:
        return [0, 0]
    span = offsets[first:last + 1]
    start = first + int(np.searchsorted(span[:, 0], start_char, side="right")) - 1
    end = first + int(np.searchsorted(span[:, 1], end_char, side="left"))
    return [max(start, first), min(max(end, start), last)]


def _encode(batch: dict[str, list[Any]], tokenizer: Any, max_seq_length: int, doc_stride: int,
            for_eval: bool) -> dict[str, list[Any]]:
    """One batch of examples -> its windows (all of them, or each example's first one with ``doc_stride`` 0)."""
    enc = tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                    max_length=max_seq_length, stride=doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding="max_length")
    sample = enc["overflow_to_sample_mapping"]
    keep = [i for i, s in enumerate(sample) if doc_stride > 0 or i == 0 or sample[i - 1] != s]
    out: dict[str, list[Any]] = {k: [enc[k][i] for i in keep] for k in _MODEL_INPUTS if k in enc}
    out["labels"] = []
    if for_eval:
        out["example_idx"], out["offset_mapping"] = [], []
    for i in keep:
        sequence_ids = enc.sequence_ids(i)
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        out["labels"].append(_label(sequence_ids, offsets, batch["answers"][sample[i]]))
        if for_eval:
            outside = np.array([s != 1 for s in sequence_ids])
            offsets[outside] = NOT_CONTEXT
            out["example_idx"].append(int(batch["idx"][sample[i]]))
            out["offset_mapping"].append(offsets.astype(np.int32))
    return out


def prepare_features(examples: datasets.Dataset, tokenizer: Any, max_seq_length: int, doc_stride: int,
                     *, for_eval: bool = False) -> datasets.Dataset:
    """Tokenise QA examples (question first, context second) into windows of exactly ``max_seq_length`` tokens.

    A context longer than one window is split into overlapping windows (``doc_stride`` tokens shared); with
    ``doc_stride`` 0 each question keeps only its first, truncated window. Columns: the model inputs
    (``input_ids``, ``attention_mask``, ``token_type_ids`` when the tokenizer gives them), ``labels`` =
    ``[start_token, end_token]`` (``[0, 0]``: the answer is not wholly in this window, or there is none) and
    ``idx`` = the window's index ``0..F-1`` (CAP's per-row banks are per window). With ``for_eval`` also
    ``example_idx`` (the example's ``idx``) and ``offset_mapping``, an ``Array2D((max_seq_length, 2), int32)``
    of each token's character span in the context, ``[-1, -1]`` for tokens outside it; both are for
    :func:`postprocess` and must not reach the model.
    """
    _check_args(examples, tokenizer, max_seq_length, doc_stride)
    _check_room(examples, tokenizer, max_seq_length, doc_stride)
    probe = tokenizer("a", "b")
    spec: dict[str, Any] = {k: datasets.Sequence(datasets.Value("int32")) for k in _MODEL_INPUTS if k in probe}
    spec["labels"] = datasets.Sequence(datasets.Value("int64"))
    if for_eval:
        spec["example_idx"] = datasets.Value("int64")
        spec["offset_mapping"] = datasets.Array2D((max_seq_length, 2), "int32")
    out = examples.map(_encode, batched=True, batch_size=500, remove_columns=examples.column_names,
                       features=datasets.Features(spec), desc="QA windows",
                       fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length,
                                  "doc_stride": doc_stride, "for_eval": for_eval})
    out = out.add_column("idx", np.arange(len(out), dtype=np.int64), feature=datasets.Value("int64"))
    logger.info("%d QA examples -> %d windows of %d tokens (doc_stride %d)", len(examples), len(out),
                max_seq_length, doc_stride)
    return out


# --------------------------------------------------------------------------------------------------------
# Logits to answers
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QaPredictionSettings:
    """How logits become answers (``run_qa.py`` flags): candidates per end, the longest span in tokens, and for
    SQuAD 2.0 the margin the null answer needs over the best span."""

    n_best_size: int = 20
    max_answer_length: int = 30
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0

    def __post_init__(self) -> None:
        for flag, value in (("--n_best_size", self.n_best_size), ("--max_answer_length", self.max_answer_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QaDataError(f"{flag} {value!r}: allowed: an integer >= 1")


def _best_spans(start: np.ndarray, end: np.ndarray, offsets: np.ndarray,
                settings: QaPredictionSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: the best valid span's score, start and end token, from the top ``n_best`` starts x ends.

    A span is valid when both ends are context tokens, ``end >= start`` and it has at most
    ``max_answer_length`` tokens; a window with none scores ``-inf``."""
    n = min(settings.n_best_size, start.shape[1])
    rows = np.arange(start.shape[0])[:, None]
    starts = np.argsort(-start, axis=1, kind="stable")[:, :n]
    ends = np.argsort(-end, axis=1, kind="stable")[:, :n]
    in_context = offsets[..., 0] >= 0
    length = ends[:, None, :] - starts[:, :, None] + 1
    ok = (in_context[rows, starts][:, :, None] & in_context[rows, ends][:, None, :]
          & (length >= 1) & (length <= settings.max_answer_length))
    score = np.where(ok, start[rows, starts][:, :, None] + end[rows, ends][:, None, :], -np.inf)
    flat = score.reshape(len(score), -1)
    best = flat.argmax(axis=1)
    window = np.arange(len(score))
    return flat[window, best], starts[window, best // n], ends[window, best % n]


def postprocess(examples: datasets.Dataset, features: datasets.Dataset, start_logits: np.ndarray,
                end_logits: np.ndarray, settings: QaPredictionSettings) -> dict[str, str]:
    """Question id -> predicted answer text (``""``: no answer), from the logits of its windows.

    Per question the best span over all its windows (score = start + end logit) is sliced from the context by
    character offsets. With ``version_2_with_negative`` the null score is the smallest ``start[0] + end[0]``
    over the windows, and the answer is ``""`` when ``null - best_span > null_score_diff_threshold``.
    """
    for col in ("example_idx", "offset_mapping"):
        if col not in features.column_names:
            raise QaDataError(f"QA features lack {col!r}: build them with prepare_features(..., for_eval=True)")
    cols = features.with_format("numpy", columns=["example_idx", "offset_mapping"])[:]
    offsets, owner = np.asarray(cols["offset_mapping"]), np.asarray(cols["example_idx"])
    start = np.asarray(start_logits, dtype=np.float64)
    end = np.asarray(end_logits, dtype=np.float64)
    if start.shape != offsets.shape[:2] or end.shape != offsets.shape[:2]:
        raise ValueError(f"logits of shape {start.shape} / {end.shape} do not match the {len(features)} windows "
                         f"of {offsets.shape[1]} tokens (expected {offsets.shape[:2]})")
    scores, first, last = _best_spans(start, end, offsets, settings)
    null = start[:, 0] + end[:, 0]
    position = {int(i): row for row, i in enumerate(examples["idx"])}
    n = len(examples)
    best = np.full(n, -np.inf)
    best_window = np.full(n, -1)
    null_min = np.full(n, np.inf)
    for window, example in enumerate(owner.tolist()):
        row = position.get(example)
        if row is None:
            raise ValueError(f"window {window} belongs to example idx {example}, which is not in the examples")
        if scores[window] > best[row]:
            best[row], best_window[row] = scores[window], window
        null_min[row] = min(null_min[row], null[window])
    contexts, ids = examples["context"], examples["id"]
    predictions: dict[str, str] = {}
    for row in range(n):
        window = int(best_window[row])
        text = ""
        if window >= 0 and np.isfinite(best[row]):
            text = contexts[row][offsets[window, first[window], 0]:offsets[window, last[window], 1]]
        if settings.version_2_with_negative and (window < 0 or not np.isfinite(best[row])
                                                 or null_min[row] - best[row] > settings.null_score_diff_threshold):
            text = ""
        predictions[ids[row]] = text
    return predictions
