"""Canary rollout: a challenger that passed the offline gate serves a share of live traffic, and
is promoted or removed on the evidence of that traffic (:mod:`ml.lifecycle.evidence`).

Label-free guardrails (errors, latency, confidence, and whether the two models agree beyond
chance on shadow-scored requests) can remove it at once. Otherwise a sequential test on the
per-label differences decides (:mod:`ml.lifecycle.sequential`): promote once the challenger is
shown not worse than the champion by more than ``rollout.margin``, roll back once it is shown
worse, and keep the champion when ``rollout.max_labels`` or ``rollout.max_hours`` runs out
first. Its error rates hold however often ``canary_rollout`` looks
(benchmarks/results/canary_power.md).
See ``docs/lifecycle.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ml import events, registry
from ml.label_policy import SourceCount
from ml.lifecycle import sequential
from ml.lifecycle.approval import Approval
from ml.lifecycle.evidence import (
    CanaryLabels,
    VersionStats,
    canary_labels,
    challenger_serving_since,
    version_stats,
)
from ml.lifecycle.loop import nothing_to_judge
from ml.lifecycle.metrics import emit_metric
from ml.lifecycle.outcomes import CANARY_OUTCOMES, CanaryAction, CanaryOutcome
from ml.params import LabelParams, RolloutParams, load_params
from ml.registry import AuditAction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryDecision:
    """``promote``, ``rollback`` or ``wait``, with the evidence that decided it.

    ``test`` is the sequential test's state (statistic: the two log-wealths and the mean
    difference; bound: ``log(1/alpha)``) and ``labels`` which labels it used (paired, unpaired,
    per source); both go into the audit row of the alias move.
    """

    action: CanaryAction
    reason: str
    champion: VersionStats
    challenger: VersionStats
    test: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "reason": self.reason,
            "test": self.test,
            "labels": self.labels,
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
            test=dict(data.get("test") or {}),
            labels=dict(data.get("labels") or {}),
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


NO_LABELS = CanaryLabels(
    diffs=np.zeros(0), low=np.zeros(0), high=np.zeros(0), is_paired=np.zeros(0, dtype=bool),
    sources=SourceCount(),
)  # fmt: skip


def decide_canary(
    champion: VersionStats,
    challenger: VersionStats,
    params: RolloutParams,
    labels: CanaryLabels = NO_LABELS,
    hours: float = 0.0,
) -> CanaryDecision:
    """Apply the rollout rule to live evidence. Pure: no I/O.

    The guardrails first (any of them rolls back at once), then the sequential test on
    ``labels``; ``hours`` is how long the canary has run.
    """

    def verdict_on(mask: Any = slice(None)) -> sequential.SequentialVerdict:
        return sequential.decide(
            labels.diffs[mask],
            margin=params.margin,
            alpha=params.alpha,
            low=labels.low[mask],
            high=labels.high[mask],
            max_labels=params.max_labels,
            kinds=(~labels.is_paired[mask]).astype(int),
        )

    verdict = verdict_on()
    # No decision rests on one source: each way must also be shown with any one source left out.
    without = {source: verdict_on(mask) for source, mask in labels.holdouts.items()}
    shown_worse = verdict.log_wealth_worse >= verdict.bound and all(
        v.log_wealth_worse >= v.bound for v in without.values()
    )
    shown_not_worse = verdict.log_wealth_not_worse >= verdict.bound and all(
        v.log_wealth_not_worse >= v.bound for v in without.values()
    )
    test = {
        **verdict.to_dict(),
        "margin": params.margin,
        "alpha": params.alpha,
        "hours": hours,
        "without_source": {
            source: {"log_wealth_worse": v.log_wealth_worse,
                     "log_wealth_not_worse": v.log_wealth_not_worse}
            for source, v in without.items()
        },
    }  # fmt: skip
    checks: dict[str, Any] = {}

    def decision(action: CanaryAction, reason: str) -> CanaryDecision:
        return CanaryDecision(
            action=action,
            reason=reason,
            champion=champion,
            challenger=challenger,
            test=test,
            labels=labels.summary(),
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
    if labels.shadowed >= params.min_shadowed and labels.kappa is not None:
        checks["disagreement_rate"] = labels.disagreement
        checks["kappa"] = labels.kappa
        if labels.kappa < params.min_kappa:
            return decision(
                CanaryAction.ROLLBACK,
                f"the challenger's labels agree with the champion's barely beyond chance on "
                f"{labels.shadowed} shadow-scored requests (Cohen's kappa {labels.kappa:.2f} < "
                f"{params.min_kappa}; they disagree on {labels.disagreement:.1%})",
            )
    used = (
        f"{verdict.labels} labels ({labels.paired} paired, {labels.unpaired} unpaired), "
        f"mean difference {verdict.mean:+.3f}"
    )
    if shown_worse:
        return decision(
            CanaryAction.ROLLBACK,
            f"challenger v{challenger.version} shown less accurate than champion "
            f"v{champion.version}: {used}; evidence {verdict.log_wealth_worse:.2f} >= "
            f"log(1/alpha) = {verdict.bound:.2f}",
        )
    if shown_not_worse:
        return decision(
            CanaryAction.PROMOTE,
            f"challenger v{challenger.version} shown not worse than champion "
            f"v{champion.version} by more than {params.margin}: {used}; evidence "
            f"{verdict.log_wealth_not_worse:.2f} >= log(1/alpha) = {verdict.bound:.2f}; "
            "no error, latency or disagreement regression",
        )
    if verdict.labels >= params.max_labels or hours >= params.max_hours:
        spent = (
            f"{verdict.labels} labels (max_labels {params.max_labels})"
            if verdict.labels >= params.max_labels
            else f"{hours:.1f} h on canary (max_hours {params.max_hours:g})"
        )
        return decision(
            CanaryAction.ROLLBACK,
            f"undecided after {spent}: keeping champion v{champion.version}; {used}",
        )
    one_source = (
        " (reached only with one source's labels: each decision must hold without any one)"
        if max(verdict.log_wealth_worse, verdict.log_wealth_not_worse) >= verdict.bound
        else ""
    )
    return decision(
        CanaryAction.WAIT,
        f"not decided yet: {used}; evidence worse {verdict.log_wealth_worse:.2f}, not worse "
        f"{verdict.log_wealth_not_worse:.2f}, either must reach {verdict.bound:.2f}{one_source}",
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
    *,
    errors: dict[str, int] | None = None,
    params: RolloutParams | None = None,
    policy: LabelParams | None = None,
) -> CanaryDecision | None:
    """The canary rule's decision on the live canary; None when no canary is live. Changes
    nothing: :func:`promote_canary` / :func:`roll_back_canary` act on it."""
    if params is None or policy is None:
        loaded = load_params()
        params = params or loaded.rollout
        policy = policy or loaded.labels
    challenger = canary_in_progress()
    champion = registry.get_alias(registry.CHAMPION)
    if challenger is None or champion is None:
        return None
    started = datetime.fromisoformat(challenger.tags[registry.CANARY_STARTED_TAG])
    share = float(challenger.tags.get(registry.CANARY_SHARE_TAG) or params.canary_share)
    versions = [champion.version, challenger.version]
    # The evidence starts when a service first served the challenger, not when the registry
    # started the canary: until then every label is the champion's (challenger_serving_since).
    serving = challenger_serving_since(started, challenger.version)
    since = serving or datetime.now(tz=UTC)
    stats = version_stats(since, versions, errors, policy)
    labels = canary_labels(
        since, champion.version, challenger.version, min(max(share, 0.01), 0.99), policy
    )
    hours = (datetime.now(tz=UTC) - started).total_seconds() / 3600
    decision = decide_canary(
        stats[champion.version], stats[challenger.version], params, labels, hours
    )
    window = {"canary_started": started.isoformat(), "evidence_since": since.isoformat()}
    decision = replace(decision, labels={**decision.labels, **window})
    if serving is None and decision.action == CanaryAction.WAIT:
        decision = replace(
            decision,
            reason=f"no service has served challenger v{challenger.version} yet: {decision.reason}",
        )
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
    outcome = CANARY_OUTCOMES[decision.action]
    if outcome == CanaryOutcome.PROMOTED and load_params().promotion.require_approval:
        outcome = CanaryOutcome.AWAITING_APPROVAL  # the move of champion waits for a person
    return CanaryEvaluation(outcome=outcome, reason=decision.reason, decision=decision)


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
    _link_review(version, "promoted to champion", decision.reason)


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
    events.emit("rollback", {"kind": "canary", "reason": decision.reason, "version": version})
    _link_review(version, "rolled back", decision.reason)


def _link_review(version: str, outcome: str, reason: str) -> None:
    """A canary that a drift retraining started ends on that drift's review page too."""
    from ml.drift.review import add_links

    report = registry.get_version(version).tags.get(registry.DRIFT_REPORT_TAG)
    add_links(report, {"Canary": f"v{version}: {outcome} ({reason[:300]})"})


def act_on_approval(decision: CanaryDecision, approval: Approval, *, actor: str) -> CanaryOutcome:
    """Carry out a person's answer to ``approve_canary_promotion``.

    Approved, with the same challenger still on canary: it becomes champion, the person named
    in the audit row. Rejected: the canary ends as a rollback does. A challenger that left the
    canary while the request waited voids it: nothing moves.
    """
    who = approval.actor(actor)
    current = canary_in_progress()
    if current is None or current.version != decision.challenger.version:
        log.warning("approval void: v%s is no longer on canary", decision.challenger.version)
        return CanaryOutcome.REJECTED
    reason = f"{approval.describe()} (rule: {decision.reason})"
    decision = replace(decision, reason=reason)
    if approval.approved:
        promote_canary(decision, actor=who)
        return CanaryOutcome.APPROVED
    roll_back_canary(decision, actor=who)
    return CanaryOutcome.REJECTED
