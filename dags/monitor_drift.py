"""
### monitor_drift

Watches the model in production and decides, on evidence, what to do about it.

**report → decide**, then one of four outcomes:

- `no_drift`: nothing crossed its threshold (or the window had too few predictions to judge).
- `retrain`: the window's inputs, embeddings or predictions drifted from the champion's
  reference, or its quality on live feedback dropped. The window's labelled rows that pass the
  Great Expectations gate become a new DVC-tracked batch (`data/feedback/`), and `train_model`
  is triggered with the reason and the report, so its MLflow run says why it exists.
- `retraining_in_progress`: drift again, but a retraining still holds the lock: nothing starts.
- `rollback`: the champion is significantly worse on live feedback than the version before it;
  `champion` moves back, and the audit table says why.

Each report (HTML + JSON) lands in `DRIFTLOOP_HOME/reports/<time>/`, in MLflow next to the
version it judged, and in the Evidently workspace (`driftloop reports`). Window and schedule:
`drift:` in params.yaml; params `since`/`until` (ISO, UTC) override the window.
"""

from __future__ import annotations

from _driftloop import DEFAULT_ARGS, START, actor, drift_schedule
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="monitor_drift",
    schedule=drift_schedule(),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["driftloop", "monitoring"],
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,
    params={
        "since": Param(None, type=["null", "string"], description="window start (ISO, UTC)"),
        "until": Param(None, type=["null", "string"], description="window end (ISO, UTC)"),
    },
)
def monitor_drift() -> None:
    @task
    def report(params: dict | None = None) -> dict:
        from ml import loop
        from ml.drift import run_drift

        p = params or {}
        result = run_drift(p.get("since"), p.get("until")).to_dict()
        loop.emit_drift_metrics(result)
        return result

    @task.branch
    def decide(drift: dict) -> str:
        from ml import loop

        decision = loop.decide(
            drift,
            comparison=loop.champion_vs_previous(),
            retraining_running=loop.retraining_running(),
        )
        get_current_context()["ti"].xcom_push(key="decision", value=decision.to_dict())
        return decision.outcome

    @task
    def retrain(drift: dict) -> dict:
        """Record the labelled window as a new data version, take the lock, build the conf."""
        from airflow.sdk.exceptions import AirflowSkipException

        from ml import loop

        signals = ", ".join(s["name"] for s in drift["signals"] if s["drifted"]) or "quality"
        reason = f"drift ({signals}) in {drift['window_start']}..{drift['window_end']}"
        token = loop.acquire_retraining(reason)
        if token is None:
            raise AirflowSkipException("another retraining holds the lock")
        window = loop.record_labelled_window(drift["window_start"], drift["window_end"])
        loop.emit_metric("retrainings", 1, kind="counter", reason="drift")
        return {
            "reason": f"{reason}; report {drift['report_dir']}",
            "drift_report": drift["report_dir"],
            "extra_paths": loop.feedback_batches(),
            "retraining_token": token,
            "labelled_window": window,
        }

    @task
    def rollback(drift: dict) -> dict:
        from ml import loop, registry

        decision = get_current_context()["ti"].xcom_pull(task_ids="decide", key="decision")
        move = registry.rollback(
            actor=actor(), reason=f"{decision['reason']}; report {drift.get('report_dir')}"
        )
        loop.emit_metric("rollbacks", 1, kind="counter", reason="live_feedback")
        return move.to_dict()

    drift = report()
    branch = decide(drift)
    conf = retrain(drift)
    trigger_train_model = TriggerDagRunOperator(
        task_id="trigger_train_model",
        trigger_dag_id="train_model",
        conf=conf,
        wait_for_completion=False,
    )
    branch >> [
        EmptyOperator(task_id="no_drift"),
        conf,
        EmptyOperator(task_id="retraining_in_progress"),
        rollback(drift),
    ]
    conf >> trigger_train_model


monitor_drift()
