"""What operators watch: Prometheus, Grafana and statsd configuration, and drift calibration.

``python -m monitoring.calibrate`` checks the drift thresholds; the drift reports themselves are
:mod:`ml.drift` (monitoring imports ml, never the other way round). See ``docs/drift.md``.
"""
