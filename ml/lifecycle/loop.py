"""The closed loop's decisions: after a drift report, retrain, roll back, or do nothing.

:func:`evaluate` names the outcome of one ``monitor_drift`` run (:func:`decide` is the pure rule);
:func:`retraining_conf` and :func:`roll_back` act on it. The lock is :mod:`ml.lifecycle.lock`,
the labelled batches :mod:`ml.lifecycle.feedback`. See ``docs/lifecycle.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from ml import events, registry
from ml.db import get_engine, predictions
from ml.lifecycle import feedback, lock
from ml.lifecycle.evidence import version_stats, worse_p_value
from ml.lifecycle.metrics import emit_metric
from ml.lifecycle.outcomes import MonitorOutcome
from ml.params import LabelParams, Params, load_params
from ml.settings import get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopDecision:
    """One outcome of ``monitor_drift`` and why."""

    outcome: MonitorOutcome
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": str(self.outcome), "reason": self.reason, "evidence": self.evidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopDecision:
        return cls(
            outcome=MonitorOutcome(data["outcome"]),
            reason=data["reason"],
            evidence=dict(data.get("evidence") or {}),
        )


def nothing_to_judge(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    *,
    traffic: bool = True,
) -> str | None:
    """Why a scheduled run has nothing to judge, or None when it has something.

    Checked cheapest first, and without creating a store that does not exist yet: no model
    registry, no champion, or (with ``traffic``) no prediction by the champion in the window
    ``[since, until)`` (default the last ``drift.window_hours``).
    """
    from ml.drift import window_bounds
    from ml.params import DriftParams
    from ml.stores import store_exists

    settings = get_settings()
    if not store_exists(settings.mlflow_tracking_uri):
        return "no model registry yet: nothing has been trained"
    champion = registry.get_alias(registry.CHAMPION)
    if champion is None:
        return "no champion to judge: nothing has been promoted"
    if not traffic:
        return None
    if not store_exists(settings.database_url):
        return "no prediction log yet: nothing has been served"
    start, end = window_bounds(since, until, DriftParams.from_params())
    query = sa.select(sa.func.count()).where(
        predictions.c.model_name == champion.name,
        predictions.c.model_version == champion.version,
        predictions.c.at >= start,
        predictions.c.at < end,
    )
    with get_engine(settings.database_url).connect() as conn:
        served = int(conn.execute(query).scalar_one())
    if served == 0:
        return (
            f"no traffic: champion v{champion.version} answered no request in "
            f"{start.isoformat()} .. {end.isoformat()}"
        )
    return None


def champion_vs_previous(
    since: datetime | None = None, policy: LabelParams | None = None
) -> dict[str, Any] | None:
    """Live feedback accuracy of the champion and of the champion before it.

    None when there is no previous champion or either has no labelled traffic. The previous
    version's evidence comes from the time it served; the champion's from ``since`` on. Labels
    count as ``policy`` (default ``labels:`` of params.yaml) allows.
    """
    policy = policy or load_params().labels
    champion = registry.get_alias(registry.CHAMPION)
    previous = registry.previous_champion()
    if champion is None or previous is None:
        return None
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    current = version_stats(since or epoch, [champion.version], policy=policy)[champion.version]
    before = version_stats(epoch, [previous], policy=policy)[previous]
    if not current.feedback or not before.feedback:
        return None
    # No rollback rests on one source: the drop must also be significant without any one.
    sources = sorted(set(current.by_source) | set(before.by_source))
    if policy.max_source_share >= 1:
        sources = []
    return {
        "champion": current.to_dict(),
        "previous": before.to_dict(),
        "p_value_worse": worse_p_value(current, before),
        "p_value_worse_without_source": {
            source: worse_p_value(current.without(source), before.without(source))
            for source in sources
        },
    }


def decide(
    drift: dict[str, Any],
    *,
    params: Params | None = None,
    comparison: dict[str, Any] | None = None,
    retraining_running: bool = False,
) -> LoopDecision:
    """Name the outcome of one monitoring run. Pure: all evidence is passed in.

    Rolling back comes first (a champion significantly worse on live feedback than the version
    before it is the most urgent problem); then retraining on data drift or a quality drop with
    enough feedback, unless a retraining is already running; otherwise nothing.
    """
    params = params or load_params()
    rollout = params.rollout
    if comparison and comparison.get("p_value_worse") is not None:
        ours, theirs = comparison["champion"], comparison["previous"]
        without = (comparison.get("p_value_worse_without_source") or {}).values()
        if (
            ours["feedback"] >= rollout.min_feedback_early
            and comparison["p_value_worse"] < rollout.alpha
            and all(p is not None and p < rollout.alpha for p in without)
        ):
            return LoopDecision(
                outcome=MonitorOutcome.ROLLBACK,
                reason=f"champion v{ours['version']} live accuracy {ours['accuracy']:.3f} on "
                f"{ours['feedback']} labels is significantly below v{theirs['version']}'s "
                f"{theirs['accuracy']:.3f} (p={comparison['p_value_worse']:.4f})",
                evidence={"comparison": comparison, "report": drift.get("report_dir")},
            )
    signals = [s["name"] for s in drift.get("signals", []) if s.get("drifted")]
    if drift.get("drift_detected"):
        reason = (
            f"drift in {', '.join(signals) or 'the window'} "
            f"({drift.get('window_start')} .. {drift.get('window_end')}, "
            f"{drift.get('rows')} predictions); report {drift.get('report_dir')}"
        )
        if retraining_running:
            return LoopDecision(
                outcome=MonitorOutcome.RETRAINING_IN_PROGRESS,
                reason=f"{reason}; a retraining is already running",
                evidence=drift,
            )
        return LoopDecision(
            outcome=MonitorOutcome.RETRAIN,
            reason=reason,
            evidence={"signals": signals, "report": drift.get("report_dir")},
        )
    return LoopDecision(
        outcome=MonitorOutcome.NO_DRIFT,
        reason=drift.get("reason") or "no signal crossed its threshold",
        evidence={"report": drift.get("report_dir")},
    )


def evaluate(drift: dict[str, Any]) -> LoopDecision:
    """:func:`decide` on a drift report with the live evidence: the champion against the
    version before it, and whether a retraining holds the lock."""
    return decide(
        drift, comparison=champion_vs_previous(), retraining_running=lock.retraining_running()
    )


def retrain_reason(drift: dict[str, Any]) -> str:
    """Why a drift report starts a retraining: its drifted signals and window."""
    signals = ", ".join(s["name"] for s in drift["signals"] if s["drifted"]) or "quality"
    return f"drift ({signals}) in {drift['window_start']}..{drift['window_end']}"


def retraining_conf(drift: dict[str, Any], token: str) -> dict[str, Any]:
    """Record the window's labelled rows as a batch; the ``train_model`` conf that uses them."""
    window = feedback.record_labelled_window(drift["window_start"], drift["window_end"])
    emit_metric("retrainings", 1, kind="counter", reason="drift")
    return {
        "task": load_params().task.name,  # the retraining is for the task that drifted
        "reason": f"{retrain_reason(drift)}; report {drift['report_dir']}",
        "drift_report": drift["report_dir"],
        "extra_paths": feedback.feedback_batches(),
        "retraining_token": token,
        "labelled_window": window.to_dict(),
    }


def roll_back(decision: LoopDecision, *, actor: str) -> registry.AliasMove:
    """Move ``champion`` back to the version before it, for the reason ``decision`` gives."""
    move = registry.rollback(
        actor=actor, reason=f"{decision.reason}; report {decision.evidence.get('report')}"
    )
    emit_metric("rollbacks", 1, kind="counter", reason="live_feedback")
    events.emit(
        "rollback", {"kind": "live_feedback", "reason": decision.reason, "move": move.to_dict()}
    )
    return move
