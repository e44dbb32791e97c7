"""Canary rollout: a challenger that passed the offline gate serves a share of live traffic, and
is promoted or removed on the evidence of that traffic (:mod:`ml.lifecycle.evidence`).

A challenger is rolled back as soon as it is *clearly* worse, without waiting for the full
sample, and promoted only once enough labels show it is not worse. See ``docs/lifecycle.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ml import registry
from ml.lifecycle.evidence import VersionStats, version_stats, worse_p_value
from ml.lifecycle.loop import nothing_to_judge
from ml.lifecycle.metrics import emit_metric
from ml.lifecycle.outcomes import CANARY_OUTCOMES, CanaryAction, CanaryOutcome
from ml.params import RolloutParams, load_params
from ml.registry import AuditAction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryDecision:
    """``promote``, ``rollback`` or ``wait``, with the evidence that decided it."""

    action: CanaryAction
    reason: str
    champion: VersionStats
    challenger: VersionStats
    p_value: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "reason": self.reason,
            "p_value": self.p_value,
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
            "checks": self.checks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryDecision:
        return cls(
            action=CanaryAction(data["action"]),
            reason=data["reason"],
            champion=VersionStats.from_dict(data["champion"]),
            challenger=VersionStats.from_dict(data["challenger"]),
            p_value=data.get("p_value"),
            checks=dict(data.get("checks") or {}),
        )


@dataclass(frozen=True)
class CanaryEvaluation:
    """How a ``canary_rollout`` run ends, why, and the canary rule's decision if it ran."""

    outcome: CanaryOutcome
    reason: str
    decision: CanaryDecision | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": str(self.outcome),
            "reason": self.reason,
            "decision": self.decision.to_dict() if self.decision else None,
        }


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

    def decision(action: CanaryAction, reason: str) -> CanaryDecision:
        return CanaryDecision(
            action=action,
            reason=reason,
            champion=champion,
            challenger=challenger,
            p_value=p,
            checks=checks,
        )

    served = challenger.predictions + challenger.errors
    if served >= params.min_requests_for_errors:
        excess = challenger.error_rate - champion.error_rate
        checks["error_rate_excess"] = excess
        if excess > params.max_error_rate_increase:
            return decision(
                CanaryAction.ROLLBACK,
                f"challenger v{challenger.version} errs on "
                f"{challenger.error_rate:.1%} of requests vs champion "
                f"{champion.error_rate:.1%}",
            )
    if challenger.predictions >= params.min_predictions and champion.predictions > 0:
        if challenger.p95_latency_ms and champion.p95_latency_ms:
            ratio = challenger.p95_latency_ms / max(champion.p95_latency_ms, 1e-6)
            checks["latency_ratio"] = ratio
            if ratio > params.max_latency_ratio:
                return decision(
                    CanaryAction.ROLLBACK, f"challenger p95 latency {ratio:.1f}x the champion's"
                )
        if challenger.mean_confidence is not None and champion.mean_confidence:
            conf_ratio = challenger.mean_confidence / champion.mean_confidence
            checks["confidence_ratio"] = conf_ratio
            if conf_ratio < params.min_confidence_ratio:
                return decision(
                    CanaryAction.ROLLBACK,
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
            CanaryAction.ROLLBACK,
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
                CanaryAction.ROLLBACK,
                f"challenger accuracy {challenger.accuracy:.3f} is "
                f"significantly below the champion's {champion.accuracy:.3f} "
                f"(p={p:.4f} < {params.alpha})",
            )
        if drop <= params.max_accuracy_drop:
            return decision(
                CanaryAction.PROMOTE,
                f"challenger accuracy {challenger.accuracy:.3f} vs "
                f"champion {champion.accuracy:.3f} on {challenger.feedback}/"
                f"{champion.feedback} labels: not worse (drop {drop:+.3f} <= "
                f"{params.max_accuracy_drop}), no error or latency regression",
            )
        if challenger.feedback >= params.max_feedback:
            return decision(
                CanaryAction.ROLLBACK,
                f"challenger accuracy stays {drop:.3f} below the "
                f"champion's after {challenger.feedback} labels",
            )
    return decision(
        CanaryAction.WAIT,
        f"not enough evidence yet: challenger {challenger.predictions} "
        f"predictions/{challenger.feedback} labels, champion "
        f"{champion.predictions}/{champion.feedback} (need {params.min_feedback} "
        "labels each)",
    )


