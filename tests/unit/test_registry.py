"""Registry, promotion rule, rollback and the audit trail (file-based MLflow + SQLite in tmp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml import registry
from ml.lifecycle import promotion
from ml.lifecycle.promotion import decide_promotion
from ml.params import PromotionParams, load_params
from ml.training import pipeline

REPO = Path(__file__).resolve().parents[2]


def _register(model_dir: Path, macro_recall: float, reason: str = "test") -> str:
    """A registered version whose validation metrics were computed on today's val split."""
    metrics = {"val_macro_recall": macro_recall, "val_macro_f1": macro_recall - 0.02,
               "val_accuracy": macro_recall + 0.01}
    info = registry.register_model_dir(model_dir, reason=reason, metrics=metrics)
    registry.client().set_tag(info.run_id, pipeline.EVAL_DATA_TAG,
                              pipeline.val_md5(load_params(REPO / "params.yaml")))
    return info.version


def test_promotion_rule() -> None:
    rule = PromotionParams(metric="macro_recall", min_improvement=0.01)
    first = decide_promotion("1", {"macro_recall": 0.5}, None, None, rule)
    assert first.promote and "no champion" in first.reason
    worse = decide_promotion("2", {"macro_recall": 0.60}, "1", {"macro_recall": 0.65}, rule)
    assert not worse.promote and worse.outcome == "kept_champion"
    marginal = decide_promotion("3", {"macro_recall": 0.655}, "1", {"macro_recall": 0.65}, rule)
    assert not marginal.promote, "a gain below the margin must not promote"
    better = decide_promotion("4", {"macro_recall": 0.70}, "1", {"macro_recall": 0.65}, rule)
    assert better.promote and "beats" in better.reason


def test_worse_model_keeps_champion_and_rollback_restores(tmp_home, tiny_model_dir) -> None:
    v1 = _register(tiny_model_dir, 0.60)
    assert promotion.promote(v1, actor="test").outcome == "promoted"
    v2 = _register(tiny_model_dir, 0.70)
    assert promotion.promote(v2, actor="test").outcome == "promoted"
    assert registry.get_alias("champion").version == v2

    v3 = _register(tiny_model_dir, 0.50, reason="worse")
    decision = promotion.promote(v3, actor="dag:train_model/run-3")
    assert decision.outcome == "kept_champion"
    assert registry.get_alias("champion").version == v2, "a worse model took the champion"

    move = registry.rollback(actor="cli:test", reason="v2 misbehaves in production")
    assert (move.from_version, move.to_version, move.action) == (v2, v1, "rollback")
    assert registry.get_alias("champion").version == v1

    log = registry.audit_log(alias="champion")
    actions = [(m.action, m.from_version, m.to_version) for m in log]
    assert actions == [("rollback", v2, v1), ("keep", v2, v2), ("promote", v1, v2),
                       ("promote", None, v1)]
    keep = log[1]
    assert keep.actor == "dag:train_model/run-3"
    aliases = {v.version: v.aliases for v in registry.list_versions()}
    assert aliases[v1] == ["champion"] and aliases[v2] == []
    assert "does not beat" in keep.reason and keep.evidence["challenger_version"] == v3
    assert log[0].reason == "v2 misbehaves in production" and log[0].at


def test_the_dag_gate_starts_a_canary_or_keeps_the_champion(tmp_home, tiny_model_dir) -> None:
    from ml.lifecycle.canary import canary_in_progress

    v1 = _register(tiny_model_dir, 0.60)
    assert promotion.promote_or_canary(v1, actor="dag:a") == "promoted"  # no champion yet
    v2 = _register(tiny_model_dir, 0.70)
    assert promotion.promote_or_canary(v2, actor="dag:b") == "canary_started"
    assert registry.get_alias("champion").version == v1, "a canary is not a promotion"
    assert canary_in_progress().version == v2
    assert registry.audit_log(limit=1)[0].reason.startswith("offline gate: v2 macro_recall")
    v3 = _register(tiny_model_dir, 0.50)
    assert promotion.promote_or_canary(v3, actor="dag:c") == "kept_champion"
    keep = registry.audit_log(limit=1)[0]
    assert keep.action == "keep" and keep.evidence["challenger_version"] == v3
    assert registry.get_alias("challenger").version == v2, "a loser never reaches traffic"


