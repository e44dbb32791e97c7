"""Live evidence per model version, from the prediction log (``predictions`` joined with
``feedback``): volume, latency, confidence, errors and accuracy on the requests whose true label
came back, and the one-sided Fisher exact test that compares two versions' accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ml.db import feedback, get_engine, predictions
from ml.settings import get_settings


@dataclass(frozen=True)
class VersionStats:
    """What live traffic says about one model version since a point in time."""

    version: str
    predictions: int = 0
    errors: int = 0
    feedback: int = 0
    correct: int = 0
    mean_confidence: float | None = None
    p95_latency_ms: float | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None

    @property
    def error_rate(self) -> float:
        total = self.predictions + self.errors
        return self.errors / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "error_rate": self.error_rate}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionStats:
        """The inverse of :meth:`to_dict` (the derived ``accuracy``/``error_rate`` are dropped)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def worse_p_value(challenger: VersionStats, champion: VersionStats) -> float | None:
    """One-sided Fisher exact test: p-value for 'the challenger is less accurate'."""
    if not challenger.feedback or not champion.feedback:
        return None
    from scipy.stats import fisher_exact

    table = [
        [challenger.correct, challenger.feedback - challenger.correct],
        [champion.correct, champion.feedback - champion.correct],
    ]
    return float(fisher_exact(table, alternative="less").pvalue)


def version_stats(
    since: datetime, versions: list[str], errors: dict[str, int] | None = None
) -> dict[str, VersionStats]:
    """Per-version evidence from the prediction log since ``since``."""
    engine = get_engine(get_settings().database_url)
    p, f = predictions, feedback
    top = sa.func.greatest if engine.dialect.name == "postgresql" else sa.func.max
    confidence = top(p.c.score_negative, p.c.score_neutral, p.c.score_positive)
    query = (
        sa.select(
            p.c.model_version,
            p.c.latency_ms,
            confidence.label("confidence"),
            p.c.label,
            f.c.label.label("truth"),
        )
        .select_from(p.outerjoin(f, f.c.request_id == p.c.request_id))
        .where(p.c.at >= since, p.c.model_version.in_(versions))
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    out = {}
    for version in versions:
        mine = [r for r in rows if r.model_version == version]
        latencies = sorted(r.latency_ms for r in mine)
        labelled = [r for r in mine if r.truth is not None]
        out[version] = VersionStats(
            version=version,
            predictions=len(mine),
            errors=(errors or {}).get(version, 0),
            feedback=len(labelled),
            correct=sum(r.label == r.truth for r in labelled),
            mean_confidence=(sum(r.confidence for r in mine) / len(mine)) if mine else None,
            p95_latency_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        )
    return out
