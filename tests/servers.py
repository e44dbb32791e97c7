"""Helpers for tests that run servers of their own (imported by test modules, not a fixture file).

:class:`PrivateServices` is a PostgreSQL and a Redis server private to one test module
(:class:`scripts.native_stack.LocalServers`), so outage tests can stop and restart them without
touching the session's shared servers.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts.airflow_api import terminate_group  # noqa: E402
from scripts.native_stack import LocalServers, ServersMissing, free_port  # noqa: E402

__all__ = ["PrivateServices", "free_port", "terminate_group", "wait_for"]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class PrivateServices(LocalServers):
    """:class:`LocalServers` that skips the test where the binaries are missing (fails in CI)."""

    def run(self, command: str) -> None:
        try:
            super().run(command)
        except ServersMissing as exc:
            if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
                pytest.fail(f"PostgreSQL or Redis is not installed: {exc}", pytrace=False)
            pytest.skip(f"PostgreSQL or Redis is not installed here: {exc}")
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
