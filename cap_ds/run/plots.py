"""Plots: the per-layer sparsity heat-map written next to every pruned model, and accuracy vs sparsity.

matplotlib runs headless (Agg). Files are written to a temporary name and renamed, so a failed plot never leaves a
truncated PNG.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cap_ds.runtime.atomic import atomic_file

# ``bert.encoder.layer.3.attention.self.query`` -> layer 3, sub-module ``attention.self.query``
_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.(.+)$")
# Short column names for the six linears of a BERT/RoBERTa layer; anything else keeps its own suffix.
_SHORT = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn out", "intermediate.dense": "ffn in", "output.dense": "ffn out",
}


def sparsity_grid(per_module: Mapping[str, float]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """Arrange ``{module name: sparsity}`` as layers x sub-modules.

    Returns ``(layers, columns, rows)``; ``rows[i][j]`` is the sparsity of ``columns[j]`` in ``layers[i]``, or
    None where that layer has no such module. Names without a ``layer.N.`` part are ignored.
    """
    cells: dict[tuple[int, str], float] = {}
    columns: list[str] = []
    for name, value in per_module.items():
        match = _LAYER_RE.search(name)
        if match is None:
            continue
        layer, sub = int(match.group(1)), match.group(2)
        column = _SHORT.get(sub, sub)
        if column not in columns:
            columns.append(column)
        cells[(layer, column)] = float(value)
    order = [c for c in _SHORT.values() if c in columns] + sorted(c for c in columns if c not in _SHORT.values())
    layers = sorted({layer for layer, _ in cells})
    rows = [[cells.get((layer, c)) for c in order] for layer in layers]
    return layers, order, rows


def _save(fig: Any, path: str | Path) -> Path:
    return atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_sparsity_heatmap(report: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Heat-map of the fraction of pruned weights per encoder layer (rows) and linear (columns).

    ``report`` is :func:`cap_ds.compression.sparsity_report`'s dict (``per_module``, ``sparsity`` and, for
    structured pruning, ``structured`` with kept heads/rows, shown next to each layer).
    """
    layers, columns, rows = sparsity_grid(report["per_module"])
    if not layers:
        raise ValueError(f"no 'layer.N.' modules in the sparsity report (got {sorted(report['per_module'])[:5]})")
    plt = _pyplot()
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.5, 0.45 * len(layers) + 1.6))
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(columns)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{100 * data[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if data[i, j] > 0.6 else "white")
    labels = []
    structured = report.get("structured") or {}
    for layer in layers:
        label = f"layer {layer}"
        heads = next((v["heads"] for k, v in structured.items() if f"layer.{layer}." in k and "heads" in v), None)
        neurons = next((v["rows"] for k, v in structured.items()
                        if f"layer.{layer}." in k and k.endswith("intermediate.dense") and "rows" in v), None)
        if heads:
            label += f"  heads {heads[0]}/{heads[1]}"
        if neurons:
            label += f"  ffn {neurons[0]}/{neurons[1]}"
        labels.append(label)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), labels)
    overall = report.get("sparsity")
    heading = title or "Pruned fraction of weights (%)"
    if overall is not None:
        heading += f" - overall {100 * overall:.1f}%"
    ax.set_title(heading, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="sparsity")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_accuracy_vs_sparsity(points: Sequence[Mapping[str, Any]], path: str | Path, *, metric: str = "accuracy",
                              dense: float | None = None, title: str | None = None) -> Path:
    """Line plot of ``metric`` vs sparsity, one line per method.

    ``points``: dicts with ``method``, ``sparsity`` (0-1) and ``metric``; ``dense``: the teacher's score, drawn as
    a dashed line with the 95 % level below it.
    """
    if not points:
        raise ValueError("no results to plot")
    plt = _pyplot()
    by_method: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        by_method.setdefault(str(p["method"]), []).append((100 * float(p["sparsity"]), 100 * float(p[metric])))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = "osD^v<>ph*"
    for k, (method, xy) in enumerate(by_method.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=markers[k % len(markers)], label=method)
    if dense is not None:
        ax.axhline(100 * dense, color="gray", linestyle="--", linewidth=1, label=f"dense teacher {100 * dense:.1f}")
        ax.axhline(95 * dense, color="gray", linestyle=":", linewidth=1, label="95 % of dense")
    ax.set_xlabel("sparsity of encoder linear weights (%)")
    ax.set_ylabel(f"dev {metric} (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
