"""
### monitor_drift

Watches the model in production and decides, on evidence, what to do about it.

**check → report → evaluate → decide**, then one of five outcomes:

- `nothing_to_judge`: no model registry, no champion, or no prediction by the champion in the
  window: the run ends at `check`, without opening a store it does not need.
- `no_drift`: nothing crossed its threshold (or the window had too few predictions to judge).
- `retrain`: the window's inputs, embeddings or predictions drifted from the champion's
  reference, or its quality on live feedback dropped. `retrain` takes the single-retraining lock
  (a setup task; a retry of this run keeps it), `record_window` turns the window's labelled rows
  that pass the Great Expectations gate into a new batch (`DRIFTLOOP_FEEDBACK_DIR`, default
  `data/feedback/`, DVC-tracked), and `train_model` is triggered with the reason and the report,
  so its MLflow run says why it exists. The teardown `release_retraining` frees the lock if
  anything before the trigger failed; once triggered, `train_model` frees it when it ends.
- `retraining_in_progress`: drift again, but a retraining still holds the lock: nothing starts.
- `rollback`: the champion is significantly worse on live feedback than the version before it;
  `champion` moves back, and the audit table says why.

`evaluate` weighs the report, the champion's live feedback against the version before it, and
the lock; `decide` follows the outcome it names.

Each report (HTML + JSON) lands in `DRIFTLOOP_HOME/reports/<time>/`, in MLflow next to the
version it judged, and in the Evidently workspace (`driftloop reports`). Window and schedule:
`drift:` in params.yaml; params `since`/`until` (ISO, UTC) override the window.

A scheduled run judges the default task and triggers one run per other task
(`trigger_other_tasks`, docs/tasks.md); a triggered run judges its `task` param only.
"""

from __future__ import annotations

from _driftloop import (
    DEFAULT_ARGS,
    START,
    actor,
    cover_other_tasks,
    for_task,
    schedule_from_params,
    set_run_note,
    task_param,
    task_tags,
)
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, setup, task, teardown

from ml.lifecycle.outcomes import MonitorOutcome  # the branch ends' task ids (stdlib only)


@dag(
    dag_id="monitor_drift",
    schedule=schedule_from_params("drift", "@hourly"),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["driftloop", "monitoring", *task_tags()],
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,
    params={
        "task": task_param(),
        "since": Param(None, type=["null", "string"], description="window start (ISO, UTC)"),
        "until": Param(None, type=["null", "string"], description="window end (ISO, UTC)"),
    },
)
def monitor_drift() -> None:
    @task.branch
    @for_task
    def check(params: dict | None = None) -> str:
        """End at once when there is nothing to judge: no registry, no champion, no traffic."""
        import logging

        from ml.lifecycle import loop

        p = params or {}
        why = loop.nothing_to_judge(p.get("since"), p.get("until"))
        if why:
            logging.getLogger(__name__).info("nothing to judge: %s", why)
            return MonitorOutcome.NOTHING_TO_JUDGE
        return "report"

    @task
    @for_task
    def report(params: dict | None = None) -> dict:
        from ml import events
        from ml.drift import run_drift
        from ml.lifecycle.metrics import emit_drift_metrics

        p = params or {}
        result = run_drift(p.get("since"), p.get("until")).to_dict()
        emit_drift_metrics(result)
        events.emit("drift_verdict", events.drift_event(result))
        return result

    @task
    @for_task
    def evaluate(drift: dict) -> dict:
        from ml.drift.review import record_decision
        from ml.lifecycle import loop

        decision = loop.evaluate(drift).to_dict()
        page = record_decision(drift.get("report_dir"), decision["outcome"], decision["reason"])
        review = f"\n\nDrift review: {page}" if page else ""
        set_run_note(f"**{decision['outcome']}**: {decision['reason']}{review}")
        return decision

    @task.branch
    @for_task
    def decide(decision: dict) -> str:
        return decision["outcome"]

    @setup
    @task(task_id=MonitorOutcome.RETRAIN)
    @for_task
    def retrain(drift: dict) -> str:
        """Take the single-retraining lock for this run (a retry of the run keeps it)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from ml.lifecycle import lock, loop

        ctx = get_current_context()
        reason = loop.retrain_reason(drift)
        token = lock.acquire_for_run(reason, dag_id=ctx["dag"].dag_id, run_id=ctx["run_id"])
        if token is None:
            raise AirflowSkipException("another retraining holds the lock")
        return token

    @task
    @for_task
    def record_window(drift: dict, token: str) -> dict:
        """Record the labelled window as a new data version; build train_model's conf."""
        from ml.lifecycle import loop

        return loop.retraining_conf(drift, token)

    @teardown
    def release_retraining(token: str) -> bool:
        """Free the lock if anything failed before train_model took it over."""
        from ml.lifecycle import lock

        # Pulled, not passed as an argument: the trigger's run id is missing when the trigger
        # failed, and an XComArg to a missing key would fail this teardown with the lock held.
        triggered = get_current_context()["ti"].xcom_pull(
            task_ids="trigger_train_model", key="trigger_run_id"
        )
        return lock.release_unless_handed_over(token, triggered)

    @task(task_id=MonitorOutcome.ROLLBACK)
    @for_task
    def rollback(decision: dict) -> dict:
        from ml.lifecycle import loop

        return loop.roll_back(loop.LoopDecision.from_dict(decision), actor=actor()).to_dict()

    drift = report()
    check() >> [EmptyOperator(task_id=MonitorOutcome.NOTHING_TO_JUDGE), drift]
    decision = evaluate(drift)
    token = retrain(drift)
    conf = record_window(drift, token)
    trigger_train_model = TriggerDagRunOperator(
        task_id="trigger_train_model",
        trigger_dag_id="train_model",
        conf=conf,
        wait_for_completion=False,
    )
    decide(decision) >> [
        EmptyOperator(task_id=MonitorOutcome.NO_DRIFT),
        token,
        EmptyOperator(task_id=MonitorOutcome.RETRAINING_IN_PROGRESS),
        rollback(decision),
    ]
    conf >> trigger_train_model >> release_retraining(token)
    cover_other_tasks("monitor_drift")


monitor_drift()
