"""The load and fault lab of the serving stack: steady open-loop load, faults injected under it,
a report per scenario. ``python -m tests.harness.load`` (``make load-test``) runs it at length,
``tests/integration/test_load_faults.py`` bounded. See docs/load-and-faults.md.
"""
