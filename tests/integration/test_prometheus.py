"""Debian's Prometheus against a real ``bentoml serve``, with monitoring/prometheus/alerts.yml.

Prometheus scrapes the service every second. After some traffic, every Grafana dashboard query
about the service (its own metrics and BentoML's) returns data; then the service is stopped and
``DriftloopServiceDown`` fires, after its ``for: 1m``. The dashboard's loop and Airflow panels
read statsd-exporter, which Debian does not package: they are checked by name only
(tests/unit/test_compose.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from scripts.procs import free_port, start_service, terminate_group, wait_http_ok
from tests.harness.servers import servers_missing, wait_for
from tests.unit.test_compose import (
    BENTOML_METRICS,
    DASHBOARD,
    dashboard_queries,
    promql_metric_names,
    service_metric_names,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus" / "alerts.yml"
# Grafana's variables, as the dashboard would fill them in.
VARIABLES = {"$__rate_interval": "30s", "$__range": "1h", "$model_version": ".*"}


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr}: {exc.read().decode(errors='replace')}") from None
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def firing(base: str) -> set[str]:
    with urllib.request.urlopen(f"{base}/api/v1/alerts", timeout=10) as resp:
        alerts = json.load(resp)["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def service_queries() -> list[tuple[str, str]]:
    """The dashboard's queries that read only what the service exports."""
    ours = service_metric_names() | BENTOML_METRICS | {"up"}
    dashboard = json.loads(DASHBOARD.read_text())
    picked = []
    for title, expr in dashboard_queries(dashboard):
        names = promql_metric_names(expr)
        if names and names <= ours:
            # A template variable's label_values(metric, label): Grafana's, not PromQL.
            expr = re.sub(r"^label_values\((\w+), (\w+)\)$", r"group by (\2) (\1)", expr)
            for key, value in VARIABLES.items():
                expr = expr.replace(key, value)
            picked.append((title, expr))
    return picked


def test_dashboard_queries_return_data_and_a_stopped_service_fires(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        servers_missing("prometheus not found", "Prometheus (Debian's prometheus package)")
    from ml import registry
    from ml.settings import get_settings

    env = {
        "DRIFTLOOP_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "DRIFTLOOP_RATE_LIMIT": "0",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DRIFTLOOP_API_KEYS", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    version = registry.register_model_dir(tiny_model_dir, reason="prometheus test")
    registry.set_alias("champion", version.version, actor="test", reason="first")

    port, prom_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "sentiment",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    service = start_service(
        port,
        env={**{k: v for k, v in os.environ.items() if k != "DRIFTLOOP_API_KEYS"}, **env},
        log_path=tmp_path / "serve.log",
    )
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{prom_port}"
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(
            f"{url}/readyz", "the service", 240, proc=service, log_path=tmp_path / "serve.log"
        )
        wait_http_ok(
            f"{base}/-/ready", "prometheus", 60, proc=prom, log_path=tmp_path / "prometheus.log"
        )
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(30):
                resp = client.post("/predict", json={"texts": [f"tweet number {i}", "same text"]})
                assert resp.status_code == 200, resp.text
            rid = resp.json()["predictions"][0]["request_id"]
            assert (
                client.post("/feedback", json={"request_id": rid, "label": "neutral"}).status_code
                == 200
            )
            assert client.post("/predict", json={"texts": []}).status_code == 422  # an error series

        queries = service_queries()
        assert len(queries) >= 15, queries
        wait_for(
            lambda: query(base, "driftloop_ready") and query(base, "driftloop_predictions_total"),
            60,
            "first scrapes",
        )
        time.sleep(3)  # two more scrapes, so rate() has two points of every series

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in queries if not query(base, expr)]

        try:
            wait_for(lambda: not empty(), 60, "every dashboard query about the service has data")
        except (AssertionError, TimeoutError):
            pytest.fail("dashboard queries without data:\n" + "\n".join(empty()), pytrace=False)
        assert query(base, "driftloop_ready")[0]["value"][1] == "1"
        assert "DriftloopServiceDown" not in firing(base)

        # Timed from the start of the stop: the service may refuse scrapes before its shutdown
        # returns, and `for: 1m` counts from the first refused scrape.
        stopped = time.monotonic()
        terminate_group(service, timeout=30)
        wait_for(
            lambda: "DriftloopServiceDown" in firing(base), 150, "DriftloopServiceDown to fire"
        )
        assert time.monotonic() - stopped >= 55  # its `for: 1m` held it back until then
    finally:
        terminate_group(service, timeout=30)
        prom.terminate()
        prom.wait(timeout=30)
        prom_log.close()
        get_settings.cache_clear()
