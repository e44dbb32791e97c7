"""The task configuration (``tasks:`` in ``params.yaml``, :mod:`ml.params`): each task's labels,
data and overrides, the default task, unknown and invalid tasks, and how a process picks its task
(:func:`ml.params.use_task`, ``DRIFTLOOP_TASK``)."""

from __future__ import annotations

import contextvars
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import ml.params
from ml import registry
from ml.params import (
    DEFAULT_LABELS,
    DEFAULT_TASK,
    Params,
    UnknownTask,
    current_task,
    load_params,
    load_tasks,
    select_task,
    use_task,
)
from ml.settings import get_settings

REPO = Path(__file__).resolve().parents[2]

TWO_TASKS = """
tasks:
  news:
    labels: [sports, politics, tech]
    description: Topic of a headline
    data:
      train: data/news/train.tsv
      val: data/news/val.tsv
      label_column: topic
      time_column: null
    train:
      epochs: 3
    promotion:
      metric: macro_f1
  spam:
    labels: [spam, ham]
    model_name: spam-filter
    limits: ["Only English messages."]
    data:
      tweets: data/spam.tsv   # the old name of data.train is still read
      time_column: sent
      train_sources: ["2020"]

data:
  text_column: body
  label_column: label
  val: data/shared-val.tsv
  seed: 7
train:
  epochs: 1
  batch_size: 16
promotion:
  metric: macro_recall
  min_improvement: 0.01
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No task chosen and no task or params file from the environment; the settings cache
    cleared before and after (``get_settings`` is cached, so a variable set in a test is read
    only after a clear).

    The chosen task is a context variable: an in-process CLI run in an earlier test
    (``select_task`` in the CLI's callback) leaves it set in pytest's context, so it is unset
    here and restored after.
    """
    token = ml.params._current_task.set(None)
    monkeypatch.delenv("DRIFTLOOP_TASK", raising=False)
    monkeypatch.delenv("DRIFTLOOP_PARAMS", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()
    ml.params._current_task.reset(token)


@pytest.fixture
def two_tasks(tmp_path: Path, fresh_settings: pytest.MonkeyPatch) -> Path:
    """A params file with two tasks, and the settings pointing at it (``DRIFTLOOP_PARAMS``)."""
    path = write(tmp_path / "params.yaml", TWO_TASKS)
    fresh_settings.setenv("DRIFTLOOP_PARAMS", str(path))
    get_settings.cache_clear()
    return path


# ------------------------------------------------------------------------------ resolving


def test_each_task_resolves_its_labels_data_and_overrides(two_tasks: Path) -> None:
    news = load_params(two_tasks, task="news")
    spam = load_params(two_tasks, task="spam")

    assert news.task.name == "news" and news.task.labels == ("sports", "politics", "tech")
    assert spam.task.name == "spam" and spam.task.labels == ("spam", "ham")
    assert news.task_names == spam.task_names == ("news", "spam")
    assert news.task.description == "Topic of a headline" and spam.task.description == ""
    assert spam.task.limits == ("Only English messages.",) and news.task.limits == ()

    # A task's data: its own keys over the shared ones, the rest shared.
    assert (news.data.train, news.data.val) == ("data/news/train.tsv", "data/news/val.tsv")
    assert (news.data.label_column, news.data.time_column) == ("topic", None)
    assert (spam.data.train, spam.data.val) == ("data/spam.tsv", "data/shared-val.tsv")
    assert (spam.data.label_column, spam.data.time_column) == ("label", "sent")
    assert spam.data.train_sources == ["2020"] and news.data.train_sources == []
    assert news.data.text_column == spam.data.text_column == "body"
    assert news.data.seed == spam.data.seed == 7

    # train.epochs is overridden for news only; every other train value stays shared.
    assert news.train.epochs == 3 and spam.train.epochs == 1
    assert news.train.batch_size == spam.train.batch_size == 16
    assert news.train.learning_rate == spam.train.learning_rate  # the code default, for both
    assert news.promotion.metric == "macro_f1" and spam.promotion.metric == "macro_recall"
    assert news.promotion.min_improvement == spam.promotion.min_improvement == 0.01

    # The registered model is named after the task unless the task names it.
    assert news.task.registered_name == "news" and spam.task.registered_name == "spam-filter"


def test_resolving_one_task_leaves_the_other_untouched(two_tasks: Path) -> None:
    first = load_params(two_tasks, task="spam").model_dump()
    load_params(two_tasks, task="news")
    assert load_params(two_tasks, task="spam").model_dump() == first


def test_the_default_task_is_the_first_declared(two_tasks: Path) -> None:
    assert load_params(two_tasks).task.name == "news"
    assert load_params().task.name == "news"  # the settings' params file (DRIFTLOOP_PARAMS)
    tasks = load_tasks(two_tasks)
    assert list(tasks) == ["news", "spam"]
    assert all(isinstance(p, Params) for p in tasks.values())
    assert tasks["spam"].task.labels == ("spam", "ham") and tasks["news"].train.epochs == 3
    assert current_task() is None  # nothing chose one: the default applies


def test_default_task_names_the_default_whatever_the_key_order(tmp_path: Path) -> None:
    """A file rewritten with sorted keys keeps its default: ``default_task`` says which."""
    path = write(tmp_path / "params.yaml", "default_task: spam\n" + TWO_TASKS)
    params = load_params(path)
    assert params.task.name == "spam" and params.task.labels == ("spam", "ham")
    assert params.task_names == ("spam", "news")  # the default first
    assert list(load_tasks(path)) == ["spam", "news"]
    assert load_params(path, task="news").task.name == "news"

    unknown = write(tmp_path / "unknown.yaml", "default_task: nope\n" + TWO_TASKS)
    with pytest.raises(UnknownTask, match=r"'nope'; params.yaml declares \['news', 'spam'\]"):
        load_params(unknown, task="news")


def test_an_unknown_task_names_the_declared_ones(two_tasks: Path) -> None:
    with pytest.raises(UnknownTask) as info:
        load_params(two_tasks, task="sentiment")
    assert info.value.name == "sentiment" and info.value.known == ("news", "spam")
    assert str(info.value) == "unknown task 'sentiment'; params.yaml declares ['news', 'spam']"
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownTask, match=r"\['news', 'spam'\]"), use_task("nope"):
        pytest.fail("the block ran for an unknown task")


