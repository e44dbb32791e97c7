"""Create or upgrade driftloop's stores exactly once, whichever process opens them first.

MLflow's backend and driftloop's own tables are initialised under a cross-process lock (a file
lock beside a SQLite file, an advisory lock on PostgreSQL), SQLite files run in WAL mode with a
busy timeout, and a store left half-migrated is refused with the command that repairs it.
Design and the race this closes: ``docs/stores.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from ml.settings import Settings

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
REPAIR_COMMAND = "driftloop setup --repair"
_LEFTOVER_PREFIX = "_alembic_tmp_"
_ready: set[str] = set()
_ready_lock = threading.Lock()
_pragmas_installed = False


class StoreError(RuntimeError):
    """A store cannot be used as it is; the message names the file and the command to run."""


@dataclass(frozen=True)
class StoreStatus:
    """What :func:`init_all` did to one store."""

    name: str
    url: str
    state: str  # "created", "upgraded", "ready", "repaired"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "url": self.url, "state": self.state}


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL, or None for any other backend (or in-memory)."""
    if not url.startswith("sqlite"):
        return None
    database = sa.engine.make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def store_exists(url: str) -> bool:
    """False only when ``url`` is a SQLite file that nobody has created yet.

    Used to end scheduled runs with nothing to judge without creating (and migrating) a store
    they do not need. Servers (PostgreSQL, an MLflow tracking server) are assumed to exist.
    """
    path = sqlite_path(url)
    return path is None or (path.is_file() and path.stat().st_size > 0)


def _install_sqlite_pragmas() -> None:
    """Every SQLite connection of this process waits for locks instead of failing at once."""
    global _pragmas_installed
    if _pragmas_installed:
        return

    @sa.event.listens_for(sa.engine.Engine, "connect")
    def _busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            dbapi_connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    _pragmas_installed = True


