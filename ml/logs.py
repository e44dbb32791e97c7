"""Process-wide logging: one handler on the root logger, as text or as JSON lines.

The CLI and the service call :func:`configure` once at start-up (Airflow task processes keep
Airflow's own handlers: it records their stderr at ERROR). The format comes from
``DRIFTLOOP_LOG_FORMAT`` (``text`` or ``json``, see :class:`ml.settings.Settings`).
A JSON line is one ``json.dumps`` of the record, so a newline in a message can never start a
forged line. See docs/cli.md ("Logs").
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal, get_args

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_DATEFMT = "%H:%M:%S"

# Libraries that log at INFO on every call; kept at WARNING so driftloop's own lines stand out.
NOISY = (
    "great_expectations",
    "mlflow",
    "alembic",
    "urllib3",
    "httpx",
    "git",
    "filelock",
    "matplotlib",
    "PIL",
    "asyncio",
    "sqlalchemy",
    "fsspec",
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_KEYS = ("ts", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC), level, logger, message, extras.

    ``exc_info`` and ``stack_info`` become strings when present. Values JSON cannot encode are
    written with ``str()``; an ``extra`` key never overwrites one of the four core keys.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _CORE_KEYS:
                doc[key] = value
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class _DriftloopHandler(logging.StreamHandler[IO[str]]):
    """The handler :func:`configure` installs (a type of its own, so a second call finds it)."""


def configure(
    verbose: bool = False, fmt: str | None = None, *, stream: IO[str] | None = None
) -> None:
    """Send every log record to ``stream`` (stderr) in one format, at INFO (DEBUG if verbose).

    Replaces the root logger's handlers with one driftloop handler, so calling it again (a
    reloaded worker, tests) changes the format instead of doubling the lines.

    Args:
        verbose: Log at DEBUG instead of INFO.
        fmt: ``"text"`` or ``"json"``; None reads ``DRIFTLOOP_LOG_FORMAT`` through the settings.
        stream: Where lines go; stderr by default (stdout is kept for results).

    Raises:
        ValueError: ``fmt`` is neither ``text`` nor ``json``.
    """
    if fmt is None:
        from ml.settings import get_settings

        fmt = get_settings().log_format
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = _DriftloopHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _DriftloopHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY:
        noisy = logging.getLogger(name)
        noisy.setLevel(logging.WARNING)
        # MLflow gives its logger a handler of its own and stops it propagating, so its
        # warnings would bypass the format: they go through the root handler instead.
        for own in list(noisy.handlers):
            noisy.removeHandler(own)
        noisy.propagate = True
