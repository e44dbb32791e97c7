"""The one spelling of the command that serves the sentiment service (``bentoml serve ...``).

``driftloop serve``, the demo, the test harness and the benchmarks all start the service with
:func:`serve_argv`; ``ml`` only names the command here, it never imports bentoml.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

SERVICE_TARGET = "bentos.sentiment.service:SentimentService"


def bentoml_executable() -> Path:
    """The ``bentoml`` command of this interpreter's environment (beside ``python``)."""
    return Path(sys.executable).with_name("bentoml")


def serve_argv(
    target: str = SERVICE_TARGET, *, host: str, port: int, extra: Sequence[str] = ()
) -> list[str]:
    """The argv of ``bentoml serve TARGET --host HOST --port PORT [EXTRA...]``.

    Args:
        target: the service (``module:Class``) or a built bento's tag.
        host: the interface to bind.
        port: the HTTP port.
        extra: further ``bentoml serve`` options, appended as given.
    """
    return [
        str(bentoml_executable()),
        "serve",
        target,
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]
