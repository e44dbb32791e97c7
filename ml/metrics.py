"""Classification metrics shared by drift quality and backend choice (numpy only, any labels)."""

from __future__ import annotations

from collections.abc import Sequence
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