def start_canary(version: str, *, actor: str, reason: str, share: float | None = None) -> None:
    """Put ``version`` on a canary share of traffic (alias ``challenger`` + tags the service
    reads), recorded in the audit table."""
    share = load_params().rollout.canary_share if share is None else share
    registry.set_version_tag(version, registry.CANARY_SHARE_TAG, f"{share:.4f}")
    registry.set_version_tag(version, registry.CANARY_STARTED_TAG, datetime.now(tz=UTC).isoformat())
    registry.set_alias(
        registry.CHALLENGER,
        version,
        actor=actor,
        action=AuditAction.CANARY_START,
        reason=f"{reason}; canary on {share:.0%} of traffic",
    )


def canary_in_progress() -> registry.ModelVersionInfo | None:
    """The challenger currently on canary traffic, if any."""
    challenger = registry.get_alias(registry.CHALLENGER)
    if challenger is None or registry.CANARY_STARTED_TAG not in challenger.tags:
        return None
    if float(challenger.tags.get(registry.CANARY_SHARE_TAG, "0") or 0) <= 0:
        return None
    return challenger


def judge_canary(
    *, errors: dict[str, int] | None = None, params: RolloutParams | None = None
) -> CanaryDecision | None:
    """The canary rule's decision on the live canary; None when no canary is live. Changes
    nothing: :func:`promote_canary` / :func:`roll_back_canary` act on it."""
    params = params or load_params().rollout
    challenger = canary_in_progress()
    champion = registry.get_alias(registry.CHAMPION)
    if challenger is None or champion is None:
        return None
    since = datetime.fromisoformat(challenger.tags[registry.CANARY_STARTED_TAG])
    stats = version_stats(since, [champion.version, challenger.version], errors)
    decision = decide_canary(stats[champion.version], stats[challenger.version], params)
    log.info(
        "canary v%s vs champion v%s: %s (%s)",
        challenger.version,
        champion.version,
        decision.action,
        decision.reason,
    )
    return decision


def evaluate(*, errors: dict[str, int] | None = None) -> CanaryEvaluation:
    """How this ``canary_rollout`` run ends: nothing to judge, no canary, or the rule's verdict.

    Checks first, without creating a store that does not exist yet, that there is a registry
    and a champion (:func:`ml.lifecycle.loop.nothing_to_judge`).
    """
    why = nothing_to_judge(traffic=False)
    if why:
        log.info("nothing to judge: %s", why)
        return CanaryEvaluation(outcome=CanaryOutcome.NOTHING_TO_JUDGE, reason=why)
    decision = judge_canary(errors=errors)
    if decision is None:
        return CanaryEvaluation(
            outcome=CanaryOutcome.NO_CANARY, reason="no challenger is on canary traffic"
        )
    return CanaryEvaluation(
        outcome=CANARY_OUTCOMES[decision.action], reason=decision.reason, decision=decision
    )


def promote_canary(decision: CanaryDecision, *, actor: str) -> None:
    """Move ``champion`` to the challenger and end its canary; record the evidence."""
    version = decision.challenger.version
    registry.set_version_tag(version, registry.CANARY_SHARE_TAG, "0")
    registry.set_alias(
        registry.CHAMPION,
        version,
        actor=actor,
        action=AuditAction.CANARY_PROMOTE,
        reason=decision.reason,
        evidence=decision.to_dict(),
    )
    emit_metric("promotions", 1, kind="counter", reason="canary")


def roll_back_canary(decision: CanaryDecision, *, actor: str) -> None:
    """End the canary: the challenger is tagged rejected and loses its alias; record why."""
    version = decision.challenger.version
    registry.set_version_tag(version, registry.CANARY_SHARE_TAG, "0")
    registry.set_version_tag(version, registry.REJECTED_TAG, decision.reason[:250])
    registry.delete_alias(
        registry.CHALLENGER,
        actor=actor,
        action=AuditAction.CANARY_ROLLBACK,
        reason=decision.reason,
        evidence=decision.to_dict(),
    )
    emit_metric("rollbacks", 1, kind="counter", reason="canary")
