"""Predictions a run writes beside ``metrics.json``: the dev answers of a QA run (``eval_predictions.json``,
question id -> text, what SQuAD's evaluation script reads) and the ``--test_file`` rows' predictions
(``predict_results.jsonl``: one line per row with its ``idx`` and the label name, or the score)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cap_ds.data.sources import TaskData
from cap_ds.runtime.atomic import atomic_file, write_json
from cap_ds.training.encode import gather_logits

EVAL_PREDICTIONS = "eval_predictions.json"
TEST_PREDICTIONS = "predict_results.jsonl"


def predict_rows(model: torch.nn.Module, data: TaskData, collate, batch_size: int, rank: int,
                 world: int) -> np.ndarray | None:
    """The logits of every ``--test_file`` row in row order (collective; None without a test file)."""
    if data.test is None:
        return None
    sampler = DistributedSampler(data.test, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data.test, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    device = next(model.parameters()).device
    return gather_logits(model, loader, device)[0]


def write_predictions(output_dir: str, data: TaskData, eval_logits: np.ndarray | None,
                      test_logits: np.ndarray | None) -> None:
    """Rank 0: the QA dev answers and the test rows' predictions, each written whole or not at all."""
    task = data.task
    if task.is_qa and eval_logits is not None:
        write_json(os.path.join(output_dir, EVAL_PREDICTIONS), data.scorer.answers(eval_logits))
    if test_logits is None:
        return
    if task.is_regression:
        values = [float(v) for v in test_logits.reshape(-1)]
    else:
        names = task.label_names
        values = [names[i] for i in test_logits.argmax(axis=-1).tolist()]
    lines = "".join(json.dumps({"idx": i, "prediction": v}) + "\n" for i, v in enumerate(values))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(lines)

    atomic_file(os.path.join(output_dir, TEST_PREDICTIONS), write)
