"""Labelled batches survive the round trip through a file, and a bad one never blocks retraining.

The failure this guards against (issue 11): a text with a lone ``\\r`` passed the guard, was
written unquoted to a labelled-window TSV, read back as two rows, and the empty one failed the
gate of every later retraining, since every retraining includes every recorded window.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.lifecycle import feedback
from ml.tables import normalise_text, read_table, write_table
from tests.unit.test_loop import _log

NASTY = [
    "a lone\rcarriage return",
    "windows\r\nline end",
    "a\nnew line",
    "a\ttab",
    'a "quoted" word',
    '"',
    "  leading and trailing  ",
    "NA",
    "null",
    "x\x00y",
    "lone \ud83d surrogate",
    "emoji \U0001f600 and \u2028 separator",
    "\\",
]


def test_nasty_texts_round_trip(tmp_path) -> None:
    table = pd.DataFrame({"label": ["positive"] * len(NASTY), "text": NASTY})
    back = read_table(write_table(table, tmp_path / "t.tsv"))
    assert back["text"].tolist() == [normalise_text(t) for t in NASTY]
    assert back["label"].tolist() == table["label"].tolist()
    # What normalising changes, and nothing else:
    assert normalise_text("a lone\rcarriage return") == "a lone\ncarriage return"
    assert normalise_text("x\x00y") == "xy"
    assert normalise_text("lone \ud83d surrogate") == "lone \ufffd surrogate"
    assert normalise_text('a\ttab "q"  ') == 'a\ttab "q"  '


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(codec=None, exclude_categories=())), min_size=1, max_size=5))
def test_any_text_round_trips(tmp_path_factory, texts: list[str]) -> None:
    path = tmp_path_factory.mktemp("rt") / "t.tsv"
    back = read_table(write_table(pd.DataFrame({"label": "neutral", "text": texts}), path))
    assert back["text"].tolist() == [normalise_text(t) for t in texts]


def test_a_window_with_a_carriage_return_is_recorded_whole(tmp_home, tmp_path) -> None:
    start = datetime(2026, 5, 4, tzinfo=UTC)
    labels = ("negative", "neutral", "positive")
    rows = [(f"tweet {i} about the match", labels[i % 3], labels[i % 3]) for i in range(89)]
    rows.append(("first line\rsecond line", "neutral", "neutral"))
    _log(rows, start)
    out = feedback.record_labelled_window(start, start + timedelta(hours=1), dvc=False,
                                          folder=tmp_path)
    assert out.path and out.rows == 90
    back = read_table(out.path)
    assert len(back) == 90 and "first line\nsecond line" in set(back["text"])
    assert feedback.feedback_batches(tmp_path) == [out.path]


def test_a_broken_old_window_is_quarantined_not_used(tmp_home, tmp_path) -> None:
    good = tmp_path / "window-20260501T000000Z.tsv"
    write_table(pd.DataFrame({"label": ["positive", "negative"], "text": ["fine", "also fine"]}),
                good)
    broken = tmp_path / "window-20260502T000000Z.tsv"
    # Written as before the fix: the lone \r is not quoted, so the row splits on reading.
    pd.DataFrame({"label": ["neutral", "positive"], "text": ["one\rtwo", "three"]}).to_csv(
        broken, sep="\t", index=False
    )
    (tmp_path / f"{broken.name}.dvc").write_text("outs: []\n")
    assert feedback.feedback_batches(tmp_path) == [str(good)]
    kept = tmp_path / feedback.QUARANTINE
    assert not broken.exists() and (kept / broken.name).exists()
    assert (kept / f"{broken.name}.dvc").exists()
    reason = (kept / f"{broken.name}.reason.txt").read_text()
    assert "shorter than" in reason or "label outside" in reason, reason
    assert feedback.feedback_batches(tmp_path) == [str(good)]  # and it stays out


def test_the_same_labels_make_the_same_batch_in_any_arrival_order(tmp_home, tmp_path) -> None:
    labels = ("negative", "neutral", "positive")
    rows = [(f"tweet {i} from the stands", labels[i % 3], labels[(i * 7) % 3]) for i in range(90)]
    first, second = datetime(2026, 5, 5, tzinfo=UTC), datetime(2026, 5, 6, tzinfo=UTC)
    _log(rows, first)
    _log(list(reversed(rows)), second, prefix="s")  # the same labels, in the opposite order
    a = feedback.record_labelled_window(first, first + timedelta(hours=1), dvc=False,
                                        folder=tmp_path / "a")
    b = feedback.record_labelled_window(second, second + timedelta(hours=1), dvc=False,
                                        folder=tmp_path / "b")
    assert a.path and b.path
    assert open(a.path, "rb").read() == open(b.path, "rb").read()
