"""Live evidence per model version, from the prediction log (``predictions`` joined with
``feedback`` and ``shadow_predictions``): volume, latency, confidence, errors and accuracy on the
requests whose true label came back; the per-label differences a canary is decided on (paired
when both models scored the text); and the one-sided Fisher exact test that compares two
versions' accuracy. Labels count only as the source policy allows (:mod:`ml.label_policy`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from ml.db import feedback, get_engine, predictions, shadow_predictions
from ml.label_policy import SourceCount, counted_mask, holdouts
from ml.params import LabelParams, load_params
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
    by_source: dict[str, list[int]] = field(default_factory=dict)  # source: [labels, correct]

    def without(self, source: str) -> VersionStats:
        """The same evidence with one source's labels left out."""
        labels, correct = self.by_source.get(source, [0, 0])
        rest = {s: v for s, v in self.by_source.items() if s != source}
        return replace(
            self, feedback=self.feedback - labels, correct=self.correct - correct, by_source=rest
        )

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
    since: datetime,
    versions: list[str],
    errors: dict[str, int] | None = None,
    policy: LabelParams | None = None,
) -> dict[str, VersionStats]:
    """Per-version evidence from the prediction log since ``since``.

    Labels count as ``policy`` (default ``labels:`` of params.yaml) allows, over all the
    versions' labels together: one decision, one tally per source.
    """
    params = load_params()
    policy = policy or params.labels
    model = params.task.registered_name  # versions are numbered per registered model
    engine = get_engine(get_settings().database_url)
    p, f = predictions, feedback
    query = (
        sa.select(
            p.c.model_version,
            p.c.latency_ms,
            p.c.confidence,
            p.c.label,
            f.c.label.label("truth"),
            f.c.source,
        )
        .select_from(p.outerjoin(f, f.c.request_id == p.c.request_id))
        .where(p.c.at >= since, p.c.model_name == model, p.c.model_version.in_(versions))
        .order_by(f.c.at, p.c.request_id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    labelled_rows = [r for r in rows if r.truth is not None]
    keep, _ = counted_mask([r.source for r in labelled_rows], policy)
    counted = {id(r) for r, k in zip(labelled_rows, keep, strict=True) if k}
    out = {}
    for version in versions:
        mine = [r for r in rows if r.model_version == version]
        latencies = sorted(r.latency_ms for r in mine)
        labelled = [r for r in mine if id(r) in counted]
        by_source: dict[str, list[int]] = {}
        for r in labelled:
            tally = by_source.setdefault(r.source, [0, 0])
            tally[0] += 1
            tally[1] += int(r.label == r.truth)
        out[version] = VersionStats(
            version=version,
            predictions=len(mine),
            errors=(errors or {}).get(version, 0),
            feedback=len(labelled),
            correct=sum(r.label == r.truth for r in labelled),
            mean_confidence=(sum(r.confidence for r in mine) / len(mine)) if mine else None,
            p95_latency_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            by_source=by_source,
        )
    return out


@dataclass(frozen=True)
class CanaryLabels:
    """The per-label differences a canary is judged on, in the order the labels came.

    ``diffs`` are challenger-minus-champion correctness: in ``{-1, 0, 1}`` for a paired label
    (the other model scored the same text in shadow), importance-weighted from the model that
    answered otherwise (:func:`ml.lifecycle.sequential.unpaired_diffs`). ``low``/``high`` bound
    each value. ``shadowed``/``disagreed`` count every shadow-scored request (labelled or not)
    and those on which the two models' labels differ; ``kappa`` is Cohen's kappa of the two
    models' labels on them (agreement beyond what their label shares give by chance).
    ``holdouts`` holds, per source, the mask of the labels without it
    (:func:`ml.label_policy.holdouts`): a decision must hold on each.
    """

    diffs: np.ndarray
    low: np.ndarray
    high: np.ndarray
    is_paired: np.ndarray
    sources: SourceCount
    shadowed: int = 0
    disagreed: int = 0
    kappa: float | None = None
    holdouts: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def paired(self) -> int:
        return int(self.is_paired.sum())

    @property
    def unpaired(self) -> int:
        return len(self.is_paired) - self.paired

    @property
    def disagreement(self) -> float | None:
        return self.disagreed / self.shadowed if self.shadowed else None

    def summary(self) -> dict[str, Any]:
        """What an audit row records about the labels (not the values themselves)."""
        return {
            "paired": self.paired,
            "unpaired": self.unpaired,
            "by_source": self.sources.to_dict(),
            "shadowed_requests": self.shadowed,
            "disagreement_rate": self.disagreement,
            "kappa": self.kappa,
        }


def cohen_kappa(table: dict[tuple[str, str], int]) -> float | None:
    """Cohen's kappa of two raters from ``(label by one, label by the other) -> count``."""
    total = sum(table.values())
    if not total:
        return None
    observed = sum(n for (a, b), n in table.items() if a == b) / total
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    for (a, b), n in table.items():
        first[a] = first.get(a, 0) + n
        second[b] = second.get(b, 0) + n
    chance = sum(first[k] * second.get(k, 0) for k in first) / total**2
    return 1.0 if chance >= 1 else (observed - chance) / (1 - chance)


def challenger_serving_since(since: datetime, challenger: str) -> datetime | None:
    """When the challenger first answered or shadow-scored a request logged since ``since``;
    None when it has not yet.

    The canary starts in the registry, and each service loads the challenger a while later
    (a poll, then the load). Until then the champion answers every request, so its labels in
    that gap are not the random ``1 - share`` the unpaired differences assume: counting them
    would tilt the test towards "challenger worse". The canary's evidence starts here instead.
    """
    model = load_params().task.registered_name  # versions are numbered per registered model
    p, s = predictions, shadow_predictions
    answered = sa.select(sa.func.min(p.c.at)).where(
        p.c.at >= since, p.c.model_name == model, p.c.model_version == challenger
    )
    shadowed = (
        sa.select(sa.func.min(p.c.at))
        .select_from(p.join(s, s.c.request_id == p.c.request_id))
        .where(p.c.at >= since, p.c.model_name == model, s.c.model_version == challenger)
    )
    with get_engine(get_settings().database_url).connect() as conn:
        firsts = [conn.execute(q).scalar() for q in (answered, shadowed)]
    # SQLite gives the stored UTC times back without their zone
    seen = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in firsts if t is not None]
    return min(seen) if seen else None


def canary_labels(
    since: datetime,
    champion: str,
    challenger: str,
    share: float,
    policy: LabelParams | None = None,
) -> CanaryLabels:
    """The canary's labelled evidence since ``since`` (see :class:`CanaryLabels`).

    ``share`` is the challenger's traffic share, which weights the unpaired labels.
    """
    from ml.lifecycle.sequential import unpaired_bounds, unpaired_diffs

    params = load_params()
    policy = policy or params.labels
    model = params.task.registered_name  # versions are numbered per registered model
    engine = get_engine(get_settings().database_url)
    p, f, s = predictions, feedback, shadow_predictions
    pair = [champion, challenger]
    base = p.outerjoin(s, s.c.request_id == p.c.request_id)
    scope = sa.and_(p.c.at >= since, p.c.model_name == model, p.c.model_version.in_(pair))
    labelled = (
        sa.select(
            p.c.model_version,
            p.c.label,
            s.c.model_version.label("shadow_version"),
            s.c.label.label("shadow_label"),
            f.c.label.label("truth"),
            f.c.source,
        )
        .select_from(base.join(f, f.c.request_id == p.c.request_id))
        .where(scope)
        .order_by(f.c.at, p.c.request_id)
    )
    shadow_pairs = (
        sa.select(p.c.model_version, p.c.label, s.c.label.label("shadow_label"), sa.func.count())
        .select_from(p.join(s, s.c.request_id == p.c.request_id))
        .where(scope, s.c.model_version.in_(pair), s.c.model_version != p.c.model_version)
        .group_by(p.c.model_version, p.c.label, s.c.label)
    )
    with engine.connect() as conn:
        rows = conn.execute(labelled).all()
        # (champion's label, challenger's label) -> shadow-scored requests
        table: dict[tuple[str, str], int] = {}
        for version, said, shadow_said, n in conn.execute(shadow_pairs):
            cell = (said, shadow_said) if version == champion else (shadow_said, said)
            table[cell] = table.get(cell, 0) + int(n)
    shadowed = sum(table.values())
    disagreed = sum(n for (a, b), n in table.items() if a != b)
    keep, tally = counted_mask([r.source for r in rows], policy)
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    is_paired = np.array(
        [r.shadow_version in pair and r.shadow_version != r.model_version for r in rows],
        dtype=bool,
    )
    by_challenger = np.array([r.model_version == challenger for r in rows], dtype=bool)
    served_right = np.array([r.label == r.truth for r in rows], dtype=float)
    shadow_right = np.array([r.shadow_label == r.truth for r in rows], dtype=float)
    challenger_right = np.where(by_challenger, served_right, shadow_right)
    champion_right = np.where(by_challenger, shadow_right, served_right)
    weighted = unpaired_diffs(by_challenger, served_right, share) if rows else np.zeros(0)
    diffs = np.where(is_paired, challenger_right - champion_right, weighted)
    unpaired_low, unpaired_high = unpaired_bounds(share)
    low = np.where(is_paired, -1.0, unpaired_low)
    high = np.where(is_paired, 1.0, unpaired_high)
    return CanaryLabels(
        diffs=diffs.astype(float),
        low=low.astype(float),
        high=high.astype(float),
        is_paired=is_paired,
        sources=tally,
        shadowed=shadowed,
        disagreed=disagreed,
        kappa=cohen_kappa(table),
        holdouts=holdouts([r.source for r in rows], policy),
    )