@contextlib.contextmanager
def init_lock(url: str) -> Iterator[None]:
    """Hold the cross-process lock that guards the first initialisation of the store at ``url``.

    SQLite: ``flock`` on ``<file>.init.lock`` beside the database. PostgreSQL: a session-level
    advisory lock in that database. Anything else (an HTTP tracking server): no lock here.
    """
    path = sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        # No folder, no database: opening it fails as it would have without us (a caller that
        # owns the folder, driftloop's home, creates it first: see _make_home_folder).
        yield
        return
    if path is not None:
        with open(path.with_name(path.name + ".init.lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if url.startswith(("postgresql", "postgres://")):
        from ml.db import normalise_url

        key = int.from_bytes(hashlib.sha256(b"driftloop-init").digest()[:8], "big", signed=True)
        engine = sa.create_engine(normalise_url(url), poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        finally:
            engine.dispose()
        return
    yield


def _make_home_folder(url: str) -> None:
    """Create the folder of a SQLite file that lives in driftloop's home (ours to create)."""
    from ml.settings import get_settings

    path = sqlite_path(url)
    if path is not None and path.resolve().is_relative_to(get_settings().home.resolve()):
        path.parent.mkdir(parents=True, exist_ok=True)


def set_wal(url: str) -> None:
    """Put a SQLite file in WAL mode (persistent), so readers never block the writer."""
    path = sqlite_path(url)
    if path is None:
        return
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:  # busy past the timeout: the next opener retries
        log.warning("could not put %s in WAL mode yet: %s", path, exc)


def leftover_tables(url: str) -> list[str]:
    """Tables a migration that was cut short left behind (``_alembic_tmp_*``)."""
    path = sqlite_path(url)
    if path is None or not path.is_file():
        return []
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return sorted(r[0] for r in rows if r[0].startswith(_LEFTOVER_PREFIX))


def _half_migrated_error(url: str, leftovers: list[str]) -> StoreError:
    return StoreError(
        f"the MLflow store {sqlite_path(url)} was left half-migrated (leftover tables "
        f"{', '.join(leftovers)}: two processes migrated it at once, or a migration was cut "
        f"short). Stop everything that uses it and run `{REPAIR_COMMAND}` (a backup is kept)."
    )


def _open_mlflow(url: str, artifact_root: str | None) -> str:
    """Create or verify MLflow's schema; return 'created' or 'ready'. Call under the lock."""
    from mlflow.store.db.utils import _all_tables_exist, create_sqlalchemy_engine_with_retry
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    leftovers = leftover_tables(url)
    if leftovers:
        raise _half_migrated_error(url, leftovers)
    engine = create_sqlalchemy_engine_with_retry(url)
    try:
        fresh = not _all_tables_exist(engine)
    finally:
        engine.dispose()
    try:
        SqlAlchemyStore(url, artifact_root or "./mlruns")
    except Exception as exc:
        if "out-of-date database schema" in str(exc):
            raise StoreError(
                f"the MLflow store {url} has an older schema than this MLflow: "
                "run `make setup` (or `driftloop setup`) to upgrade it"
            ) from exc
        raise
    return "created" if fresh else "ready"


def _artifact_root(settings: Settings) -> str | None:
    if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        return None
    return settings.artifact_root.resolve().as_uri()


def ensure_mlflow_store(settings: Settings) -> None:
    """Make sure MLflow's backend store is whole before this process uses it (once per process).

    A fresh store is created under :func:`init_lock`, so concurrent first users wait for one
    migration instead of running several. A tracking server needs nothing from us.
    """
    url = settings.mlflow_tracking_uri
    if url in _ready or url.startswith(("http://", "https://", "file:")):
        return
    with _ready_lock:
        if url in _ready:
            return
        _install_sqlite_pragmas()
        _make_home_folder(url)
        with init_lock(url):
            _open_mlflow(url, _artifact_root(settings))
            set_wal(url)
        _ready.add(url)


def _upgrade_mlflow(url: str) -> str:
    """Bring an existing MLflow store to the newest schema (a SQLite file is backed up first)."""
    from mlflow.store.db.utils import (
        _all_tables_exist,
        _get_latest_schema_revision,
        _get_schema_version,
        _upgrade_db,
        create_sqlalchemy_engine_with_retry,
    )

    engine = create_sqlalchemy_engine_with_retry(url)
    try:
        if not _all_tables_exist(engine):  # not an MLflow store yet: opening it creates one
            return "ready"
        if _get_schema_version(engine) == _get_latest_schema_revision():
            return "ready"
        path = sqlite_path(url)
        if path is not None:
            backup = _backup(path, "pre-upgrade")
            log.info("backed up %s to %s before upgrading it", path, backup)
        _upgrade_db(engine)
    finally:
        engine.dispose()
    return "upgraded"


def _backup(path: Path, why: str) -> Path:
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.{why}-{stamp}")
    import sqlite3

    with (
        contextlib.closing(sqlite3.connect(path)) as src,
        contextlib.closing(sqlite3.connect(backup)) as dst,
    ):
        src.backup(dst)
    return backup


def _holds_data(path: Path) -> bool:
    """Whether a SQLite MLflow store holds anything a user made (runs or registered models)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in ("runs", "registered_models", "model_versions", "logged_models"):
            if table in tables and conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]:
                return True
    return False


def repair_mlflow(settings: Settings) -> str:
    """Repair a half-migrated SQLite MLflow store; nothing it held is lost.

    On a copy: leftover ``_alembic_tmp_*`` tables are dropped where their table still exists
    (a partial copy) or renamed back where it does not, then the migrations run to the head.
    Only a copy that opens cleanly replaces the store; the original is kept beside it. A store
    holding no runs and no models (the fresh-home race) that still fails is created anew.
    """
    url = settings.mlflow_tracking_uri
    path = sqlite_path(url)
    if path is None or not leftover_tables(url):
        return "ready"
    import sqlite3

    backup = _backup(path, "half-migrated")
    trial = path.with_name(path.name + ".repairing")
    trial.unlink(missing_ok=True)
    shutil.copyfile(backup, trial)
    trial_url = f"sqlite:///{trial}"
    try:
        with contextlib.closing(sqlite3.connect(trial)) as conn:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            for tmp in sorted(t for t in tables if t.startswith(_LEFTOVER_PREFIX)):
                base = tmp[len(_LEFTOVER_PREFIX) :]
                if base in tables:
                    conn.execute(f'DROP TABLE "{tmp}"')
                else:
                    conn.execute(f'ALTER TABLE "{tmp}" RENAME TO "{base}"')
            conn.commit()
        _upgrade_mlflow(trial_url)
        _open_mlflow(trial_url, _artifact_root(settings))
    except Exception as exc:  # noqa: BLE001 - every failure falls through to the decision below
        trial.unlink(missing_ok=True)
        if _holds_data(backup):
            raise StoreError(
                f"could not repair {path} automatically ({exc}); it is unchanged, and a copy is "
                f"at {backup}. Restore an earlier backup of it, or move it aside to start afresh"
            ) from exc
        log.warning("%s held no runs or models and did not migrate; creating it afresh", path)
        path.unlink()
        _open_mlflow(url, _artifact_root(settings))
        return "repaired"
    trial.replace(path)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    log.info("repaired %s (the half-migrated original is kept as %s)", path, backup)
    return "repaired"


def init_all(settings: Settings, *, repair: bool = False) -> list[StoreStatus]:
    """Create or upgrade every store driftloop owns: MLflow's backend and driftloop's tables.

    Called by ``make setup`` (``driftloop setup``) and the compose stack's init job before any DAG
    or service starts. Idempotent; safe to run while other processes start.
    """
    from ml import db

    settings.ensure_home()
    _install_sqlite_pragmas()
    statuses: list[StoreStatus] = []
    url = settings.mlflow_tracking_uri
    if url.startswith(("http://", "https://")):
        statuses.append(StoreStatus("mlflow", url, "served"))
    else:
        with init_lock(url):
            state = None
            if leftover_tables(url):
                if not repair:
                    raise _half_migrated_error(url, leftover_tables(url))
                state = repair_mlflow(settings)
            if state is None and store_exists(url):
                state = _upgrade_mlflow(url)
            opened = _open_mlflow(url, _artifact_root(settings))
            set_wal(url)
        _ready.add(url)
        statuses.append(
            StoreStatus("mlflow", url, state if state in ("upgraded", "repaired") else opened)
        )
    existed = store_exists(settings.database_url)
    db.get_engine(settings.database_url)
    statuses.append(
        StoreStatus("driftloop", settings.database_url, "ready" if existed else "created")
    )
    return statuses
