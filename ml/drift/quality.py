"""The quality half of a report: the task's primary metric on the window's feedback labels.

Compared with the champion's validation value of the same metric (``promotion.metric``:
macro-recall for sentiment, macro-F1 for emotion), with a bootstrap bound so that a few labels
do not raise an alarm; see ``docs/drift.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ml.drift.features import score_columns
from ml.drift.result import DriftSignal
from ml.metrics import METRICS, label_codes, score
from ml.params import DriftParams

if TYPE_CHECKING:
    import pandas as pd
    from evidently.core.report import Snapshot


def quality_signal(
    labelled: pd.DataFrame,
    reference_score: float | None,
    params: DriftParams,
    *,
    metric: str = "macro_recall",
    reference_source: str = "",
) -> tuple[DriftSignal, dict[str, Any] | None]:
    """``metric`` on the window's feedback against the champion's reference value of it.

    The signal fires when the drop exceeds ``quality_drop`` *and* is significant: the
    one-sided bootstrap upper bound (``quality_confidence``) of the window's score is still
    below the reference. With fewer than ``min_feedback`` labelled rows it does not fire and
    says so.
    """
    import numpy as np

    n = len(labelled)
    if n < params.min_feedback or reference_score is None:
        why = (
            f"{n} labelled rows in the window (< min_feedback={params.min_feedback})"
            if n < params.min_feedback
            else f"no reference {metric} to compare with"
        )
        detail = {"metric": metric, "feedback_rows": n, "skipped": why}
        return DriftSignal("quality", None, params.quality_drop, False, detail, "quality"), None
    of = METRICS[metric]
    y_true = labelled["true_label"].astype(str).to_numpy()
    y_pred = labelled["label"].astype(str).to_numpy()
    t, p = label_codes(y_true, y_pred)
    current = of(t, p)
    rng = np.random.default_rng(params.seed)
    boots = []
    for _ in range(500):
        idx = rng.integers(0, n, n)
        boots.append(of(t[idx], p[idx]))
    upper = float(np.nanquantile(boots, params.quality_confidence))
    lower = float(np.nanquantile(boots, 1 - params.quality_confidence))
    drop = float(reference_score) - current
    drifted = drop > params.quality_drop and upper < float(reference_score)
    quality = {
        "metric": metric,
        "feedback_rows": n,
        "score": current,
        "score_ci": [lower, upper],
        "confidence": params.quality_confidence,
        "accuracy": float((y_true == y_pred).mean()),
        "recall_by_label": {
            c: float((y_pred[y_true == c] == c).mean()) for c in sorted(set(y_true.tolist()))
        },
        "reference_score": float(reference_score),
        "reference_source": reference_source,
        "drop": drop,
    }
    return DriftSignal("quality", drop, params.quality_drop, drifted, quality, "quality"), quality


def quality_report(
    labelled: pd.DataFrame,
    reference: pd.DataFrame,
    *,
    labels: Sequence[str],
    timestamp: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> Snapshot:
    """Evidently's classification view of the window's feedback rows next to the reference.

    The reference rows carry their true labels and the champion's predictions, so both sides
    are the same classifier on labelled data: the window's feedback and training-period rows.
    """
    import pandas as pd
    from evidently import (
        BinaryClassification,
        DataDefinition,
        Dataset,
        MulticlassClassification,
        Report,
    )
    from evidently.metrics import Accuracy, F1Score, Recall

    # Probabilities in columns named after the labels: Evidently then knows every class of the
    # task even when a window's feedback holds only some of them.
    # A two-label task is binary to Evidently, which then needs the positive label's
    # probability and its name: the second label's, by the order of the model's outputs.
    labels = list(labels)
    task: Any = (
        BinaryClassification(target="true_label", prediction_probas=labels[1], pos_label=labels[1])
        if len(labels) == 2
        else MulticlassClassification(target="true_label", prediction_probas=labels)
    )
    definition = DataDefinition(categorical_columns=["true_label"], classification=[task])

    def dataset(df: pd.DataFrame) -> Dataset:
        rows = df[df["true_label"].isin(labels)]
        frame = pd.DataFrame({"true_label": rows["true_label"].astype(str).to_numpy()})
        probs = rows[score_columns(labels)].to_numpy(dtype=float)
        probs = probs / probs.sum(axis=1, keepdims=True).clip(min=1e-12)  # float32 sums drift
        for j, label in enumerate(labels):
            frame[label] = probs[:, j]
        return Dataset.from_pandas(frame, data_definition=definition)

    has_truth = "true_label" in reference.columns and reference["true_label"].isin(labels).any()
    report = Report(
        [Recall(), Accuracy(), F1Score()],
        metadata=dict(metadata or {}),
        tags=["driftloop", "quality"],
    )
    with warnings.catch_warnings():
        # A window's feedback may lack a class: sklearn warns that its recall/AUC is undefined.
        warnings.simplefilter("ignore", UserWarning)
        return report.run(
            dataset(labelled), dataset(reference) if has_truth else None, timestamp=timestamp
        )


def reference_score(
    version: str | None,
    reference: pd.DataFrame,
    given: float | None,
    labels: Sequence[str],
    metric: str = "macro_recall",
) -> tuple[float | None, str]:
    """The ``metric`` value the window is held to: given, else the version's validation
    value, else the reference sample's."""
    if given is not None:
        return float(given), "given"
    if version is not None:
        from ml import registry

        value = registry.get_version(str(version)).metrics.get(f"val_{metric}")
        if value is not None:
            return float(value), f"v{version} val_{metric}"
    if "true_label" in reference.columns and reference["true_label"].isin(labels).any():
        rows = reference[reference["true_label"].isin(labels)]
        return score(metric, rows["true_label"], rows["label"]), "reference sample"
    return None, ""
