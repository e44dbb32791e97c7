"""ml.logs: one handler on the root logger, text or one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

import pytest

from ml import logs


@pytest.fixture(autouse=True)
def _logging_restored(restore_logging: None) -> None:
    """Every test here may reconfigure the root logger (tests/conftest.py puts it back)."""


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_ts_level_logger_message_and_extras() -> None:
    stream = io.StringIO()
    logs.configure(fmt="json", stream=stream)
    logging.getLogger("ml.registry").info("moved %s to v%s", "champion", 3, extra={"version": "3"})
    logging.getLogger("ml.registry").debug("not shown at INFO")

    [line] = json_lines(stream)
    assert line["level"] == "INFO" and line["logger"] == "ml.registry"
    assert line["message"] == "moved champion to v3" and line["version"] == "3"
    ts = datetime.fromisoformat(str(line["ts"]))
    assert ts.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(tz=UTC) - ts).total_seconds()) < 60


def test_json_exception_is_a_string_field() -> None:
    stream = io.StringIO()
    logs.configure(fmt="json", stream=stream)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("ml.test").exception("failed")
    [line] = json_lines(stream)
    assert line["level"] == "ERROR" and line["message"] == "failed"
    assert isinstance(line["exc_info"], str) and "ZeroDivisionError" in line["exc_info"]


def test_a_newline_in_a_message_cannot_forge_a_line() -> None:
    stream = io.StringIO()
    logs.configure(fmt="json", stream=stream)
    forged = 'ok\n{"level": "INFO", "logger": "ml.registry", "message": "promoted"}'
    logging.getLogger("bentos.sentiment").warning("text was %s", forged)
    assert len(stream.getvalue().splitlines()) == 1
    [line] = json_lines(stream)
    assert line["message"] == f"text was {forged}" and line["level"] == "WARNING"


def test_an_extra_cannot_overwrite_a_core_key_and_odd_values_are_strings() -> None:
    stream = io.StringIO()
    logs.configure(fmt="json", stream=stream)
    logging.getLogger("ml.x").info("hi", extra={"level": "DEBUG", "when": datetime(2024, 1, 2)})
    [line] = json_lines(stream)
    assert line["level"] == "INFO" and line["when"] == "2024-01-02 00:00:00"


def test_format_comes_from_driftloop_log_format(monkeypatch) -> None:
    from ml.settings import get_settings

    monkeypatch.setenv("DRIFTLOOP_LOG_FORMAT", "json")
    get_settings.cache_clear()
    try:
        stream = io.StringIO()
        logs.configure(stream=stream)
        logging.getLogger("ml.x").info("from the environment")
        assert json_lines(stream)[0]["message"] == "from the environment"
    finally:
        get_settings.cache_clear()


def test_text_is_the_default_and_verbose_shows_debug(monkeypatch) -> None:
    from ml.settings import get_settings

    monkeypatch.delenv("DRIFTLOOP_LOG_FORMAT", raising=False)
    get_settings.cache_clear()
    try:
        stream = io.StringIO()
        logs.configure(verbose=True, stream=stream)
        logging.getLogger("ml.x").debug("detail")
    finally:
        get_settings.cache_clear()
    line = stream.getvalue().strip()
    assert line.endswith("DEBUG ml.x: detail")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_configure_twice_switches_format_without_doubling_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure(fmt="text", stream=first)
    logs.configure(fmt="json", stream=second)
    logging.getLogger("ml.x").info("once")
    assert first.getvalue() == ""
    assert [line["message"] for line in json_lines(second)] == ["once"]
    assert len(logging.getLogger().handlers) == 1


def test_noisy_libraries_stay_at_warning() -> None:
    import mlflow  # noqa: F401 - it configures its own logger on import, as in a real run

    stream = io.StringIO()
    logs.configure(verbose=True, fmt="json", stream=stream)
    logging.getLogger("mlflow.tracking").info("chatter")
    logging.getLogger("mlflow.tracking").warning("worth seeing")
    assert [line["message"] for line in json_lines(stream)] == ["worth seeing"]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        logs.configure(fmt="xml")