def test_a_file_without_tasks_has_the_single_default_task(tmp_path: Path) -> None:
    path = write(
        tmp_path / "params.yaml",
        """
        data:
          tweets: data/old-tweets.tsv
        train:
          epochs: 2
        """,
    )
    params = load_params(path)
    assert params.task.name == DEFAULT_TASK == "sentiment"
    assert params.task.labels == DEFAULT_LABELS == ("negative", "neutral", "positive")
    assert params.task_names == ("sentiment",) and params.task.registered_name == "sentiment"
    assert params.data.train == "data/old-tweets.tsv" and params.train.epochs == 2
    assert load_params(path, task="sentiment").model_dump() == params.model_dump()
    assert list(load_tasks(path)) == ["sentiment"]
    with pytest.raises(UnknownTask, match=r"\['sentiment'\]"):
        load_params(path, task="emotion")
    assert load_params(write(tmp_path / "empty.yaml", "")).task.labels == DEFAULT_LABELS


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ("[spam, ham, spam]", "labels repeat"),
        ("[spam]", "at least two labels"),
        ("[]", "at least two labels"),
        ('[spam, " ham"]', "without outer spaces"),
        ('[spam, ""]', "1-16 characters"),
    ],
)
def test_invalid_labels_are_refused(tmp_path: Path, labels: str, words: str) -> None:
    path = write(tmp_path / "params.yaml", f"tasks:\n  spam:\n    labels: {labels}\n")
    with pytest.raises(ValidationError, match=words):
        load_params(path)


def test_invalid_task_names_and_sections_are_refused(tmp_path: Path) -> None:
    bad_name = write(tmp_path / "a.yaml", "tasks:\n  Bad Name:\n    labels: [a, b]\n")
    with pytest.raises(ValidationError, match="pattern"):
        load_params(bad_name)
    not_a_mapping = write(tmp_path / "b.yaml", "tasks: [spam, ham]\n")
    with pytest.raises(ValueError, match="tasks must map each task's name"):
        load_params(not_a_mapping)


