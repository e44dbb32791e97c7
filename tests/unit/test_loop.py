"""The closed loop's decisions: which branch monitor_drift takes, the single-retraining guard,
and turning a labelled production window into a validated training batch."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from ml.db import feedback as feedback_table
from ml.db import get_engine, predictions, retraining_lock
from ml.lifecycle import feedback, lock, loop
from ml.lifecycle.loop import LoopDecision
from ml.lifecycle.outcomes import MonitorOutcome
from ml.settings import get_settings

DRIFT = {"drift_detected": True, "report_dir": "/r/1", "window_start": "a", "window_end": "b",
         "rows": 500, "signals": [{"name": "embeddings", "drifted": True, "score": 0.4},
                                  {"name": "descriptors", "drifted": False, "score": 0.1}]}
CALM = {"drift_detected": False, "report_dir": "/r/2", "signals": [], "reason": "all quiet"}


def comparison(champion_acc: float, previous_acc: float, p: float, n: int = 200) -> dict:
    return {"champion": {"version": "3", "accuracy": champion_acc, "feedback": n},
            "previous": {"version": "2", "accuracy": previous_acc, "feedback": n},
            "p_value_worse": p}


def test_no_drift() -> None:
    d = loop.decide(CALM)
    assert d.outcome == "no_drift" and d.reason == "all quiet"
    assert d.outcome is MonitorOutcome.NO_DRIFT


def test_a_decision_crosses_the_xcom_boundary_as_a_dict_and_back() -> None:
    d = loop.decide(DRIFT, comparison=comparison(0.40, 0.70, p=1e-6))
    as_dict = d.to_dict()
    assert as_dict["outcome"] == "rollback" and type(as_dict["outcome"]) is str
    assert LoopDecision.from_dict(as_dict) == d


def test_drift_retrains_and_names_signals_and_report() -> None:
    d = loop.decide(DRIFT)
    assert d.outcome == "retrain"
    assert "embeddings" in d.reason and "descriptors" not in d.reason and "/r/1" in d.reason


def test_drift_while_retraining_starts_nothing() -> None:
    assert loop.decide(DRIFT, retraining_running=True).outcome == "retraining_in_progress"


def test_worse_champion_on_live_feedback_is_rolled_back_first() -> None:
    d = loop.decide(DRIFT, comparison=comparison(0.40, 0.70, p=1e-6))
    assert d.outcome == "rollback" and "significantly below v2" in d.reason
    # not significant, or too few labels: no rollback
    assert loop.decide(CALM, comparison=comparison(0.66, 0.68, p=0.3)).outcome == "no_drift"
    assert loop.decide(CALM, comparison=comparison(0.2, 0.9, p=1e-3, n=5)).outcome == "no_drift"


def test_only_one_retraining_at_a_time(tmp_home) -> None:
    first = lock.acquire_retraining("drift in embeddings")
    assert first and lock.retraining_running()
    assert lock.acquire_retraining("drift again") is None
    assert not lock.release_retraining("not-the-token")
    assert lock.release_retraining(first) and not lock.retraining_running()
    second = lock.acquire_retraining("next drift")
    assert second and second != first


def test_a_retry_of_the_same_run_carries_on_with_its_own_lock(tmp_home) -> None:
    mine = lock.run_token("monitor_drift", "scheduled__2026-12-01T10:00:00+00:00")
    assert mine == lock.run_token("monitor_drift", "scheduled__2026-12-01T10:00:00+00:00")
    assert lock.acquire_retraining("drift", token=mine) == mine
    assert lock.acquire_retraining("drift, try 2", token=mine) == mine  # the retry proceeds
    other = lock.run_token("monitor_drift", "scheduled__2026-12-01T11:00:00+00:00")
    assert lock.acquire_retraining("drift, next run", token=other) is None  # another run waits
    assert loop.decide(DRIFT, retraining_running=lock.retraining_running()).outcome == (
        "retraining_in_progress")


def test_the_lock_is_freed_unless_train_model_took_it_over(tmp_home) -> None:
    token = lock.acquire_retraining("drift", token="run-a")
    assert not lock.release_unless_handed_over(token, "manual__train_model_run")
    assert lock.retraining_running()  # train_model's own teardown frees it when it ends
    assert lock.release_unless_handed_over(token, None)  # recording or triggering failed
    assert not lock.retraining_running()


def test_stale_lock_is_taken_over(tmp_home) -> None:
    engine = get_engine(get_settings().database_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(retraining_lock).values(
            name="retraining", token="dead", acquired_at=datetime.now(tz=UTC) - timedelta(days=1),
            reason="a run that died"))
    assert lock.acquire_retraining("fresh", ttl=timedelta(hours=6)) not in (None, "dead")


def _log(rows: list[tuple[str, str, str | None]], at: datetime, prefix: str = "r",
         model_name: str = "sentiment") -> None:
    engine = get_engine(get_settings().database_url)
    preds, fbs = [], []
    for i, (text, pred, truth) in enumerate(rows):
        rid = f"{prefix}{i}"
        preds.append({"request_id": rid, "at": at + timedelta(seconds=i), "model_name": model_name,
                      "model_version": "1", "text": text, "label": pred,
                      "scores": {"negative": 0.2, "neutral": 0.3, "positive": 0.5},
                      "confidence": 0.5, "latency_ms": 5.0, "cached": False})
        if truth is not None:
            fbs.append({"request_id": rid, "at": at + timedelta(seconds=i + 1), "label": truth,
                        "source": f"k-{i % 5}"})  # five labellers: max_source_share 0.25
    with engine.begin() as conn:
        conn.execute(sa.insert(predictions), preds)
        if fbs:
            conn.execute(sa.insert(feedback_table), fbs)


def test_labelled_window_becomes_a_validated_batch(tmp_home, tmp_path) -> None:
    start = datetime(2026, 5, 1, tzinfo=UTC)
    labels = ("negative", "neutral", "positive")
    rows = [(f"tweet {i} about the game", labels[i % 3], labels[(i + 1) % 3]) for i in range(90)]
    rows += [("no label came back", "neutral", None)] * 1
    rows += [("   ", "neutral", "neutral"), ("tweet 1 about the game", "neutral", "neutral")]
    _log(rows, start)
    out = feedback.record_labelled_window(start.isoformat(), start + timedelta(hours=1), dvc=False,
                                      folder=tmp_path)
    assert out.path and out.rows == 90 and out.dropped == 2
    written = open(out.path).read().splitlines()
    assert written[0] == "label\ttext" and len(written) == 91
    assert "neutral\ttweet 0 about the game" in written  # the feedback label, not the prediction
    assert feedback.feedback_batches(tmp_path) == [out.path]


def test_a_labelled_window_holds_only_the_task_s_own_predictions(tmp_home, tmp_path,
                                                                 monkeypatch) -> None:
    """Feedback on another task's predictions (same window, same log) is not this task's data."""
    from ml.params import use_task

    monkeypatch.setenv("DRIFTLOOP_FEEDBACK_DIR", str(tmp_path / "feedback"))  # not data/feedback
    get_settings.cache_clear()
    start = datetime(2026, 5, 4, tzinfo=UTC)
    labels = ("negative", "neutral", "positive")
    _log([(f"sentiment tweet {i}", labels[i % 3], labels[i % 3]) for i in range(60)], start)
    emotions = ("anger", "joy", "optimism", "sadness")
    _log([(f"emotion tweet {i}", emotions[i % 4], emotions[i % 4]) for i in range(80)], start,
         prefix="e", model_name="emotion")
    until = start + timedelta(hours=1)
    table = feedback.labelled_window(start, until)
    assert len(table) == 60 and set(table["label"]) == set(labels)
    with use_task("emotion"):
        table = feedback.labelled_window(start, until)
        out = feedback.record_labelled_window(start, until, dvc=False)
    assert len(table) == 80 and set(table["label"]) == set(emotions)
    assert out.path and out.rows == 80
    assert os.path.dirname(out.path) == str(tmp_path / "feedback" / "emotion")


def test_window_that_fails_the_gate_adds_nothing(tmp_home, tmp_path) -> None:
    start = datetime(2026, 5, 2, tzinfo=UTC)
    _log([(f"only positives {i}", "positive", "positive") for i in range(40)], start)
    out = feedback.record_labelled_window(start, start + timedelta(hours=1), dvc=False,
                                      folder=tmp_path)
    assert out.path is None and any("class" in r for r in out.rejected)
    assert set(out.to_dict()) == {"path", "rows", "dropped", "rejected"}
    assert feedback.feedback_batches(tmp_path) == []


def test_a_batch_outside_the_dvc_repo_is_recorded_with_its_md5(tmp_home, tmp_path,
                                                               monkeypatch) -> None:
    """The compose stack writes batches to a volume outside the repo: no dvc add, still a hash."""
    import hashlib

    monkeypatch.setenv("DRIFTLOOP_FEEDBACK_DIR", str(tmp_path / "volume" / "feedback"))
    get_settings.cache_clear()
    start = datetime(2026, 5, 3, tzinfo=UTC)
    labels = ("negative", "neutral", "positive")
    _log([(f"tweet {i} on the volume", labels[i % 3], labels[i % 3]) for i in range(90)], start)
    out = feedback.record_labelled_window(start, start + timedelta(hours=1))
    path = out.path
    assert path.startswith(str(tmp_path / "volume" / "feedback" / "sentiment" / "window-"))
    assert out.md5 == hashlib.md5(open(path, "rb").read()).hexdigest()
    assert not os.path.exists(f"{path}.dvc")
    assert feedback.feedback_batches() == [path]
