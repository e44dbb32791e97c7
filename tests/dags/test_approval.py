"""Approval mode on a real scheduler: with ``promotion.require_approval: true``, ``train_model``
waits at ``approve_promotion`` until a named Airflow user answers through the REST API, and
the audit table says who approved the move of ``champion``.

The same scheduler also shows events leaving real Airflow tasks: the approved move arrives at
a loopback webhook receiver as ``alias_moved``, and a run that fails arrives as ``run_failed``
through the DAGs' failure callback, each once and validly signed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.airflow_api import LocalAirflow
from scripts.procs import free_port, wait_for
from scripts.stack_env import stack_env
from tests.unit.test_events import SECRET, Receiver, valid

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_train_model_waits_for_and_records_an_approval(tmp_path, tiny_model_dir, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["promotion"]["require_approval"] = True
    # Only the runs this test triggers (as in make demo): no scheduled monitor or canary run.
    params["drift"]["schedule"] = params["rollout"]["schedule"] = "none"
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"reviewer": "approve-me"}))
    receiver = Receiver(free_port()).start()

    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MLFLOW_", "DRIFTLOOP_", "DATABASE_URL"))}
    base["DRIFTLOOP_HOME"] = str(tmp_path / "home")
    env = {**base, **stack_env(base), "DRIFTLOOP_BASE_MODEL": str(tiny_model_dir)}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "DRIFTLOOP_PARAMS": str(params_path),
        # A named user instead of the local stack's anonymous admin: the audit must name them.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "reviewer:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "DRIFTLOOP_WEBHOOK_URL": f"http://127.0.0.1:{receiver.port}/hooks",
        "DRIFTLOOP_WEBHOOK_SECRET": SECRET,
        "DRIFTLOOP_TASK_RETRIES": "0",  # the failing run below fails at once
    })  # fmt: skip
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=600)

    log_path = tmp_path / "standalone.log"
    dag, task = "train_model", "approve_promotion"
    with LocalAirflow(log_path, port=free_port(), env=env) as api:
        api.login("reviewer", "approve-me")
        api.wait_dag(dag)
        run_id = api.trigger(dag, {"max_examples": 60, "reason": "approval test"})

        def waiting() -> bool | None:
            states = api.task_states(dag, run_id)
            assert states.get("promoted") != "success", "champion moved without an approval"
            assert api.run(dag, run_id)["state"] not in ("success", "failed"), states
            return states.get(task) == "awaiting_input" or None

        wait_for(waiting, f"{task} to wait for input", timeout=900, every=3)
        request = api.approval_request(dag, run_id, task)
        assert request["options"] == ["Approve", "Reject"]
        assert "Move `champion` to v1" in request["body"], request
        assert not request.get("response_received")
        # Nothing has moved while it waits.
        default_db = f"sqlite:///{tmp_path / 'home' / 'driftloop.db'}"
        for key in ("DRIFTLOOP_HOME", "MLFLOW_TRACKING_URI", "DATABASE_URL"):
            monkeypatch.setenv(key, env.get(key) or default_db)
        from ml.registry import audit_log, get_alias
        from ml.settings import get_settings

        get_settings.cache_clear()
        try:
            assert get_alias("champion") is None
            answer = api.respond(dag, run_id, task, "Approve", {"comment": "looks good"})
            assert answer["responded_by"]["name"] == "reviewer"
            state = api.wait_run(dag, run_id, timeout=600)
            tasks = api.task_states(dag, run_id)
            assert state == "success", log_path.read_text()[-5000:]
            assert tasks["approved"] == "success" and tasks["rejected"] == "skipped", tasks
            assert tasks["promoted"] == "skipped", tasks
            champion = get_alias("champion")
            assert champion is not None and champion.version == "1"
            (row,) = audit_log(alias="champion")
            assert row.actor.startswith("user:reviewer via dag:train_model/"), row
            assert row.to_version == "1" and row.action == "promote"
            assert row.reason.startswith("approved by reviewer: looks good"), row
            assert row.evidence and row.evidence["approval"]["user"] == "reviewer"

            # A run that fails: its task's failure callback sends run_failed.
            failing = api.trigger(dag, {"batch_path": str(tmp_path / "missing.tsv")})
            assert api.wait_run(dag, failing, timeout=600) == "failed"
        finally:
            get_settings.cache_clear()
            receiver.stop()
    got = [json.loads(r["body"]) for r in receiver.accepted()]
    assert all(valid(r) for r in receiver.receipts), "a receipt failed its signature"
    assert len({e["id"] for e in got}) == len(got), "an event arrived twice"
    moved = [e["data"] for e in got if e["type"] == "alias_moved"]
    moved = [m for m in moved if m["alias"] == "champion"]
    assert [(m["actor"].split(" ")[0], m["to_version"]) for m in moved] == [("user:reviewer", "1")]
    failed = [e["data"] for e in got if e["type"] == "run_failed"]
    assert [(f["dag_id"], f["run_id"], f["task_id"]) for f in failed] == [
        (dag, failing, "validate")
    ], got
