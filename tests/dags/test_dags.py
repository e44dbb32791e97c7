"""DAG integrity: every DAG imports cleanly, is documented, tagged and retried, and parses fast
(no heavy library at the top of a DAG file; of the library, only the outcome enums)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
HELPERS = sorted(DAGS_DIR.glob("_*.py"))
HEAVY = {
    "torch",
    "transformers",
    "pandas",
    "evidently",
    "great_expectations",
    "mlflow",
    "sklearn",
    "bentoml",
    "numpy",
}
# The library modules a DAG file may import at parse time (both stdlib only): the outcomes its
# branches name, and the options of its approval step.
OUTCOMES = "ml.lifecycle.outcomes"
PARSE_TIME_ML = {"ml", "ml.lifecycle", OUTCOMES, "ml.lifecycle.approval"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    if str(DAGS_DIR) not in sys.path:  # Airflow's own processes put the DAGs folder there
        sys.path.insert(0, str(DAGS_DIR))

    return DagBag(dag_folder=str(DAGS_DIR))


def test_dags_import_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert "train_model" in dagbag.dags


def test_every_dag_has_tags_docs_and_retries(dagbag) -> None:
    assert dagbag.dags, "no DAG found"
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no docs"
        assert dag.catchup is False, f"{dag_id} catches up"
        for task in dag.tasks:
            # Empty branch ends have nothing worth retrying.
            if task.task_type != "EmptyOperator":
                assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_every_dag_for_a_task_is_tagged_with_every_task_it_can_run_for(dagbag) -> None:
    from ml.params import load_tasks

    wanted = {f"task:{name}" for name in load_tasks()}
    assert len(wanted) >= 2
    for dag_id, dag in dagbag.dags.items():
        if "task" in dag.params:
            assert wanted <= set(dag.tags), f"{dag_id} tags {sorted(dag.tags)}"
            assert {f"task:{n}" for n in dag.params.get_param("task").schema["enum"]} == wanted


@pytest.mark.parametrize("path", DAG_FILES + HELPERS, ids=lambda p: p.name)
def test_no_heavy_imports_at_dag_top_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    modules = set()
    for node in tree.body:  # module level only: imports inside tasks are the point
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    top = {m.split(".")[0] for m in modules}
    assert not (top & HEAVY), f"{path.name} imports {sorted(top & HEAVY)} at top level"
    library = {m for m in modules if m.split(".")[0] == "ml"} - {OUTCOMES}
    assert not library, f"{path.name} imports the library ({sorted(library)}) at parse time"


def test_the_outcomes_a_dag_imports_at_parse_time_need_only_the_standard_library() -> None:
    source = DAGS_DIR.parent / (OUTCOMES.replace(".", "/") + ".py")
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "enum"}, sorted(imported)
    for package in ("ml", "ml/lifecycle"):  # their __init__ runs on import too: docstring only
        tree = ast.parse((DAGS_DIR.parent / package / "__init__.py").read_text())
        assert all(isinstance(n, ast.Expr) for n in tree.body), package


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parsing_a_dag_file_loads_no_torch(path: Path) -> None:
    # A fresh interpreter with the DAGs folder on sys.path, as Airflow's DAG processor has it.
    code = (
        "import runpy, sys; sys.path.insert(0, sys.argv[2]); runpy.run_path(sys.argv[1]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'mlflow', 'great_expectations') "
        "if m in sys.modules); print(','.join(heavy)); "
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'ml')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(DAGS_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    *_, heavy, library = out.stdout.splitlines()
    assert heavy == "", out.stdout
    assert set(filter(None, library.split(","))) <= PARSE_TIME_ML, out.stdout


def test_train_model_shape(dagbag) -> None:
    dag = dagbag.dags["train_model"]
    ids = {t.task_id for t in dag.tasks}
    assert {
        "prepare",
        "validate",
        "train",
        "evaluate",
        "register",
        "promote",
        "promoted",
        "canary_started",
        "kept_champion",
        "release_retraining",
    } <= ids
    assert dag.get_task("promote").downstream_task_ids >= {
        "promoted",
        "canary_started",
        "kept_champion",
        "approve_promotion",  # only with promotion.require_approval
    }
    assert dag.get_task("act_on_approval").upstream_task_ids == {"approve_promotion"}
    assert dag.get_task("act_on_approval").downstream_task_ids - {"release_retraining"} == {
        "approved",
        "rejected",
    }
    # The lock is released by a teardown that waits for every other task, whatever its state;
    # no watcher is needed, since a teardown never decides the run's state.
    release = dag.get_task("release_retraining")
    assert release.is_teardown and release.trigger_rule == "all_done_setup_success"
    assert release.upstream_task_ids == ids - {"release_retraining"}
    assert dag.get_task("validate").upstream_task_ids == {"prepare"}
    assert dag.get_task("train").upstream_task_ids == {"validate"}
    assert set(dag.params.keys()) >= {"max_examples", "epochs", "reason", "extra_paths"}
    assert dag.max_active_runs == 1


def test_monitor_drift_shape(dagbag) -> None:
    dag = dagbag.dags["monitor_drift"]
    check = dag.get_task("check")
    assert not check.upstream_task_ids
    assert check.downstream_task_ids == {"nothing_to_judge", "report"}
    assert dag.get_task("evaluate").upstream_task_ids == {"report"}
    assert dag.get_task("decide").upstream_task_ids == {"evaluate"}
    assert dag.get_task("decide").downstream_task_ids == {
        "no_drift",
        "retrain",
        "retraining_in_progress",
        "rollback",
    }
    # rollback acts on the decision evaluate passed it (a TaskFlow argument, no manual XCom).
    assert dag.get_task("rollback").upstream_task_ids == {"decide", "evaluate"}
    # retrain takes the lock (setup); the teardown frees it unless train_model was triggered.
    take, release = dag.get_task("retrain"), dag.get_task("release_retraining")
    assert take.is_setup and release.is_teardown
    assert release.upstream_task_ids == {"retrain", "trigger_train_model"}
    assert dag.get_task("trigger_train_model").upstream_task_ids == {"record_window"}
    assert dag.get_task("record_window").upstream_task_ids == {"report", "retrain"}


def test_canary_rollout_ends_in_a_named_outcome(dagbag) -> None:
    dag = dagbag.dags["canary_rollout"]
    assert not dag.get_task("evaluate").upstream_task_ids
    assert dag.get_task("decide").upstream_task_ids == {"evaluate"}
    assert dag.get_task("decide").downstream_task_ids == {
        "nothing_to_judge",
        "no_canary",
        "waiting",
        "canary_promoted",
        "canary_rolled_back",
        "approve_canary_promotion",  # only with promotion.require_approval
    }
    # A person's answer is acted on by one task, which ends in one of two named outcomes.
    assert dag.get_task("act_on_approval").upstream_task_ids == {
        "approve_canary_promotion",
        "evaluate",
    }
    assert dag.get_task("act_on_approval").downstream_task_ids == {
        "canary_approved",
        "canary_rejected",
    }
    # evaluate decides without acting; only the acting tasks move an alias, on its decision.
    assert dag.get_task("evaluate").downstream_task_ids == {
        "decide",
        "canary_promoted",
        "canary_rolled_back",
        "act_on_approval",
    }
    for end in ("nothing_to_judge", "no_canary", "waiting"):
        assert dag.get_task(end).task_type == "EmptyOperator"
    for act in ("canary_promoted", "canary_rolled_back"):
        assert dag.get_task(act).upstream_task_ids == {"decide", "evaluate"}
