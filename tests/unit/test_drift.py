"""Drift reports: no alarm on same-period traffic, alarms on shifted traffic, and the report files.

Most tests use the tiny random BERT (its embeddings are still a fixed function of the text, so a
shift in the text shows in them); one uses the real MiniLM encoder on a few hundred tweets. The
data are the real tweets: same period = 2013-2015 rows that are not in the reference sample.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, recall_score

from ml.drift import DriftResult, list_reports, run_drift
from ml.drift.compare import compare
from ml.drift.features import DESCRIPTORS, compute_features, text_descriptors
from ml.drift.quality import quality_signal, reference_score
from ml.drift.reference import build_reference
from ml.drift.result import decide
from ml.drift.window import load_window
from ml.metrics import score
from ml.params import DEFAULT_LABELS, DriftParams, load_params
from monitoring.calibrate import out_of_domain_texts

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = {
    "drift_detected",
    "data_drift",
    "quality_drop",
    "outcome",
    "reason",
    "signals",
    "drifted_signals",
    "window_start",
    "window_end",
    "rows",
    "feedback_rows",
    "quality",
    "thresholds",
    "model_version",
    "report_dir",
    "report_html",
    "report_json",
}
SIGNAL_KEYS = {"name", "score", "threshold", "drifted", "detail", "kind"}
LABELS = DEFAULT_LABELS  # the sentiment task: params.yaml's first


@pytest.fixture(scope="module")
def params() -> DriftParams:
    return DriftParams.from_params(load_params(REPO_ROOT / "params.yaml"))


@pytest.fixture(scope="module")
def tweets() -> pd.DataFrame:
    """Train-period rows shuffled once, and the 2016 rows, from the real data."""
    p = load_params(REPO_ROOT / "params.yaml")
    df = pd.read_csv(REPO_ROOT / "data/tweets.tsv", sep="\t", dtype=str, keep_default_na=False)
    old = df[df["source"].isin(p.data.train_sources)].sample(frac=1.0, random_state=7)
    new = df[df["source"].isin(p.data.drift_sources)].sample(frac=1.0, random_state=7)
    old = old.assign(period="old")
    new = new.assign(period="2016")
    return pd.concat([old, new], ignore_index=True)


def rows(df: pd.DataFrame) -> pd.DataFrame:
    """The shape the reference and a labelled window have: text and the true label."""
    return pd.DataFrame({"text": df["text"].to_numpy(), "true_label": df["label"].to_numpy()})


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    from ml.modeling import load_tokenizer, tiny_classifier

    return tiny_classifier(seed=3), load_tokenizer()


@pytest.fixture(scope="module")
def tiny_pools(tweets: pd.DataFrame, tiny, params: DriftParams) -> dict[str, pd.DataFrame]:
    """Featured pools (tiny model): reference, held-out same period, off-domain text."""
    model, tok = tiny
    old = tweets[tweets["period"] == "old"]
    ood = pd.DataFrame({"text": out_of_domain_texts(250, seed=1), "true_label": None})

    def feats(df: pd.DataFrame) -> pd.DataFrame:
        return compute_features(df, model, tok, labels=LABELS, max_length=params.max_length)

    return {
        "reference": feats(rows(old.iloc[:1500])),
        "held": feats(rows(old.iloc[1500:3500])),
        "ood": feats(ood),
    }


# ---------------------------------------------------------------------------------- features


def test_descriptors_count_what_they_name(tiny) -> None:
    _, tok = tiny
    texts = [
        "#happy #friday @user see http://t.co/abc and www.example.com",
        "GREAT DAY",
        "plain words only",
        "emoji \U0001f600\U0001f600 here 2016",
    ]
    d = text_descriptors(texts, tok)
    assert list(d.columns) == list(DESCRIPTORS)
    assert d.loc[0, ["hashtags", "mentions", "urls"]].tolist() == [2, 1, 2]
    assert d.loc[1, "upper_share"] == 1.0 and d.loc[2, "upper_share"] == 0.0
    assert d.loc[2, "words"] == 3 and d.loc[2, "chars"] == len("plain words only")
    assert d.loc[2, "unk_share"] == 0.0 and d.loc[3, "unk_share"] > 0  # emoji: not in vocab
    assert d.loc[3, "non_ascii_share"] > 0 and d.loc[3, "digit_share"] > 0
    assert d.loc[3, "tokens"] >= d.loc[3, "words"]


def test_features_keep_logged_scores_and_add_the_model_scores_otherwise(tiny) -> None:
    model, tok = tiny
    logged = pd.DataFrame(
        {
            "text": ["good", "bad"],
            "label": ["positive", "negative"],
            "score_negative": [0.1, 0.8],
            "score_neutral": [0.1, 0.1],
            "score_positive": [0.8, 0.1],
        }
    )
    f = compute_features(logged, model, tok, labels=LABELS)
    assert f["label"].tolist() == ["positive", "negative"]  # what production answered
    assert f["confidence"].tolist() == pytest.approx([0.8, 0.8])
    assert len([c for c in f.columns if c.startswith("emb_")]) == model.config.hidden_size
    fresh = compute_features(logged[["text"]], model, tok, labels=LABELS)
    probs = fresh[["score_negative", "score_neutral", "score_positive"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(fresh["label"]) <= set(LABELS)


def test_features_need_scores_for_every_label_of_the_task(tiny) -> None:
    """Rows scored for another task's labels are not this task's answers: the model scores them,
    and a model for other labels is refused."""
    model, tok = tiny
    logged = pd.DataFrame({"text": ["good", "bad"], "score_negative": [0.1, 0.8]})
    emotion = ("anger", "joy", "optimism", "sadness")
    with pytest.raises(ValueError, match=r"predicts 3 classes, the task has \['anger'"):
        compute_features(logged, model, tok, labels=emotion)
    two = ("negative", "positive")
    from ml.modeling import tiny_classifier

    f = compute_features(logged, tiny_classifier(seed=3, labels=two), tok, labels=two)
    assert {"score_negative", "score_positive"} <= set(f.columns) and "score_neutral" not in f
    assert f["score_negative"].tolist() != [0.1, 0.8]  # scored now, not the partial log
    assert set(f["label"]) <= set(two)


# ------------------------------------------------------------------------- drift / no drift


@pytest.mark.slow
def test_same_period_windows_raise_no_drift(tiny_pools, params: DriftParams) -> None:
    """Random 250-row windows of held-out 2013-2015 tweets: false alarms stay rare."""
    rng = np.random.default_rng(11)
    held, reference = tiny_pools["held"], tiny_pools["reference"]
    alarms = []
    for _ in range(6):
        idx = rng.choice(len(held), size=250, replace=False)
        comparison = compare(held.iloc[idx].reset_index(drop=True), reference, params)
        alarms.append([s.name for s in comparison.signals if s.drifted])
    false_alarm_rate = sum(bool(a) for a in alarms) / len(alarms)
    assert false_alarm_rate <= 1 / 6, alarms


def test_off_domain_text_raises_drift(tiny_pools, params: DriftParams) -> None:
    comparison = compare(tiny_pools["ood"], tiny_pools["reference"], params)
    drifted = {s.name for s in comparison.signals if s.drifted}
    assert {"text_descriptors", "embeddings", "dataset"} <= drifted
    desc = next(s for s in comparison.signals if s.name == "text_descriptors")
    # Long sentences with no hashtags, mentions or links: the descriptors say so.
    for col in ("chars", "words", "mentions", "urls"):
        assert desc.detail["columns"][col]["drifted"], col
    assert (
        desc.detail["columns"]["chars"]["current_mean"]
        > 2 * desc.detail["columns"]["chars"]["reference_mean"]
    )


@pytest.mark.slow
def test_real_minilm_embeddings_separate_2016_from_the_training_period(
    tweets: pd.DataFrame, tiny, params: DriftParams
) -> None:
    """The real encoder: held-out 2013-2015 windows pass, 2016 windows drift in embeddings."""
    from transformers import AutoModel

    from ml.modeling import base_model_path

    tiny_model, tok = tiny
    encoder = AutoModel.from_pretrained(base_model_path())
    old = tweets[tweets["period"] == "old"]
    new = tweets[tweets["period"] == "2016"]

    def feats(df: pd.DataFrame) -> pd.DataFrame:
        scored = compute_features(rows(df), tiny_model, tok, labels=LABELS)  # a classifier's
        keep = ["text", "true_label", "label", "score_negative", "score_neutral", "score_positive"]
        return compute_features(
            scored[keep], encoder, tok, labels=LABELS, max_length=params.max_length
        )

    reference = feats(old.iloc[5000:5800])
    same = compare(feats(old.iloc[6000:6300]), reference, params)
    shifted = compare(feats(new.iloc[:300]), reference, params)
    assert not any(s.drifted for s in same.signals), [s for s in same.signals if s.drifted]
    emb = next(s for s in shifted.signals if s.name == "embeddings")
    assert emb.drifted, emb
    assert emb.score > next(s for s in same.signals if s.name == "embeddings").score


# ---------------------------------------------------------------------------------- quality


def labelled(per_class: int, correct: int) -> pd.DataFrame:
    """``per_class`` feedback rows of each label, ``correct`` of them predicted right.

    Every recall is ``correct / per_class``, so the macro-recall is exact; wrong answers are
    the next label.
    """
    truth, pred = [], []
    for i, label in enumerate(LABELS):
        truth += [label] * per_class
        pred += [label] * correct + [LABELS[(i + 1) % 3]] * (per_class - correct)
    return pd.DataFrame({"true_label": truth, "label": pred})


def test_quality_signal_fires_when_feedback_accuracy_drops(params: DriftParams) -> None:
    fine, _ = quality_signal(labelled(100, 72), 0.70, params)  # 0.72 on 300 labels vs 0.70
    assert not fine.drifted and fine.score == pytest.approx(-0.02)
    bad, quality = quality_signal(labelled(100, 45), 0.70, params)  # 0.45
    assert bad.drifted and bad.kind == "quality" and bad.score == pytest.approx(0.25)
    assert quality is not None and quality["metric"] == "macro_recall"
    assert quality["score"] == pytest.approx(0.45) and quality["score_ci"][1] < 0.70
    assert quality["recall_by_label"] == pytest.approx({label: 0.45 for label in LABELS})


def test_quality_signal_needs_enough_feedback_and_a_significant_drop(params: DriftParams) -> None:
    few, quality = quality_signal(labelled(30, 0), 0.70, params)  # 90 labels, all wrong
    assert params.min_feedback > 90 and not few.drifted and quality is None
    assert "min_feedback" in few.detail["skipped"]
    # 0.647 is 0.053 below 0.70: past the margin, but on 102 labels that is within the noise...
    noisy, q = quality_signal(labelled(34, 22), 0.70, params)
    assert q is not None and q["drop"] > params.quality_drop
    assert q["score_ci"][1] >= 0.70 and not noisy.drifted
    # ...and on 3000 labels it is not.
    sure, q = quality_signal(labelled(1000, 647), 0.70, params)
    assert q is not None and q["score_ci"][1] < 0.70 and sure.drifted


def test_quality_signal_holds_feedback_to_the_tasks_own_metric(params: DriftParams) -> None:
    """A macro-F1 task (emotion) is judged on macro-F1, against its champion's value of it.

    Every wrong answer here is "negative", so its precision falls (F1 0.714) while its recall
    stays 1.0: macro-recall 0.733, macro-F1 0.738. The sample reference (a champion that
    answered 90% of each class right, no wrong answer to one class more than another) holds
    the window to 0.90 on either metric.
    """
    truth = [label for label in LABELS for _ in range(200)]
    pred = ["negative"] * 200 + ["neutral"] * 120 + ["negative"] * 80
    pred += ["positive"] * 120 + ["negative"] * 80
    rows = pd.DataFrame({"true_label": truth, "label": pred})
    signal, q = quality_signal(rows, 0.80, params, metric="macro_f1")
    assert q is not None and q["metric"] == "macro_f1" and signal.drifted
    assert q["score"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert q["score"] == pytest.approx(0.7381, abs=1e-4)
    assert "macro-F1 on feedback 0.738 vs 0.800" in decide([signal])[3]
    recall, q = quality_signal(rows, 0.80, params)
    assert q is not None and q["score"] == pytest.approx(0.7333, abs=1e-4)

    ref = labelled(100, 90)
    assert reference_score(None, ref, None, LABELS, "macro_f1") == (
        pytest.approx(f1_score(ref["true_label"], ref["label"], average="macro")),
        "reference sample",
    )
    assert reference_score(None, ref, 0.5, LABELS, "macro_f1") == (0.5, "given")


@pytest.mark.parametrize("seed", range(5))
def test_metrics_on_codes_match_sklearn_over_the_classes_present(seed: int) -> None:
    """ml.metrics scores a window over the classes its feedback holds, as sklearn does when
    told those classes; a predicted label outside them counts against the true class."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]
    truth = rng.choice(classes[:3], 300).tolist()  # "d" never true...
    pred = rng.choice(classes, 300).tolist()  # ...but sometimes predicted
    present = sorted(set(truth))
    assert score("macro_f1", truth, pred) == pytest.approx(
        f1_score(truth, pred, labels=present, average="macro")
    )
    assert score("macro_recall", truth, pred) == pytest.approx(
        recall_score(truth, pred, labels=present, average="macro")
    )
    assert score("accuracy", truth, pred) == pytest.approx(np.mean(np.equal(truth, pred)))


