"""The drift review page: ``review.html`` beside a run's Evidently reports, for a person.

From the top: the verdict and what the loop decided, with the thresholds; what moved (tokens
and hashtags by weighted log-odds with an informative Dirichlet prior, the predicted-class mix
and the confidence distribution before and after, the task's primary metric on live feedback
with its interval); the window texts most unlike the reference (a reference-vs-window
classifier on the embeddings, cross-validated, the detector Evidently recommends for text),
each with the champion's prediction; and links. One self-contained HTML file, no scripts,
readable at 1280 px.

:func:`review_data` computes everything (JSON-able, saved as ``review.json``) and
:func:`render` turns it into HTML, so the DAG can re-render the page once the decision is known.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.drift.features import embedding_columns
from ml.metrics import metric_name

log = logging.getLogger(__name__)

TOKEN = re.compile(r"#\w+|[a-z][a-z']+", re.IGNORECASE)
URL_OR_MENTION = re.compile(r"https?://\S+|www\.\S+|@\w+", re.IGNORECASE)
STOPWORDS = frozenset(
    "the a an and or but of to in on at for with is are was were be been it its this that "
    "i you he she we they me my your our their his her them us am do does did have has had "
    "not no so if as by from just can will would im it's i'm".split()
)
PRIOR_SCALE = 500.0  # pseudo-counts of the informative prior (the pooled corpus), in total
MIN_COUNT = 3  # a term seen fewer times on both sides together is not ranked
CONFIDENCE_BINS = 10
Z_SHOWN = 1.96  # a term is listed as moved when |z| is past this (two-sided 5%)


def terms(text: str) -> list[str]:
    """Lower-cased words and hashtags of a tweet (no URLs, mentions, stopwords or HTML entities:
    the tweets carry ``&amp;``, which would otherwise rank as the word "amp")."""
    words = TOKEN.findall(URL_OR_MENTION.sub(" ", html.unescape(text)).lower())
    return [w for w in words if w not in STOPWORDS and len(w) > 1]


def log_odds(
    reference: list[str], window: list[str], prior_scale: float = PRIOR_SCALE
) -> list[dict[str, Any]]:
    """Weighted log-odds ratios with an informative Dirichlet prior (Monroe, Colaresi and
    Quinn 2008), window against reference: one row per term, ``z`` > 0 when the window uses it
    more. The prior is the pooled corpus, so rare terms are shrunk towards no change instead of
    topping the list on a count of two."""
    ref: Counter[str] = Counter()
    win: Counter[str] = Counter()
    for text in reference:
        ref.update(terms(text))
    for text in window:
        win.update(terms(text))
    pooled = ref + win
    total = sum(pooled.values())
    n_ref, n_win = sum(ref.values()), sum(win.values())
    if not total or not n_ref or not n_win:
        return []
    rows = []
    for term, count in pooled.items():
        if count < MIN_COUNT:
            continue
        alpha = prior_scale * count / total
        y_w, y_r = win[term], ref[term]
        delta = math.log((y_w + alpha) / (n_win + prior_scale - y_w - alpha)) - math.log(
            (y_r + alpha) / (n_ref + prior_scale - y_r - alpha)
        )
        z = delta / math.sqrt(1 / (y_w + alpha) + 1 / (y_r + alpha))
        rows.append(
            {
                "term": term,
                "z": round(z, 3),
                "window_per_1k": round(1000 * y_w / n_win, 2),
                "reference_per_1k": round(1000 * y_r / n_ref, 2),
            }
        )
    return sorted(rows, key=lambda r: -abs(r["z"]))


def shares(labels: pd.Series, names: list[str]) -> dict[str, float]:
    counts = labels.astype(str).value_counts()
    n = max(int(counts.sum()), 1)
    return {name: round(float(counts.get(name, 0)) / n, 4) for name in names}


def histogram(values: pd.Series, bins: int = CONFIDENCE_BINS) -> list[float]:
    counts, _ = np.histogram(values.astype(float).clip(0, 1), bins=bins, range=(0.0, 1.0))
    return [round(float(c) / max(int(counts.sum()), 1), 4) for c in counts]


def window_like(
    reference: pd.DataFrame, window: pd.DataFrame, top: int = 8, seed: int = 0
) -> dict[str, Any]:
    """A reference-vs-window classifier on the embeddings: its cross-validated ROC AUC (0.5:
    the two cannot be told apart) and the window texts it finds most window-like."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cols = [c for c in embedding_columns(window) if c in set(reference.columns)]
    if not cols or len(window) < 10 or len(reference) < 10:
        return {"auc": None, "examples": []}
    x = np.vstack([reference[cols].to_numpy(float), window[cols].to_numpy(float)])
    y = np.r_[np.zeros(len(reference)), np.ones(len(window))]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    clf = LogisticRegression(max_iter=1000, C=1.0, class_weight="balanced")
    p = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
    p_window = p[len(reference) :]
    order = np.argsort(-p_window)[:top]
    examples = [
        {
            "text": str(window["text"].iloc[i]),
            "window_likeness": round(float(p_window[i]), 3),
            "label": str(window["label"].iloc[i]),
            "confidence": round(float(window["confidence"].iloc[i]), 3),
        }
        for i in order
    ]
    return {"auc": round(float(roc_auc_score(y, p)), 4), "examples": examples}


