"""driftloop's Prometheus metrics, served on BentoML's ``/metrics`` next to BentoML's own.

Created on first use, never on import: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker
after the service module is imported, and ``prometheus_client`` must see it when a metric is made.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """The counters and histograms the service updates."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.predictions = Counter(
            "driftloop_predictions",
            "Predictions served, by task, label and model version",
            ["task", "label", "model_version"],
        )
        self.latency = Histogram(
            "driftloop_request_latency_seconds",
            "Time spent in a driftloop endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_texts = Histogram(
            "driftloop_batch_size",
            "Texts per inference batch run",
            buckets=BATCH_BUCKETS,
        )
        self.batch_requests = Histogram(
            "driftloop_batch_requests",
            "Requests gathered into one inference batch run",
            buckets=BATCH_BUCKETS,
        )
        self.inference = Histogram(
            "driftloop_inference_seconds",
            "Time of one inference batch run",
            buckets=LATENCY_BUCKETS,
        )
        self.cache = Counter(
            "driftloop_cache_lookups",
            "Prediction cache lookups, by task and result",
            ["task", "result"],
        )
        self.errors = Counter(
            "driftloop_errors",
            "Requests answered with an error, by endpoint (predict, feedback, admin; http for "
            "requests the HTTP boundary refused), status and reason",
            ["endpoint", "status", "reason"],
        )
        self.feedback_conflicts = Counter(
            "driftloop_feedback_conflicts",
            "Labels refused (409) because the request id already has a different label",
        )
        self.inference_errors = Counter(
            "driftloop_inference_errors",
            "Requests whose inference failed, by task and model version",
            ["task", "model_version"],
        )
        self.swaps = Counter(
            "driftloop_model_swaps",
            "Model versions swapped in, by alias",
            ["alias"],
        )
        self.load_failures = Counter(
            "driftloop_model_load_failures",
            "Model versions that failed to load",
        )
        self.canary_share = Gauge(
            "driftloop_canary_share",
            "Share of a task's requests routed to its challenger",
            ["task"],
            multiprocess_mode="mostrecent",
        )
        self.shadow_scored = Counter(
            "driftloop_shadow_scored",
            "Canary texts also scored in shadow by the model that did not answer them",
        )
        self.shadow_dropped = Counter(
            "driftloop_shadow_dropped",
            "Canary texts sampled for shadow scoring but not scored, by reason "
            "(queue_full, not_loaded, failed)",
            ["reason"],
        )

        # Sampled every few seconds by ServiceMetrics.sample (the service's state thread), for
        # monitoring/prometheus/alerts.yml: readiness, admission and the prediction log.
        self.ready = Gauge(
            "driftloop_ready",
            "1 while a model can answer (what /readyz says), else 0",
            multiprocess_mode="mostrecent",
        )
        self.queue_texts = Gauge(
            "driftloop_queue_texts",
            "Texts admitted to inference and not yet answered",
            multiprocess_mode="mostrecent",
        )
        self.queue_limit = Gauge(
            "driftloop_queue_limit_texts",
            "Admission bound in texts (serve.max_queue_texts); beyond it /predict answers 503",
            multiprocess_mode="mostrecent",
        )
        self.predlog_pending = Gauge(
            "driftloop_predlog_pending_rows",
            "Prediction-log rows waiting in memory for the database",
            multiprocess_mode="mostrecent",
        )
        self.predlog_spooled = Gauge(
            "driftloop_predlog_spooled_rows",
            "Prediction-log rows spooled on disk while the database was unreachable",
            multiprocess_mode="mostrecent",
        )

    def sample(
        self, *, ready: bool, queue_texts: int, queue_limit: int, pending: int, spooled: int
    ) -> None:
        """Set the state gauges."""
        self.ready.set(1 if ready else 0)
        self.queue_texts.set(queue_texts)
        self.queue_limit.set(queue_limit)
        self.predlog_pending.set(pending)
        self.predlog_spooled.set(spooled)

    def error(self, endpoint: str, status: int, reason: str) -> None:
        self.errors.labels(endpoint=endpoint, status=str(status), reason=reason).inc()

    def observe_batch(self, stats: Any) -> None:
        self.batch_texts.observe(stats.texts)
        self.batch_requests.observe(stats.requests)
        self.inference.observe(stats.seconds)

    def shadow_drop(self, reason: str, texts: int) -> None:
        self.shadow_dropped.labels(reason=reason).inc(texts)


@lru_cache(maxsize=1)
def service_metrics() -> ServiceMetrics:
    """The process's metrics, made once."""
    return ServiceMetrics()
