"""The alert rules (monitoring/prometheus/alerts.yml): valid, unit-tested by promtool, and about
metrics that exist.

``promtool`` comes with Debian's ``prometheus`` package (``make services-install``). Firing on a
real stopped service: tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml.params import load_params
from tests.harness.servers import servers_missing
from tests.unit.test_compose import known_metrics

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
# What operators are paged or warned about (issue 13's list), by alert name.
EXPECTED = {
    "DriftloopServiceDown",
    "DriftloopServiceNotReady",
    "DriftloopHigh5xxRate",
    "DriftloopShedding",
    "DriftloopHighLatency",
    "DriftloopAdmissionSaturated",
    "DriftloopPredictionLogBacklog",
    "DriftloopPredictionLogSpooling",
    "DriftloopDriftDetected",
    "DriftloopCanaryRolledBack",
    "DriftloopTrainModelFailed",
    "DriftloopMonitorStale",
}
SCHEDULE_SECONDS = {"@hourly": 3600, "@daily": 86400, "@weekly": 7 * 86400}
PROMQL_WORDS = {
    "sum", "max", "min", "by", "on", "or", "and", "rate", "increase", "time", "absent",
    "clamp_min", "histogram_quantile", "le", "job", "instance", "endpoint", "http_response_code",
    "dag_id", "state", "reason", "humanizePercentage", "humanizeDuration",
}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        servers_missing("promtool not found", "Prometheus (Debian's prometheus package)")
    return path


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS_DIR,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_there_and_fires_in_a_unit_test() -> None:
    names = {r["alert"] for r in rules()}
    assert names == EXPECTED
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        t["alertname"] for case in cases for t in case["alert_rule_test"] if t.get("exp_alerts")
    }
    quiet = {
        t["alertname"] for case in cases for t in case["alert_rule_test"] if not t.get("exp_alerts")
    }
    assert fired == EXPECTED, f"never seen firing: {EXPECTED - fired}"
    assert quiet == EXPECTED, f"never seen quiet: {EXPECTED - quiet}"


def test_rules_name_only_metrics_that_are_exported() -> None:
    known = known_metrics() | {"process_start_time_seconds"}  # Prometheus's own
    for rule in rules():
        expr = re.sub(r"\b\d[\w.+-]*", " ", rule["expr"])
        expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr):
            if word in PROMQL_WORDS:
                continue
            assert word in known, f"{rule['alert']} names {word!r}, which nothing exports"


def test_the_stale_monitor_alert_follows_the_drift_schedule() -> None:
    schedule = load_params().drift.schedule
    assert schedule in SCHEDULE_SECONDS, f"add {schedule!r} here and to the rule"
    (rule,) = [r for r in rules() if r["alert"] == "DriftloopMonitorStale"]
    limits = {int(x) for x in re.findall(r"> (\d+)\)", rule["expr"])}
    assert limits == {2 * SCHEDULE_SECONDS[schedule]}


def test_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    out = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_each_alert_says_what_and_how_bad(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"page", "warn", "info"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
