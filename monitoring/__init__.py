"""Monitoring: the Evidently workspace that keeps every drift report, and threshold calibration.

The drift computation itself is :mod:`ml.drift`; ``monitoring/README.md`` says what each signal
means and how its threshold was chosen.
"""
