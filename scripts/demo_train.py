"""``make demo-train``: train_model alone on a real Airflow scheduler, then the champion.

Starts ``airflow standalone`` in the background (API server, scheduler, DAG processor,
triggerer; SQLite by default, PostgreSQL when ``DATABASE_URL`` is set), triggers
``train_model`` through the REST API with the default parameters, prints every task state
change while it runs, and ends with the champion, its validation metrics and where to look.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from scripts.airflow_api import LocalAirflow, print_progress


def say(message: str) -> None:
    sys.stderr.write(f"==> {message}\n")
    sys.stderr.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW_PORT", "8080")))
    parser.add_argument("--conf", default="{}", help="JSON conf for the train_model run")
    args = parser.parse_args()

    from ml.settings import get_settings

    settings = get_settings()
    home = settings.ensure_home()
    log_path = home / "logs" / "airflow-standalone.log"
    started = time.monotonic()
    say(
        f"starting Airflow (scheduler, DAG processor, API server) on port {args.port}; "
        f"log: {log_path}"
    )
    with LocalAirflow(log_path, port=args.port) as api:
        say("Airflow is healthy; waiting for the DAG processor to parse train_model")
        api.wait_dag("train_model")
        conf = {"reason": "make demo: first model on the 2013-2015 tweets", **json.loads(args.conf)}
        run_id = api.trigger("train_model", conf)
        say(f"triggered train_model run {run_id}; following its tasks")
        state = api.wait_run("train_model", run_id, on_change=print_progress("train_model"))
        tasks = api.task_states("train_model", run_id)
    elapsed = time.monotonic() - started
    say(f"train_model {run_id}: {state} in {elapsed:.0f}s")
    if state != "success":
        say(
            f"see the task logs under {Path(os.environ.get('AIRFLOW_HOME', home / 'airflow'))}"
            "/logs or in the Airflow UI (make airflow-ui)"
        )
        return 1
    return summary(tasks)


def summary(tasks: dict[str, str | None]) -> int:
    from ml.lifecycle.outcomes import TrainOutcome
    from ml.registry import CHALLENGER, CHAMPION, audit_log, get_alias
    from ml.settings import get_settings

    settings = get_settings()
    champion = get_alias(CHAMPION)
    challenger = get_alias(CHALLENGER)
    promoted = tasks.get(TrainOutcome.PROMOTED) == "success"
    outcome = TrainOutcome.PROMOTED if promoted else TrainOutcome.KEPT_CHAMPION
    lines = ["", "driftloop demo: done", f"  outcome of this run: {outcome}"]
    if champion is None:
        lines.append("  no champion registered (see the Airflow task logs)")
    else:
        metrics = {
            k.removeprefix("val_"): round(v, 4)
            for k, v in champion.metrics.items()
            if k.startswith("val_")
        }
        lines += [
            f"  champion: {champion.name} v{champion.version} (run {champion.run_id})",
            f"  validation macro-recall: {metrics.get('macro_recall')}  "
            f"macro-F1: {metrics.get('macro_f1')}  accuracy: {metrics.get('accuracy')}",
            f"  per-class recall: negative {metrics.get('recall_negative')}, "
            f"neutral {metrics.get('recall_neutral')}, positive {metrics.get('recall_positive')}",
            f"  training: {champion.metrics.get('train_examples_per_second', 0):.1f} examples/s, "
            f"{champion.metrics.get('train_seconds', 0):.0f}s",
        ]
    if challenger is not None and (champion is None or challenger.version != champion.version):
        lines.append(f"  challenger: v{challenger.version}")
    moves = audit_log(limit=3)
    if moves:
        lines.append("  latest alias moves:")
        lines += [
            f"    {m.at[:19]} {m.action} {m.alias}: {m.from_version} -> {m.to_version} by {m.actor}"
            for m in moves
        ]
    lines += [
        "",
        "where to look:",
        "  driftloop status              champion/challenger, metrics and lineage (--json: JSON)",
        "  driftloop audit               every alias move",
        "  make airflow-ui               Airflow UI on http://localhost:8080 (the run above)",
        "  make mlflow-ui                MLflow UI on http://localhost:5000 (runs, curves, "
        "confusion matrices, registry)",
        f"  data docs                     {settings.data_docs_dir / 'index.html'}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if champion is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