def review_data(
    result: dict[str, Any],
    reference: pd.DataFrame,
    window: pd.DataFrame,
    labels: list[str],
    *,
    decision: dict[str, Any] | None = None,
    links: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, JSON-able. ``result`` is ``DriftResult.to_dict()``;
    ``reference`` and ``window`` are the featured rows the report compared."""
    moved = log_odds(reference["text"].astype(str).tolist(), window["text"].astype(str).tolist())
    words = [r for r in moved if not r["term"].startswith("#")]
    tags = [r for r in moved if r["term"].startswith("#")]
    quality = result.get("quality") or {}
    if "score" not in quality and "macro_recall" in quality:  # written before per-task metrics
        old = ("macro_recall", "macro_recall_ci", "reference_macro_recall")
        new = ("score", "score_ci", "reference_score")
        renamed = {n: quality.get(o) for n, o in zip(new, old, strict=True)}
        quality = {"metric": "macro_recall", **quality, **renamed}
    return {
        "result": {
            k: result.get(k)
            for k in (
                "drift_detected",
                "outcome",
                "reason",
                "window_start",
                "window_end",
                "rows",
                "feedback_rows",
                "model_version",
                "thresholds",
                "drifted_signals",
                "created_at",
            )
        },  # fmt: skip
        "signals": [
            {k: s.get(k) for k in ("name", "score", "threshold", "drifted", "kind")}
            for s in result.get("signals", [])
        ],
        "decision": decision or {"action": "in progress", "why": "the loop has not decided yet"},
        "terms_up": [r for r in words if r["z"] > Z_SHOWN][:10],
        "terms_down": [r for r in words if r["z"] < -Z_SHOWN][:10],
        "hashtags_up": [r for r in tags if r["z"] > Z_SHOWN][:6],
        "hashtags_down": [r for r in tags if r["z"] < -Z_SHOWN][:6],
        # How many were compared and how many passed: about 5% pass by chance alone.
        "terms_tested": {
            "words": len(words),
            "words_moved": sum(abs(r["z"]) > Z_SHOWN for r in words),
            "hashtags": len(tags),
            "hashtags_moved": sum(abs(r["z"]) > Z_SHOWN for r in tags),
        },
        "labels": labels,
        "mix_reference": shares(reference["label"], labels),
        "mix_window": shares(window["label"], labels),
        "confidence_reference": histogram(reference["confidence"]),
        "confidence_window": histogram(window["confidence"]),
        "quality": {
            k: quality.get(k)
            for k in ("metric", "score", "score_ci", "reference_score", "feedback_rows")
        }
        if quality.get("score") is not None
        else None,
        "window_like": window_like(reference, window),
        "links": links or {},
    }


# ---------------------------------------------------------------------------------- rendering

CSS = """
body{font:14px/1.35 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;
color:#1d2330;background:#f6f7f9}
header{padding:10px 20px;color:#fff}header.drift{background:#b3261e}header.ok{background:#1e7a3c}
header.none{background:#5f6368}h1{font-size:20px;margin:0}header p{margin:2px 0 0}
main{display:grid;grid-template-columns:repeat(4,1fr);gap:10px;padding:10px 20px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 10px}
section.wide{grid-column:span 2}section.full{grid-column:1/-1}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#5f6368;margin:0 0 6px}
table{border-collapse:collapse;width:100%;font-size:12.5px}td,th{padding:2px 4px;text-align:left}
th{color:#5f6368;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#b3261e}.down{color:#1a5fb4}.drifted{color:#b3261e;font-weight:600}
.ex td{border-top:1px solid #eef0f3;vertical-align:top}.muted{color:#5f6368}
svg text{font-size:11px;fill:#1d2330}a{color:#1a5fb4}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _terms_table(rows: list[dict[str, Any]], css: str) -> str:
    if not rows:
        return f'<p class="muted">none moved by more than |z| = {Z_SHOWN}</p>'
    body = "".join(
        f'<tr><td class="{css}">{_e(r["term"])}</td><td class="n">{r["reference_per_1k"]:g}</td>'
        f'<td class="n">{r["window_per_1k"]:g}</td><td class="n">{r["z"]:+.1f}</td></tr>'
        for r in rows
    )
    return f"<table><tr><th>term</th><th>ref ‰</th><th>window ‰</th><th>z</th></tr>{body}</table>"


def _bars(series: dict[str, list[float]], names: list[str], width: int = 280) -> str:
    """Grouped horizontal bars: one group per name, one bar per series (reference, window)."""
    colours = {"reference": "#9aa0a6", "window": "#d93025"}
    row_h, bar_h = 26, 10
    height = row_h * len(names) + 18
    top = max([v for values in series.values() for v in values] + [1e-9])
    parts = [f'<svg width="{width}" height="{height}" role="img">']
    for i, name in enumerate(names):
        y = i * row_h
        parts.append(f'<text x="0" y="{y + 14}">{_e(name)}</text>')
        for j, (key, values) in enumerate(series.items()):
            w = (width - 150) * values[i] / top
            by = y + 4 + j * (bar_h + 1)
            parts.append(
                f'<rect x="90" y="{by}" width="{w:.1f}" height="{bar_h}" fill="{colours[key]}"/>'
                f'<text x="{95 + w:.1f}" y="{by + 9}">{values[i]:.0%}</text>'
            )
    legend_y = height - 4
    parts.append(
        f'<text x="90" y="{legend_y}" style="fill:#9aa0a6">■ reference</text>'
        f'<text x="170" y="{legend_y}" style="fill:#d93025">■ window</text></svg>'
    )
    return "".join(parts)


def _histogram_svg(ref: list[float], win: list[float], width: int = 280, height: int = 110) -> str:
    top = max(ref + win + [1e-9])
    n = len(ref)
    step = (width - 10) / n
    parts = [f'<svg width="{width}" height="{height + 16}" role="img">']
    for i in range(n):
        for j, (values, colour) in enumerate(((ref, "#9aa0a6"), (win, "#d93025"))):
            h = (height - 14) * values[i] / top
            x = 5 + i * step + j * step / 2
            parts.append(
                f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{step / 2 - 1:.1f}" '
                f'height="{h:.1f}" fill="{colour}"/>'
            )
    parts.append(
        f'<text x="0" y="{height + 12}">0</text><text x="{width / 2 - 8}" y="{height + 12}">'
        f'0.5</text><text x="{width - 14}" y="{height + 12}">1</text></svg>'
    )
    return "".join(parts)


def _link(name: str, target: str) -> str:
    """A page or URL becomes an anchor; anything else (an MLflow ``runs:/`` URI, a version and
    its outcome) is shown as text, since a browser could not follow it."""
    if not target.startswith(("http://", "https://")) and (":" in target or " " in target):
        return f"{_e(name)}: <code>{_e(target)}</code>"
    return f'<a href="{_e(target)}">{_e(name)}</a>'


def render(data: dict[str, Any]) -> str:
    """The page for :func:`review_data`'s output."""
    r, decision = data["result"], data["decision"]
    verdict = (
        "Drift detected" if r["drift_detected"]
        else "Not judged" if r["outcome"] == "insufficient_data"
        else "No drift"
    )  # fmt: skip
    judged = r["outcome"] != "insufficient_data"
    css = "drift" if r["drift_detected"] else "ok" if judged else "none"
    signals = "".join(
        f'<tr><td class="{"drifted" if s["drifted"] else ""}">{_e(s["name"])}</td>'
        f'<td class="n">{_score(s["score"])}</td>'
        f'<td class="n">{s["threshold"]:g}</td><td>{"drifted" if s["drifted"] else "ok"}</td></tr>'
        for s in data["signals"]
    )
    labels = data["labels"]
    quality = data["quality"]
    quality_html = (
        f"<p>live {metric_name(quality['metric'])} <b>{quality['score']:.3f}</b> "
        f"(interval {quality['score_ci'][0]:.3f}–{quality['score_ci'][1]:.3f}, "
        f"{quality['feedback_rows']} labelled rows) against "
        f"{quality['reference_score']:.3f} at training</p>"
        if quality
        else '<p class="muted">no live labels in this window: quality not judged</p>'
    )
    wl = data["window_like"]
    auc = (
        f"a reference-vs-window classifier on the embeddings tells them apart with ROC AUC "
        f"<b>{wl['auc']:.2f}</b> (0.5: indistinguishable)"
        if wl["auc"] is not None
        else "too few rows to train a reference-vs-window classifier"
    )
    examples = "".join(
        f'<tr class="ex"><td class="n">{ex["window_likeness"]:.2f}</td><td>{_e(ex["text"])}</td>'
        f'<td>{_e(ex["label"])}</td><td class="n">{ex["confidence"]:.2f}</td></tr>'
        for ex in wl["examples"]
    )
    links = (
        " · ".join(_link(name, target) for name, target in data["links"].items())
        or '<span class="muted">none yet</span>'
    )
    window = f"{_e(r['window_start'])} – {_e(r['window_end'])}"
    tested = data.get("terms_tested")
    chance = (
        f'<p class="muted">{tested["words_moved"]} of {tested["words"]} words compared moved '
        f"past |z| {Z_SHOWN}; chance alone moves about {0.05 * tested['words']:.0f}</p>"
        if tested
        else ""
    )
    why = str(decision.get("why") or "")
    why = f"<p>decision: {_e(why)}</p>" if why and why.strip() != str(r["reason"]).strip() else ""
    confidence = _histogram_svg(data["confidence_reference"], data["confidence_window"])
    mix = _bars(
        {
            "reference": [data["mix_reference"][n] for n in labels],
            "window": [data["mix_window"][n] for n in labels],
        },
        labels,
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>driftloop drift review: {verdict}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><header class="{css}"><h1 id="verdict">{verdict} · decision: {_e(decision["action"])}</h1>
<p>{_e(r["reason"])}</p>{why}
<p>window {window} · {r["rows"]} rows, {r["feedback_rows"]} labelled ·
model v{_e(r["model_version"])}</p></header>
<main>
<section class="wide"><h2>Signals and thresholds</h2><table><tr><th>signal</th><th>score</th>
<th>threshold</th><th></th></tr>{signals}</table></section>
<section><h2>Predicted class mix</h2>{mix}</section>
<section><h2>Confidence</h2>{confidence}{quality_html}</section>
<section><h2>Words more frequent now</h2>{_terms_table(data["terms_up"], "up")}{chance}</section>
<section><h2>Words less frequent now</h2>{_terms_table(data["terms_down"], "down")}</section>
<section><h2>Hashtags up</h2>{_terms_table(data["hashtags_up"], "up")}</section>
<section><h2>Hashtags down</h2>{_terms_table(data["hashtags_down"], "down")}</section>
<section class="full" id="examples"><h2>Window texts least like the reference</h2><p>{auc}</p>
<table><tr><th>window-like</th><th>text</th><th>champion says</th><th>confidence</th></tr>
{examples}</table></section>
<section class="full"><h2>Links</h2>{links}</section>
</main></body></html>
"""


def write_review(report_dir: Path, data: dict[str, Any]) -> Path:
    """Write ``review.json`` and ``review.html`` in ``report_dir``; the page's path."""
    (report_dir / "review.json").write_text(json.dumps(data, indent=2, default=str))
    path = report_dir / "review.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(data))
    tmp.replace(path)
    return path


def _update(report_dir: str | Path | None, change: dict[str, Any]) -> Path | None:
    """Re-render a run's page with ``change`` merged in (``links`` are added to the page's);
    None for a run without a page. Never raises: the decision stands whatever happens to it."""
    if not report_dir or not (Path(report_dir) / "review.json").exists():
        return None
    try:
        data = json.loads((Path(report_dir) / "review.json").read_text())
        links = {**data.get("links", {}), **change.pop("links", {})}
        return write_review(Path(report_dir), {**data, **change, "links": links})
    except Exception:  # noqa: BLE001
        log.exception("could not update the review page in %s", report_dir)
        return None


def record_decision(report_dir: str | Path | None, action: str, why: str) -> Path | None:
    """Put the loop's decision on a run's page (the DAG's evaluate step)."""
    return _update(report_dir, {"decision": {"action": action, "why": why}})


def add_links(report_dir: str | Path | None, links: dict[str, str]) -> Path | None:
    """Add what a decision led to (the retraining run, the canary) to a run's page."""
    return _update(report_dir, {"links": links})
