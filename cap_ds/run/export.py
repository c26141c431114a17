"""Export: the pruned model saved with ``save_pretrained`` (safetensors) plus the tokenizer.

- Unstructured masks only: masks are baked into the weights of the *original* architecture, so plain
  ``transformers.AutoModelForSequenceClassification.from_pretrained`` loads it with no cap_ds code.
- Structured masks (heads / FFN neurons): the physically cleaned, smaller model
  (``compression.save_clean_pretrained``; loads after ``import cap_ds`` or with ``trust_remote_code=True``).
Both are collectives under ZeRO-3 (call on every rank); rank 0 writes to a temporary folder renamed into place,
so a failed export never leaves a half-written directory. Given the sparsity report, the export also carries
``sparsity.json`` and the per-layer heat-map ``sparsity_heatmap.png``. Written last, ``files.json`` records the size
and checksum of every other file, so a user or a later tool can check a copied or archived export with
:func:`verify_folder` (``python -c "from cap_ds.run.export import verify_folder; print(verify_folder('final'))"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cap_ds.compression import baked_state, has_structured_masks, masked_modules, save_clean_pretrained
from cap_ds.compression.stats import sparsity_report as measure_sparsity
from cap_ds.run.plots import plot_sparsity_heatmap
from cap_ds.runtime.atomic import atomic_dir
from cap_ds.runtime.collectives import barrier, rank
from cap_ds.runtime.manifest import EXPORT_MANIFEST, verify_folder, write_folder_manifest

__all__ = ["EXPORT_MANIFEST", "export_pretrained", "plain_model", "sparsity_files", "verify_folder"]


def plain_model(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A fresh transformers model of the same config and head (sequence classification or QA) holding the baked
    weights."""
    from cap_ds.data.models import model_class

    plain = model_class("QuestionAnswering" in type(model).__name__).from_config(model.config)
    plain.load_state_dict(state if state is not None else baked_state(model), strict=True)
    return plain.eval()


HEATMAP_FILE = "sparsity_heatmap.png"
SPARSITY_FILE = "sparsity.json"


def sparsity_files(report: dict[str, Any] | None, title: str | None = None):
    """A writer that puts ``sparsity.json`` and the heat-map into an export folder (None without a report)."""
    if report is None:
        return None

    def write(folder: Path) -> None:
        (folder / SPARSITY_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        plot_sparsity_heatmap(report, folder / HEATMAP_FILE, title=title)

    return write


def export_pretrained(model: nn.Module, tokenizer: Any, target: str | Path,
                      sparsity_report: dict[str, Any] | None = None, title: str | None = None,
                      card: str | None = None) -> Path:
    """Save the pruned model + tokenizer to ``target`` (collective; rank 0 writes); returns the path.

    A model with masks gets ``sparsity.json`` and ``sparsity_heatmap.png`` in the export, from
    ``sparsity_report`` when given (:func:`cap_ds.compression.sparsity_report` of the masked model) or measured here.
    ``card``: the model card's text, written as ``README.md`` (``run/model_card.py``).
    """
    target = Path(target)
    if sparsity_report is None and masked_modules(model):
        sparsity_report = measure_sparsity(model)  # collective under ZeRO-3, like the export itself
    sparsity = sparsity_files(sparsity_report, title)

    def extra(folder: Path) -> None:  # last inside the atomic write: the manifest covers every other file
        if sparsity is not None:
            sparsity(folder)
        if card is not None:
            (folder / "README.md").write_text(card, encoding="utf-8")
        write_folder_manifest(folder)

    if has_structured_masks(model):
        return save_clean_pretrained(model, target, tokenizer, extra_files=extra)
    state = baked_state(model)  # gathers partitioned parameters on every rank
    if rank() == 0:
        plain = plain_model(model, state)

        def write(tmp: Path) -> None:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            extra(tmp)

        atomic_dir(target, write)
    barrier()
    return target

