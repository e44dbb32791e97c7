"""The data-drift half of a report: an Evidently report on two featured frames, read as signals.

Embeddings are projected on the reference's principal components and every column is tested
with a size-independent distance; see ``docs/drift.md``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ml.drift.features import DESCRIPTORS, embedding_columns
from ml.drift.result import DriftError, DriftSignal
from ml.params import DriftParams

if TYPE_CHECKING:
    import pandas as pd
    from evidently.core.report import Snapshot

PC_PREFIX = "pc_"


@dataclass
class Comparison:
    """The data-drift half of a report: signals, per-column scores and the Evidently snapshot."""

    signals: list[DriftSignal]
    columns: dict[str, dict[str, Any]]
    snapshot: Snapshot


def project_embeddings(
    current: pd.DataFrame, reference: pd.DataFrame, params: DriftParams
) -> tuple[pd.DataFrame, pd.DataFrame, list[float]]:
    """Both sides' embeddings on the reference's first principal components (``pc_1``...).

    Returns the two projections and the share of the reference's variance each component
    explains. The PCA is fitted on the reference only, so the axes are those of the training
    data and a window cannot move them.
    """
    import pandas as pd
    from sklearn.decomposition import PCA

    cols = embedding_columns(reference)
    if cols != embedding_columns(current):
        raise DriftError(
            "current and reference embeddings differ in width; compute both with the same model"
        )
    k = max(1, min(params.pca_components, len(cols), len(reference) - 1))
    pca = PCA(n_components=k, random_state=params.seed)
    ref = pca.fit_transform(reference[cols].to_numpy(dtype="float64"))
    cur = pca.transform(current[cols].to_numpy(dtype="float64"))
    names = [f"{PC_PREFIX}{i + 1}" for i in range(k)]
    return (
        pd.DataFrame(cur, columns=names),
        pd.DataFrame(ref, columns=names),
        [float(v) for v in pca.explained_variance_ratio_],
    )


def _column_plan(pcs: list[str], params: DriftParams) -> dict[str, tuple[str, float]]:
    """Each tested column -> (Evidently drift method, threshold)."""
    plan = {c: (params.descriptor_method, params.descriptor_threshold) for c in DESCRIPTORS}
    plan.update({c: (params.embedding_method, params.embedding_threshold) for c in pcs})
    plan["confidence"] = (params.confidence_method, params.confidence_threshold)
    plan["label"] = (params.label_method, params.label_threshold)
    return plan


def compare(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    params: DriftParams,
    *,
    timestamp: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> Comparison:
    """Run the Evidently report on two featured frames and turn it into data-drift signals.

    Pure apart from Evidently itself: nothing is read or written. Groups: ``text_descriptors``
    and ``embeddings`` drift when their share of drifted columns (Evidently's
    ``DriftedColumnsCount``) reaches the group's share; ``predicted_label`` and ``confidence``
    are one column each; ``dataset`` is the share over every tested column.
    """
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, RowCount, ValueDrift

    cur_pcs, ref_pcs, variance = project_embeddings(current, reference, params)
    pcs = list(ref_pcs.columns)
    plan = _column_plan(pcs, params)
    numeric = [*DESCRIPTORS, *pcs, "confidence"]

    def frame(feats: pd.DataFrame, proj: pd.DataFrame) -> pd.DataFrame:
        out = feats[[*DESCRIPTORS, "confidence"]].reset_index(drop=True).astype(float)
        out = pd.concat([out, proj.reset_index(drop=True)], axis=1)
        out["label"] = feats["label"].astype(str).to_numpy()
        return out[[*numeric, "label"]]

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=["label"])
    groups: dict[str, tuple[list[str], float]] = {
        "text_descriptors": (list(DESCRIPTORS), params.descriptors_drift_share),
        "embeddings": (pcs, params.embeddings_drift_share),
        "dataset": ([*numeric, "label"], params.drift_share),
    }
    metrics: list[Any] = [RowCount()]
    metrics += [ValueDrift(column=c, method=m, threshold=t) for c, (m, t) in plan.items()]
    metrics += [
        DriftedColumnsCount(
            columns=cols,
            drift_share=share,
            per_column_method={c: plan[c][0] for c in cols},
            per_column_threshold={c: plan[c][1] for c in cols},
        )
        for cols, share in groups.values()
    ]
    report = Report(metrics, metadata=dict(metadata or {}), tags=["driftloop", "drift"])
    with warnings.catch_warnings():
        # Evidently correlates the columns for its tables; a constant one (no [UNK] anywhere)
        # has no correlation, which numpy reports as a division warning. The drift is unaffected.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        snapshot = report.run(
            Dataset.from_pandas(frame(current, cur_pcs), data_definition=definition),
            Dataset.from_pandas(frame(reference, ref_pcs), data_definition=definition),
            timestamp=timestamp,
        )
    values = _snapshot_values(snapshot)

    columns: dict[str, dict[str, Any]] = {}
    for col, (method, threshold) in plan.items():
        score = float(values["ValueDrift", col])
        entry: dict[str, Any] = {
            "score": score,
            "threshold": threshold,
            "method": method,
            "drifted": score >= threshold,
        }
        if col == "label":
            seen = sorted({*reference["label"].astype(str), *current["label"].astype(str)})
            entry["reference_shares"] = _shares(reference["label"], seen)
            entry["current_shares"] = _shares(current["label"], seen)
        else:
            ref_col = ref_pcs[col] if col in pcs else reference[col]
            cur_col = cur_pcs[col] if col in pcs else current[col]
            entry["reference_mean"] = float(ref_col.mean())
            entry["current_mean"] = float(cur_col.mean())
        columns[col] = entry

    signals = []
    for name, (cols, share) in groups.items():
        got = values["DriftedColumnsCount", tuple(cols)]
        detail: dict[str, Any] = {
            "drifted_columns": [c for c in cols if columns[c]["drifted"]],
            "tested_columns": len(cols),
        }
        if name != "dataset":
            detail["columns"] = {c: columns[c] for c in cols}
        if name == "embeddings":
            detail["explained_variance"] = variance
        signals.append(DriftSignal(name, float(got["share"]), share, got["share"] >= share, detail))
    for name in ("predicted_label", "confidence"):
        col = "label" if name == "predicted_label" else name
        c = columns[col]
        signals.append(DriftSignal(name, c["score"], c["threshold"], c["drifted"], dict(c)))
    order = ["text_descriptors", "embeddings", "predicted_label", "confidence", "dataset"]
    signals.sort(key=lambda s: order.index(s.name))
    return Comparison(signals=signals, columns=columns, snapshot=snapshot)


def _shares(labels: pd.Series, seen: list[str]) -> dict[str, float]:
    counts = labels.astype(str).value_counts(normalize=True)
    return {label: float(counts.get(label, 0.0)) for label in seen}


def _snapshot_values(snapshot: Snapshot) -> dict[tuple[Any, ...], Any]:
    """Metric values keyed by (metric type, column) or (type, tuple of columns)."""
    out: dict[tuple[Any, ...], Any] = {}
    for item in snapshot.dict()["metrics"]:
        cfg = item["config"]
        kind = cfg["type"].rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            out[kind, cfg["column"]] = item["value"]
        elif kind == "DriftedColumnsCount":
            out[kind, tuple(cfg["columns"])] = item["value"]
        else:
            out[kind, None] = item["value"]
    return out