def test_rollback_steps_back_past_rolled_back_versions(tmp_home, tiny_model_dir) -> None:
    v1, v2, v3 = (_register(tiny_model_dir, r) for r in (0.5, 0.6, 0.7))
    for v in (v1, v2, v3):
        promotion.promote(v, actor="test")
    assert registry.rollback(actor="t", reason="r").to_version == v2
    assert registry.rollback(actor="t", reason="r").to_version == v1
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(actor="t", reason="r")


def test_rollback_without_champion_is_a_clear_error(tmp_home) -> None:
    with pytest.raises(registry.RegistryError, match="no champion"):
        registry.rollback(actor="t", reason="r")


def test_forced_promotion_is_audited_with_the_rule_verdict(tmp_home, tiny_model_dir) -> None:
    v1 = _register(tiny_model_dir, 0.7)
    promotion.promote(v1, actor="t")
    v2 = _register(tiny_model_dir, 0.6)
    decision = promotion.promote(v2, actor="cli:ops", force=True, reason="hotfix")
    assert decision.promote and "forced by cli:ops: hotfix" in decision.reason
    assert "does not beat" in registry.audit_log(limit=1)[0].reason


def test_champion_is_rescored_when_validation_data_changed(tmp_home, tiny_model_dir) -> None:
    info = registry.register_model_dir(tiny_model_dir, reason="old", metrics={
        "val_macro_recall": 0.99})  # scored on some other data: no eval-data tag
    registry.set_alias("champion", info.version, actor="t", reason="seed")
    version, metrics = promotion.champion_metrics_on_current_data(
        load_params(REPO / "params.yaml"))
    assert version == info.version
    assert metrics["macro_recall"] < 0.6, "the stale 0.99 was reused instead of re-scoring"


def test_register_is_idempotent_for_a_run(tmp_home, tiny_model_dir) -> None:
    import mlflow

    registry.ensure_experiment()
    with mlflow.start_run() as run:
        uri = registry.log_model_dir(tiny_model_dir)
        mlflow.set_tag(pipeline.MODEL_URI_TAG, uri)
        mlflow.log_metric("val_macro_recall", 0.5)
    first = pipeline.register(run.info.run_id, reason="r", actor="t")
    again = pipeline.register(run.info.run_id, reason="r", actor="t")  # a retried task
    assert first["version"] == again["version"]
    assert len(registry.list_versions()) == 1
    assert len(registry.audit_log(alias="challenger")) == 1


def test_a_run_registers_only_under_the_task_it_trained_for(tmp_home, tiny_model_dir) -> None:
    import mlflow

    from ml.training.lineage import TASK_TAG

    registry.ensure_experiment()
    with mlflow.start_run() as run:
        uri = registry.log_model_dir(tiny_model_dir)
        mlflow.set_tags({pipeline.MODEL_URI_TAG: uri, TASK_TAG: "sentiment"})
        mlflow.log_metric("val_macro_recall", 0.5)
        mlflow.log_metric("val_macro_f1", 0.5)
    emotion = load_params(REPO / "params.yaml", task="emotion")
    with pytest.raises(registry.RegistryError, match="task 'sentiment', not 'emotion'"):
        pipeline.register(run.info.run_id, reason="r", actor="t", params=emotion)
    assert registry.list_versions("emotion") == []
    assert pipeline.register(run.info.run_id, reason="r", actor="t")["version"] == "1"


def test_downloaded_model_loads_and_predicts(tmp_home, tiny_model_dir) -> None:
    from ml.modeling import load_model, predict_proba

    version = _register(tiny_model_dir, 0.5)
    model_dir = registry.download_model(version, dst=tmp_home / "dl")
    model, tok = load_model(model_dir)
    assert predict_proba(model, tok, ["good", "bad day"]).shape == (2, 3)
    assert registry.get_version(version).metrics["val_macro_recall"] == 0.5
    with pytest.raises(registry.RegistryError, match="no version 99"):
        registry.get_version("99")