# ------------------------------------------------------------------------ the whole report


def _log_window(url: str, df: pd.DataFrame, start: datetime, version: str) -> None:
    import sqlalchemy as sa

    from ml.db import feedback, get_engine, predictions

    preds, fb = [], []
    for i, row in enumerate(df.itertuples()):
        rid = f"{version}-{i:05d}"
        preds.append(
            {
                "request_id": rid,
                "at": start + timedelta(seconds=i),
                "model_name": "sentiment",
                "model_version": version,
                "text": row.text,
                "label": row.label,
                "scores": {
                    "negative": row.score_negative,
                    "neutral": row.score_neutral,
                    "positive": row.score_positive,
                },
                "confidence": max(row.score_negative, row.score_neutral, row.score_positive),
                "latency_ms": 4.0,
                "cached": False,
            }
        )
        if isinstance(row.true_label, str):
            fb.append(
                {
                    "request_id": rid,
                    "at": start + timedelta(seconds=i + 1),
                    "label": row.true_label,
                    "source": f"k-{i % 5}",
                }  # five labellers: max_source_share 0.25
            )
    with get_engine(url).begin() as conn:
        conn.execute(sa.insert(predictions), preds)
        if fb:
            conn.execute(sa.insert(feedback), fb)


def test_load_window_joins_feedback_and_keeps_the_window_and_version(tmp_home: Path) -> None:
    from ml.settings import get_settings

    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    df = pd.DataFrame(
        {
            "text": ["a", "b", "c", "d"],
            "label": ["positive", "neutral", "negative", "neutral"],
            "score_negative": [0.1, 0.2, 0.7, 0.3],
            "score_neutral": [0.2, 0.6, 0.2, 0.4],
            "score_positive": [0.7, 0.2, 0.1, 0.3],
            "true_label": ["positive", None, "neutral", None],
        }
    )
    url = get_settings().database_url
    _log_window(url, df, start, "1")
    _log_window(url, df.iloc[:2], start, "2")
    window = load_window(start, start + timedelta(seconds=3), model_version="1")
    assert window["text"].tolist() == ["a", "b", "c"]  # [since, until): the 4th is at +3s
    assert window["true_label"].tolist()[0] == "positive" and window["true_label"].isna()[1]
    assert window["label"].tolist() == ["positive", "neutral", "negative"]  # predicted
    assert str(window["at"].dt.tz) == "UTC"
    assert len(load_window(start, start + timedelta(hours=1))) == 6  # every version


