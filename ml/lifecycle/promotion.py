"""The one promotion gate: a challenger is compared with the champion on the same held-out data,
and then promoted, put on canary traffic, or kept out (the champion stays).

The CLI (``driftloop promote``, ``driftloop canary``, ``driftloop train``) and the ``train_model``
DAG all go through :func:`promote`. Every decision is written to the audit table.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ml import registry
from ml.lifecycle.approval import Approval
from ml.lifecycle.canary import start_canary
from ml.lifecycle.outcomes import TrainOutcome
from ml.params import Params, PromotionParams, load_params
from ml.registry import AuditAction
from ml.training import pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a challenger takes over from the champion, and why."""

    promote: bool  # it passed the gate (or was forced past it)
    outcome: TrainOutcome
    metric: str
    challenger_version: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    min_improvement: float
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": str(self.outcome)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromotionDecision:
        """Back from :meth:`to_dict` (it crosses task boundaries as XCom)."""
        return cls(**{**data, "outcome": TrainOutcome(data["outcome"])})


def decide_promotion(
    challenger_version: str,
    challenger_metrics: dict[str, float],
    champion_version: str | None,
    champion_metrics: dict[str, float] | None,
    params: PromotionParams,
) -> PromotionDecision:
    """The challenger becomes champion only if there is none or it wins by the margin. Pure."""
    metric = params.metric
    score = float(challenger_metrics[metric])
    if champion_version is None or champion_metrics is None:
        return PromotionDecision(
            promote=True,
            outcome=TrainOutcome.PROMOTED,
            metric=metric,
            challenger_version=challenger_version,
            challenger_score=score,
            champion_version=None,
            champion_score=None,
            min_improvement=params.min_improvement,
            reason=f"no champion yet; v{challenger_version} has {metric}={score:.4f}",
        )
    best = float(champion_metrics[metric])
    delta = score - best
    promote = delta >= params.min_improvement
    verdict = "beats" if promote else "does not beat"
    return PromotionDecision(
        promote=promote,
        outcome=TrainOutcome.PROMOTED if promote else TrainOutcome.KEPT_CHAMPION,
        metric=metric,
        challenger_version=challenger_version,
        challenger_score=score,
        champion_version=champion_version,
        champion_score=best,
        min_improvement=params.min_improvement,
        reason=(
            f"v{challenger_version} {metric}={score:.4f} {verdict} champion v{champion_version} "
            f"{metric}={best:.4f} by the required {params.min_improvement:+.4f} "
            f"(delta {delta:+.4f})"
        ),
        evidence={"challenger": challenger_metrics, "champion": champion_metrics},
    )


def _val_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k[len("val_") :]: v for k, v in metrics.items() if k.startswith("val_")}


def champion_metrics_on_current_data(params: Params) -> tuple[str | None, dict[str, float] | None]:
    """The champion's validation metrics on today's validation data.

    Reuses the metrics logged with the champion when they were computed on the same file
    (same md5); otherwise re-scores the champion, so the comparison is always like for like.
    """
    champion = registry.get_alias(registry.CHAMPION)
    if champion is None:
        return None, None
    run_tags = registry.client().get_run(champion.run_id).data.tags if champion.run_id else {}
    if (
        run_tags.get(pipeline.EVAL_DATA_TAG) == pipeline.val_md5(params)
        and f"val_{params.promotion.metric}" in champion.metrics
    ):
        return champion.version, _val_metrics(champion.metrics)
    model_dir = registry.download_model(champion.version)
    return champion.version, pipeline.evaluate_dir(model_dir, params).metrics


def gate(version: str, params: Params) -> PromotionDecision:
    """The offline gate: ``version`` against the champion on today's validation data."""
    challenger = registry.get_version(version)
    if f"val_{params.promotion.metric}" not in challenger.metrics:
        raise registry.RegistryError(
            f"version {version} has no validation {params.promotion.metric}"
        )
    challenger_metrics = _val_metrics(challenger.metrics)
    champ_version, champ_metrics = champion_metrics_on_current_data(params)
    if champ_version == str(version):
        score = challenger_metrics[params.promotion.metric]
        return PromotionDecision(
            promote=False,
            outcome=TrainOutcome.KEPT_CHAMPION,
            metric=params.promotion.metric,
            challenger_version=str(version),
            challenger_score=score,
            champion_version=champ_version,
            champion_score=score,
            min_improvement=params.promotion.min_improvement,
            reason=f"v{version} is already champion",
        )
    return decide_promotion(
        str(version), challenger_metrics, champ_version, champ_metrics, params.promotion
    )


