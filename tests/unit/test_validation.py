"""Unit tests for the validation gate (:mod:`ml.training.validation`) on tiny and real batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from ml.params import DEFAULT_LABELS, ValidationParams, load_params
from ml.tables import DataError, read_table
from ml.training.validation import (
    ExpectationFailure,
    ValidationFailed,
    ValidationResult,
    require_valid,
    validate_file,
    validate_frame,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = ValidationParams()  # min_rows 20, lengths [1, 1000], dup 5%, class shares [3%, 90%]
LABELS = DEFAULT_LABELS  # negative, neutral, positive


def batch(per_class: int = 10) -> pd.DataFrame:
    """A valid labelled batch: ``per_class`` rows of each label, unique texts, an extra column."""
    rows = [
        {"id": f"{label}-{i}", "label": label, "text": f"tweet number {i} feeling {label}"}
        for label in LABELS
        for i in range(per_class)
    ]
    return pd.DataFrame(rows)


def failures_for(result: ValidationResult, check: str) -> list[ExpectationFailure]:
    return [f for f in result.failures if f.check == check]


def only_failure(result: ValidationResult) -> ExpectationFailure:
    assert not result.success
    assert len(result.failures) == 1, result.reasons()
    return result.failures[0]


def test_valid_batch_passes() -> None:
    df = batch()
    result = validate_frame(df, PARAMS, name="tiny", labels=LABELS)

    assert result.success, result.reasons()
    assert result.failures == []
    assert result.reasons() == []
    assert result.rows == 30
    assert result.name == "tiny"
    assert result.data_docs is None
    assert result.statistics["evaluated_expectations"] == 14
    assert result.statistics["unsuccessful_expectations"] == 0
    assert json.loads(json.dumps(result.to_dict()))["success"] is True
    assert require_valid(result) is result
    assert df.equals(batch()), "validation must not modify the caller's frame"


@pytest.mark.parametrize("column", ["label", "text"])
def test_missing_required_column_is_named(column: str) -> None:
    result = validate_frame(batch().drop(columns=[column]), PARAMS, labels=LABELS)

    failure = only_failure(result)  # the column's other checks are not reported as crashes
    assert failure.expectation_type == "expect_column_to_exist"
    assert failure.column == column
    assert f"column '{column}' is missing" in failure.message
    assert column not in failure.observed
    with pytest.raises(ValidationFailed) as info:
        require_valid(result)
    assert "expect_column_to_exist" in str(info.value)
    assert f"'{column}'" in str(info.value)
    assert info.value.result is result


def test_unknown_labels_are_listed() -> None:
    df = batch()
    df.loc[[0, 1], "label"] = "happy"
    df.loc[12, "label"] = "sad"
    failure = only_failure(validate_frame(df, PARAMS, labels=LABELS))

    assert failure.expectation_type == "expect_column_values_to_be_in_set"
    assert failure.check == "label_in_set"
    assert failure.column == "label"
    assert failure.observed == ["happy", "sad"]
    assert "3 rows have labels outside {negative, neutral, positive}" in failure.message
    assert "'happy'" in failure.message and "'sad'" in failure.message


def test_empty_and_whitespace_only_texts_fail() -> None:
    df = batch()
    df.loc[3, "text"] = ""
    df.loc[4, "text"] = " \t  "
    failure = only_failure(validate_frame(df, PARAMS, labels=LABELS))

    assert failure.expectation_type == "expect_column_values_to_not_be_null"
    assert failure.check == "not_empty"
    assert failure.column == "text"
    assert failure.observed == 2
    assert "2 rows are null or empty (0 null, 2 empty or whitespace-only)" in failure.message


def test_nulls_fail_in_both_columns() -> None:
    df = batch()
    df.loc[5, "label"] = None
    df.loc[6, "text"] = float("nan")
    result = validate_frame(df, PARAMS, labels=LABELS)

    assert not result.success
    assert {(f.check, f.column) for f in result.failures} == {
        ("not_empty", "label"),
        ("not_empty", "text"),
    }
    for failure in result.failures:
        assert failure.expectation_type == "expect_column_values_to_not_be_null"
        assert failure.observed == 1
        assert "1 row is null or empty (1 null, 0 empty" in failure.message


def test_length_is_measured_after_stripping() -> None:
    df = batch()
    df.loc[7, "text"] = "   " + "a" * 1000 + "\n"  # 1000 characters once stripped: fine
    assert validate_frame(df, PARAMS, labels=LABELS).success

    df.loc[8, "text"] = "b" * 1001
    failure = only_failure(validate_frame(df, PARAMS, labels=LABELS))
    assert failure.expectation_type == "expect_column_value_lengths_to_be_between"
    assert failure.column == "text"
    assert failure.observed == 1
    assert "1 row has a length outside [1, 1000]" in failure.message
    assert "1001" in failure.message


def test_duplicate_share_threshold() -> None:
    df = batch(per_class=20)  # 60 rows: 3 duplicates are exactly the 5% allowed
    df.loc[1, "text"] = df.loc[0, "text"]
    df.loc[2, "text"] = df.loc[0, "text"] + "   "  # same text once stripped
    df.loc[3, "text"] = df.loc[0, "text"]
    assert validate_frame(df, PARAMS, labels=LABELS).success

    df.loc[4, "text"] = df.loc[0, "text"]  # 4 of 60 = 6.7%
    failure = only_failure(validate_frame(df, PARAMS, labels=LABELS))
    assert failure.expectation_type == "expect_column_proportion_of_unique_values_to_be_between"
    assert failure.check == "duplicate_share"
    assert failure.column == "text"
    assert failure.observed == pytest.approx(4 / 60, abs=1e-6)
    assert "6.7% of texts are duplicates, above max_duplicate_share 5.0%" in failure.message


def test_missing_class_fails() -> None:
    df = batch()
    df = df[df["label"] != "neutral"].reset_index(drop=True)
    failure = only_failure(validate_frame(df, PARAMS, labels=LABELS))

    assert failure.check == "class_min_share"
    assert failure.column == "label"
    assert failure.observed == 0.0
    assert "class 'neutral' is missing" in failure.message


def test_imbalanced_classes_fail_both_bounds() -> None:
    rows = (
        [("positive", f"good {i}") for i in range(95)]
        + [("negative", f"bad {i}") for i in range(3)]
        + [("neutral", f"meh {i}") for i in range(2)]
    )
    df = pd.DataFrame(rows, columns=["label", "text"])
    result = validate_frame(df, PARAMS, labels=LABELS)

    assert not result.success
    assert {(f.check, f.column) for f in result.failures} == {
        ("class_max_share", "label"),
        ("class_min_share", "label"),
    }
    (too_many,) = failures_for(result, "class_max_share")
    assert too_many.expectation_type == "expect_column_values_to_not_be_in_set"
    assert too_many.observed == pytest.approx(0.95)
    assert "class 'positive' is 95.0% of labels (95 of 100), above max_class_share 90.0%" in (
        too_many.message
    )
    (too_few,) = failures_for(result, "class_min_share")
    assert too_few.observed == pytest.approx(0.02)
    assert "class 'neutral' is 2.0% of labels (2 of 100), below min_class_share 3.0%" in (
        too_few.message
    )


def test_too_few_rows() -> None:
    failure = only_failure(validate_frame(batch(per_class=2), PARAMS, labels=LABELS))

    assert failure.expectation_type == "expect_table_row_count_to_be_between"
    assert failure.column is None
    assert failure.observed == 6
    assert "table has 6 rows, fewer than min_rows 20" in failure.message


def test_failed_message_names_every_failure() -> None:
    df = batch(per_class=2).drop(columns=["label"])
    with pytest.raises(ValidationFailed) as info:
        require_valid(validate_frame(df, PARAMS, name="broken.tsv", labels=LABELS))
    message = str(info.value)
    assert message.startswith("broken.tsv failed validation (2 failed expectation(s) on 6 rows)")
    assert "expect_column_to_exist: column 'label' is missing" in message
    assert "expect_table_row_count_to_be_between: table has 6 rows" in message


def test_file_that_is_not_a_table_raises_data_error(tmp_path: Path) -> None:
    binary = tmp_path / "weights.tsv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="not UTF-8"):
        validate_file(binary, PARAMS, labels=LABELS)

    one_column = tmp_path / "notes.tsv"
    one_column.write_text("just some words\nand some more\n")
    with pytest.raises(DataError, match="found 1 column"):
        validate_file(one_column, PARAMS, labels=LABELS)

    with pytest.raises(DataError, match="no such file"):
        validate_file(tmp_path / "absent.tsv", PARAMS, labels=LABELS)


def test_validate_file_reads_tsv(tmp_path: Path) -> None:
    path = tmp_path / "batch.tsv"
    df = batch()
    df.loc[0, "text"] = "NA"  # read as the text "NA", not as a null
    df.to_csv(path, sep="\t", index=False)
    result = validate_file(path, PARAMS, labels=LABELS)

    assert result.success, result.reasons()
    assert result.name == str(path)
    assert result.rows == 30


def test_data_docs_are_written_where_asked(tmp_path: Path) -> None:
    docs_dir = tmp_path / "docs"
    df = batch()
    df.loc[0, "label"] = "happy"
    result = validate_frame(
        df, PARAMS, name="window 7", data_docs_dir=docs_dir, labels=LABELS
    )

    assert result.data_docs == str((docs_dir / "index.html").resolve())
    assert Path(result.data_docs).is_file()
    pages = list((docs_dir / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text()
    assert "Every label is one of negative, neutral, positive." in html
    assert "happy" in html
    assert "labelled_batch" in Path(result.data_docs).read_text()


def test_gx_info_logs_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("great_expectations").setLevel(logging.NOTSET)  # undo earlier tests
    with caplog.at_level(logging.INFO):
        validate_frame(batch(), PARAMS, data_docs_dir=None, labels=LABELS)
    noisy = [r for r in caplog.records if r.name.startswith("great_expectations")]
    assert [r for r in noisy if r.levelno < logging.WARNING] == []
    assert any(
        r.name == "ml.training.validation" and "passed validation" in r.message
        for r in caplog.records
    )


def test_real_val_set_passes_default_params() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    result = validate_file(
        REPO_ROOT / params.data.val, params.validation, labels=params.task.labels
    )

    assert result.success, result.reasons()
    assert result.rows == 2000


def test_real_training_sources_pass_default_params() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    tweets = pd.read_csv(REPO_ROOT / params.data.train, sep="\t", dtype=str, keep_default_na=False)
    train = tweets[tweets[params.data.time_column].isin(params.data.train_sources)]
    result = validate_frame(
        train, params.validation, name="train_sources", labels=params.task.labels
    )

    assert result.success, result.reasons()
    assert result.rows == len(train) > 10_000


def test_real_emotion_tables_pass_default_params() -> None:
    params = load_params(REPO_ROOT / "params.yaml", task="emotion")
    for path in (params.data.train, params.data.val):
        result = validate_file(REPO_ROOT / path, params.validation, labels=params.task.labels)
        assert result.success, (path, result.reasons())
        assert set(read_table(REPO_ROOT / path)["label"]) == set(params.task.labels)


def test_sentiment_labels_fail_the_emotion_suite() -> None:
    """The label set is the task's: a sentiment batch is not an emotion batch."""
    emotion = load_params(REPO_ROOT / "params.yaml", task="emotion").task.labels
    result = validate_frame(batch(), PARAMS, labels=emotion)

    assert not result.success
    (outside,) = failures_for(result, "label_in_set")
    assert outside.observed and set(outside.observed) <= set(LABELS)  # the first few shown
    assert "30 rows have labels outside {anger, joy, optimism, sadness}" in outside.message
    missing = failures_for(result, "class_min_share")
    for label in emotion:  # every emotion class is missing, each named once
        assert sum(f"class '{label}' is missing" in f.message for f in missing) == 1
    assert len(missing) == len(emotion)