def test_run_drift_on_the_prediction_log_writes_reports_mlflow_and_workspace(
    tmp_home: Path, tweets: pd.DataFrame, tiny, tiny_pools
) -> None:
    """A logged window of off-domain text whose feedback says the model is wrong."""
    import mlflow

    from ml import registry
    from ml.drift.workspace import list_snapshots
    from ml.settings import get_settings

    model, tok = tiny
    window = tiny_pools["ood"].iloc[:220].copy()
    # Feedback for 150 rows, each label the model did not predict: quality collapses.
    window["true_label"] = [
        LABELS[(LABELS.index(p) + 1) % 3] if i < 150 else None
        for i, p in enumerate(window["label"])
    ]
    start = datetime.now(tz=UTC) - timedelta(hours=1)
    _log_window(get_settings().database_url, window, start, "7")

    result = run_drift(
        start,
        start + timedelta(hours=1),
        model_version="7",
        model=model,
        tokenizer=tok,
        reference=tiny_pools["reference"],
        reference_score=0.7,
    )
    assert result.rows == 220 and result.feedback_rows == 150
    assert result.drift_detected and result.data_drift and result.quality_drop
    assert result.outcome == "data_drift+quality_drop"
    assert "text_descriptors" in result.drifted_signals and "quality" in result.drifted_signals
    assert result.quality is not None and result.quality["score"] < 0.1

    out = result.to_dict()
    assert RESULT_KEYS <= set(out)
    assert all(SIGNAL_KEYS <= set(s) for s in out["signals"])
    assert out["thresholds"]["embedding_threshold"] == pytest.approx(0.17)
    assert json.loads(json.dumps(out)) == out  # plain JSON
    assert DriftResult.from_dict(out).to_dict() == out

    report_dir = Path(result.report_dir)
    assert report_dir.parent == get_settings().reports_dir / "sentiment"  # the task's folder
    for name in ("report.html", "report.json", "quality.html", "result.json"):
        assert (report_dir / name).stat().st_size > 0, name
    assert "<html" in Path(result.report_html).read_text()[:2000].lower()
    snapshot = json.loads(Path(result.report_json).read_text())
    assert any("ValueDrift" in json.dumps(m) for m in snapshot["metrics"])
    assert json.loads((report_dir / "result.json").read_text())["drift_detected"] is True

    run = registry.client().get_run(result.mlflow_run_id)
    assert run.data.tags["driftloop.kind"] == "drift"
    assert run.data.tags["driftloop.model_version"] == "7"
    artifacts = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="drift")
    assert artifacts, "report not logged to MLflow"

    assert result.workspace_snapshot_id in {s["id"] for s in list_snapshots()}
    listed = list_reports()
    assert listed and listed[0].report_dir == result.report_dir


