"""Label-steering attacks from one key, through the real decision code on a real prediction log.

A client that can predict and label sees which version answered each request (``model_version``)
and what it said, never the other model's shadow answer. Two attacks (issue 11):

- **canary steering**: label every challenger answer "right" and every champion answer "wrong",
  so that a worse challenger is promoted;
- **rollback walk-back**: label every champion answer "wrong", so that ``monitor_drift``'s
  live-feedback rollback walks a sound champion back.

Honest labels come from five labelling teams, the attacker's from one key that labels twice as
many requests. Each attack is shown to work when the label policy lets one source decide
(``max_source_share: 1``), so the checks can fail, and to change no decision under the default
policy (``labels:`` in params.yaml: a bounded share, and no decision resting on one source).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from ml import registry
from ml.db import feedback, get_engine, predictions, shadow_predictions
from ml.lifecycle import canary, loop
from ml.lifecycle.outcomes import CanaryAction, MonitorOutcome
from ml.params import DEFAULT_LABELS, LabelParams, load_params

HONEST = [f"key-honest{i}" for i in range(5)]
ATTACKER = "key-attacker"
DEFAULT = load_params().labels
LABELS = DEFAULT_LABELS  # the sentiment task's (the prediction rows score these)
ONE_SOURCE_MAY_DECIDE = LabelParams(sources="all", max_source_share=1.0)
CHAMPION_ACCURACY = 0.65
DISCORDANCE = 0.1165  # measured on val.tsv: exactly one of two checkpoints is right (canary_power)


def answers(rng: random.Random, delta: float) -> tuple[str, str, str]:
    """(truth, champion's label, challenger's label) for one text; correctness as in
    benchmarks/canary_power.py, and two wrong models give the same wrong label 70% of the time."""
    p10, p01 = (DISCORDANCE - delta) / 2, (DISCORDANCE + delta) / 2
    p11 = CHAMPION_ACCURACY - p10
    u = rng.random()
    champion_right, challenger_right = (
        (True, True) if u < p11 else (True, False) if u < p11 + p10
        else (False, True) if u < p11 + p10 + p01 else (False, False)
    )  # fmt: skip
    truth = rng.choice(LABELS)
    wrong = [label for label in LABELS if label != truth]
    champion = truth if champion_right else rng.choice(wrong)
    if challenger_right:
        challenger = truth
    elif not champion_right and rng.random() < 0.7:
        challenger = champion
    else:
        challenger = rng.choice(wrong)
    return truth, champion, challenger


def log_canary_traffic(
    champion: str, challenger: str, delta: float, honest: int, attacked: int, seed: int
) -> None:
    """Shadow-scored canary traffic (challenger on 20%), every request labelled: ``honest``
    requests by the five teams, ``attacked`` by the attacker, interleaved in time."""
    rng = random.Random(seed)
    who = [None] * honest + [ATTACKER] * attacked
    rng.shuffle(who)
    start = datetime.now(tz=UTC) + timedelta(seconds=1)
    rows, shadows, labels = [], [], []
    for i, source in enumerate(who):
        truth, by_champion, by_challenger = answers(rng, delta)
        served_by_challenger = rng.random() < 0.2
        served, other = (challenger, champion) if served_by_challenger else (champion, challenger)
        said, shadow_said = (
            (by_challenger, by_champion) if served_by_challenger else (by_champion, by_challenger)
        )
        if source is None:
            source, label = rng.choice(HONEST), truth
        elif served_by_challenger:
            label = said  # "the challenger is right"
        else:
            label = rng.choice([x for x in LABELS if x != said])  # "the champion is wrong"
        rid, at = f"r{seed}-{i}", start + timedelta(milliseconds=10 * i)
        rows.append(prediction_row(rid, at, served, said))
        shadows.append({**prediction_row(rid, at, other, shadow_said), "latency_ms": 9.0})
        labels.append({"request_id": rid, "at": at, "label": label, "source": source})
    write(rows, shadows, labels)


def prediction_row(rid: str, at: datetime, version: str, label: str) -> dict:
    row = {"request_id": rid, "at": at, "model_version": version, "label": label,
           "scores": {"negative": 0.2, "neutral": 0.2, "positive": 0.6}, "confidence": 0.6,
           "latency_ms": 20.0}  # fmt: skip
    return row


def write(rows: list[dict], shadows: list[dict], labels: list[dict]) -> None:
    full = [{**r, "model_name": "sentiment", "text": f"text {r['request_id']}", "cached": False}
            for r in rows]  # fmt: skip
    shadow_rows = [{k: v for k, v in r.items()} for r in shadows]
    with get_engine(registry.get_settings().database_url).begin() as conn:
        conn.execute(sa.insert(predictions), full)
        if shadow_rows:
            conn.execute(sa.insert(shadow_predictions), shadow_rows)
        conn.execute(sa.insert(feedback), labels)


@pytest.fixture
def canary_live(tmp_home, tiny_model_dir):
    v1 = registry.register_model_dir(tiny_model_dir, reason="first").version
    registry.set_alias("champion", v1, actor="t", reason="seed", action="promote")
    v2 = registry.register_model_dir(tiny_model_dir, reason="retrain").version
    canary.start_canary(v2, actor="t", reason="passed the offline gate", share=0.2)
    return v1, v2


@pytest.mark.parametrize("attacked", [0, 6000])
def test_steering_a_clearly_worse_challenger_changes_no_canary_decision(canary_live,
                                                                         attacked) -> None:
    champion, challenger = canary_live
    log_canary_traffic(champion, challenger, delta=-0.10, honest=3000, attacked=attacked, seed=1)
    decision = canary.judge_canary(policy=DEFAULT)
    assert decision.action == CanaryAction.ROLLBACK, decision.reason
    counted = decision.labels["by_source"]["counted"]
    assert counted.get(ATTACKER, 0) <= DEFAULT.max_source_share * sum(counted.values()) + 1
    if attacked:
        unguarded = canary.judge_canary(policy=ONE_SOURCE_MAY_DECIDE)
        assert unguarded.action == CanaryAction.PROMOTE, "the attack must work without the policy"


def test_a_steering_key_alone_promotes_nothing(canary_live) -> None:
    champion, challenger = canary_live
    log_canary_traffic(champion, challenger, delta=-0.10, honest=0, attacked=4000, seed=3)
    assert canary.judge_canary(policy=ONE_SOURCE_MAY_DECIDE).action == CanaryAction.PROMOTE
    decision = canary.judge_canary(policy=DEFAULT)
    assert decision.action == CanaryAction.WAIT, decision.reason
    assert decision.labels["by_source"]["counted"] == {ATTACKER: 1}


def log_served(version: str, n: int, attacked: int, start: datetime, seed: int) -> None:
    """``n`` honestly labelled answers of ``version`` (accuracy 0.65) and ``attacked`` more
    that the attacker labels "wrong", interleaved."""
    rng = random.Random(seed)
    who = [None] * n + [ATTACKER] * attacked
    rng.shuffle(who)
    rows, labels = [], []
    for i, source in enumerate(who):
        truth, said, _ = answers(rng, 0.0)
        if source is None:
            source, label = rng.choice(HONEST), truth
        else:
            label = rng.choice([x for x in LABELS if x != said])
        rid, at = f"w{seed}-{i}", start + timedelta(milliseconds=10 * i)
        rows.append(prediction_row(rid, at, version, said))
        labels.append({"request_id": rid, "at": at, "label": label, "source": source})
    write(rows, [], labels)


def test_walking_a_sound_champion_back_changes_no_rollback_decision(tmp_home,
                                                                     tiny_model_dir) -> None:
    v1 = registry.register_model_dir(tiny_model_dir, reason="first").version
    registry.set_alias("champion", v1, actor="t", reason="seed", action="promote")
    log_served(v1, 1500, 0, datetime.now(tz=UTC) - timedelta(days=2), seed=4)
    v2 = registry.register_model_dir(tiny_model_dir, reason="retrain").version
    registry.set_alias("champion", v2, actor="t", reason="canary", action="canary_promote")
    since = datetime.now(tz=UTC)
    log_served(v2, 1500, 3000, since + timedelta(seconds=1), seed=5)  # equally good, attacked
    calm = {"drift_detected": False, "signals": []}

    unguarded = loop.decide(calm, comparison=loop.champion_vs_previous(
        since, policy=ONE_SOURCE_MAY_DECIDE))  # fmt: skip
    assert unguarded.outcome == MonitorOutcome.ROLLBACK, "the attack must work without the policy"
    guarded = loop.champion_vs_previous(since, policy=DEFAULT)
    decision = loop.decide(calm, comparison=guarded)
    assert decision.outcome != MonitorOutcome.ROLLBACK, decision.reason
    assert guarded["p_value_worse_without_source"][ATTACKER] > 0.05
