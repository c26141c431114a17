"""SQuAD exact match and token F1, as the official v1.1 evaluation script defines them (written afresh), so the
numbers compare with published ones; unanswerable questions (no gold answer) follow the SQuAD 2.0 script."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import datasets

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (official v1.1 order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised texts: overlap counted with multiplicity; 0 without any common token."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) in 0..1, the best over the gold answers; no gold answer means the gold is "no answer"."""
    if not golds:  # unanswerable (SQuAD 2.0): only an empty prediction is right
        empty = float(normalize_answer(prediction) == "")
        return empty, empty
    pred = normalize_answer(prediction)
    exact = max(float(pred == normalize_answer(g)) for g in golds)
    return exact, max(_f1(prediction, g) for g in golds)


def _gold_texts(answers: Any) -> list[str]:
    if isinstance(answers, dict):
        return list(answers.get("text") or [])
    return [a["text"] if isinstance(a, dict) else str(a) for a in (answers or [])]


def squad_metrics(predictions: dict[str, str], examples: datasets.Dataset) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in 0..100, averaged over every example (each the max over its gold answers).

    Every example needs a prediction (a ValueError names how many are missing), so a dropped question cannot
    inflate the score; predictions for ids not in ``examples`` are ignored, as the official script does.
    """
    ids, answers = examples["id"], examples["answers"]
    missing = [qid for qid in ids if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ids)} questions have no prediction (e.g. id {missing[0]!r}); "
                         "predict every question (\"\" for no answer)")
    if not ids:
        raise ValueError("no examples to score")
    exact = f1 = 0.0
    for qid, gold in zip(ids, answers):
        em_one, f1_one = _scores(predictions[qid], _gold_texts(gold))
        exact += em_one
        f1 += f1_one
    return {"exact_match": 100.0 * exact / len(ids), "f1": 100.0 * f1 / len(ids)}