def promote(
    version: str,
    *,
    actor: str,
    params: Params | None = None,
    canary: bool = False,
    force: bool = False,
    reason: str | None = None,
    hold_for_approval: bool = False,
) -> PromotionDecision:
    """Pass ``version`` through the offline gate and act on the verdict; return the decision.

    ``promoted``: ``champion`` moves to it (it won, there was no champion, or ``force``).
    ``canary_started`` (only with ``canary``, a champion, and ``rollout.canary_share > 0``): it
    won and now serves a canary share as ``challenger``; ``canary_rollout`` decides on live
    evidence. ``kept_champion``: it lost (a ``keep`` row in the audit names it), or it already
    is champion (nothing is recorded). ``approve_promotion`` (only with ``hold_for_approval``):
    it won and would become champion, which waits for a person (:func:`act_on_approval`).
    """
    params = params or load_params()
    decision = gate(version, params)
    if decision.champion_version == str(version):
        return decision
    if force and not decision.promote:
        decision = replace(
            decision,
            promote=True,
            outcome=TrainOutcome.PROMOTED,
            reason=f"forced by {actor}: {reason or 'no reason given'} "
            f"(rule said: {decision.reason})",
        )
    if not decision.promote:
        registry.record_keep(
            champion_version=decision.champion_version,
            challenger_version=str(version),
            actor=actor,
            reason=decision.reason,
            evidence=decision.to_dict(),
        )
        return decision
    if canary and decision.champion_version is not None and params.rollout.canary_share > 0:
        start_canary(str(version), actor=actor, reason=f"offline gate: {decision.reason}")
        return replace(decision, outcome=TrainOutcome.CANARY_STARTED)
    if hold_for_approval:
        log.info("v%s waits for approval: %s", version, decision.reason)
        return replace(decision, outcome=TrainOutcome.AWAITING_APPROVAL)
    registry.set_alias(
        registry.CHAMPION,
        str(version),
        actor=actor,
        action=AuditAction.PROMOTE,
        reason=decision.reason,
        evidence=decision.to_dict(),
    )
    return decision


def promote_or_canary(version: str, *, actor: str, params: Params | None = None) -> TrainOutcome:
    """``driftloop canary``'s step: :func:`promote` by way of a canary."""
    return promote(version, actor=actor, params=params, canary=True).outcome


def promote_in_dag(version: str, *, actor: str, params: Params | None = None) -> PromotionDecision:
    """``train_model``'s step: :func:`promote` by way of a canary, where a direct move of
    ``champion`` waits for a person when ``promotion.require_approval`` says so (at the CLI a
    person acts already)."""
    params = params or load_params()
    hold = params.promotion.require_approval
    return promote(version, actor=actor, params=params, canary=True, hold_for_approval=hold)


def act_on_approval(decision: PromotionDecision, approval: Approval, *, actor: str) -> TrainOutcome:
    """Carry out a person's answer to :func:`promote`'s ``approve_promotion``.

    Approved: ``champion`` moves, with the person as the audit row's actor. Rejected, or the
    champion moved while the request waited (which voids it): the champion stays, recorded.
    """
    who = approval.actor(actor)
    evidence = {**decision.to_dict(), "approval": approval.to_dict()}
    current = registry.get_alias(registry.CHAMPION)
    current_version = current.version if current else None
    if approval.approved and current_version == decision.champion_version:
        registry.set_alias(
            registry.CHAMPION,
            decision.challenger_version,
            actor=who,
            action=AuditAction.PROMOTE,
            reason=f"{approval.describe()} (gate: {decision.reason})",
            evidence=evidence,
        )
        return TrainOutcome.APPROVED
    why = approval.describe()
    if approval.approved:
        why = (
            f"void: champion moved from v{decision.champion_version} to v{current_version} "
            f"while the request waited ({why})"
        )
    registry.record_keep(
        champion_version=current_version,
        challenger_version=decision.challenger_version,
        actor=who,
        reason=why,
        evidence=evidence,
    )
    return TrainOutcome.REJECTED


def run_all(
    *,
    reason: str,
    actor: str = "cli",
    epochs: int | None = None,
    max_examples: int | None = None,
    extra_paths: list[str] | None = None,
) -> dict[str, Any]:
    """The whole pipeline in one process (the CLI's ``driftloop train``): train, then promote."""
    batch = pipeline.prepare(extra_paths=extra_paths, max_examples=max_examples)
    pipeline.validate(batch.path)
    trained = pipeline.train(
        batch.path,
        reason=reason,
        trigger=actor,
        epochs=epochs,
        batch_inputs=batch.inputs,
        batch_mix=batch.mix,
    )
    metrics = pipeline.evaluate(trained["run_id"])
    version = pipeline.register(trained["run_id"], reason=reason, actor=actor)
    decision = promote(version["version"], actor=actor)
    return {
        "batch": batch.__dict__,
        "train": trained,
        "metrics": metrics,
        "version": version["version"],
        "decision": decision.to_dict(),
    }
