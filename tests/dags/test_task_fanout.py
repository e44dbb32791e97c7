"""Scheduled runs cover every task: a scheduled run of ``monitor_drift`` or ``canary_rollout``
judges the default task itself and triggers one run of its own DAG per other task
(``_driftloop.cover_other_tasks``); a triggered run triggers none.

The fast tests call the fan-out's callable with a stand-in context; the slow one runs the real
DAGs with ``dag.test()`` on a SQLite Airflow, once as a scheduled run and once as a manual one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "dags"
FANNED_OUT = ("monitor_drift", "canary_rollout")
SCHEDULED_ID = "scheduled__2026-03-01T10:00:00+00:00"
# Airflow's default [scheduler] allowed_run_id_pattern, for a run id a DAG author chooses.
ALLOWED_RUN_ID = r"^[A-Za-z0-9_.~:+-]+$"


@pytest.fixture(scope="module")
def dagbag():
    """The DAGs, parsed as Airflow's DAG processor does (which also makes ``_driftloop``
    importable)."""
    from airflow.dag_processing.dagbag import DagBag

    if str(DAGS_DIR) not in sys.path:  # Airflow's own processes put the DAGs folder there
        sys.path.insert(0, str(DAGS_DIR))
    return DagBag(dag_folder=str(DAGS_DIR))


@pytest.fixture
def three_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A params file whose default task is declared between two others."""
    from ml.settings import get_settings

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    first, *_ = raw["tasks"].values()
    raw["tasks"] = {"alpha": first, "beta": first, "gamma": first}
    raw["default_task"] = "beta"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=True))
    monkeypatch.setenv("DRIFTLOOP_PARAMS", str(path))
    get_settings.cache_clear()
    yield ["beta", "alpha", "gamma"]
    get_settings.cache_clear()


def call_other_tasks(monkeypatch, dag, *, run_type: str, run_id: str, task: str) -> list[dict]:
    """Run the ``other_tasks`` callable of ``dag`` as a task of a run of ``run_type`` would."""
    import airflow.sdk

    ctx = {
        "run_id": run_id,
        "dag_run": SimpleNamespace(run_type=run_type, run_id=run_id),
        "params": {"task": task},
        "dag": dag,
    }
    monkeypatch.setattr(airflow.sdk, "get_current_context", lambda: ctx)
    return dag.get_task("other_tasks").python_callable()


def test_the_run_ids_follow_airflows_rules(dagbag) -> None:
    import re

    from _driftloop import other_task_runs
    from airflow.utils.types import DagRunType

    for name in ("emotion", "a-b_c9"):
        (run,) = other_task_runs(SCHEDULED_ID, "scheduled", "sentiment", ["sentiment", name])
        run_id = run["trigger_run_id"]
        assert re.match(ALLOWED_RUN_ID, run_id) and ".." not in run_id, run_id
        # scheduled__ is Airflow's for the runs its scheduler makes.
        assert DagRunType.from_run_id(run_id) == DagRunType.MANUAL, run_id
        assert run_id == f"{name}__2026-03-01T10:00:00+00:00"


def test_only_a_scheduled_run_fans_out(dagbag) -> None:
    from _driftloop import other_task_runs
    from airflow.utils.types import DagRunType

    names = ["sentiment", "emotion"]
    assert other_task_runs(SCHEDULED_ID, DagRunType.SCHEDULED, "sentiment", names) == [
        {
            "trigger_run_id": "emotion__2026-03-01T10:00:00+00:00",
            "conf": {"task": "emotion"},
            "note": f"task `emotion` · from the scheduled run {SCHEDULED_ID}",
        }
    ]
    # A person's run, make demo's, a fanned-out one (operator_triggered), a backfill: none.
    for kind in set(DagRunType) - {DagRunType.SCHEDULED}:
        assert other_task_runs(f"{kind.value}__x", kind, "sentiment", names) == [], kind
    # A params file with one task: nothing to cover.
    assert other_task_runs(SCHEDULED_ID, "scheduled", "sentiment", ["sentiment"]) == []


@pytest.mark.parametrize("dag_id", FANNED_OUT)
def test_a_scheduled_run_triggers_every_other_task(dagbag, monkeypatch, dag_id) -> None:
    # The repository's params.yaml: the default task and every other one it declares.
    from ml.params import load_tasks

    default, *others = list(load_tasks())
    assert others, "params.yaml declares one task: nothing to fan out"
    dag = dagbag.dags[dag_id]
    assert dag.params["task"] == default  # what a scheduled run gets
    runs = call_other_tasks(
        monkeypatch, dag, run_type="scheduled", run_id=SCHEDULED_ID, task=default
    )
    assert [r["conf"] for r in runs] == [{"task": name} for name in others]
    for run, name in zip(runs, others, strict=True):
        assert name in run["trigger_run_id"] and run["trigger_run_id"] != SCHEDULED_ID
        assert run["note"].startswith(f"task `{name}` · ")  # as set_run_note starts a note
    assert len({r["trigger_run_id"] for r in runs}) == len(runs)


@pytest.mark.parametrize("dag_id", FANNED_OUT)
def test_the_fan_out_reads_the_tasks_at_run_time(dagbag, monkeypatch, three_tasks, dag_id):
    default, *others = three_tasks
    runs = call_other_tasks(
        monkeypatch, dagbag.dags[dag_id], run_type="scheduled", run_id=SCHEDULED_ID, task=default
    )
    assert [(r["trigger_run_id"], r["conf"]) for r in runs] == [
        (f"{name}__2026-03-01T10:00:00+00:00", {"task": name}) for name in others
    ]


