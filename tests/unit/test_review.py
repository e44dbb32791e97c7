"""The drift review page (ml.drift.review): what moved is found, and the page renders in a real
headless Chromium with its verdict and examples on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.drift.review import add_links, log_odds, record_decision, review_data, terms, write_review
from scripts.review_shots import chromium, dump_dom, shoot
from tests.harness.servers import servers_missing

LABELS = ["negative", "neutral", "positive"]
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BASE = [
    "going to the beach tomorrow with friends",
    "this coffee is great today",
    "watching the game tonight at home",
    "new album dropped and it is good",
    "traffic on the way to work again",
    "happy birthday to my little sister",
]


def frame(texts: list[str], shift: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(texts)
    emb = rng.normal(size=(n, 8)) + shift
    df = pd.DataFrame(
        {
            "text": texts,
            "label": rng.choice(LABELS, n, p=[0.2 + shift / 4, 0.5, 0.3 - shift / 4]),
            "confidence": rng.beta(5, 2, n),
        }
    )
    for i in range(8):
        df[f"emb_{i}"] = emb[:, i]
    return df


def drifted() -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    reference = frame([BASE[i % len(BASE)] + f" {i}" for i in range(300)], 0.0, 1)
    window = frame(
        [
            (BASE[i % len(BASE)] + " #debate election vote") if i % 2 else BASE[i % len(BASE)]
            for i in range(200)
        ],
        0.6,
        2,
    )
    result = {
        "drift_detected": True,
        "outcome": "data_drift",
        "reason": "embeddings drifted",
        "window_start": "2016-11-01T00:00:00+00:00",
        "window_end": "2016-11-02T00:00:00+00:00",
        "rows": 200,
        "feedback_rows": 0,
        "model_version": "2",
        "signals": [
            {"name": "embeddings", "score": 0.4, "threshold": 0.3, "drifted": True},
            {"name": "quality", "score": None, "threshold": 0.05, "drifted": False},
        ],
    }
    return result, reference, window


def test_log_odds_ranks_what_moved_and_shrinks_rare_terms() -> None:
    reference = ["the cat sat on the mat"] * 200 + ["rare word here"] * 2
    window = ["the cat sat on the mat"] * 100 + ["election vote tonight"] * 100 + ["rare thing"]
    rows = log_odds(reference, window)
    top = [r["term"] for r in rows[:3]]
    assert set(top) == {"election", "vote", "tonight"}
    assert all(r["z"] > 0 for r in rows[:3])
    rare = next(r for r in rows if r["term"] == "rare")
    assert abs(rare["z"]) < 1  # three sightings are not news
    same = next(r for r in rows if r["term"] == "cat")
    assert abs(same["z"]) < abs(rows[0]["z"])
    # HTML entities in tweets are text, not words: "&amp;" must not rank as "amp".
    assert terms("salt &amp; pepper &lt;3") == ["salt", "pepper"]


def test_the_page_says_the_verdict_moved_terms_and_examples(tmp_path: Path) -> None:
    result, reference, window = drifted()
    data = review_data(result, reference, window, LABELS, links={"Evidently": "report.html"})
    assert data["terms_up"][0]["term"] in {"election", "vote"}
    assert data["hashtags_up"][0]["term"] == "#debate"
    assert data["window_like"]["auc"] > 0.7
    tested = data["terms_tested"]
    assert 0 < tested["words_moved"] <= tested["words"] and tested["hashtags_moved"] >= 1
    assert len(data["window_like"]["examples"]) == 8
    page = write_review(tmp_path, data).read_text()
    assert "Drift detected" in page and "decision: in progress" in page
    assert f"of {tested['words']} words compared moved past |z| 1.96; chance alone" in page
    record_decision(tmp_path, "retrain", "the window has labels to learn from")
    page = (tmp_path / "review.html").read_text()
    assert "decision: retrain" in page
    assert "decision: the window has labels to learn from" in page  # the why, said once
    assert page.count(result["reason"]) == 1
    assert "<script" not in page
    assert record_decision(tmp_path / "missing", "retrain", "") is None
    # What a decision led to: pages and web addresses are links, an MLflow URI is text.
    add_links(tmp_path, {"Retraining run (MLflow)": "runs:/abc123", "Run": "http://mlflow/x"})
    page = (tmp_path / "review.html").read_text()
    assert "Retraining run (MLflow): <code>runs:/abc123</code>" in page
    assert '<a href="http://mlflow/x">Run</a>' in page and '<a href="report.html">' in page


@pytest.mark.parametrize("case", ["drift", "no_drift"])
def test_the_page_renders_in_headless_chromium(tmp_path: Path, case: str) -> None:
    if chromium() is None:
        servers_missing("chromium not found", "Chromium (Debian's chromium package)")
    result, reference, window = drifted()
    if case == "no_drift":
        window = frame([BASE[i % len(BASE)] + f" {i}" for i in range(200)], 0.0, 3)
        result = {**result, "drift_detected": False, "outcome": "no_drift", "reason": "nothing"}
        result["signals"] = [{**s, "drifted": False} for s in result["signals"]]
    page = write_review(tmp_path, review_data(result, reference, window, LABELS))
    dom = dump_dom(page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    verdict = "Drift detected" if case == "drift" else "No drift"
    assert f'<h1 id="verdict">{verdict}' in dom.stdout
    assert dom.stdout.count('<tr class="ex">') == 8
    log = shoot(page, RESULTS / f"review_{case}_test.png")
    assert (RESULTS / f"review_{case}_test.png").stat().st_size > 10_000
    assert "Uncaught" not in log  # a script error would be logged here (checked: it is)
