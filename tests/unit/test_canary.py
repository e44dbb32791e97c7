"""Canary rollout decisions on synthetic live traffic, and applying them to the registry."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from ml import registry
from ml.db import feedback, get_engine, predictions
from ml.lifecycle import canary
from ml.lifecycle.canary import CanaryDecision, decide_canary
from ml.lifecycle.evidence import VersionStats
from ml.lifecycle.outcomes import CanaryOutcome
from ml.params import RolloutParams

PARAMS = RolloutParams()


def stats(version: str, n: int, labels: int, acc: float, conf: float = 0.8,
          p95: float = 40.0, errors: int = 0) -> VersionStats:
    return VersionStats(version=version, predictions=n, errors=errors, feedback=labels,
                        correct=round(labels * acc), mean_confidence=conf, p95_latency_ms=p95)


def test_better_challenger_is_promoted() -> None:
    d = decide_canary(stats("1", 800, 400, 0.66), stats("2", 200, 120, 0.72), PARAMS)
    assert d.action == "promote" and "not worse" in d.reason


def test_a_decision_crosses_the_xcom_boundary_as_a_dict_and_back() -> None:
    d = decide_canary(stats("1", 800, 400, 0.70), stats("2", 200, 150, 0.50), PARAMS)
    as_dict = d.to_dict()
    assert as_dict["action"] == "rollback" and type(as_dict["action"]) is str
    assert as_dict["challenger"]["accuracy"] == d.challenger.accuracy
    assert CanaryDecision.from_dict(as_dict) == d


def test_equal_challenger_is_promoted_as_not_worse() -> None:
    d = decide_canary(stats("1", 800, 400, 0.68), stats("2", 200, 120, 0.68), PARAMS)
    assert d.action == "promote"


def test_worse_challenger_is_rolled_back() -> None:
    d = decide_canary(stats("1", 800, 400, 0.70), stats("2", 200, 150, 0.50), PARAMS)
    assert d.action == "rollback" and d.p_value is not None and d.p_value < 0.01


def test_clearly_worse_challenger_is_removed_before_the_full_sample() -> None:
    champion, challenger = stats("1", 300, 150, 0.70), stats("2", 60, 40, 0.30)
    assert challenger.feedback < PARAMS.min_feedback
    d = decide_canary(champion, challenger, PARAMS)
    assert d.action == "rollback" and "significantly below" in d.reason


def test_not_enough_evidence_waits() -> None:
    d = decide_canary(stats("1", 100, 20, 0.7), stats("2", 25, 5, 0.6), PARAMS)
    assert d.action == "wait" and "not enough evidence" in d.reason


@pytest.mark.parametrize(
    ("challenger", "why"),
    [
        (stats("2", 200, 0, 0.0, errors=30), "errs"),
        (stats("2", 200, 0, 0.0, p95=400.0), "latency"),
        (stats("2", 200, 0, 0.0, conf=0.36), "confidence"),
    ],
)
def test_guard_rails_roll_back_without_labels(challenger, why) -> None:
    d = decide_canary(stats("1", 800, 0, 0.0), challenger, PARAMS)
    assert d.action == "rollback" and why in d.reason


def _log_traffic(version: str, n: int, acc: float, start: datetime, rng: random.Random) -> None:
    labels = ("negative", "neutral", "positive")
    rows, fb = [], []
    for i in range(n):
        truth = labels[i % 3]
        pred = truth if rng.random() < acc else labels[(i + 1) % 3]
        rid = f"{version}-{i}-{rng.random()}"
        rows.append({"request_id": rid, "at": start + timedelta(seconds=i), "model_name": "s",
                     "model_version": version, "text": f"t{i}", "label": pred,
                     "score_negative": 0.1, "score_neutral": 0.1, "score_positive": 0.8,
                     "latency_ms": 20.0 + i % 7, "cached": False})
        fb.append({"request_id": rid, "at": start + timedelta(seconds=i + 1), "label": truth})
    with get_engine(registry.get_settings().database_url).begin() as conn:
        conn.execute(sa.insert(predictions), rows)
        conn.execute(sa.insert(feedback), fb)


@pytest.mark.parametrize(("acc", "action", "outcome", "champion_after"),
                         [(0.80, "promote", "canary_promoted", "2"),
                          (0.30, "rollback", "canary_rolled_back", "1")])
def test_canary_evaluation_end_to_end(tmp_home, tiny_model_dir, acc, action, outcome,
                                      champion_after):
    v1 = registry.register_model_dir(tiny_model_dir, reason="first").version
    registry.set_alias("champion", v1, actor="t", reason="seed", action="promote")
    v2 = registry.register_model_dir(tiny_model_dir, reason="retrain").version
    canary.start_canary(v2, actor="dag:train_model/x", reason="passed offline gate", share=0.2)
    assert canary.canary_in_progress().version == v2
    assert registry.get_version(v2).tags["canary_share"] == "0.2000"

    start = datetime.now(tz=UTC) + timedelta(seconds=1)
    rng = random.Random(0)
    _log_traffic(v1, 400, 0.70, start, rng)
    _log_traffic(v2, 150, acc, start, rng)
    _log_traffic(v2, 50, 0.1, start - timedelta(days=1), rng)  # before the canary: ignored

    evaluation = canary.evaluate()
    assert evaluation.outcome == outcome, evaluation.reason
    decision = evaluation.decision
    assert decision.action == action, decision.reason
    assert decision.challenger.predictions == 150
    assert registry.get_alias("champion").version == v1, "evaluating must not act"
    act = canary.promote_canary if action == "promote" else canary.roll_back_canary
    act(CanaryDecision.from_dict(evaluation.to_dict()["decision"]), actor="dag:canary_rollout/y")
    assert registry.get_alias("champion").version == champion_after
    last = registry.audit_log(limit=1)[0]
    assert last.action == f"canary_{action}" and last.actor == "dag:canary_rollout/y"
    assert last.evidence["challenger"]["feedback"] == 150
    assert canary.canary_in_progress() is None
    if action == "rollback":
        assert registry.get_alias("challenger") is None
        assert "rejected" in registry.get_version(v2).tags


def test_nothing_to_judge_then_no_canary(tmp_home, tiny_model_dir) -> None:
    assert canary.evaluate().outcome is CanaryOutcome.NOTHING_TO_JUDGE  # no registry yet
    v1 = registry.register_model_dir(tiny_model_dir, reason="first").version
    registry.set_alias("champion", v1, actor="t", reason="seed", action="promote")
    evaluation = canary.evaluate()
    assert evaluation.outcome is CanaryOutcome.NO_CANARY and evaluation.decision is None
