"""Drift monitoring: is production traffic still what the champion was trained on?

Features, window, reference, compare, quality and the report each have their module; the
design note is ``docs/drift.md``.
"""

from ml.drift.report import list_reports, run_drift
from ml.drift.result import DriftError, DriftResult
from ml.drift.window import window_bounds

__all__ = ["DriftError", "DriftResult", "list_reports", "run_drift", "window_bounds"]
