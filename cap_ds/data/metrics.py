"""The standard GLUE metrics (accuracy, F1, Matthews, Pearson/Spearman) as plain Python floats."""

from __future__ import annotations

import logging

import numpy as np

from cap_ds.data.tasks import TaskSpec

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------
def _correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    """Pearson/Spearman as a float; NaN (with a warning) when undefined, e.g. constant predictions."""
    from scipy import stats

    if (
        len(x) < 2
        or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)))
        or np.ptp(x) == 0
        or np.ptp(y) == 0
    ):
        logger.warning(
            "%s correlation is undefined (constant, non-finite or < 2 values): returning nan", kind
        )
        return float("nan")
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(x, y)[0])


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics for ``task`` as plain floats; ``task.primary_metric`` is always among the keys.

    ``predictions`` are logits ``[N, C]`` (argmax is taken; ``[N]`` class ids are accepted too) for
    classification, or ``[N]`` / ``[N, 1]`` scores for regression.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(predictions)
    gold = np.asarray(labels).reshape(-1)
    if task.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"regression predictions must be [N] or [N, 1], got shape {preds.shape}")
    else:
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        elif preds.ndim != 1:
            raise ValueError(f"predictions must be logits [N, C] or class ids [N], got shape {preds.shape}")
    if preds.shape[0] != gold.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {gold.shape[0]} labels")
    if gold.shape[0] == 0:
        raise ValueError("compute_metrics needs at least one example")

    if task.is_regression:
        x, y = preds.astype(np.float64), gold.astype(np.float64)
        pearson = _correlation("pearson", x, y)
        spearman = _correlation("spearman", x, y)
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2.0}

    preds = preds.astype(np.int64)
    gold = gold.astype(np.int64)
    out = {"accuracy": float(accuracy_score(gold, preds))}
    if "matthews_correlation" in task.metrics:
        # sklearn returns 0.0 when either side is constant (denominator 0), the conventional value.
        out["matthews_correlation"] = float(matthews_corrcoef(gold, preds))
    if "f1" in task.metrics:
        out["f1"] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
    if "macro_f1" in task.metrics:  # every class the gold or the predictions hold counts equally
        out["macro_f1"] = float(f1_score(gold, preds, average="macro", zero_division=0.0))
    return out
