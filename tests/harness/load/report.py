"""The load lab's reports: one ``load_<scenario>.{md,json}`` per scenario and the summary table
``load_faults.md`` over every scenario's latest run, in the results folder."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
RESULTS = Path(os.environ.get("DRIFTLOOP_RESULTS_DIR") or REPO / "benchmarks" / "results")


@dataclass
class ScenarioReport:
    """What a scenario did and what it saw; ``checks`` are (statement, held?) pairs."""

    name: str
    title: str
    did: str
    started_at: str
    seconds: float
    load: dict[str, Any]
    rows: dict[str, Any] = field(default_factory=dict)
    recovery_s: dict[str, float | None] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks)

    def failures(self) -> list[str]:
        return [text for text, ok in self.checks if not ok]

    def to_markdown(self) -> str:
        load = self.load
        lines = [
            f"# {self.title}",
            "",
            f"{self.did}",
            "",
            f"Run {self.started_at}, {self.seconds:.0f} s, on {machine()['summary']}. "
            f"Result: **{'passed' if self.passed else 'FAILED'}**.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| requests sent | {load['requests']} (skipped slots: {load.get('skipped', 0)}) |",
            f"| answered (200) | {load['answered']} |",
            f"| 5xx | {load['errors_5xx']} |",
            f"| 4xx | {load['errors_4xx']} |",
            f"| no response (refused/timed out) | {load['no_response']} |",
            f"| predictions made | {load['predictions']} |",
            f"| answered by version | {load['versions']} |",
            f"| latency p50 / p95 / p99 | {load['p50_ms']} / {load['p95_ms']} / "
            f"{load['p99_ms']} ms |",
        ]
        for key, value in self.rows.items():
            lines.append(f"| log: {key.replace('_', ' ')} | {value} |")
        for key, value in self.recovery_s.items():
            shown = "n/a" if value is None else f"{value:.2f} s"
            lines.append(f"| recovery: {key} | {shown} |")
        for key, value in self.memory.items():
            lines.append(f"| memory: {key.replace('_', ' ')} | {value} |")
        lines += ["", "Checks:", ""]
        lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in self.checks]
        if self.events:
            lines += ["", "Timeline (s since the load started):", ""]
            lines += [f"- {at:7.2f} {what}" for at, what in self.events]
        if self.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "machine": machine()}


def machine() -> dict[str, Any]:
    cores = os.cpu_count() or 0
    return {
        "cpus": cores,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "summary": f"{cores} CPU cores, {platform.system()} (loopback only)",
    }


def write_report(report: ScenarioReport, results: Path = RESULTS) -> Path:
    """``load_<name>.md`` and ``.json``, then the summary over every scenario's latest json."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"load_{report.name}.md"
    path.write_text(report.to_markdown())
    (results / f"load_{report.name}.json").write_text(
        json.dumps(report.to_dict(), indent=2, default=str) + "\n"
    )
    write_summary(results)
    return path


def write_summary(results: Path = RESULTS) -> Path:
    rows = []
    for path in sorted(results.glob("load_*.json")):
        data = json.loads(path.read_text())
        load = data["load"]
        rec = "; ".join(
            f"{k} {'n/a' if v is None else f'{v:.1f} s'}" for k, v in data["recovery_s"].items()
        )
        logged = data["rows"].get("logged", "-")
        rows.append(
            f"| [{data['name']}](load_{data['name']}.md) | {data['seconds']:.0f} s | "
            f"{load['requests']} | {load['errors_5xx']} | {load['no_response']} | "
            f"{load['predictions']} | {logged} | {data['rows'].get('missing', '-')} | "
            f"{rec or '-'} | {'passed' if data['passed'] else 'FAILED'} |"
        )
    text = "\n".join(
        [
            "# Load and fault tests of the serving stack",
            "",
            "Written by `python -m tests.harness.load` (`make load-test`; bounded versions run "
            "in `make test` via `tests/integration/test_load_faults.py`). One row per scenario, "
            "its latest run.",
            "",
            "| scenario | length | requests | 5xx | no response | predictions | logged | "
            "missing | recovery | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    path = results / "load_faults.md"
    path.write_text(text)
    return path
