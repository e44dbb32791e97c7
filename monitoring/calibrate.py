"""Calibrate the drift thresholds in ``params.yaml`` on the real tweets.

``python -m monitoring.calibrate`` runs random windows of three populations through
:func:`ml.drift.compare.compare` and prints each signal's alarm rate; see ``docs/drift.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from ml.params import DriftParams

log = logging.getLogger(__name__)

_PRODUCTS = [
    "vacuum cleaner",
    "coffee grinder",
    "pair of running shoes",
    "blender",
    "laptop stand",
    "electric kettle",
    "set of kitchen knives",
    "office chair",
    "wireless keyboard",
    "air purifier",
    "water bottle",
    "desk lamp",
    "backpack",
    "toaster",
    "rice cooker",
]
_PARTS = [
    "build quality",
    "battery life",
    "handle",
    "lid",
    "motor",
    "finish",
    "packaging",
    "instruction manual",
    "power cord",
    "stitching",
    "display",
    "warranty service",
]
_ADJ_GOOD = ["excellent", "solid", "well designed", "surprisingly sturdy", "very reliable"]
_ADJ_BAD = ["disappointing", "flimsy", "poorly finished", "unreliable", "noticeably cheap"]
_VERDICTS = [
    "it has exceeded my expectations in almost every respect",
    "it stopped working properly after roughly three weeks of normal use",
    "it does exactly what the description promises, nothing more and nothing less",
    "I would not purchase it again at this price point",
    "it has become an indispensable part of my daily routine",
]
_ADVICE = [
    "Overall, I would recommend it to anyone looking for a dependable option.",
    "I returned it and requested a full refund from the seller.",
    "Customer support responded promptly and replaced the defective unit.",
    "Four stars, mainly because the delivery took considerably longer than estimated.",
    "If you can find it on sale, it represents reasonable value for money.",
]
_SUBJECTS = [
    "The committee",
    "The board of directors",
    "The research group",
    "The ministry",
    "The review panel",
    "The municipal council",
    "The university senate",
    "The audit office",
]
_VERBS = [
    "concluded",
    "emphasised",
    "reaffirmed",
    "noted with concern",
    "acknowledged",
    "recommended",
    "determined",
]
_TOPICS = [
    "the allocation of public funding for infrastructure",
    "the long-term sustainability of the pension system",
    "the methodology used in the preliminary assessment",
    "the regulatory framework governing financial disclosures",
    "the implementation of the revised safety protocols",
    "the proposed amendments to the procurement procedures",
]
_CLAUSES = [
    "requires further consultation with the relevant stakeholders before any final decision",
    "should be reviewed annually in accordance with the applicable statutory provisions",
    "remains consistent with the objectives set out in the strategic plan",
    "could not be evaluated conclusively on the basis of the evidence currently available",
    "will be subject to an independent evaluation during the next fiscal year",
]
_QUALIFIERS = [
    "notwithstanding the concerns raised during the previous session",
    "in view of the considerable uncertainty surrounding future revenue",
    "subject to the approval of the supervisory authority",
    "taking into account the comments submitted by the participating institutions",
]


def out_of_domain_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts unlike tweets: half product reviews, half long formal sentences."""
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(n):
        if i % 2 == 0:
            good = rng.random() < 0.5
            adj = rng.choice(_ADJ_GOOD if good else _ADJ_BAD)
            texts.append(
                f"I bought this {rng.choice(_PRODUCTS)} {rng.randint(2, 11)} months ago and "
                f"{rng.choice(_VERDICTS)}. The {rng.choice(_PARTS)} is {adj}, although the "
                f"{rng.choice(_PARTS)} could be improved. {rng.choice(_ADVICE)}"
            )
        else:
            texts.append(
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} that {rng.choice(_TOPICS)} "
                f"{rng.choice(_CLAUSES)}, {rng.choice(_QUALIFIERS)}."
            )
    return texts


