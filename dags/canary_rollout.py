"""
### canary_rollout

Decides the fate of a challenger serving a canary share of live traffic.

**evaluate → decide**, then one of five outcomes:

- `nothing_to_judge`: no model registry or no champion yet; the run ends without opening a
  store it does not need.
- `no_canary`: no challenger is on canary traffic.
- `waiting`: not enough live evidence yet (see `rollout:` in params.yaml).
- `canary_promoted`: on its share of traffic the challenger did not err more, was not slower,
  kept its confidence, and its accuracy on live feedback was not worse than the champion's
  (one-sided Fisher exact test): it becomes `champion`.
- `canary_rolled_back`: it erred, slowed, lost confidence, or was significantly less accurate:
  the canary ends and the champion keeps all traffic. A clearly worse challenger is removed as
  soon as the evidence is strong, without waiting for the full sample.

With `promotion.require_approval: true`, `canary_promoted` is replaced by a wait at
`approve_canary_promotion` for Approve or Reject (Browse → Required Actions, or the REST API):
`canary_approved` moves champion, `canary_rejected` ends the canary; the audit row names the
person. Unanswered, it is rejected after `promotion.approval_timeout_hours`.

`evaluate` only reads the evidence and applies the canary rule; `decide` follows the outcome it
names, and only the `canary_promoted` and `canary_rolled_back` tasks move an alias. Every
decision they act on is written to the audit table with its evidence (`driftloop audit`).

A scheduled run judges the default task and triggers one run per other task
(`trigger_other_tasks`, docs/tasks.md); a triggered run judges its `task` param only.
"""

from __future__ import annotations

from _driftloop import (
    DEFAULT_ARGS,
    START,
    actor,
    approval_task,
    cover_other_tasks,
    for_task,
    request_approval,
    schedule_from_params,
    task_param,
    task_tags,
)
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import dag, task

from ml.lifecycle.outcomes import CanaryOutcome  # the branch ends' task ids (stdlib only)


@dag(
    dag_id="canary_rollout",
    schedule=schedule_from_params("rollout", "*/10 * * * *"),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["driftloop", "rollout", *task_tags()],
    default_args=DEFAULT_ARGS,
    params={"task": task_param()},
)
def canary_rollout() -> None:
    @task
    @for_task
    def evaluate() -> dict:
        """Nothing to judge, no canary, or the canary rule's decision on live evidence."""
        from ml.lifecycle import canary

        return canary.evaluate().to_dict()

    @task.branch
    @for_task
    def decide(evaluation: dict) -> str:
        if evaluation["outcome"] == CanaryOutcome.AWAITING_APPROVAL:
            d = evaluation["decision"]
            request_approval(
                challenger=d["challenger"]["version"],
                champion=d["champion"]["version"],
                reason=evaluation["reason"],
            )
        return evaluation["outcome"]

    approve = approval_task(
        CanaryOutcome.AWAITING_APPROVAL, "driftloop: promote the canary to champion?", "decide"
    )

    @task.branch
    @for_task
    def act_on_approval(response: dict, evaluation: dict) -> str:
        """A person answered: the challenger becomes champion, or its canary ends; audited."""
        from ml.lifecycle import canary
        from ml.lifecycle.approval import Approval

        decision = canary.CanaryDecision.from_dict(evaluation["decision"])
        answer = Approval.from_response(response)
        return str(canary.act_on_approval(decision, answer, actor=actor()))

    @task(task_id=CanaryOutcome.PROMOTED)
    @for_task
    def promote(evaluation: dict) -> None:
        from ml.lifecycle import canary

        decision = canary.CanaryDecision.from_dict(evaluation["decision"])
        canary.promote_canary(decision, actor=actor())

    @task(task_id=CanaryOutcome.ROLLED_BACK)
    @for_task
    def roll_back(evaluation: dict) -> None:
        from ml.lifecycle import canary

        decision = canary.CanaryDecision.from_dict(evaluation["decision"])
        canary.roll_back_canary(decision, actor=actor())

    evaluation = evaluate()
    decide(evaluation) >> [
        EmptyOperator(task_id=CanaryOutcome.NOTHING_TO_JUDGE),
        EmptyOperator(task_id=CanaryOutcome.NO_CANARY),
        EmptyOperator(task_id=CanaryOutcome.WAITING),
        promote(evaluation),
        roll_back(evaluation),
        approve,
    ]
    act_on_approval(approve.output, evaluation) >> [
        EmptyOperator(task_id=CanaryOutcome.APPROVED),
        EmptyOperator(task_id=CanaryOutcome.REJECTED),
    ]
    cover_other_tasks("canary_rollout")


canary_rollout()
