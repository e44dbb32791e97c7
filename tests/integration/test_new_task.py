"""A task declared only in a temporary params file (two labels, a tiny table, the tiny random BERT)
goes through train → register → promote → serve-load → prediction log → feedback → drift → canary
with no code change, and never touches the default task's model, reports or rows."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ml import registry
from ml.params import load_params, use_task

pytestmark = pytest.mark.integration

WORDS = {"ham": ["lunch", "meeting", "thanks", "see you", "family"],
         "spam": ["win", "prize", "free", "click", "offer"]}  # fmt: skip


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("ham", "spam")[i % 2]
        words = rng.sample(WORDS[label], 3)
        rows.append({"category": label, "body": f"{' '.join(words)} number {seed}-{i}"})
    return pd.DataFrame(rows)


@pytest.fixture
def spam_task(tmp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """params.yaml plus a task `spam` whose table names its columns `body` and `category`."""
    from ml.settings import REPO_ROOT, get_settings

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    _table(80, 1).to_csv(tmp_path / "spam_train.tsv", sep="\t", index=False)
    _table(40, 2).to_csv(tmp_path / "spam_val.tsv", sep="\t", index=False)
    raw["tasks"]["spam"] = {
        "labels": ["ham", "spam"],
        "description": "Two-label test task",
        "data": {
            "train": str(tmp_path / "spam_train.tsv"),
            "val": str(tmp_path / "spam_val.tsv"),
            "text_column": "body",
            "label_column": "category",
            "time_column": None,
        },
        "train": {"max_examples": 80, "epochs": 1, "batch_size": 16},
        "promotion": {"metric": "macro_f1"},
        "validation": {"min_class_share": 0.1},
        "drift": {"min_rows": 20, "reference_size": 40, "min_feedback": 10},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("DRIFTLOOP_PARAMS", str(path))
    monkeypatch.setenv("DRIFTLOOP_FEEDBACK_DIR", str(tmp_path / "feedback"))
    get_settings.cache_clear()
    return path


def test_a_task_in_configuration_runs_the_whole_loop(spam_task: Path) -> None:
    from ml.db import get_engine, predictions
    from ml.drift import run_drift
    from ml.lifecycle import canary, promotion
    from ml.lifecycle.feedback import record_labelled_window
    from ml.modeling import load_tokenizer, tiny_classifier
    from ml.serving.loading import ModelLoadError, load_for_serving
    from ml.serving.predlog import PredictionLog
    from ml.serving.records import FeedbackRecord, PredictionRecord, new_request_id
    from ml.settings import get_settings
    from ml.training import pipeline

    settings = get_settings()
    assert load_params().task.name == "sentiment", "the first task stays the default"
    with use_task("spam") as params:
        assert params.task.labels == ("ham", "spam") and params.promotion.metric == "macro_f1"
        batch = pipeline.prepare()
        assert batch.class_counts == {"ham": 40, "spam": 40}
        pipeline.validate(batch.path)
        model = tiny_classifier(seed=3, labels=params.task.labels)
        trained = pipeline.train(batch.path, reason="test", model=model, tokenizer=load_tokenizer())
        metrics = pipeline.evaluate(trained["run_id"])
        assert {"macro_f1", "macro_recall", "recall_ham", "recall_spam"} <= set(metrics)
        version = pipeline.register(trained["run_id"], reason="first spam model", actor="test")
        card = registry.client().get_model_version("spam", version["version"]).description
        assert version["name"] == "spam" and "`spam`: Two-label test task" in card
        assert promotion.promote_or_canary(version["version"], actor="test") == "promoted"
        assert registry.get_alias(registry.CHAMPION).name == "spam"

        # The service's loader takes the task's labels and refuses a model with others.
        model_dir = registry.download_model(version["version"])
        served = load_for_serving(model_dir, name="spam", version="1", labels=params.task.labels)
        assert served.labels == ("ham", "spam") and served.predict(["free prize"]).shape == (1, 2)
        with pytest.raises(ModelLoadError, match=r"its task has \['negative'"):
            load_for_serving(model_dir, name="spam", version="1", labels=("negative", "neutral",
                                                                           "positive"))

        # Predictions and feedback of the task, logged with its two labels.
        texts = _table(60, 3)
        probs = served.predict(texts["body"].tolist())
        start = datetime.now(tz=UTC) - timedelta(minutes=5)
        log = PredictionLog(settings.database_url, settings.home / "spool").start()
        ids = []
        for i, (text, row) in enumerate(zip(texts["body"], probs, strict=True)):
            rid = new_request_id()
            ids.append(rid)
            scores = dict(zip(params.task.labels, map(float, row), strict=True))
            log.log_predictions([PredictionRecord(
                request_id=rid, at=start + timedelta(seconds=i), model_name="spam",
                model_version="1", text=text, label=max(scores, key=scores.__getitem__),
                scores=scores, latency_ms=3.0)])  # fmt: skip
        for i, (rid, label) in enumerate(zip(ids, texts["category"], strict=True)):
            source = f"key-{i % 5}"  # five sources: none over labels.max_source_share
            log.log_feedback(FeedbackRecord(request_id=rid, label=label, source=source))
        assert log.flush(30)
        log.close()
        with get_engine(settings.database_url).connect() as conn:
            rows = conn.execute(predictions.select()).mappings().all()
        assert len(rows) == 60 and all(set(r["scores"]) == {"ham", "spam"} for r in rows)

        until = datetime.now(tz=UTC) + timedelta(minutes=1)
        window = record_labelled_window(start, until, dvc=False)
        assert window.path and Path(window.path).parent.name == "spam", window.to_dict()
        assert window.rows == 60

        result = run_drift(start, until, log_to_mlflow=False, add_to_workspace=False)
        assert result.rows == 60 and result.model_version == "1"
        # Its feedback is held to its own metric, macro-F1, against v1's val_macro_f1.
        assert result.quality is not None and result.quality["metric"] == "macro_f1"
        assert result.quality["reference_source"] == "v1 val_macro_f1", result.quality
        report_dir = Path(str(result.report_dir))
        assert report_dir.parent.name == "spam" and (report_dir / "review.html").is_file()
        assert "ham" in (report_dir / "review.html").read_text()

        assert canary.evaluate().outcome in ("no_canary", "nothing_to_judge")

    # The default task saw none of it.
    assert registry.get_alias(registry.CHAMPION) is None
    with use_task("sentiment"):
        assert registry.model_name() == "sentiment" and not registry.list_versions()
