"""Error rates of drift's quality signal, by simulation through the real code.

For each task a synthetic champion answers with fixed per-class recalls (errors spread evenly
over the other labels), on the class mix of the task's validation table. As in production, the
value a window is held to is the champion's metric on that validation table, so it is noisy too
(374 rows for emotion). Windows of ``n`` feedback labels are then drawn

- from the same champion: a firing is a **false alarm**;
- from a degraded one (each class's recall times ``--degrade``): a firing is a **detection**.

Each window is judged by :func:`ml.drift.quality.quality_signal` with the ``drift:`` settings of
params.yaml (drop > ``quality_drop`` and the bootstrap bound below the reference), on the task's
``promotion.metric``. Writes ``benchmarks/results/quality_alarms.{json,md}``.
Usage: ``python -m benchmarks.quality_alarms [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.drift.quality import quality_signal
from ml.metrics import METRICS, label_codes
from ml.params import DriftParams, load_params

RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = (100, 300, 1000)

# Class counts of each task's validation table (data/val.tsv, data/emotion/val.tsv), and a
# champion's per-class recall of the size the demo's models reach.
TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "val": {"negative": 312, "neutral": 869, "positive": 819},
        "recall": {"negative": 0.55, "neutral": 0.75, "positive": 0.70},
    },
    "emotion": {
        "val": {"anger": 160, "joy": 97, "optimism": 28, "sadness": 89},
        "recall": {"anger": 0.80, "joy": 0.75, "optimism": 0.35, "sadness": 0.65},
    },
}


def answers(rng: np.random.Generator, truth: np.ndarray, recall: np.ndarray, k: int) -> np.ndarray:
    """Predicted class codes: right with the class's recall, else another class at random."""
    right = rng.random(len(truth)) < recall[truth]
    other = (truth + rng.integers(1, k, len(truth))) % k
    return np.where(right, truth, other)


def draw(rng: np.random.Generator, shares: np.ndarray, recall: np.ndarray, n: int) -> np.ndarray:
    truth = rng.choice(len(shares), n, p=shares)
    return np.stack([truth, answers(rng, truth, recall, len(shares))])


def simulate(task: str, runs: int, degrade: float, dp: DriftParams, seed: int) -> dict[str, Any]:
    spec = TASKS[task]
    params = load_params(task=task)
    metric = params.promotion.metric
    labels = np.array(params.task.labels)
    counts = np.array([spec["val"][label] for label in labels], dtype=float)
    shares = counts / counts.sum()
    recall = np.array([spec["recall"][label] for label in labels])
    rng = np.random.default_rng(seed)
    score = METRICS[metric]

    def population(r: np.ndarray) -> float:
        t, p = draw(rng, shares, r, 200_000)
        return score(*label_codes(labels[t].tolist(), labels[p].tolist()))

    rows: list[dict[str, Any]] = []
    for n in WINDOWS:
        fired = {"same": 0, "degraded": 0}
        for _ in range(runs):
            # The reference: the champion scored on a validation table of the task's size.
            t, p = draw(rng, shares, recall, int(counts.sum()))
            held_to = score(*label_codes(labels[t].tolist(), labels[p].tolist()))
            for case, r in (("same", recall), ("degraded", recall * degrade)):
                t, p = draw(rng, shares, r, n)
                window = pd.DataFrame({"true_label": labels[t], "label": labels[p]})
                signal, _ = quality_signal(window, held_to, dp, metric=metric)
                fired[case] += signal.drifted
        rows.append(
            {
                "feedback_labels": n,
                "false_alarm_rate": fired["same"] / runs,
                "detection_rate": fired["degraded"] / runs,
            }
        )
    return {
        "task": task,
        "metric": metric,
        "validation_rows": int(counts.sum()),
        "champion": round(population(recall), 4),
        "degraded": round(population(recall * degrade), 4),
        "windows": rows,
    }


def markdown(results: list[dict[str, Any]], runs: int, dp: DriftParams, seconds: float) -> str:
    lines = [
        "# Drift's quality signal: false alarms and detections, simulated",
        "",
        f"`python -m benchmarks.quality_alarms --runs {runs}` ({seconds:.0f} s). Each cell is "
        f"{runs} windows judged by `ml.drift.quality.quality_signal` (fires when the drop is "
        f"> {dp.quality_drop} and the {dp.quality_confidence:.0%} bootstrap bound is below the "
        "reference), the reference re-measured for each window on a validation table of the "
        "task's size. The champion's per-class recalls and the degraded model's are in "
        "`benchmarks/quality_alarms.py`.",
        "",
        "| task | metric | champion (true) | degraded (true) | feedback labels "
        "| false alarms | detections |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for w in r["windows"]:
            lines.append(
                f"| {r['task']} | {r['metric']} | {r['champion']:.3f} | {r['degraded']:.3f} | "
                f"{w['feedback_labels']} | {w['false_alarm_rate']:.1%} | "
                f"{w['detection_rate']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--degrade", type=float, default=0.85, help="recall factor, degraded")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    dp = DriftParams.from_params(load_params())
    start = time.perf_counter()
    results = [
        simulate(task, args.runs, args.degrade, dp, args.seed + i) for i, task in enumerate(TASKS)
    ]
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"runs": args.runs, "degrade": args.degrade, "seconds": seconds, "results": results}
    (args.out / "quality_alarms.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(results, args.runs, dp, seconds)
    (args.out / "quality_alarms.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