def test_a_window_with_too_few_rows_is_not_judged(tmp_home: Path, tiny, tiny_pools) -> None:
    model, tok = tiny
    result = run_drift(
        current=tiny_pools["held"].iloc[:20],
        reference=tiny_pools["reference"],
        model=model,
        tokenizer=tok,
        log_to_mlflow=False,
    )
    assert not result.drift_detected and result.outcome == "insufficient_data"
    assert "20 rows" in result.reason and "min_rows" in result.reason
    assert result.report_dir is None and result.signals == []
    assert result.to_dict()["drift_detected"] is False
    assert list_reports() == []


def test_reference_is_built_once_per_version(tmp_home: Path, tweets: pd.DataFrame, tiny) -> None:
    model, tok = tiny
    ref_rows = rows(tweets[tweets["period"] == "old"].iloc[:40])
    first = build_reference("3", model=model, tokenizer=tok, rows=ref_rows)
    assert len(first) == 40 and {"label", "confidence", *DESCRIPTORS} <= set(first.columns)
    cached = list((tmp_home / "reports").glob("reference-sentiment-v3-*.parquet"))
    assert len(cached) == 1
    # No model this time: only the cache can answer (the registry has no version 3).
    again = build_reference("3", rows=ref_rows)
    pd.testing.assert_frame_equal(first, again)


