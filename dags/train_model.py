"""
### train_model

Trains a new model for one task (the `task` param: params.yaml `tasks:`) and promotes it only
if it is better.

**prepare → validate → train → evaluate → register → promote**, then one of three outcomes:

- `promoted`: there was no champion (or canaries are off: `rollout.canary_share: 0`); the
  MLflow alias `champion` now points at the new version.
- `canary_started`: it beat the champion on the validation split by at least
  `promotion.min_improvement` (params.yaml), so it now serves `rollout.canary_share` of live
  traffic as `challenger`; `canary_rollout` promotes or removes it on live evidence.
- `kept_champion`: it did not pass that offline gate and never reaches traffic.

With `promotion.require_approval: true`, a move of `champion` (the first outcome) waits instead
at `approve_promotion` for Approve or Reject (Browse → Required Actions, or the REST API),
then ends `approved` (champion moved) or `rejected` (champion kept); the audit row names the
person. Unanswered, it is rejected after `promotion.approval_timeout_hours`.

A batch that fails the Great Expectations gate stops the run at `validate` (no retry, nothing is
registered); the task log names each failing expectation and column, and the Data Docs path.
Every alias move, and every decision to keep the champion, is written to the audit table
(`driftloop audit`). Params: `task`, `max_examples`, `epochs`, `reason` (shown on the MLflow run),
`extra_paths` (labelled batches to add), `batch_path` (train on exactly this table instead);
`monitor_drift` also passes `drift_report` (tagged on the MLflow run) and the retraining lock,
which `release_retraining` frees however the run ends.
"""

from __future__ import annotations

from datetime import timedelta

from _driftloop import (
    DEFAULT_ARGS,
    START,
    actor,
    approval_task,
    for_task,
    request_approval,
    set_run_note,
    task_param,
    task_tags,
)
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, dag, get_current_context, task, teardown

# The ends' task ids (stdlib only).
from ml.lifecycle.outcomes import TRAIN_ANSWERED, TRAIN_ENDS, TrainOutcome


@dag(
    dag_id="train_model",
    schedule=None,
    start_date=START,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["driftloop", "training", *task_tags()],
    default_args=DEFAULT_ARGS,
    params={
        "task": task_param(),
        "max_examples": Param(
            None,
            type=["null", "integer"],
            minimum=20,
            description="training rows (default: train.max_examples in params.yaml)",
        ),
        "epochs": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=20,
            description="passes over the batch (default: the task's train.epochs)",
        ),
        "reason": Param("manual run", type="string", description="why this model is trained"),
        "extra_paths": Param([], type="array", description="extra labelled batches (TSV)"),
        "batch_path": Param(None, type=["null", "string"], description="train on this table"),
        "drift_report": Param(None, type=["null", "string"], description="report that caused it"),
        "retraining_token": Param(None, type=["null", "string"], description="lock to release"),
    },
)
def train_model() -> None:
    @task
    @for_task
    def prepare(params: dict | None = None) -> dict:
        from ml.training import pipeline

        p = params or {}
        if p.get("batch_path"):
            return {"path": p["batch_path"], "inputs": {}}
        batch = pipeline.prepare(extra_paths=p.get("extra_paths"), max_examples=p["max_examples"])
        return {"path": batch.path, "inputs": batch.inputs, "rows": batch.rows, "mix": batch.mix}

    @task
    @for_task
    def validate(batch: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from ml.tables import DataError
        from ml.training import pipeline
        from ml.training.validation import ValidationFailed

        try:
            pipeline.validate(batch["path"])
        except (ValidationFailed, DataError) as exc:  # bad data: retrying will not help
            raise AirflowFailException(f"batch rejected: {exc}") from exc
        return batch

    @task(execution_timeout=timedelta(hours=2))
    @for_task
    def train(batch: dict, params: dict | None = None) -> str:
        from ml.training import pipeline

        p = params or {}
        result = pipeline.train(
            batch["path"],
            reason=p.get("reason", "manual run"),
            trigger=actor(),
            epochs=p.get("epochs"),
            batch_inputs=batch.get("inputs"),
            batch_mix=batch.get("mix"),
        )
        if p.get("drift_report"):  # the drift review page and this run link each other
            from ml.drift.review import add_links
            from ml.registry import run_link

            add_links(p["drift_report"], {"Retraining run (MLflow)": run_link(result["run_id"])})
            set_run_note(f"{p.get('reason')}\n\nDrift review: {p['drift_report']}/review.html")
        return result["run_id"]

    @task
    @for_task
    def evaluate(mlflow_run: str) -> str:
        from ml.training import pipeline

        pipeline.evaluate(mlflow_run)
        return mlflow_run

    @task
    @for_task
    def register(mlflow_run: str, params: dict | None = None) -> str:
        from ml.training import pipeline

        p = params or {}
        reason, report = p.get("reason", "manual run"), p.get("drift_report")
        version = pipeline.register(mlflow_run, reason=reason, actor=actor(), drift_report=report)
        return version["version"]

    @task.branch
    @for_task
    def promote(version: str, params: dict | None = None) -> str:
        """The offline gate, then a canary when a champion exists: names one of the ends, or
        the approval step when a move of champion waits for a person."""
        from ml.drift.review import add_links
        from ml.lifecycle import promotion

        decision = promotion.promote_in_dag(version, actor=actor())
        ctx = get_current_context()
        ctx["ti"].xcom_push(key="decision", value=decision.to_dict())
        if decision.outcome == TrainOutcome.AWAITING_APPROVAL:
            request_approval(
                challenger=decision.challenger_version,
                champion=decision.champion_version,
                reason=decision.reason,
                evidence={"run": ctx["run_id"], **(params or {})},
            )
        outcome = f"v{version}: {decision.outcome} ({decision.reason})"
        add_links((params or {}).get("drift_report"), {"Retraining outcome": outcome})
        return str(decision.outcome)

    approve = approval_task(
        TrainOutcome.AWAITING_APPROVAL, "driftloop: promote a new champion?", "promote"
    )

    @task.branch
    @for_task
    def act_on_approval(response: dict) -> str:
        """A person answered: move champion (approved) or keep it (rejected); both audited."""
        from ml.lifecycle import promotion
        from ml.lifecycle.approval import Approval

        asked = get_current_context()["ti"].xcom_pull(task_ids="promote", key="decision")
        decision = promotion.PromotionDecision.from_dict(asked)
        answer = Approval.from_response(response)
        return str(promotion.act_on_approval(decision, answer, actor=actor()))

    @teardown
    @task(retries=3)
    @for_task
    def release_retraining(params: dict | None = None) -> bool:
        """Free the single-retraining lock taken by monitor_drift, however this run ended."""
        from ml.lifecycle import lock

        return lock.release_retraining((params or {}).get("retraining_token"))

    steps = [prepare()]
    for step in (validate, train, evaluate, register, promote):
        steps.append(step(steps[-1]))
    ends = [EmptyOperator(task_id=outcome) for outcome in TRAIN_ENDS]
    steps[-1] >> [*ends, approve]
    answered = act_on_approval(approve.output)
    answered >> (approval_ends := [EmptyOperator(task_id=o) for o in TRAIN_ANSWERED])
    steps += [approve, answered]
    ends += approval_ends
    # A teardown runs once every task before it is done, whatever their states, and its own
    # state never decides the run's: a failed step still fails the run.
    [*steps, *ends] >> release_retraining()


train_model()
