"""Helpers shared by driftloop's DAG files (not a DAG: the leading underscore keeps it out)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def notify_failure(context: dict[str, Any]) -> None:
    """A task's last try failed: a ``run_failed`` event (ml.events; off without a webhook URL)."""
    from ml import events

    ti = context.get("task_instance") or context.get("ti")
    events.emit(
        "run_failed",
        {
            "dag_id": getattr(ti, "dag_id", None),
            "run_id": getattr(ti, "run_id", None),
            "task_id": getattr(ti, "task_id", None),
            "try_number": getattr(ti, "try_number", None),
            "error": str(context.get("exception") or "")[:500],
        },
    )


# A task that fails on a passing outage (MLflow, the database) is tried again; a deployment whose
# services take long to come back can allow more tries or a longer pause (read at parse time).
DEFAULT_ARGS = {
    "on_failure_callback": notify_failure,
    "retries": int(os.environ.get("DRIFTLOOP_TASK_RETRIES", "2")),
    "retry_delay": timedelta(seconds=float(os.environ.get("DRIFTLOOP_RETRY_DELAY", "20"))),
    "owner": "driftloop",
}


def actor() -> str:
    """Who moves an alias, for the audit table: this DAG run."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    return f"dag:{ctx['dag'].dag_id}/{ctx['run_id']}"


def schedule_from_params(section: str, default: str) -> str | None:
    """``<section>.schedule`` from params.yaml (a small YAML read: fine at parse time).

    ``none`` (or an empty value) turns the schedule off: the DAG then runs only when triggered,
    as in ``make demo``, whose scripted steps must be the only runs.
    """
    from pathlib import Path

    import yaml

    path = Path(os.environ.get("DRIFTLOOP_PARAMS") or Path(__file__).parents[1] / "params.yaml")
    value = ((yaml.safe_load(path.read_text()) or {}).get(section) or {}).get("schedule", default)
    return None if value in (None, "", "none", "None") else str(value)
