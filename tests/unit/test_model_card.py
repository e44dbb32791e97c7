"""MLflow metadata of a trained model: its card, signature, input example and logged datasets.

A tiny BERT is trained through :func:`ml.training.pipeline.train` on a batch that
:func:`ml.training.pipeline.prepare` carved from a small base table and one feedback window, then
evaluated and registered (file-based MLflow + SQLite in ``tmp_path``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ml import registry
from ml.modeling import load_tokenizer, tiny_classifier
from ml.params import DEFAULT_LABELS, Params, load_params
from ml.tables import file_md5, read_table, write_table
from ml.training import pipeline
from ml.training.lineage import TASK_TAG
from ml.training.model_card import COMMON_LIMITS, ModelCard, render_card
from ml.training.pipeline import DatasetContext

REPO = Path(__file__).resolve().parents[2]
WORDS = {
    "positive": ["love", "great", "happy"],
    "negative": ["hate", "awful", "sad"],
    "neutral": ["table", "tuesday", "report"],
}
FEEDBACK_ROWS = 12
REASON = "drift on the 2016 tweets"
LABELS = DEFAULT_LABELS  # the sentiment task's


def _rows(n: int, prefix: str) -> pd.DataFrame:
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    texts = [f"{prefix} {WORDS[label][i % 3]} number {i}" for i, label in enumerate(labels)]
    return pd.DataFrame({"label": labels, "text": texts})


@pytest.fixture
def setup(tmp_home: Path, tmp_path: Path) -> tuple[Params, Path, Path, Path]:
    """Small params, a base table, a validation split and one labelled feedback window."""
    base = _rows(90, "@user base").assign(source="s1")
    base.insert(0, "id", [str(i) for i in range(len(base))])
    tweets = write_table(base, tmp_path / "tweets.tsv")
    val = write_table(_rows(30, "held out"), tmp_path / "val.tsv")
    window = write_table(_rows(FEEDBACK_ROWS, "feedback"), tmp_path / "window-1.tsv")
    params = load_params(REPO / "params.yaml")
    data = params.data.model_copy(
        update={"train": str(tweets), "val": str(val), "train_sources": ["s1"]}
    )
    train = params.train.model_copy(
        update={"max_examples": 60, "epochs": 1, "batch_size": 16, "max_length": 32}
    )
    return params.model_copy(update={"data": data, "train": train}), tweets, val, window


@pytest.fixture
def registered(setup, tiny_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """Prepare, train, evaluate and register, with a champion in place (as in a retraining)."""
    params, tweets, val, window = setup
    batch = pipeline.prepare(tmp_path / "batch.tsv", extra_paths=[str(window)], params=params)
    trained = pipeline.train(
        batch.path,
        reason=REASON,
        trigger="test",
        batch_inputs=batch.inputs,
        batch_mix=batch.mix,
        params=params,
        model=tiny_classifier(),
        tokenizer=load_tokenizer(),
    )
    metrics = pipeline.evaluate(trained["run_id"], params)
    champion = registry.register_model_dir(tiny_model_dir, reason="seed")
    registry.set_alias(registry.CHAMPION, champion.version, actor="test", reason="seed")
    version = pipeline.register(trained["run_id"], reason=REASON, actor="test", params=params)
    return {
        "params": params,
        "batch": batch,
        "trained": trained,
        "metrics": metrics,
        "version": version["version"],
        "champion": champion.version,
        "files": {"tweets": tweets, "val": val, "window": window},
    }


def test_registered_version_description_is_a_model_card(registered) -> None:
    assert registry.model_name() == "sentiment"  # the default task's registered model
    mv = registry.client().get_model_version(registry.model_name(), registered["version"])
    card = mv.description
    task = registered["params"].task
    assert f"`sentiment`: {task.description} (MLflow task" in card
    assert "Labels: `negative`, `neutral`, `positive`." in card
    for label in LABELS:
        assert f"`{label}`" in card
    for name in ("val_macro_recall", "val_macro_f1", "val_accuracy"):
        assert f"| {name} | {registered['metrics'][name.removeprefix('val_')]:.4f} |" in card
    assert REASON in card
    files = registered["files"]
    for path in (registered["batch"].path, files["tweets"], files["window"]):
        assert f"| `{Path(path).name}` | `{file_md5(path)}` |" in card, path
    assert f"## Metrics (validation split md5 `{file_md5(files['val'])}`)" in card
    assert f"| recent | {FEEDBACK_ROWS} |" in card
    assert f"champion at registration: v{registered['champion']}" in card
    assert task.limits and all(limit in card for limit in (*COMMON_LIMITS, *task.limits))
    assert any("Negation:" in limit for limit in task.limits)  # params.yaml's sentiment limits
    assert mv.tags[TASK_TAG] == "sentiment"
    run = registry.client().get_run(registered["trained"]["run_id"])
    assert run.data.tags[TASK_TAG] == "sentiment"


def test_logged_model_has_a_signature_and_the_input_example(registered) -> None:
    import mlflow
    from mlflow.models import Model
    from mlflow.types import DataType

    uri = registered["trained"]["model_uri"]
    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None
    assert info.signature.inputs.input_types() == [DataType.string]
    assert info.signature.outputs.input_names() == ["label", "score"]
    assert info.signature.outputs.input_types() == [DataType.string, DataType.double]
    assert info.saved_input_example_info is not None
    assert Model.load(uri).load_input_example() == list(registry.INPUT_EXAMPLE)


def _inputs(run_id: str) -> dict[str, Any]:
    import mlflow

    found = {}
    for dataset_input in mlflow.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in dataset_input.tags}
        found[tags.pop("mlflow.data.context")] = (dataset_input.dataset, tags)
    return found


def test_run_logs_training_validation_and_feedback_datasets(registered) -> None:
    batch, files = registered["batch"], registered["files"]
    inputs = _inputs(registered["trained"]["run_id"])
    assert set(inputs) == {"training", "validation", "feedback"}

    training, tags = inputs[DatasetContext.TRAINING]
    assert training.digest == file_md5(batch.path) and training.name == Path(batch.path).name
    assert json.loads(training.profile)["num_rows"] == batch.rows
    assert tags[f"{pipeline.DATA_TAG_PREFIX}{files['tweets'].name}"] == file_md5(files["tweets"])

    validation, _ = inputs[DatasetContext.VALIDATION]
    assert validation.digest == file_md5(files["val"])

    feedback, tags = inputs[DatasetContext.FEEDBACK]
    assert json.loads(feedback.profile)["num_rows"] == batch.mix["recent"] == FEEDBACK_ROWS
    assert tags == {f"{pipeline.DATA_TAG_PREFIX}{files['window'].name}": file_md5(files["window"])}


def test_batch_given_as_a_table_logs_what_it_can_and_says_so(setup, caplog) -> None:
    import mlflow

    params, _, val, window = setup
    table = pd.concat([_rows(30, "base"), _rows(FEEDBACK_ROWS, "feedback")], ignore_index=True)
    path = write_table(table, window.parent / "given.tsv")
    registry.ensure_experiment()
    with mlflow.start_run() as run, caplog.at_level(logging.WARNING, "ml.training.pipeline"):
        pipeline._log_datasets(
            table,
            path,
            {str(path): file_md5(path)},
            read_table(val),
            params,
            {"base": 30, "recent": FEEDBACK_ROWS},
        )
    assert set(_inputs(run.info.run_id)) == {"training", "validation"}
    assert f"holds {FEEDBACK_ROWS} feedback rows but its feedback files are unknown" in caplog.text


def test_a_store_that_refuses_datasets_costs_a_warning_not_the_run(
    setup, monkeypatch, caplog
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    params, _, val, window = setup

    def refuse(**_: Any) -> None:
        raise MlflowException("inputs not supported")

    monkeypatch.setattr(mlflow, "log_inputs", refuse)
    table = read_table(window)
    registry.ensure_experiment()
    with mlflow.start_run(), caplog.at_level(logging.WARNING, "ml.training.pipeline"):
        pipeline._log_datasets(table, window, {str(window): file_md5(window)}, table, params, {})
    assert "datasets were not logged: inputs not supported" in caplog.text


def _card(**fields: object) -> str:
    """A rendered card: an empty first model, with ``fields`` set."""
    empty = {"run_id": "r1", "reason": "first model", "task": "sentiment", "labels": LABELS,
             "metrics": {},
             "data_mix": {}, "data_hashes": {}, "git_commit": "unknown"}
    return render_card(ModelCard(**{**empty, **fields}))  # type: ignore[arg-type]


def test_card_without_champion_mix_or_metrics_says_so() -> None:
    card = _card()
    assert "none (no champion when registered)" in card
    assert "Not recorded" in card and "None logged." in card and "No data hashes" in card
    assert card.index("## Why this version exists") < card.index("## Known limits")


def test_card_states_the_feedback_share_of_the_batch() -> None:
    card = _card(
        reason="retrain",
        metrics={"val_macro_recall": 0.61234},
        data_mix={"base": 75, "recent": 20, "older": 5, "recent_windows": 3},
        data_hashes={"tweets.tsv": "abc"},
        git_commit="deadbeef",
        champion_version="4",
    )
    assert "Feedback (labelled production windows): 25 of 100 rows (25.0%)." in card
    assert (
        "| val_macro_recall | 0.6123 |" in card and "v4 (the version this one challenges)" in card
    )


def test_card_names_the_task_its_description_and_its_limits() -> None:
    card = _card(task="spam", description="Spam or not", labels=("spam", "ham"),
                 limits=(*COMMON_LIMITS, "Only English."))
    assert "`spam`: Spam or not (MLflow task `text-classification`)." in card
    assert "Labels: `spam`, `ham`." in card
    assert card.endswith(f"## Known limits\n\n- {COMMON_LIMITS[0]}\n- Only English.\n")
    assert "`sentiment`" not in _card(task="spam")


def test_card_for_an_emotion_run_uses_the_emotion_task() -> None:
    from types import SimpleNamespace

    emotion = load_params(REPO / "params.yaml", task="emotion")
    sentiment = load_params(REPO / "params.yaml", task="sentiment")
    run = SimpleNamespace(
        info=SimpleNamespace(run_id="r9"),
        data=SimpleNamespace(tags={TASK_TAG: "emotion"}, metrics={"val_macro_f1": 0.7}),
    )
    card = pipeline.card_for_run(run, "first emotion model", None, params=emotion)
    assert card.task == "emotion" and card.labels == ("anger", "joy", "optimism", "sadness")
    assert card.description == emotion.task.description and card.description
    assert card.limits == (*COMMON_LIMITS, *emotion.task.limits)
    assert not set(sentiment.task.limits) & set(card.limits)
    text = render_card(card)
    assert "Labels: `anger`, `joy`, `optimism`, `sadness`." in text
    assert "| val_macro_f1 | 0.7000 |" in text
