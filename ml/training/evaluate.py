"""Evaluation on held-out data (the promotion rule that uses it: :mod:`ml.lifecycle.promotion`).

Every table is scored with macro-averaged recall, macro-F1, accuracy and per-class recall; a
task's ``promotion.metric`` says which one decides (TweetEval's: macro-recall for sentiment,
macro-F1 for emotion).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.params import EvaluateParams

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one labelled table."""

    metrics: dict[str, float]
    labels: tuple[str, ...]  # the confusion matrix's rows and columns, in order
    confusion: list[list[int]]
    report: str
    rows: int
    data: str = ""  # which table (path and md5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> tuple[dict[str, float], Any]:
    """Macro recall/F1, accuracy and per-class recall, plus the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    labels = list(labels)
    per_class = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics = {
        "macro_recall": float(
            recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }
    metrics.update({f"recall_{lab}": float(r) for lab, r in zip(labels, per_class, strict=True)})
    return metrics, confusion_matrix(y_true, y_pred, labels=labels)


def evaluate_predictions(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], data: str = ""
) -> EvalResult:
    from sklearn.metrics import classification_report

    metrics, cm = compute_metrics(y_true, y_pred, labels)
    report = classification_report(y_true, y_pred, labels=list(labels), digits=4, zero_division=0)
    return EvalResult(
        metrics=metrics,
        labels=tuple(labels),
        confusion=cm.tolist(),
        report=str(report),
        rows=len(y_true),
        data=data,
    )


def evaluate_model(
    model: Any, tokenizer: Any, table: pd.DataFrame, params: EvaluateParams, data: str = ""
) -> EvalResult:
    """Predict every row of ``table`` (columns label, text) and score the predictions with the
    model's own labels (a row labelled outside them counts as a miss)."""
    from ml.modeling import model_labels, predict_proba

    labels = model_labels(model)
    probs = predict_proba(
        model, tokenizer, table["text"].tolist(), params.batch_size, params.max_length
    )
    y_pred = [labels[i] for i in probs.argmax(axis=1)]
    return evaluate_predictions(table["label"].tolist(), y_pred, labels, data=data)


def confusion_png(
    confusion: list[list[int]],
    labels: Sequence[str],
    path: Path,
    title: str = "Confusion matrix",
) -> Path:
    """Draw the confusion matrix (counts and row-normalised shading) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), list(labels))
    ax.set_yticks(range(len(labels)), list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{norm[i, j]:.0%}",
                ha="center",
                va="center",
                color=color,
                fontsize=9,
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_to_mlflow(result: EvalResult, prefix: str = "val_") -> None:
    """Log metrics, the confusion-matrix PNG and the classification report to the active run."""
    import tempfile

    import mlflow

    mlflow.log_metrics({f"{prefix}{k}": v for k, v in result.metrics.items()})
    with tempfile.TemporaryDirectory() as tmp:
        png = confusion_png(
            result.confusion, result.labels, Path(tmp) / f"{prefix}confusion_matrix.png"
        )
        mlflow.log_artifact(str(png), "evaluation")
        report = Path(tmp) / f"{prefix}classification_report.txt"
        report.write_text(f"{result.data}\n\n{result.report}")
        mlflow.log_artifact(str(report), "evaluation")
        (Path(tmp) / f"{prefix}metrics.json").write_text(json.dumps(result.to_dict(), indent=2))
        mlflow.log_artifact(str(Path(tmp) / f"{prefix}metrics.json"), "evaluation")
