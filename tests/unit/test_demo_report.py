"""The demo's honest report: the summary checker (``scripts/check_demo.py``), the failed-try and
run listing of :class:`scripts.airflow_api.AirflowAPI` against a fake ``/api/v2``, and the
demo's own verdict on them (``scripts/demo.py``). At the end, the tests' own honesty: a missing
server binary fails a test unless ``DRIFTLOOP_ALLOW_MISSING_SERVICES=1`` (``servers.py``)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

from scripts import airflow_api, check_demo, demo  # noqa: E402

GOOD: dict[str, Any] = {
    "started": "2026-01-01T00:00:00+00:00",
    "steps": [
        {"step": "first model", "outcome": "promoted"},
        {"step": "same-period traffic", "outcome": "no_drift",
         "note": "**no_drift**: nothing moved\n\nDrift review: /r/1/review.html"},
        {"step": "2016 traffic", "outcome": "retrain",
         "note": "**retrain**: drifted\n\nDrift review: /r/2/review.html"},
        {"step": "retraining", "state": "success", "outcome": "canary_started"},
        {"step": "canary", "outcome": "canary_promoted",
         "evidence": {"test": {"log_wealth_not_worse": 3.4, "bound": 3.0},
                      "labels": {"paired": 420, "unpaired": 12}}},
        {"step": "damaged model, offline gate", "outcome": "kept_champion"},
        {"step": "damaged model, canary", "outcome": "canary_rolled_back"},
        {"step": "emotion model", "outcome": "promoted", "task": "emotion", "version": "1"},
        {"step": "emotion traffic", "outcome": "served", "task": "emotion",
         "service": "http://127.0.0.1:3000", "before_champion": 503,
         "answers": {
             "sentiment": {"path": "/predict", "status": 200, "model_version": "3",
                           "labels": ["negative", "neutral", "positive"],
                           "predicted": ["negative", "positive"]},
             "emotion": {"path": "/tasks/emotion/predict", "status": 200, "model_version": "1",
                         "labels": ["anger", "joy", "optimism", "sadness"],
                         "predicted": ["anger", "joy", "sadness"]},
         },
         "sent": 374, "feedback_sent": 190, "by_version": {"1": 374}},
        {"step": "emotion shifted traffic", "outcome": "retrain", "task": "emotion",
         "note": "task `emotion`\n\n**retrain**: drifted\n\nDrift review: /r/3/review.html"},
        {"step": "emotion retraining", "task": "emotion", "state": "success",
         "outcome": "kept_champion"},
    ],
    "runs": [
        {"dag_id": "train_model", "run_id": "manual__1", "run_type": "manual", "state": "success"},
        {"dag_id": "canary_rollout", "run_id": "scheduled__1", "state": "success"},
    ],
    "failed_tries": [],
    "seconds": 1200,
}
FAILED_TRY = {
    "dag_id": "monitor_drift",
    "run_id": "scheduled__2026-01-01T00:00:00+00:00",
    "task_id": "report",
    "map_index": -1,
    "try_number": 1,
    "state": "failed",
    "start_date": "2026-01-01T00:00:01Z",
    "end_date": "2026-01-01T00:00:05Z",
}


def run_check(tmp_path: Path, summary: dict[str, Any], capsys) -> tuple[int, str]:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    rc = check_demo.main([str(path)])
    return rc, capsys.readouterr().out


def test_a_good_summary_passes(tmp_path: Path, capsys) -> None:
    rc, out = run_check(tmp_path, GOOD, capsys)
    assert rc == 0, out
    # the steps, the three run notes, the canary's evidence, the second task's answers (503
    # before its champion, then both tasks' labels), failed tries and failed runs
    assert out.count("\nok  ") == len(check_demo.EXPECTED_STEPS) + 3 + 1 + 3 + 2
    assert "FAIL" not in out and out.rstrip().endswith("demo check: passed")
    assert "expected canary_rolled_back" in out and "seen canary_rolled_back" in out


@pytest.mark.parametrize("index", range(len(GOOD["steps"])))
def test_each_wrong_outcome_fails(tmp_path: Path, capsys, index: int) -> None:
    summary = copy.deepcopy(GOOD)
    summary["steps"][index]["outcome"] = "unknown"
    rc, out = run_check(tmp_path, summary, capsys)
    assert rc == 1
    (bad,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    name, want = check_demo.EXPECTED_STEPS[index]
    assert name in bad and f"expected {want}" in bad and "seen unknown" in bad


def test_a_summary_without_the_second_task_fails(tmp_path: Path, capsys) -> None:
    """The sentiment loop alone, every step right, is not the demo: the emotion steps must be
    there (issue 14: a new task is configuration)."""
    summary = copy.deepcopy(GOOD)
    summary["steps"] = [s for s in summary["steps"] if not s["step"].startswith("emotion")]
    assert len(summary["steps"]) == 7
    rc, out = run_check(tmp_path, summary, capsys)
    assert rc == 1 and "demo check: FAILED" in out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 4 and all("(step missing)" in line for line in failed), out
    for name in ("emotion model", "emotion traffic", "emotion shifted traffic",
                 "emotion retraining"):  # fmt: skip
        assert any(name in line for line in failed)


def _answers(s: dict[str, Any]) -> dict[str, Any]:
    return s["steps"][8]["answers"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s["steps"][8].update(before_champion=200),
                     id="served before its champion existed"),
        pytest.param(lambda s: s["steps"][8].pop("before_champion"), id="no 503 recorded"),
        pytest.param(lambda s: _answers(s)["emotion"].update(labels=["negative", "neutral",
                                                                      "positive"]),
                     id="emotion answered with sentiment's labels"),
        pytest.param(lambda s: _answers(s)["emotion"].update(labels=["anger", "joy"]),
                     id="emotion answered with two labels"),
        pytest.param(lambda s: _answers(s)["emotion"].update(predicted=["positive"]),
                     id="emotion predicted a label it does not have"),
        pytest.param(lambda s: _answers(s)["emotion"].update(status=503), id="emotion 503"),
        pytest.param(lambda s: _answers(s).pop("sentiment"), id="sentiment not asked"),
        pytest.param(lambda s: _answers(s)["sentiment"].update(labels=["anger", "joy",
                                                                        "optimism", "sadness"]),
                     id="the default task answered with emotion's labels"),
        pytest.param(lambda s: s["steps"][8].pop("answers"), id="no answers recorded"),
        pytest.param(lambda s: s["steps"][9].update(note=None), id="emotion drift without a note"),
        pytest.param(lambda s: s["steps"][9].update(outcome="no_drift"), id="no emotion drift"),
        pytest.param(lambda s: s["steps"][10].update(outcome="canary_started"),
                     id="emotion retraining went to canary"),
    ],
)  # fmt: skip
def test_the_second_task_must_be_served_with_its_labels(tmp_path: Path, capsys, change) -> None:
    summary = copy.deepcopy(GOOD)
    change(summary)
    rc, out = run_check(tmp_path, summary, capsys)
    assert rc == 1 and "demo check: FAILED" in out, out


def test_the_checked_labels_are_params_yaml_s() -> None:
    from ml.params import load_tasks

    tasks = load_tasks(REPO / "params.yaml")
    assert {name: p.task.labels for name, p in tasks.items()} == check_demo.TASK_LABELS
    assert demo.SECOND_TASK in tasks and demo.SECOND_TASK != next(iter(tasks))
    # The checked step names are the demo's: "<second task> model", "... traffic", ...
    assert {n for n, _ in check_demo.EXPECTED_STEPS if n.startswith(demo.SECOND_TASK)} == {
        f"{demo.SECOND_TASK} {what}"
        for what in ("model", "traffic", "shifted traffic", "retraining")
    }


def test_the_demo_sends_a_task_s_traffic_under_its_prefix() -> None:
    assert demo.task_base("http://127.0.0.1:3000", None) == "http://127.0.0.1:3000"
    base = demo.task_base("http://127.0.0.1:3000", "emotion")
    assert base == "http://127.0.0.1:3000/tasks/emotion"
    # ml.serving.replay posts to "/predict" and "/feedback" on a client with this base URL.
    client = httpx.Client(base_url=base)
    assert client.build_request("POST", "/predict").url.path == "/tasks/emotion/predict"
    assert client.build_request("POST", "/feedback").url.path == "/tasks/emotion/feedback"


def test_the_demo_records_what_an_answer_shows() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:3000/tasks/emotion/predict")
    scores = [{"anger": 0.1, "joy": 0.7, "optimism": 0.1, "sadness": 0.1},
              {"anger": 0.6, "joy": 0.2, "optimism": 0.1, "sadness": 0.1}]
    body = {
        "predictions": [
            {"label": label, "scores": score, "request_id": f"r{i}", "model_version": "1"}
            for i, (label, score) in enumerate(zip(["joy", "anger"], scores, strict=True))
        ],
        "model_version": "1",
    }  # fmt: skip
    got = demo.answer(httpx.Response(200, json=body, request=request))
    assert got == {
        "path": "/tasks/emotion/predict",
        "status": 200,
        "labels": ["anger", "joy", "optimism", "sadness"],
        "predicted": ["joy", "anger"],
        "model_version": "1",
    }
    refused = demo.answer(httpx.Response(503, text="no champion yet", request=request))
    assert refused["status"] == 503 and refused["body"] == "no champion yet"


def test_a_failed_try_fails_even_when_every_outcome_is_right(tmp_path: Path, capsys) -> None:
    summary = copy.deepcopy(GOOD)
    summary["failed_tries"] = [FAILED_TRY]
    rc, out = run_check(tmp_path, summary, capsys)
    assert rc == 1
    assert "FAIL  failed task tries" in out and "monitor_drift.report try 1: failed" in out


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s.pop("failed_tries"), id="failed tries not recorded"),
        pytest.param(lambda s: s.update(failed_tries=None), id="failed tries unknown"),
        pytest.param(lambda s: s.pop("runs"), id="runs not recorded"),
        pytest.param(lambda s: s["runs"][1].update(state="failed"), id="a failed run"),
        pytest.param(lambda s: s["steps"].pop(4), id="a step missing"),
        pytest.param(lambda s: s["steps"][4].pop("evidence"), id="canary without evidence"),
        pytest.param(lambda s: s["steps"][4]["evidence"]["labels"].update(paired=0),
                     id="canary decided without paired labels"),
        pytest.param(lambda s: s["steps"][4]["evidence"]["test"].update(log_wealth_not_worse=1),
                     id="canary promoted below the bound"),
        pytest.param(lambda s: s["steps"].reverse(), id="steps out of order"),
        pytest.param(lambda s: s["steps"].append({"step": "x", "outcome": "y"}), id="extra"),
        pytest.param(lambda s: s.update(error="RuntimeError: boom"), id="the demo stopped"),
        pytest.param(lambda s: s["steps"][2].update(note=None), id="a drift run without a note"),
    ],
)
def test_anything_else_wrong_fails(tmp_path: Path, capsys, change) -> None:
    summary = copy.deepcopy(GOOD)
    change(summary)
    rc, out = run_check(tmp_path, summary, capsys)
    assert rc == 1 and "demo check: FAILED" in out, out


def test_an_unreadable_summary_is_an_error(tmp_path: Path, capsys) -> None:
    assert check_demo.main([str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert check_demo.main([str(tmp_path / "bad.json")]) == 2


def test_the_default_path_follows_driftloop_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path))
    assert check_demo.default_path() == tmp_path / "demo" / "summary.json"
    monkeypatch.delenv("DRIFTLOOP_HOME")
    assert check_demo.default_path() == REPO / ".driftloop" / "demo" / "summary.json"


# --------------------------------------------------------------- the Airflow API side, faked


def ti(task_id: str, state: str, try_number: int, map_index: int = -1) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "dag_id": "train_model",
        "dag_run_id": "r1",
        "map_index": map_index,
        "state": state,
        "try_number": try_number,
        "start_date": f"2026-01-01T00:0{try_number}:00Z",
        "end_date": f"2026-01-01T00:0{try_number}:30Z",
    }


TASK_INSTANCES = [
    ti("prepare", "success", 1),
    ti("train", "success", 2),  # try 1 failed, the retry fixed it
    ti("split", "success", 1, map_index=0),
    ti("split", "up_for_retry", 1, map_index=1),
    ti("promote", "failed", 1),
    ti("kept_champion", "skipped", 0),
]
TRIES = {
    "train/tries": [ti("train", "failed", 1), ti("train", "success", 2)],
    # Airflow leaves an up_for_retry instance out of its tries: the history has the failed try.
    "split/1/tries": [ti("split", "failed", 1, map_index=1)],
    "promote/tries": [ti("promote", "failed", 1)],
}
RUNS = [
    {"dag_run_id": "old", "dag_id": "monitor_drift", "state": "success",
     "queued_at": "2025-12-31T23:00:00Z", "run_after": "2025-12-31T23:00:00Z"},
    {"dag_run_id": "scheduled__x", "dag_id": "monitor_drift", "state": "running",
     "queued_at": "2026-01-01T00:00:05Z", "run_after": "2025-12-31T23:59:00Z"},
    {"dag_run_id": "manual__y", "dag_id": "monitor_drift", "state": "failed",
     "queued_at": "2026-01-01T00:10:00Z", "run_after": "2026-01-01T00:10:00Z"},
]  # fmt: skip


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> tuple[airflow_api.AirflowAPI, list[httpx.URL]]:
    """An AirflowAPI on a fake ``/api/v2`` with pages of two items (to exercise paging)."""
    monkeypatch.setattr(airflow_api, "PAGE", 2)
    seen: list[httpx.URL] = []

    def page(items: list[dict[str, Any]], request: httpx.Request) -> dict[str, Any]:
        offset, limit = int(request.url.params["offset"]), int(request.url.params["limit"])
        return {"items": items[offset : offset + limit], "total_entries": len(items)}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        path = request.url.path
        prefix = "/api/v2/dags/train_model/dagRuns/r1/taskInstances"
        if path == prefix:
            body = page(TASK_INSTANCES, request)
            return httpx.Response(200, json={"task_instances": body.pop("items"), **body})
        if path.startswith(prefix + "/"):
            key = path.removeprefix(prefix + "/")
            if key not in TRIES:
                return httpx.Response(404, json={"detail": "not found"})
            return httpx.Response(200, json={"task_instances": TRIES[key], "total_entries": 9})
        if path == "/api/v2/dags/monitor_drift/dagRuns":
            body = page(RUNS, request)
            return httpx.Response(200, json={"dag_runs": body.pop("items"), **body})
        return httpx.Response(404, json={"detail": path})

    api = airflow_api.AirflowAPI("http://airflow.test")
    api.http = httpx.Client(base_url=api.base_url, transport=httpx.MockTransport(handler))
    return api, seen


def test_failed_tries_include_a_try_that_a_retry_fixed_and_mapped_ones(fake_api) -> None:
    api, seen = fake_api
    failed = api.failed_tries("train_model", "r1")
    got = [(t["task_id"], t["map_index"], t["try_number"], t["state"]) for t in failed]
    assert got == [
        ("promote", -1, 1, "failed"),
        ("split", 1, 1, "failed"),
        ("train", -1, 1, "failed"),
    ]
    assert failed[0] == {
        "dag_id": "train_model",
        "run_id": "r1",
        "task_id": "promote",
        "map_index": -1,
        "try_number": 1,
        "state": "failed",
        "start_date": "2026-01-01T00:01:00Z",
        "end_date": "2026-01-01T00:01:30Z",
    }
    asked = {u.path.rsplit("/taskInstances/", 1)[-1] for u in seen if "/tries" in u.path}
    # Only instances with a retry or a failed state have their history read; mapped by index.
    assert asked == {"train/tries", "split/1/tries", "promote/tries"}
    assert len(api.all_task_instances("train_model", "r1")) == len(TASK_INSTANCES)  # all pages


def test_runs_since_counts_a_run_from_when_it_was_queued(fake_api) -> None:
    api, seen = fake_api
    since = datetime(2026, 1, 1, tzinfo=UTC)
    runs = api.runs_since("monitor_drift", since)
    # The scheduled run's run_after is before the start, but it was queued after it.
    assert [r["dag_run_id"] for r in runs] == ["scheduled__x", "manual__y"]
    assert seen[0].params["updated_at_gte"] == "2026-01-01T00:00:00.000000Z"


def test_the_demo_records_every_run_and_fails_on_a_failed_try(fake_api, monkeypatch) -> None:
    api, _ = fake_api
    monkeypatch.setattr(demo, "DAGS", ("monitor_drift",))
    monkeypatch.setattr(
        api, "failed_tries", lambda dag_id, run_id: [FAILED_TRY] if run_id == "manual__y" else []
    )
    record: dict[str, Any] = {"steps": [{"step": "first model", "outcome": "promoted"}]}
    demo.record_runs(api, datetime(2026, 1, 1, tzinfo=UTC), record, settle=0)
    assert [(r["run_id"], r["state"]) for r in record["runs"]] == [
        ("scheduled__x", "running"),
        ("manual__y", "failed"),
    ]
    assert record["failed_tries"] == [FAILED_TRY]
    assert demo.problems(record) == ["1 task tries failed", "1 DAG runs failed"]
    report = "\n".join(demo.run_report(record))
    assert "failed task tries:\n  monitor_drift.report try 1: failed" in report
    json.dumps(record)  # what goes to summary.json


def test_the_demo_passes_with_no_failed_try_and_says_none() -> None:
    record = copy.deepcopy(GOOD)
    assert demo.problems(record) == []
    report = demo.run_report(record)
    assert report[report.index("failed task tries:") + 1] == "  none"


def test_the_demo_fails_when_airflow_cannot_say(fake_api, monkeypatch) -> None:
    api, _ = fake_api
    monkeypatch.setattr(demo, "DAGS", ("no_such_dag",))
    record: dict[str, Any] = {"steps": []}
    demo.record_runs(api, datetime(2026, 1, 1, tzinfo=UTC), record, settle=0)
    assert record["runs"] is None and record["failed_tries"] is None
    assert demo.problems(record) and "404" in record["runs_error"]


# ------------------------------------------------- a missing server fails a test, never skips it


def test_a_missing_server_fails_the_test_naming_the_install_command(monkeypatch) -> None:
    from tests.harness.servers import servers_missing

    monkeypatch.delenv("DRIFTLOOP_ALLOW_MISSING_SERVICES", raising=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        servers_missing("redis-server not found", what="Redis")
    assert "make services-install" in str(failed.value)
    assert "scripts/services.sh install" in str(failed.value)
    assert "redis-server not found" in str(failed.value)
    monkeypatch.setenv("DRIFTLOOP_ALLOW_MISSING_SERVICES", "0")
    with pytest.raises(pytest.fail.Exception):
        servers_missing("initdb not found")


def test_a_missing_server_skips_only_when_asked(monkeypatch) -> None:
    from tests.harness.servers import servers_missing

    monkeypatch.setenv("DRIFTLOOP_ALLOW_MISSING_SERVICES", "1")
    with pytest.raises(pytest.skip.Exception) as skipped:
        servers_missing("initdb not found", what="PostgreSQL")
    assert "PostgreSQL" in str(skipped.value) and "make services-install" in str(skipped.value)