# ------------------------------------------------------------------------ choosing a task


def test_use_task_makes_load_params_and_the_registry_follow_it(two_tasks: Path) -> None:
    assert load_params().task.name == "news" and registry.model_name() == "news"
    with use_task("spam") as params:
        assert params.task.name == "spam"
        assert current_task() == "spam"
        assert load_params().task.name == "spam" and load_params().task.labels == ("spam", "ham")
        assert registry.model_name() == "spam-filter"
        with use_task("news"):  # blocks nest
            assert registry.model_name() == "news"
        assert registry.model_name() == "spam-filter"
    assert current_task() is None
    assert load_params().task.name == "news" and registry.model_name() == "news"


def test_use_task_is_undone_when_the_block_raises(two_tasks: Path) -> None:
    with pytest.raises(RuntimeError, match="inside"), use_task("spam"):
        raise RuntimeError("inside")
    assert load_params().task.name == "news" and registry.model_name() == "news"


def test_use_task_none_is_the_default_task(two_tasks: Path) -> None:
    with use_task(None) as params:
        assert params.task.name == "news" and registry.model_name() == "news"


def test_select_task_sets_the_task_for_the_rest_of_the_context(two_tasks: Path) -> None:
    def command() -> tuple[str, str]:
        select_task("spam")  # a command's --task
        return load_params().task.name, registry.model_name()

    assert contextvars.copy_context().run(command) == ("spam", "spam-filter")
    assert load_params().task.name == "news"  # another context: untouched


def test_the_driftloop_task_variable_selects_the_task(
    two_tasks: Path, fresh_settings: pytest.MonkeyPatch
) -> None:
    assert get_settings().task is None  # read (and cached) before the variable is set
    fresh_settings.setenv("DRIFTLOOP_TASK", "spam")
    assert load_params().task.name == "news"  # the cached settings have not read it yet
    get_settings.cache_clear()
    assert get_settings().task == "spam" and current_task() == "spam"
    assert load_params().task.name == "spam" and registry.model_name() == "spam-filter"
    with use_task("news"):  # a task named in code wins over the environment
        assert load_params().task.name == "news" and registry.model_name() == "news"
    assert load_params().task.name == "spam"
    assert load_params(task="news").task.name == "news"  # and so does an explicit one

    fresh_settings.setenv("DRIFTLOOP_TASK", "nope")
    get_settings.cache_clear()
    with pytest.raises(UnknownTask, match="'nope'"):
        load_params()


# ---------------------------------------------------------------------- the real params.yaml


def test_the_real_params_declare_sentiment_first_and_emotion() -> None:
    tasks = load_tasks(REPO / "params.yaml")
    assert list(tasks)[:2] == ["sentiment", "emotion"]
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(raw["tasks"])[:2] == ["sentiment", "emotion"]  # declared first, in the file
    assert raw.get("default_task", "sentiment") == "sentiment"
    assert load_params(REPO / "params.yaml").task.name == "sentiment"

    sentiment, emotion = tasks["sentiment"], tasks["emotion"]
    assert sentiment.task.labels == DEFAULT_LABELS
    assert emotion.task.labels == ("anger", "joy", "optimism", "sadness")
    assert sentiment.promotion.metric == "macro_recall"
    assert emotion.promotion.metric == "macro_f1"
    assert sentiment.task.registered_name == "sentiment"
    assert emotion.task.registered_name == "emotion"

    assert sentiment.data.train == "data/tweets.tsv" and sentiment.data.time_column == "source"
    assert emotion.data.train == "data/emotion/train.tsv" and emotion.data.time_column is None
    for params in (sentiment, emotion):
        for path in (params.data.train, params.data.val):
            assert (REPO / path).is_file(), path
    # emotion overrides training; sentiment keeps the shared defaults.
    assert emotion.train.epochs == 4 and sentiment.train.epochs == 1
    assert emotion.train.batch_size == sentiment.train.batch_size
    assert emotion.validation == sentiment.validation
    assert sentiment.task.limits and emotion.task.limits
