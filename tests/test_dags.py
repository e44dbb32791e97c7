"""DAG integrity: every DAG imports cleanly, is documented, tagged and retried, and parses fast
(no heavy library at the top of a DAG file)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
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
            # Empty branch ends and the run-failing watcher have nothing worth retrying.
            if task.task_type != "EmptyOperator" and task.trigger_rule != "one_failed":
                assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


@pytest.mark.parametrize("path", DAG_FILES + HELPERS, ids=lambda p: p.name)
def test_no_heavy_imports_at_dag_top_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:  # module level only: imports inside tasks are the point
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not (top & HEAVY), f"{path.name} imports {sorted(top & HEAVY)} at top level"
    assert "ml" not in top, f"{path.name} imports the library at parse time"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parsing_a_dag_file_loads_no_torch(path: Path) -> None:
    code = (
        "import runpy, sys; sys.path.insert(0, sys.argv[2]); runpy.run_path(sys.argv[1]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'mlflow', 'great_expectations') "
        "if m in sys.modules); print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(DAGS_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1:] in ([""], []), out.stdout


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
        "watcher",
    } <= ids
    assert dag.get_task("promote").downstream_task_ids >= {
        "promoted",
        "canary_started",
        "kept_champion",
    }
    assert dag.get_task("release_retraining").trigger_rule == "all_done"
    watcher = dag.get_task("watcher")
    assert watcher.trigger_rule == "one_failed" and not watcher.downstream_task_ids
    assert {t.task_id for t in dag.tasks} - {"watcher"} - {
        t.task_id for t in dag.tasks if "watcher" in t.downstream_task_ids
    } <= {"promoted", "canary_started", "kept_champion"}, "a task the watcher does not watch"
    assert dag.get_task("validate").upstream_task_ids == {"prepare"}
    assert dag.get_task("train").upstream_task_ids == {"validate"}
    assert set(dag.params.keys()) >= {"max_examples", "epochs", "reason", "extra_paths"}
    assert dag.max_active_runs == 1