@pytest.mark.parametrize("dag_id", FANNED_OUT)
@pytest.mark.parametrize("run_type", ["manual", "operator_triggered"])
def test_a_triggered_run_triggers_nothing(dagbag, monkeypatch, dag_id, run_type) -> None:
    for task in ("sentiment", "emotion"):
        runs = call_other_tasks(
            monkeypatch,
            dagbag.dags[dag_id],
            run_type=run_type,
            run_id=f"{run_type}__2026-03-01T10:00:00+00:00",
            task=task,
        )
        assert runs == [], (run_type, task)


@pytest.mark.parametrize("dag_id", FANNED_OUT)
def test_the_fan_out_stands_apart_from_the_decisions(dagbag, dag_id) -> None:
    dag = dagbag.dags[dag_id]
    lister, trigger = dag.get_task("other_tasks"), dag.get_task("trigger_other_tasks")
    assert not lister.upstream_task_ids and lister.downstream_task_ids == {"trigger_other_tasks"}
    assert trigger.upstream_task_ids == {"other_tasks"} and not trigger.downstream_task_ids
    # One run per task: a TriggerDagRunOperator mapped over the list, for this same DAG.
    assert trigger.task_type == "TriggerDagRunOperator"
    assert trigger.partial_kwargs["trigger_dag_id"] == dag_id
    assert trigger.partial_kwargs["wait_for_completion"] is False
    assert trigger.partial_kwargs["skip_when_already_exists"] is True  # a cleared run
    assert trigger.retries >= 1
    # Neither is connected to any task of the DAG's own chain, so no branch or skip reaches them.
    fan_out = {"other_tasks", "trigger_other_tasks"}
    for task in dag.tasks:
        if task.task_id in fan_out:
            continue
        relatives = task.get_flat_relative_ids(upstream=True) | task.get_flat_relative_ids()
        assert not relatives & fan_out, f"{dag_id}.{task.task_id} is tied to the fan-out"


def test_train_model_does_not_fan_out(dagbag) -> None:
    # A drift in task X triggers train_model for task X only.
    assert "trigger_other_tasks" not in dagbag.dags["train_model"].task_ids


# ------------------------------------------------------------------ real runs (dag.test())

RUN = r"""
import json, os, sys
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "dags"))
import airflow.models.dagrun as dagrun
from airflow.utils.state import DagRunState
from airflow.utils.types import DagRunType

dag_id, run_type = sys.argv[1], DagRunType(sys.argv[2])


def create(*, dag, logical_date, run_id, **kwargs):
    # dag.test() makes a manual run; this makes the run the scheduler would make.
    run_id = run_type.generate_run_id(suffix=logical_date.isoformat())
    return dag.create_dagrun(run_id=run_id, logical_date=logical_date, run_type=run_type,
                             state=DagRunState.RUNNING, **kwargs)


dagrun.get_or_create_dagrun = create
from airflow.dag_processing.dagbag import DagBag
from airflow.utils.session import create_session

run = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags[dag_id].test()
with create_session() as session:
    others = session.query(dagrun.DagRun).filter(
        dagrun.DagRun.dag_id == dag_id, dagrun.DagRun.run_id != run.run_id)
    mine = session.query(dagrun.DagRun).filter(dagrun.DagRun.run_id == run.run_id).one()
    print(json.dumps({
        "run": run.run_id, "state": str(run.state),
        "tasks": {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in mine.task_instances},
        "labels": [ti.rendered_map_index for ti in mine.task_instances if ti.map_index >= 0],
        "triggered": [{"run_id": r.run_id, "run_type": str(r.run_type), "conf": r.conf,
                       "note": r.note}
                      for r in others if r.run_id.endswith(run.run_id.split("__", 1)[1])],
    }))
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fanout")
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "MLFLOW_", "DRIFTLOOP_", "DATABASE_URL"))
    }
    env = {**base, "AIRFLOW_HOME": str(root / "airflow"), "DRIFTLOOP_HOME": str(root / "home"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "PYTHONPATH": str(REPO), "DRIFTLOOP_TASK_RETRIES": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    for command in (["airflow", "db", "migrate"], ["airflow", "dags", "reserialize"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return env


def real_run(env: dict[str, str], dag_id: str, run_type: str) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, dag_id, run_type], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("dag_id", FANNED_OUT)
def test_real_runs_fan_out_only_when_scheduled(airflow_env, dag_id) -> None:
    from ml.params import load_tasks

    default, *others = list(load_tasks())
    scheduled = real_run(airflow_env, dag_id, "scheduled")
    # Nothing to judge here (no registry): the run's own chain ends as it always does.
    assert scheduled["state"] == "success", scheduled
    assert scheduled["tasks"]["nothing_to_judge[-1]"] == "success", scheduled
    assert [t["conf"] for t in scheduled["triggered"]] == [{"task": n} for n in others]
    for run, name in zip(scheduled["triggered"], others, strict=True):
        assert run["run_type"] == "operator_triggered" and run["run_id"].startswith(name), run
        assert run["note"].startswith(f"task `{name}` · "), run
    assert scheduled["labels"] == others  # the UI names each mapped trigger by its task

    manual = real_run(airflow_env, dag_id, "manual")
    assert manual["state"] == "success", manual
    assert manual["tasks"]["trigger_other_tasks[-1]"] == "skipped", manual
    assert manual["tasks"]["nothing_to_judge[-1]"] == "success", manual
    assert manual["triggered"] == []
