"""Answering questions with an extractive-QA model, exported or in memory.

transformers 5 removed the ``"question-answering"`` pipeline, so :class:`QuestionAnswerer` takes its place: the
same windows (``qa.prepare_features``) and span search (``qa.postprocess``) that training evaluates with, so an
exported model answers exactly as the masked model did in its last evaluation. The window and span settings of
the run travel in the model's ``config.task_specific_params["question-answering"]``.

    from cap_ds.data.answer import QuestionAnswerer
    qa = QuestionAnswerer.from_pretrained("out/squad_cap/final")
    qa("Where is Normandy?", "The Normans ... gave their name to Normandy, a region in France.")
    # {'answer': 'a region in France'}
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import datasets
import numpy as np
import torch

from cap_ds.data.qa import QaPredictionSettings, postprocess, prepare_features
from cap_ds.runtime.outputs import output_logits

CONFIG_KEY = "question-answering"


def remember_qa_settings(config: Any, max_seq_length: int, doc_stride: int, settings: QaPredictionSettings) -> None:
    """Store the run's window and span settings in ``config`` (saved with the model) for :class:`QuestionAnswerer`."""
    params = dict(getattr(config, "task_specific_params", None) or {})
    params[CONFIG_KEY] = {"max_seq_length": max_seq_length, "doc_stride": doc_stride, **asdict(settings)}
    config.task_specific_params = params


class QuestionAnswerer:
    """``answerer(question, context)`` -> ``{"answer": text}`` (lists in, list out); ``""`` is "no answer"
    (only with ``version_2_with_negative``). Windows of ``max_seq_length`` tokens overlap by ``doc_stride``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_seq_length: int = 384, doc_stride: int = 128,
                 settings: QaPredictionSettings | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_seq_length, self.doc_stride = max_seq_length, doc_stride
        self.settings = settings or QaPredictionSettings()

    @classmethod
    def from_pretrained(cls, folder: str, **overrides: Any) -> QuestionAnswerer:
        """Load an exported QA model (a cleaned CAP-f model too) with the settings its run stored."""
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        import cap_ds.compression  # noqa: F401  (registers the cleaned model classes)

        model = AutoModelForQuestionAnswering.from_pretrained(folder)
        stored = dict((getattr(model.config, "task_specific_params", None) or {}).get(CONFIG_KEY, {}))
        stored.update(overrides)
        windows = {k: stored.pop(k) for k in ("max_seq_length", "doc_stride") if k in stored}
        known = {k: v for k, v in stored.items() if k in QaPredictionSettings.__dataclass_fields__}
        return cls(model, AutoTokenizer.from_pretrained(folder), **windows,
                   settings=replace(QaPredictionSettings(), **known))

    @torch.no_grad()
    def __call__(self, question: str | list[str], context: str | list[str],
                 batch_size: int = 32) -> dict[str, str] | list[dict[str, str]]:
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        contexts = [context] * len(questions) if isinstance(context, str) else list(context)
        if len(contexts) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        n = len(questions)
        examples = datasets.Dataset.from_dict({
            "id": [str(i) for i in range(n)], "title": [""] * n, "context": contexts, "question": questions,
            "answers": [{"text": [], "answer_start": []}] * n, "idx": list(range(n))})
        features = prepare_features(examples, self.tokenizer, self.max_seq_length, self.doc_stride, for_eval=True)
        inputs = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.column_names]
        device = next(self.model.parameters()).device
        logits = []
        for start in range(0, len(features), batch_size):
            rows = features.select_columns(inputs)[start:start + batch_size]
            batch = {k: torch.as_tensor(np.asarray(v), dtype=torch.long, device=device) for k, v in rows.items()}
            logits.append(output_logits(self.model(**batch)).float().cpu().numpy())
        both = np.concatenate(logits)
        answers = postprocess(examples, features, both[:, 0], both[:, 1], self.settings)
        out = [{"answer": answers[str(i)]} for i in range(n)]
        return out[0] if single else out