def test_reference_rows_leave_out_the_champions_training_batch(
    tmp_home: Path, tmp_path: Path
) -> None:
    from ml.drift.reference import REFERENCE_TAG, reference_rows
    from ml.params import Params
    from ml.settings import get_settings
    from ml.tables import file_md5

    texts = [f"tweet number {i}" for i in range(80)]
    table = pd.DataFrame(
        {
            "id": range(80),
            "source": ["2013train"] * 60 + ["2016test"] * 20,
            "label": [LABELS[i % 3] for i in range(80)],
            "text": texts,
        }
    )
    tweets = tmp_path / "tweets.tsv"
    table.to_csv(tweets, sep="\t", index=False)
    raw = load_params(REPO_ROOT / "params.yaml").model_dump()
    raw["data"].update(train=str(tweets), train_sources=["2013train"])
    raw["drift"] = {**raw.get("drift", {}), "reference_size": 10}
    params = Params.model_validate(raw)
    batch = get_settings().work_dir / "train_batch_sentiment.tsv"
    batch.parent.mkdir(parents=True, exist_ok=True)
    table.iloc[:45][["label", "text"]].to_csv(batch, sep="\t", index=False)

    unseen = reference_rows(
        params=params, run_tags={f"driftloop.data.{batch.name}": file_md5(batch)}
    )
    assert len(unseen) == 10 and set(unseen["text"]) <= set(texts[45:60])
    assert "minus the champion's training batch" in unseen.attrs["origin"]
    assert set(unseen["true_label"]) <= set(LABELS)
    # A batch that is not the one the run recorded (other md5) is not trusted to exclude rows.
    other = reference_rows(params=params, run_tags={f"driftloop.data.{batch.name}": "0" * 32})
    assert set(other["text"]) <= set(texts[:60]) and "minus" not in other.attrs["origin"]
    # A run can name its own reference table.
    own = tmp_path / "own.tsv"
    table.iloc[60:][["label", "text"]].to_csv(own, sep="\t", index=False)
    tagged = reference_rows(params=params, run_tags={REFERENCE_TAG: str(own)})
    assert set(tagged["text"]) <= set(texts[60:]) and len(tagged) == 10


def test_the_judged_version_comes_from_the_one_download_cache(
    tmp_home: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml import artifacts, registry
    from ml.drift.reference import load_version

    version = registry.register_model_dir(tiny_model_dir, reason="test").version
    model, tok = load_version(version)
    assert model.config.num_labels == len(LABELS) and tok("a tweet")["input_ids"]
    cached = [p for p in artifacts.cache_root().iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and f"-v{version}-" in cached[0].name

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(registry, "download_model", no_download)
    again, _ = load_version(version)  # the copy serving would read too
    assert again.config.hidden_size == model.config.hidden_size
