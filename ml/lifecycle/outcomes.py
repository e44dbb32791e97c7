"""The named outcomes of driftloop's decisions, one ``StrEnum`` per decision.

Each value is at once what the library returns, the id of the DAG task that the decision's
``@task.branch`` follows, and what ``scripts/demo.py`` and ``scripts/check_demo.py`` expect.
"""

from __future__ import annotations

from enum import StrEnum


class TrainOutcome(StrEnum):
    """How ``train_model`` ends: the offline promotion gate and what followed it."""

    PROMOTED = "promoted"  # no champion yet (or canaries off): the challenger is champion now
    CANARY_STARTED = "canary_started"  # passed the gate: serves a canary share of traffic
    KEPT_CHAMPION = "kept_champion"  # failed the gate: never reaches traffic
    # With ``promotion.require_approval``: the gate said promote, and a person decides.
    AWAITING_APPROVAL = "approve_promotion"  # the approval task, not an end
    APPROVED = "approved"  # a person approved: the challenger is champion now
    REJECTED = "rejected"  # a person rejected: the champion stays


TRAIN_ENDS = (TrainOutcome.PROMOTED, TrainOutcome.CANARY_STARTED, TrainOutcome.KEPT_CHAMPION)
TRAIN_ANSWERED = (TrainOutcome.APPROVED, TrainOutcome.REJECTED)  # the ends after an answer


class MonitorOutcome(StrEnum):
    """How ``monitor_drift`` ends."""

    NOTHING_TO_JUDGE = "nothing_to_judge"  # no registry, no champion or no traffic
    NO_DRIFT = "no_drift"
    RETRAIN = "retrain"
    RETRAINING_IN_PROGRESS = "retraining_in_progress"  # drift, but the lock is held
    ROLLBACK = "rollback"  # champion significantly worse than the version before it


class CanaryAction(StrEnum):
    """What the canary rule says to do with the challenger on canary traffic."""

    PROMOTE = "promote"
    ROLLBACK = "rollback"
    WAIT = "wait"


class CanaryOutcome(StrEnum):
    """How ``canary_rollout`` ends."""

    NOTHING_TO_JUDGE = MonitorOutcome.NOTHING_TO_JUDGE.value  # no registry or no champion
    NO_CANARY = "no_canary"
    WAITING = "waiting"
    PROMOTED = "canary_promoted"
    ROLLED_BACK = "canary_rolled_back"
    # With ``promotion.require_approval``: the rule said promote, and a person decides.
    AWAITING_APPROVAL = "approve_canary_promotion"  # the approval task, not an end
    APPROVED = "canary_approved"  # a person approved: the challenger is champion now
    REJECTED = "canary_rejected"  # a person rejected: the canary ends, the champion stays


CANARY_OUTCOMES = {
    CanaryAction.PROMOTE: CanaryOutcome.PROMOTED,
    CanaryAction.ROLLBACK: CanaryOutcome.ROLLED_BACK,
    CanaryAction.WAIT: CanaryOutcome.WAITING,
}