def evaluate_windows(
    reference: pd.DataFrame,
    pools: dict[str, pd.DataFrame],
    params: DriftParams,
    *,
    windows: int = 20,
    rows: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Alarm rates of each signal over random windows drawn from each featured pool.

    Every window goes through :func:`ml.drift.compare.compare`, the comparison ``run_drift`` makes.
    A pool smaller than ``windows * rows`` is sampled with overlapping windows.
    """
    import numpy as np

    from ml.drift.compare import compare

    rng = np.random.default_rng(seed)
    summary: dict[str, Any] = {}
    for name, pool in pools.items():
        alarms = 0
        per_signal: dict[str, list[float]] = {}
        fired: dict[str, int] = {}
        for _ in range(windows):
            idx = rng.choice(len(pool), size=min(rows, len(pool)), replace=False)
            comparison = compare(pool.iloc[idx].reset_index(drop=True), reference, params)
            alarms += any(s.drifted for s in comparison.signals)
            for s in comparison.signals:
                per_signal.setdefault(s.name, []).append(float(s.score or 0.0))
                fired[s.name] = fired.get(s.name, 0) + int(s.drifted)
        summary[name] = {
            "windows": windows,
            "rows": min(rows, len(pool)),
            "alarm_rate": alarms / windows,
            "signals": {
                k: {
                    "rate": fired[k] / windows,
                    "median": float(np.median(v)),
                    "max": float(np.max(v)),
                }
                for k, v in per_signal.items()
            },
        }
        log.info("%s: data drift in %d/%d windows", name, alarms, windows)
    return summary


def _featured_pools(
    model_dir: str | None, params: DriftParams, *, windows: int, rows: int, seed: int
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Reference and the three populations, with features from MiniLM (or ``model_dir``)."""
    import pandas as pd

    from ml.drift.features import compute_features, encode, score_columns
    from ml.modeling import base_model_path, load_model, load_tokenizer
    from ml.params import load_params
    from ml.settings import REPO_ROOT
    from ml.tables import read_task_table

    task = load_params()
    data, labels = task.data, task.task.labels
    if not data.time_column:
        raise SystemExit(f"task {task.task.name} has no time column to calibrate drift on")
    tweets = read_task_table(REPO_ROOT / data.train, data, training=True)
    time = tweets[data.time_column]
    old = tweets[time.isin(data.train_sources)].sample(frac=1.0, random_state=seed)
    new = tweets[time.isin(data.drift_sources)].sample(frac=1.0, random_state=seed)
    n_ref, n_held = params.reference_size, max(rows * 4, min(windows * rows, 6000))
    frames = {
        "reference": old.iloc[:n_ref],
        "same_period": old.iloc[n_ref : n_ref + n_held],
        "2016": new.iloc[:n_held],
        "out_of_domain": pd.DataFrame({"text": out_of_domain_texts(max(rows * 2, 400), seed)}),
    }
    frames = {
        k: pd.DataFrame({"text": v["text"].astype(str).to_numpy()}) for k, v in frames.items()
    }
    if model_dir:
        model, tok = load_model(model_dir)
    else:
        from sklearn.linear_model import LogisticRegression
        from transformers import AutoModel

        model, tok = AutoModel.from_pretrained(base_model_path()), load_tokenizer()
        fit = old.iloc[n_ref + n_held : n_ref + n_held + 2500]  # the proxy champion's data
        emb, _ = encode(model, tok, fit["text"].tolist(), max_length=params.max_length)
        head = LogisticRegression(max_iter=2000).fit(emb, fit["label"])
        order = [list(head.classes_).index(label) for label in labels]
        for df in frames.values():
            emb, _ = encode(model, tok, df["text"].tolist(), max_length=params.max_length)
            probs = head.predict_proba(emb)[:, order]
            for j, col in enumerate(score_columns(labels)):
                df[col] = probs[:, j]
            df["label"] = [labels[k] for k in probs.argmax(axis=1)]
    featured = {
        k: compute_features(v, model, tok, labels=labels, max_length=params.max_length)
        for k, v in frames.items()
    }
    reference = featured.pop("reference")
    return reference, featured


def main(argv: list[str] | None = None) -> int:
    """Print the alarm rates over random windows as JSON (see the module docstring)."""
    from ml.params import DriftParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=20, help="windows per population")
    parser.add_argument("--rows", type=int, default=300, help="rows per window")
    parser.add_argument("--model", default=None, help="a trained classifier dir (HF format)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = DriftParams.from_params()
    start = time.perf_counter()
    reference, pools = _featured_pools(
        args.model, params, windows=args.windows, rows=args.rows, seed=args.seed
    )
    log.info("features ready in %.0fs", time.perf_counter() - start)
    summary = evaluate_windows(
        reference, pools, params, windows=args.windows, rows=args.rows, seed=args.seed
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["thresholds"] = params.thresholds()
    print(json.dumps(summary, indent=2))  # noqa: T201 - the script's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
