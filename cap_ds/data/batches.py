"""From rows to batches: tokenisation, dynamic padding (``GlueCollator``, batches keep ``idx``) and the run's
four data loaders (train, encode, evaluate, importance)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cap_ds.cap.shards import ShardSampler
from cap_ds.data.tasks import TaskSpec

logger = logging.getLogger(__name__)


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
    is given) and int64 otherwise (QA: ``[B, 2]`` start and end token positions); ``idx`` is int64 so per-example state can be gathered with it.
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
            if isinstance(labels[0], list | tuple | np.ndarray | torch.Tensor):  # QA: [start, end] token positions
                batch["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
                labels = None
        if "labels" in features[0] and labels is not None:
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


@dataclass(frozen=True)
class LoaderSettings:
    """Batch sizes and workers of the run's loaders; ``importance``: CAP-f's ordered pass is needed."""

    seed: int
    train_batch: int
    eval_batch: int
    num_workers: int = 0
    importance: bool = False
    pin_memory: bool = False


def make_loaders(train_ds: datasets.Dataset, eval_ds: datasets.Dataset, collate: GlueCollator, *, rank: int,
                 world: int, settings: LoaderSettings) -> Loaders:
    """Every loader is seeded with its own generator: creating a loader iterator must not draw from the global RNG
    (dropout), or a resumed run would diverge from an uninterrupted one. ``pin_memory`` (on CUDA) lets batches
    reach the device by asynchronous copies (``transfer.to_device``)."""
    seed, num_workers, pin_memory = settings.seed, settings.num_workers, settings.pin_memory
    train_batch, eval_batch, importance = settings.train_batch, settings.eval_batch, settings.importance

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


