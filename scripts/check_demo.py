"""Check a demo's summary (``$DRIFTLOOP_HOME/demo/summary.json``, written by ``scripts/demo.py``).

    .venv/bin/python -m scripts.check_demo [PATH]

Passes only when the steps are the expected ones, in order, each with its expected outcome
(first model promoted, no drift on same-period traffic, retraining on 2016 traffic, the retrained
model on canary and promoted there, the damaged model kept out by the offline gate and rolled
back on canary; then the second task, emotion: its first model promoted, served by the same
service beside sentiment (503 before its champion, then answers with its four labels while
``/predict`` answers with sentiment's three), drift found in its shifted window and the
retraining that started kept out by the offline gate), and when no task try and no DAG run
failed. Prints one line per check with the expected and the seen value; exits 0 when all hold,
1 when one does not, 2 when the summary cannot be read. Used by CI (``.ci/run``) and
``make demo-check``. Standard library only (and :mod:`ml.lifecycle.outcomes`, itself standard
library only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ml.lifecycle.outcomes import CanaryOutcome, MonitorOutcome, TrainOutcome

REPO = Path(__file__).resolve().parents[1]

EXPECTED_STEPS: tuple[tuple[str, str], ...] = (
    ("first model", TrainOutcome.PROMOTED),
    ("same-period traffic", MonitorOutcome.NO_DRIFT),
    ("2016 traffic", MonitorOutcome.RETRAIN),
    ("retraining", TrainOutcome.CANARY_STARTED),
    ("canary", CanaryOutcome.PROMOTED),
    ("damaged model, offline gate", TrainOutcome.KEPT_CHAMPION),
    ("damaged model, canary", CanaryOutcome.ROLLED_BACK),
    # The second task (params.yaml ``tasks:``) on the same service.
    ("emotion model", TrainOutcome.PROMOTED),
    ("emotion traffic", "served"),
    ("emotion shifted traffic", MonitorOutcome.RETRAIN),
    ("emotion retraining", TrainOutcome.KEPT_CHAMPION),
)
# Each task's labels as params.yaml declares them (in the model's output order; a unit test
# keeps them in step): what the one service's answers for that task must name.
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "sentiment": ("negative", "neutral", "positive"),
    "emotion": ("anger", "joy", "optimism", "sadness"),
}
# Before the second task's first champion, its endpoint answers this (no model yet).
NOT_YET_SERVED = 503


def default_path() -> Path:
    """``$DRIFTLOOP_HOME/demo/summary.json``; ``DRIFTLOOP_HOME`` defaults to the checkout's
    ``.driftloop`` (as in ``ml/settings.py``)."""
    home = os.environ.get("DRIFTLOOP_HOME")
    return (Path(home) if home else REPO / ".driftloop") / "demo" / "summary.json"


def _try_line(t: dict[str, Any]) -> str:
    index = t.get("map_index")
    mapped = f"[{index}]" if isinstance(index, int) and index >= 0 else ""
    return (
        f"{t.get('dag_id')}.{t.get('task_id')}{mapped} try {t.get('try_number')}: "
        f"{t.get('state')} (run {t.get('run_id')})"
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def check(summary: dict[str, Any]) -> tuple[list[str], bool]:
    """The report lines and whether every check holds."""
    lines: list[str] = []
    ok = True

    def line(passed: bool, what: str, expected: str, seen: str) -> None:
        nonlocal ok
        ok = ok and passed
        lines.append(
            f"{'ok  ' if passed else 'FAIL'}  {what:<30} expected {expected:<20} seen {seen}"
        )

    steps = summary.get("steps")
    if not isinstance(steps, list):
        steps = []
        line(False, "steps", "a list", "missing")
    for i, (name, want) in enumerate(EXPECTED_STEPS):
        got = steps[i] if i < len(steps) and isinstance(steps[i], dict) else None
        if got is None:
            line(False, name, want, "(step missing)")
        elif got.get("step") != name:
            line(False, name, want, f"step {got.get('step')!r}: {got.get('outcome')}")
        else:
            line(got.get("outcome") == want, name, want, str(got.get("outcome")))
    # Each drift judgement's Airflow run carries a note linking its review page.
    for step in steps:
        if isinstance(step, dict) and "note" in step:
            note = str(step.get("note") or "")
            line("review.html" in note, f"{step.get('step')}: run note", "links review.html",
                 note.splitlines()[-1][:60] if note else "(no note)")  # fmt: skip
    for extra in steps[len(EXPECTED_STEPS) :]:
        label = extra.get("step") if isinstance(extra, dict) else extra
        line(False, f"unexpected step {label!r}", "(none)", str(extra))

    canary = next((s for s in steps if isinstance(s, dict) and s.get("step") == "canary"), None)
    if canary is not None:
        evidence = canary.get("evidence") or {}
        test, labels = evidence.get("test") or {}, evidence.get("labels") or {}
        shown = bool(test) and test.get("log_wealth_not_worse", 0) >= test.get("bound", 1e9)
        paired = int(labels.get("paired") or 0)
        line(
            shown and paired > 0,
            "canary decided by the test",
            "paired, not worse",
            f"{paired} paired + {labels.get('unpaired')} unpaired labels, log-wealth "
            f"{test.get('log_wealth_not_worse', float('nan')):.2f} vs bound "
            f"{test.get('bound', float('nan')):.2f}",
        )

    served = next(
        (s for s in steps if isinstance(s, dict) and s.get("step") == "emotion traffic"), None
    )
    if served is not None:
        before = served.get("before_champion")
        line(
            before == NOT_YET_SERVED,
            "emotion before its champion",
            f"HTTP {NOT_YET_SERVED}",
            f"HTTP {before}",
        )
        answers = _dict(served.get("answers"))
        for task, labels in TASK_LABELS.items():
            got = _dict(answers.get(task))
            seen, predicted = _list(got.get("labels")), _list(got.get("predicted"))
            passed = (
                got.get("status") == 200
                and sorted(seen) == sorted(labels)
                and bool(predicted)
                and set(predicted) <= set(labels)
            )
            line(
                passed,
                f"{task} answers' labels",
                ", ".join(labels),
                f"HTTP {got.get('status')} {got.get('path')}: {', '.join(map(str, seen))}"
                f" (predicted {', '.join(sorted(set(map(str, predicted))))})",
            )

    tries = summary.get("failed_tries")
    if not isinstance(tries, list):
        line(False, "failed task tries", "none", "not recorded")
    else:
        line(not tries, "failed task tries", "none", str(len(tries)) if tries else "none")
        lines += [f"        {_try_line(t)}" for t in tries if isinstance(t, dict)]

    runs = summary.get("runs")
    if not isinstance(runs, list):
        line(False, "failed DAG runs", "none", "not recorded")
    else:
        failed = [r for r in runs if isinstance(r, dict) and r.get("state") == "failed"]
        line(not failed, "failed DAG runs", "none", str(len(failed)) if failed else "none")
        lines += [f"        {r.get('dag_id')} {r.get('run_id')}" for r in failed]

    if summary.get("error"):
        line(False, "demo error", "none", str(summary["error"])[:200])
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=None, help="the summary.json")
    args = parser.parse_args(argv)
    path: Path = args.path or default_path()
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        sys.stdout.write(f"FAIL  cannot read the demo summary {path}: {exc}\n")
        return 2
    if not isinstance(summary, dict):
        sys.stdout.write(f"FAIL  {path} is not a JSON object\n")
        return 2
    lines, ok = check(summary)
    verdict = "demo check: passed" if ok else "demo check: FAILED"
    sys.stdout.write("\n".join([f"demo summary {path}:", *lines, verdict]) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
