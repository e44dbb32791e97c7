"""Helpers shared by driftloop's DAG files (not a DAG: the leading underscore keeps it out)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

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


F = TypeVar("F", bound=Callable[..., Any])


def _params_file() -> dict[str, Any]:
    from pathlib import Path

    import yaml

    path = Path(os.environ.get("DRIFTLOOP_PARAMS") or Path(__file__).parents[1] / "params.yaml")
    return dict(yaml.safe_load(path.read_text()) or {})


def task_names() -> list[str]:
    """The tasks params.yaml declares, the default first (read at parse time)."""
    raw = _params_file()
    names = list(raw.get("tasks") or {}) or ["sentiment"]
    default = raw.get("default_task") or names[0]
    return [default, *(n for n in names if n != default)]


def task_tags() -> list[str]:
    """One ``task:<name>`` tag per declared task: the DAG list filters by task."""
    return [f"task:{name}" for name in task_names()]


def task_param() -> Any:
    """The ``task`` param every driftloop DAG takes: which classifier a run is for."""
    from airflow.sdk import Param

    names = task_names()
    return Param(
        names[0],
        type="string",
        enum=names,
        description="the task (params.yaml tasks:) this run is for: its data, model and reports",
    )


def for_task(fn: F) -> F:
    """Run a DAG task's callable for the run's ``task`` param (``ml.params.use_task``): its
    registered model, data, thresholds and reports. Put it under ``@task``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from airflow.sdk import get_current_context

        from ml.params import use_task

        name = (get_current_context().get("params") or {}).get("task")
        with use_task(name):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


# The task ids of the fan-out that makes a scheduled run cover every task (cover_other_tasks).
OTHER_TASKS = "other_tasks"
TRIGGER_OTHER_TASKS = "trigger_other_tasks"


def other_task_runs(
    run_id: str, run_type: str, task: str | None, names: Sequence[str]
) -> list[dict[str, Any]]:
    """The runs a scheduled run of a DAG triggers for the tasks it does not judge itself.

    A scheduled run gets the default params, so it is for the default task; it triggers one run
    of its own DAG for each other task in ``names``: conf ``{"task": name}``, run id
    ``<name>__<time>`` for the scheduled run ``scheduled__<time>`` (within Airflow's
    ``allowed_run_id_pattern``; Airflow keeps the ``scheduled__`` prefix for scheduled runs),
    and a note that names the task and the scheduled run (a task that sets the run's note, as
    ``monitor_drift``'s ``evaluate`` does, replaces it). Any other run (triggered by a person,
    by ``make demo``, by this fan-out) triggers none, so the fan-out never recurses.
    """
    if run_type != "scheduled":  # DagRunType is a str enum
        return []
    stamp = run_id.removeprefix("scheduled__")
    return [
        {
            "trigger_run_id": f"{name}__{stamp}",
            "conf": {"task": name},
            "note": f"task `{name}` · from the scheduled run {run_id}",
        }
        for name in names
        if name != task
    ]


def cover_other_tasks(dag_id: str) -> Any:
    """Make a scheduled run of ``dag_id`` cover every task (:func:`other_task_runs`).

    Two tasks tied to no task of the DAG's own chain, so they change none of its branches and
    none of its skips reach them: ``other_tasks`` lists the runs, and ``trigger_other_tasks``, a
    ``TriggerDagRunOperator`` mapped over that list, triggers each without waiting for it (the
    UI names each mapped instance by its task). For a run that triggers none, the mapped task is
    skipped and the DAG run's state is its chain's. Call it inside the DAG.
    """
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
    from airflow.sdk import task

    @task(task_id=OTHER_TASKS)
    @for_task
    def other_tasks() -> list[dict[str, Any]]:
        from airflow.sdk import get_current_context

        from ml.params import load_params

        ctx = get_current_context()
        return other_task_runs(
            ctx["run_id"],
            ctx["dag_run"].run_type,
            (ctx.get("params") or {}).get("task"),
            load_params().task_names,  # the run's task is current: its file's tasks, default first
        )

    return TriggerDagRunOperator.partial(
        task_id=TRIGGER_OTHER_TASKS,
        trigger_dag_id=dag_id,
        wait_for_completion=False,
        # A cleared or retried fan-out finds its runs there already: not an error.
        skip_when_already_exists=True,
        map_index_template="{{ task.conf['task'] }}",
    ).expand_kwargs(other_tasks())


