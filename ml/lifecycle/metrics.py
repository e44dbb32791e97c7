"""The loop's metrics for the Grafana loop panels, sent to StatsD (``driftloop.<name>``).

Off unless ``DRIFTLOOP_STATSD_HOST`` is set; UDP, fire and forget, so a missing exporter never
fails the loop. DogStatsD-style tags become Prometheus labels in the statsd-exporter.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from ml.settings import get_settings

log = logging.getLogger(__name__)


def emit_metric(name: str, value: float, *, kind: str = "gauge", **labels: str) -> None:
    """Send one loop metric to StatsD (``driftloop.<name>``) if a StatsD host is configured."""
    settings = get_settings()
    if not settings.statsd_host:
        return
    tags = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    line = (
        f"driftloop.{name}{',' + tags if tags else ''}:{value}|{'c' if kind == 'counter' else 'g'}"
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(line.encode(), (settings.statsd_host, settings.statsd_port))
    except OSError as exc:
        log.debug("statsd %s unreachable: %s", settings.statsd_host, exc)


def emit_drift_metrics(drift: dict[str, Any]) -> None:
    """Drift scores per signal and the verdict, for the Grafana loop panels."""
    for signal in drift.get("signals", []):
        if signal.get("score") is not None:
            emit_metric("drift_score", float(signal["score"]), feature=signal["name"])
    emit_metric("drift_detected", 1.0 if drift.get("drift_detected") else 0.0)
    # monitoring/prometheus/alerts.yml fires when this is older than twice drift.schedule.
    emit_metric("drift_last_run_timestamp_seconds", round(time.time(), 3))
