"""Helpers for tests that run servers of their own (imported by test modules, not a fixture file).

:class:`PrivateServices` is a PostgreSQL and a Redis server private to one test module
(:class:`tests.harness.native_stack.LocalServers`), so outage tests can stop and restart them
without touching the session's shared servers.

:func:`servers_missing` is the one policy for a server binary that is not installed, used by every
test that starts PostgreSQL or Redis (``conftest.py``, :class:`PrivateServices`,
``test_load_faults.py``): the test fails, naming the command that installs them, unless
``DRIFTLOOP_ALLOW_MISSING_SERVICES=1`` asks for a skip instead (``make test-fast`` sets it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from scripts import procs
from tests.harness.native_stack import LocalServers, ServersMissing

ALLOW_MISSING_SERVICES = "DRIFTLOOP_ALLOW_MISSING_SERVICES"
INSTALL_COMMAND = "make services-install"  # = bash scripts/services.sh install (as root or sudo)


def allow_missing_services() -> bool:
    """Whether ``DRIFTLOOP_ALLOW_MISSING_SERVICES=1`` asks to skip, not fail, without servers."""
    return os.environ.get(ALLOW_MISSING_SERVICES, "").strip().lower() in {"1", "true", "yes"}


def servers_missing(detail: str, what: str = "PostgreSQL or Redis") -> NoReturn:
    """Fail the test because a server binary is missing; skip it only when asked to.

    The one place where that policy lives: a missing package must never pass for a test that
    was skipped, unless ``DRIFTLOOP_ALLOW_MISSING_SERVICES=1`` says so.
    """
    install = f"`{INSTALL_COMMAND}` (`bash scripts/services.sh install`, as root or with sudo)"
    tail = f":\n{detail.strip()}" if detail.strip() else ""
    if allow_missing_services():
        pytest.skip(f"{what} is not installed ({ALLOW_MISSING_SERVICES}=1); {install}{tail}")
    pytest.fail(
        f"{what} is not installed here: run {install}, "
        f"or set {ALLOW_MISSING_SERVICES}=1 to skip the tests that need it{tail}",
        pytrace=False,
    )


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (:func:`scripts.procs.wait_for`, no
    exception taken for "not yet"); fail the test after ``timeout``."""
    try:
        return procs.wait_for(condition, what, timeout, every, retry_on=())
    except TimeoutError as exc:
        pytest.fail(str(exc))


class PrivateServices(LocalServers):
    """:class:`LocalServers` that fails the test where the binaries are missing
    (:func:`servers_missing`: a skip only with ``DRIFTLOOP_ALLOW_MISSING_SERVICES=1``)."""

    def run(self, command: str) -> None:
        try:
            super().run(command)
        except ServersMissing as exc:
            servers_missing(str(exc))
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
