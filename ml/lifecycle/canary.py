"""Canary rollout: a challenger that passed the offline gate serves a share of live traffic, and
is promoted or removed on the evidence of that traffic.

The evidence comes from the prediction log (``predictions`` joined with ``feedback``), split by
the model version that answered: volume, latency, confidence, errors, and accuracy on the
requests whose true label came back as feedback. Accuracy is compared with a one-sided Fisher
exact test, so a challenger is rolled back as soon as it is *clearly* worse, without waiting for
the full sample, and promoted only once enough labels show it is not worse.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from ml import registry
from ml.db import feedback, get_engine, predictions
from ml.params import RolloutParams, load_params
from ml.settings import get_settings

log = logging.getLogger(__name__)

CANARY_SHARE_TAG = "canary_share"
CANARY_STARTED_TAG = "canary_started_at"


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


@dataclass(frozen=True)
class CanaryDecision:
    """``promote``, ``rollback`` or ``wait``, with the evidence that decided it."""

    action: str
    reason: str
    champion: VersionStats
    challenger: VersionStats
    p_value: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "p_value": self.p_value,
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
            "checks": self.checks,
        }


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


def decide_canary(
    champion: VersionStats, challenger: VersionStats, params: RolloutParams
) -> CanaryDecision:
    """Apply the rollout rule to live evidence. Pure: no I/O.

    Rollback at once if the challenger errs more, is much slower, loses its confidence, or is
    significantly less accurate at the early (stricter) level; promote once both versions have
    ``min_feedback`` labels and the challenger is not worse beyond ``max_accuracy_drop`` nor
    significantly worse; otherwise wait for more traffic.
    """
    p = worse_p_value(challenger, champion)
    checks: dict[str, Any] = {"p_value_worse": p}

    def decision(action: str, reason: str) -> CanaryDecision:
        return CanaryDecision(action, reason, champion, challenger, p, checks)

    served = challenger.predictions + challenger.errors
    if served >= params.min_requests_for_errors:
        excess = challenger.error_rate - champion.error_rate
        checks["error_rate_excess"] = excess
        if excess > params.max_error_rate_increase:
            return decision(
                "rollback",
                f"challenger v{challenger.version} errs on "
                f"{challenger.error_rate:.1%} of requests vs champion "
                f"{champion.error_rate:.1%}",
            )
    if challenger.predictions >= params.min_predictions and champion.predictions > 0:
        if challenger.p95_latency_ms and champion.p95_latency_ms:
            ratio = challenger.p95_latency_ms / max(champion.p95_latency_ms, 1e-6)
            checks["latency_ratio"] = ratio
            if ratio > params.max_latency_ratio:
                return decision("rollback", f"challenger p95 latency {ratio:.1f}x the champion's")
        if challenger.mean_confidence is not None and champion.mean_confidence:
            conf_ratio = challenger.mean_confidence / champion.mean_confidence
            checks["confidence_ratio"] = conf_ratio
            if conf_ratio < params.min_confidence_ratio:
                return decision(
                    "rollback",
                    f"challenger mean confidence "
                    f"{challenger.mean_confidence:.2f} vs champion "
                    f"{champion.mean_confidence:.2f}: clearly worse",
                )
    if (
        p is not None
        and challenger.feedback >= params.min_feedback_early
        and p < params.early_alpha
    ):
        return decision(
            "rollback",
            f"challenger accuracy {challenger.accuracy:.3f} on "
            f"{challenger.feedback} labels is significantly below the champion's "
            f"{champion.accuracy:.3f} (p={p:.4f} < {params.early_alpha})",
        )
    if challenger.feedback >= params.min_feedback and champion.feedback >= params.min_feedback:
        assert challenger.accuracy is not None and champion.accuracy is not None
        drop = champion.accuracy - challenger.accuracy
        checks["accuracy_drop"] = drop
        if p is not None and p < params.alpha:
            return decision(
                "rollback",
                f"challenger accuracy {challenger.accuracy:.3f} is "
                f"significantly below the champion's {champion.accuracy:.3f} "
                f"(p={p:.4f} < {params.alpha})",
            )
        if drop <= params.max_accuracy_drop:
            return decision(
                "promote",
                f"challenger accuracy {challenger.accuracy:.3f} vs "
                f"champion {champion.accuracy:.3f} on {challenger.feedback}/"
                f"{champion.feedback} labels: not worse (drop {drop:+.3f} <= "
                f"{params.max_accuracy_drop}), no error or latency regression",
            )
        if challenger.feedback >= params.max_feedback:
            return decision(
                "rollback",
                f"challenger accuracy stays {drop:.3f} below the "
                f"champion's after {challenger.feedback} labels",
            )
    return decision(
        "wait",
        f"not enough evidence yet: challenger {challenger.predictions} "
        f"predictions/{challenger.feedback} labels, champion "
        f"{champion.predictions}/{champion.feedback} (need {params.min_feedback} "
        "labels each)",
    )


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


def start_canary(version: str, *, actor: str, reason: str, share: float | None = None) -> None:
    """Put ``version`` on a canary share of traffic (alias ``challenger`` + tags the service
    reads), recorded in the audit table."""
    share = load_params().rollout.canary_share if share is None else share
    registry.set_version_tag(version, CANARY_SHARE_TAG, f"{share:.4f}")
    registry.set_version_tag(version, CANARY_STARTED_TAG, datetime.now(tz=UTC).isoformat())
    registry.set_alias(
        registry.CHALLENGER,
        version,
        actor=actor,
        action="canary_start",
        reason=f"{reason}; canary on {share:.0%} of traffic",
    )


def canary_in_progress() -> registry.ModelVersionInfo | None:
    """The challenger currently on canary traffic, if any."""
    challenger = registry.get_alias(registry.CHALLENGER)
    if challenger is None or CANARY_STARTED_TAG not in challenger.tags:
        return None
    if float(challenger.tags.get(CANARY_SHARE_TAG, "0") or 0) <= 0:
        return None
    return challenger


def evaluate_canary(
    *, actor: str, errors: dict[str, int] | None = None, params: RolloutParams | None = None
) -> CanaryDecision | None:
    """Decide on the live canary (if any) and apply the decision; None when no canary is live."""
    params = params or load_params().rollout
    challenger = canary_in_progress()
    champion = registry.get_alias(registry.CHAMPION)
    if challenger is None or champion is None:
        return None
    since = datetime.fromisoformat(challenger.tags[CANARY_STARTED_TAG])
    stats = version_stats(since, [champion.version, challenger.version], errors)
    decision = decide_canary(stats[champion.version], stats[challenger.version], params)
    log.info(
        "canary v%s vs champion v%s: %s (%s)",
        challenger.version,
        champion.version,
        decision.action,
        decision.reason,
    )
    apply_decision(decision, actor=actor)
    return decision


def apply_decision(decision: CanaryDecision, *, actor: str) -> None:
    """Promote (move ``champion``) or roll back (end the canary); record the evidence."""
    version = decision.challenger.version
    if decision.action == "promote":
        registry.set_version_tag(version, CANARY_SHARE_TAG, "0")
        registry.set_alias(
            registry.CHAMPION,
            version,
            actor=actor,
            action="canary_promote",
            reason=decision.reason,
            evidence=decision.to_dict(),
        )
    elif decision.action == "rollback":
        registry.set_version_tag(version, CANARY_SHARE_TAG, "0")
        registry.set_version_tag(version, "rejected", decision.reason[:250])
        registry.delete_alias(
            registry.CHALLENGER,
            actor=actor,
            action="canary_rollback",
            reason=decision.reason,
            evidence=decision.to_dict(),
        )
