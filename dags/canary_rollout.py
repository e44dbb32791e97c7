"""
### canary_rollout

Decides the fate of a challenger serving a canary share of live traffic.

**evaluate**, then one of five outcomes:

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

Every decision is written to the audit table with its evidence (`driftloop audit`).
"""

from __future__ import annotations

from _driftloop import DEFAULT_ARGS, START, actor, schedule_from_params
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import dag, task

OUTCOMES = {"promote": "canary_promoted", "rollback": "canary_rolled_back", "wait": "waiting"}


@dag(
    dag_id="canary_rollout",
    schedule=schedule_from_params("rollout", "*/10 * * * *"),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["driftloop", "rollout"],
    default_args=DEFAULT_ARGS,
)
def canary_rollout() -> None:
    @task.branch
    def evaluate() -> str:
        import logging

        from ml.lifecycle import canary, loop

        why = loop.nothing_to_judge(traffic=False)
        if why:
            logging.getLogger(__name__).info("nothing to judge: %s", why)
            return loop.NOTHING_TO_JUDGE
        decision = canary.evaluate_canary(actor=actor())
        if decision is None:
            return "no_canary"
        if decision.action in ("promote", "rollback"):
            loop.emit_metric(
                "promotions" if decision.action == "promote" else "rollbacks",
                1,
                kind="counter",
                reason="canary",
            )
        return OUTCOMES[decision.action]

    ends = ("nothing_to_judge", "no_canary", *OUTCOMES.values())
    evaluate() >> [EmptyOperator(task_id=t) for t in ends]


canary_rollout()
