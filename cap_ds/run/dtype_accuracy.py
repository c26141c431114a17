"""What a faster dtype costs in accuracy: an exported classifier's accuracy on a labelled file with the dense
kernels and with the served (sparsified) path, in each dtype ``cap_ds.run.speed`` times.

On a CPU with bf16 units dense bf16 can be faster than any fp32 path, sparse included; whether a user may take it
depends on what bf16 does to the predictions, so the speed report measures that on the user's own labelled rows
instead of assuming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cap_ds.data.files import guess_text_columns, read_table
from cap_ds.runtime.errors import UserError

FLAG = "--validation_file"


@dataclass(frozen=True)
class LabelledRows:
    """Tokenised rows (batches of ``input_ids``/``attention_mask``/...) and their class ids."""

    path: str
    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def _text_columns(names: list[str], label: str, given: str | None) -> list[str]:
    if given:
        cols = [c.strip() for c in given.split(",") if c.strip()]
        missing = [c for c in cols if c not in names]
        if not cols or len(cols) > 2 or missing:
            raise UserError(f"--text_column_names {given!r}: one or two of the file's columns {names}")
        return cols
    guess = guess_text_columns(names, label)
    if guess is not None:
        return list(guess)
    raise UserError(f"{FLAG}: no text column found among {names}; name it with --text_column_names")


def _class_ids(values: list[Any], config, path: str) -> torch.Tensor:
    """Labels as the model's class ids: names through ``config.label2id``, integers as they are."""
    label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    ids = []
    for value in values:
        if isinstance(value, bool) or value is None:
            raise UserError(f"{FLAG} {path}: label {value!r} is not a class of this model ({sorted(label2id)})")
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()
                                      and str(value).strip() not in label2id):
            ids.append(int(value))
        elif str(value) in label2id:
            ids.append(label2id[str(value)])
        else:
            raise UserError(f"{FLAG} {path}: label {value!r} is not a class of this model ({sorted(label2id)})")
    out = torch.tensor(ids, dtype=torch.long)
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= config.num_labels):
        raise UserError(f"{FLAG} {path}: class ids must be in 0..{config.num_labels - 1} for this model")
    return out


def read_labelled(path: str | Path, folder: Path, config, *, text_columns: str | None = None,
                  label_column: str = "label", max_samples: int | None = None, max_seq_length: int = 128,
                  batch_size: int = 64) -> LabelledRows:
    """A labelled file (CSV/TSV/JSON Lines/JSON/Parquet, as training reads them), tokenised with the export's
    tokenizer; one-line :class:`UserError` for a file this model cannot be scored on."""
    from transformers import AutoTokenizer

    if "QuestionAnswering" in "".join(config.architectures or []) or config.num_labels < 2:
        raise UserError(f"{FLAG}: accuracy needs a classification model; {folder} is not one")
    ds = read_table(FLAG, str(path), label_column)
    if label_column not in ds.column_names:
        raise UserError(f"{FLAG} {path}: no {label_column!r} column (columns: {ds.column_names}); name it with "
                        "--label_column_name")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    cols = _text_columns(ds.column_names, label_column, text_columns)
    labels = _class_ids(list(ds[label_column]), config, str(path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [[str(t) for t in ds[c]] for c in cols]
    batches = []
    for start in range(0, len(ds), batch_size):
        chunk = [t[start:start + batch_size] for t in texts]
        enc = tokenizer(*chunk, truncation=True, max_length=max_seq_length, padding=True, return_tensors="pt")
        batches.append(dict(enc))
    return LabelledRows(str(path), batches, labels)


def accuracy(model: torch.nn.Module, rows: LabelledRows, device: torch.device) -> float:
    """Share of rows whose argmax class is the label (the model in its own dtype)."""
    preds = []
    with torch.inference_mode():
        for batch in rows.batches:
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            preds.append(logits.float().argmax(-1).cpu())
    return float((torch.cat(preds) == rows.labels).float().mean())
