"""Approval mode in the library: a held promotion, a person's answer, and the audit row that
names them (file-based MLflow + SQLite in tmp). The Airflow side: tests/dags/test_approval.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml import registry
from ml.drift.review import review_data, write_review
from ml.lifecycle import canary, promotion
from ml.lifecycle.approval import Approval, ApprovalError, request_body
from ml.lifecycle.canary import CanaryDecision
from ml.params import load_params
from ml.training import pipeline
from tests.unit.test_review import LABELS, drifted

REPO = Path(__file__).resolve().parents[2]


def _params(require: bool):
    params = load_params(REPO / "params.yaml")
    promo = params.promotion.model_copy(update={"require_approval": require})
    return params.model_copy(update={"promotion": promo})


def _register(model_dir: Path, macro_recall: float) -> str:
    metrics = {"val_macro_recall": macro_recall, "val_macro_f1": macro_recall - 0.02}
    info = registry.register_model_dir(model_dir, reason="test", metrics=metrics)
    registry.client().set_tag(info.run_id, pipeline.EVAL_DATA_TAG,
                              pipeline.val_md5(load_params(REPO / "params.yaml")))
    return info.version


def _response(choice: str, name: str | None = "ana", comment: str = "") -> dict:
    return {"chosen_options": [choice], "params_input": {"comment": comment},
            "responded_at": "2026-12-03T11:00:00+00:00",
            "responded_by_user": {"id": name, "name": name} if name else None}


def test_a_response_becomes_an_approval_naming_the_person() -> None:
    yes = Approval.from_response(_response("Approve", comment="ok by me"))
    assert yes.approved and yes.user == "ana" and yes.describe() == "approved by ana: ok by me"
    assert yes.actor("dag:train_model/r1") == "user:ana via dag:train_model/r1"
    no = Approval.from_response(_response("Reject", name=None))
    assert not no.approved and no.user == "nobody (timed out)"
    for bad in ([], ["Approve", "Reject"], ["Maybe"]):
        with pytest.raises(ApprovalError):
            Approval.from_response({"chosen_options": bad})
    body = request_body(challenger="2", champion="1", reason="v2 beats v1", evidence={"x": 1})
    assert "Move `champion` to v2** (now v1)" in body and "- x: 1" in body


def test_a_held_promotion_moves_nothing_until_approved(tmp_home, tiny_model_dir) -> None:
    v1 = _register(tiny_model_dir, 0.60)
    held = promotion.promote_in_dag(v1, actor="dag:train_model/r1", params=_params(True))
    assert held.outcome == "approve_promotion" and held.promote
    assert registry.get_alias("champion") is None and registry.audit_log() == []

    again = promotion.PromotionDecision.from_dict(held.to_dict())
    outcome = promotion.act_on_approval(again, Approval.from_response(_response("Approve")),
                                        actor="dag:train_model/r1")
    assert outcome == "approved" and registry.get_alias("champion").version == v1
    (row,) = registry.audit_log(alias="champion")
    assert (row.action, row.to_version, row.actor) == ("promote", v1,
                                                       "user:ana via dag:train_model/r1")
    assert row.reason.startswith("approved by ana (gate: no champion yet")
    assert row.evidence["approval"]["user"] == "ana"


def test_a_rejection_or_a_moved_champion_keeps_the_champion(tmp_home, tiny_model_dir) -> None:
    v1 = _register(tiny_model_dir, 0.60)
    promotion.promote(v1, actor="cli")
    v2 = _register(tiny_model_dir, 0.70)
    no_canary = _params(True)
    no_canary = no_canary.model_copy(
        update={"rollout": no_canary.rollout.model_copy(update={"canary_share": 0.0})})
    held = promotion.promote_in_dag(v2, actor="dag:t/r2", params=no_canary)
    assert held.outcome == "approve_promotion"
    rejected = promotion.act_on_approval(
        held, Approval.from_response(_response("Reject", "bo", "not this week")), actor="dag:t/r2")
    assert rejected == "rejected" and registry.get_alias("champion").version == v1
    keep = registry.audit_log(limit=1)[0]
    assert keep.action == "keep" and keep.actor == "user:bo via dag:t/r2"
    assert keep.reason == "rejected by bo: not this week"

    # Approved, but another version took champion while the request waited: void.
    v3 = _register(tiny_model_dir, 0.80)
    held = promotion.promote_in_dag(v2, actor="dag:t/r3", params=no_canary)
    promotion.promote(v3, actor="cli", force=True, reason="hotfix")
    void = promotion.act_on_approval(held, Approval.from_response(_response("Approve")),
                                     actor="dag:t/r3")
    assert void == "rejected" and registry.get_alias("champion").version == v3
    assert registry.audit_log(limit=1)[0].reason.startswith(f"void: champion moved from v{v1}")


def test_without_approval_mode_the_dag_gate_promotes_at_once(tmp_home, tiny_model_dir) -> None:
    v1 = _register(tiny_model_dir, 0.60)
    assert promotion.promote_in_dag(v1, actor="dag:a", params=_params(False)).outcome == "promoted"
    assert registry.get_alias("champion").version == v1


@pytest.mark.parametrize(("choice", "outcome", "champion_after"),
                         [("Approve", "canary_approved", "2"), ("Reject", "canary_rejected", "1")])
def test_a_canary_promotion_waits_for_its_answer(tmp_home, tiny_model_dir, choice, outcome,
                                                 champion_after) -> None:
    from tests.unit.test_canary import CHALLENGER, CHAMPION

    v1 = registry.register_model_dir(tiny_model_dir, reason="first").version
    registry.set_alias("champion", v1, actor="t", reason="seed", action="promote")
    v2 = registry.register_model_dir(tiny_model_dir, reason="retrain").version
    # v2 came from a drift finding: its canary's end goes onto that finding's review page.
    report = tmp_home / "reports" / "r1"
    report.mkdir(parents=True)
    write_review(report, review_data(*drifted(), LABELS))
    registry.set_version_tag(v2, registry.DRIFT_REPORT_TAG, str(report))
    canary.start_canary(v2, actor="dag:train_model/x", reason="passed offline gate", share=0.2)
    decision = CanaryDecision(action=canary.CanaryAction.PROMOTE, reason="not worse",
                              champion=CHAMPION, challenger=CHALLENGER)
    got = canary.act_on_approval(decision, Approval.from_response(_response(choice, "cy")),
                                 actor="dag:canary_rollout/z")
    assert got == outcome and registry.get_alias("champion").version == champion_after
    last = registry.audit_log(limit=1)[0]
    assert last.actor == "user:cy via dag:canary_rollout/z"
    assert last.action == ("canary_promote" if choice == "Approve" else "canary_rollback")
    assert canary.canary_in_progress() is None
    end, verb = ("promoted to champion", "approved") if choice == "Approve" else ("rolled back",
                                                                              "rejected")
    assert f"Canary: <code>v{v2}: {end} ({verb} by cy" in (report / "review.html").read_text()
