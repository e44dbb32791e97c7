"""Speed measurements against baselines measured in the same run.

Run as modules from the repository root: ``python -m benchmarks.serve_bench``.
"""