def actor() -> str:
    """Who moves an alias, for the audit table: this DAG run."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    return f"dag:{ctx['dag'].dag_id}/{ctx['run_id']}"


def _params_section(section: str) -> dict[str, Any]:
    """One shared section of params.yaml (a small YAML read: fine at parse time)."""
    return dict(_params_file().get(section) or {})


def set_run_note(note: str) -> bool:
    """Put ``note`` on this DAG run (the Airflow UI shows it on the run); best effort.

    A task cannot write its own run's note through Airflow 3's execution API, so this goes
    through the public REST API of the API server the task reports to, with
    ``DRIFTLOOP_AIRFLOW_API_TOKEN`` or, on a local stack with all-admins auth, its token.
    Returns whether the note was set; never fails the task.
    """
    import logging

    import httpx
    from airflow.configuration import conf
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    task = (ctx.get("params") or {}).get("task")
    note = f"task `{task}` · {note}" if task else note
    execution = conf.get("core", "execution_api_server_url", fallback="") or ""
    base = os.environ.get("DRIFTLOOP_AIRFLOW_API_URL") or execution.removesuffix("/").removesuffix(
        "/execution"
    )
    try:
        with httpx.Client(base_url=base, timeout=10.0) as http:
            token = os.environ.get("DRIFTLOOP_AIRFLOW_API_TOKEN")
            if not token:
                token = http.get("/auth/token").raise_for_status().json()["access_token"]
            http.patch(
                f"/api/v2/dags/{ctx['dag'].dag_id}/dagRuns/{ctx['run_id']}",
                params={"update_mask": "note"},
                json={"note": note[:1000]},
                headers={"Authorization": f"Bearer {token}"},
            ).raise_for_status()
        return True
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        logging.getLogger(__name__).warning("could not set the run's note (%s): %s", base, exc)
        return False


def schedule_from_params(section: str, default: str) -> str | None:
    """``<section>.schedule`` from params.yaml.

    ``none`` (or an empty value) turns the schedule off: the DAG then runs only when triggered,
    as in ``make demo``, whose scripted steps must be the only runs.
    """
    value = _params_section(section).get("schedule", default)
    return None if value in (None, "", "none", "None") else str(value)


def approval_task(task_id: str, subject: str, request_task: str) -> Any:
    """The human-in-the-loop step that asks to move ``champion`` (``promotion:`` in
    params.yaml). The request's Markdown is the XCom ``approval_request`` of ``request_task``;
    an unanswered request is rejected after ``approval_timeout_hours``."""
    from airflow.providers.standard.operators.hitl import HITLOperator
    from airflow.sdk import Param

    from ml.lifecycle.approval import OPTIONS, REJECT

    hours = float(_params_section("promotion").get("approval_timeout_hours", 72))
    return HITLOperator(
        task_id=task_id,
        subject=subject,
        body=f"{{{{ ti.xcom_pull(task_ids='{request_task}', key='approval_request') }}}}",
        options=OPTIONS,
        defaults=[REJECT],
        params={"comment": Param("", type="string", description="why (goes into the audit)")},
        response_timeout=timedelta(hours=hours),
    )


def request_approval(**request: Any) -> None:
    """Put the Markdown that :func:`approval_task` shows (``ml.lifecycle.approval.request_body``
    of ``request``) in this task's XCom ``approval_request``."""
    from airflow.sdk import get_current_context

    from ml.lifecycle.approval import request_body

    get_current_context()["ti"].xcom_push(key="approval_request", value=request_body(**request))
