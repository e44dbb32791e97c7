"""Classification metrics shared by drift quality and backend choice (numpy only, any labels).

The names are those of a task's ``promotion.metric`` and of the training table's ``val_*``
metrics (:mod:`ml.training.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def label_codes(y_true: Sequence[str], y_pred: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Both label sequences as integer codes of the classes in ``y_true`` (other labels: -1)."""
    import numpy as np

    truth = [str(v) for v in y_true]
    index = {label: i for i, label in enumerate(sorted(set(truth)))}
    t = np.fromiter((index[v] for v in truth), dtype=np.int64, count=len(truth))
    p = np.fromiter((index.get(str(v), -1) for v in y_pred), dtype=np.int64)
    return t, p


def macro_recall_codes(t: np.ndarray, p: np.ndarray) -> float:
    """Recall averaged over the classes present in ``t`` (codes of :func:`label_codes`)."""
    import numpy as np

    k = int(t.max()) + 1 if len(t) else 0
    support = np.bincount(t, minlength=k)
    hits = np.bincount(t[t == p], minlength=k)
    present = support > 0
    return float((hits[present] / support[present]).mean()) if present.any() else float("nan")


def macro_recall(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Recall averaged over the classes present in ``y_true`` (absent classes are undefined);
    NaN for no rows."""
    t, p = label_codes(y_true, y_pred)
    return macro_recall_codes(t, p) if len(t) else float("nan")


def macro_f1_codes(t: np.ndarray, p: np.ndarray) -> float:
    """F1 averaged over the classes present in ``t`` (codes of :func:`label_codes`)."""
    import numpy as np

    k = int(t.max()) + 1 if len(t) else 0
    support = np.bincount(t, minlength=k)
    hits = np.bincount(t[t == p], minlength=k)
    predicted = np.bincount(p[p >= 0], minlength=k)[:k]
    present = support > 0
    f1 = 2 * hits[present] / (support[present] + predicted[present])
    return float(f1.mean()) if present.any() else float("nan")


def accuracy_codes(t: np.ndarray, p: np.ndarray) -> float:
    """Share of rows whose prediction is the truth."""
    return float((t == p).mean()) if len(t) else float("nan")


# What a task's ``promotion.metric`` may name; each takes the codes of :func:`label_codes`.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "macro_recall": macro_recall_codes,
    "macro_f1": macro_f1_codes,
    "accuracy": accuracy_codes,
}


def score(metric: str, y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """``metric`` (a key of :data:`METRICS`) of the predictions; NaN for no rows."""
    t, p = label_codes(y_true, y_pred)
    return METRICS[metric](t, p) if len(t) else float("nan")


def metric_name(metric: str) -> str:
    """How people write ``metric``: macro-recall, macro-F1, accuracy."""
    return {"macro_recall": "macro-recall", "macro_f1": "macro-F1"}.get(metric, metric)
