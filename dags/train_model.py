"""
### train_model

Trains a new tweet-sentiment model and promotes it only if it is better.

**prepare → validate → train → evaluate → register → promote**, then one of two outcomes:

- `promoted`: the new version beat the champion on the validation split by at least
  `promotion.min_improvement` (params.yaml), or there was no champion; the MLflow alias
  `champion` now points at it.
- `kept_champion`: it did not; `champion` stays where it was and the new version keeps the
  alias `challenger`.

A batch that fails the Great Expectations gate stops the run at `validate` (no retry, nothing is
registered); the task log names each failing expectation and column, and the Data Docs path.
Every alias move, and every decision to keep the champion, is written to the audit table
(`driftloop audit`). Params: `max_examples`, `epochs`, `reason` (shown on the MLflow run),
`extra_paths` (labelled batches to add), `batch_path` (train on exactly this table instead).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, dag, get_current_context, task


def _actor() -> str:
    ctx = get_current_context()
    return f"dag:{ctx['dag'].dag_id}/{ctx['run_id']}"


@dag(
    dag_id="train_model",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["driftloop", "training"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20), "owner": "driftloop"},
    params={
        "max_examples": Param(8000, type="integer", minimum=20, description="training rows"),
        "epochs": Param(1, type="integer", minimum=1, maximum=20),
        "reason": Param("manual run", type="string", description="why this model is trained"),
        "extra_paths": Param([], type="array", description="extra labelled batches (TSV)"),
        "batch_path": Param(None, type=["null", "string"], description="train on this table"),
    },
)
def train_model() -> None:
    @task
    def prepare(params: dict | None = None) -> dict:
        from ml import pipeline

        p = params or {}
        if p.get("batch_path"):
            return {"path": p["batch_path"], "inputs": {}}
        batch = pipeline.prepare(extra_paths=p.get("extra_paths"), max_examples=p["max_examples"])
        return {"path": batch.path, "inputs": batch.inputs, "rows": batch.rows}

    @task
    def validate(batch: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from ml import pipeline
        from ml.data import DataError
        from ml.validation import ValidationFailed

        try:
            pipeline.validate(batch["path"])
        except (ValidationFailed, DataError) as exc:  # bad data: retrying will not help
            raise AirflowFailException(f"batch rejected: {exc}") from exc
        return batch

    @task(execution_timeout=timedelta(hours=2))
    def train(batch: dict, params: dict | None = None) -> str:
        from ml import pipeline

        p = params or {}
        result = pipeline.train(
            batch["path"],
            reason=p.get("reason", "manual run"),
            trigger=_actor(),
            epochs=p.get("epochs"),
            batch_inputs=batch.get("inputs"),
        )
        return result["run_id"]

    @task
    def evaluate(mlflow_run: str) -> str:
        from ml import pipeline

        pipeline.evaluate(mlflow_run)
        return mlflow_run

    @task
    def register(mlflow_run: str, params: dict | None = None) -> str:
        from ml import pipeline

        reason = (params or {}).get("reason", "manual run")
        return pipeline.register(mlflow_run, reason=reason, actor=_actor())["version"]

    @task.branch
    def promote(version: str) -> str:
        from ml import pipeline

        return pipeline.promote(version, actor=_actor()).outcome

    outcome = promote(register(evaluate(train(validate(prepare())))))
    outcome >> [EmptyOperator(task_id="promoted"), EmptyOperator(task_id="kept_champion")]


train_model()
