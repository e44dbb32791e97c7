"""driftloop's own tables in ``DATABASE_URL`` (SQLite by default, PostgreSQL when set).

The schema is plain SQLAlchemy Core so that SQLite and PostgreSQL behave the same. It is made and
changed by versioned Alembic migrations (``ml/migrations``, docs/migrations.md), run to the head
on first use in each process (or by ``driftloop setup``) under a cross-process lock, never on
import. The tables below are the head's, for queries.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ml.stores import _install_sqlite_pragmas, _make_home_folder, init_lock, set_wal, sqlite_path

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

metadata = sa.MetaData()

# Every move of a registry alias, by whom, when, from which version to which, and why.
alias_audit = sa.Table(
    "alias_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("from_version", sa.String(32), nullable=True),
    sa.Column("to_version", sa.String(32), nullable=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.JSON, nullable=True),
)


def normalise_url(url: str) -> str:
    """Give SQLAlchemy an explicit driver for PostgreSQL URLs (``postgres://`` is common)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


# Every prediction the service made (issue 3); the drift and quality reports read it. The request
# id is the primary key, so a batch written twice after an outage inserts nothing new.
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.String(16), nullable=False),
    # label -> probability, in the model's label order; ``confidence`` is the highest of them.
    sa.Column("scores", sa.JSON, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("cached", sa.Boolean, nullable=False, default=False),
)

# The true label a client reported for a logged prediction: one per request id, and the first
# stands. ``source`` says who sent it: an id derived from the API key (never the key itself), or
# from the client address where the service runs without keys (ml.serving.provenance).
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("source", sa.String(64), nullable=False, server_default="unknown", index=True),
)

# During a canary, the model that did not answer a request scores it too, off the request path
# (shadow scoring): this row is that second prediction, keyed by the answered request's id. The
# answered prediction (role "served") is in ``predictions``; joined on request_id, one label
# judges both models on the same text.
shadow_predictions = sa.Table(
    "shadow_predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("label", sa.String(16), nullable=False),
    # label -> probability, in the model's label order; ``confidence`` is the highest of them.
    sa.Column("scores", sa.JSON, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)

# Roles of the two rows a shadowed request leaves (predictions, shadow_predictions).
SERVED = "served"
SHADOW = "shadow"

# At most one retraining at a time: the row's primary key is the lock. A drift found while a
# retraining holds it does not start another; the train_model run it started releases it.
retraining_lock = sa.Table(
    "retraining_lock",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)


# ------------------------------------------------------------------------------ migrations

_migrated: set[str] = set()  # URLs this process has brought to the head
_migrated_lock = threading.Lock()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL per process; its schema is migrated to the head first (under a lock)."""
    url = normalise_url(url)
    kwargs: dict[str, object] = {"pool_pre_ping": True, "future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    engine = sa.create_engine(url, **kwargs)
    if url not in _migrated:
        with _migrated_lock:
            if url not in _migrated:
                _locked(url, lambda cfg: _upgrade(cfg, "head"), engine)
                _migrated.add(url)
    return engine


def migrate(url: str, revision: str = "head") -> str | None:
    """Upgrade driftloop's tables at ``url`` to ``revision``; return the revision they are at.

    A database an older driftloop made (its tables, no version) is stamped at the baseline
    first; an empty one is created from nothing. Runs under the stores' cross-process lock and,
    on SQLite and PostgreSQL, in one transaction: a migration cut short changes nothing.
    """
    url = normalise_url(url)
    _locked(url, lambda cfg: _upgrade(cfg, revision))
    if revision == "head":
        with _migrated_lock:
            _migrated.add(url)
    return current_revision(url)


def downgrade(url: str, revision: str) -> str | None:
    """Take driftloop's tables at ``url`` down to ``revision`` (e.g. ``"0001"``); return it.

    A revision that cannot be undone without losing rows raises and changes nothing.
    """
    from alembic import command

    url = normalise_url(url)
    _locked(url, lambda cfg: command.downgrade(cfg, revision))
    with _migrated_lock:
        _migrated.discard(url)
    return current_revision(url)


def current_revision(url: str) -> str | None:
    """The revision driftloop's tables at ``url`` are at; None when unversioned or absent."""
    from alembic.runtime.migration import MigrationContext

    from ml.migrations import VERSION_TABLE
    from ml.stores import store_exists

    url = normalise_url(url)
    if not store_exists(url):  # never create a SQLite file just to read its version
        return None
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision in ``ml/migrations/versions``."""
    from alembic.script import ScriptDirectory

    from ml.migrations import alembic_config

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "ml/migrations/versions holds no revision"
    return head


def _upgrade(cfg: Config, revision: str) -> None:
    from alembic import command

    command.upgrade(cfg, revision)


def _locked(url: str, action: Callable[[Config], None], engine: Engine | None = None) -> None:
    """Run ``action`` on an Alembic config bound to one transaction, under the init lock.

    An unversioned database holding driftloop's tables (made before migrations) is first brought
    to the baseline schema and stamped at it, in the same transaction.
    """
    from ml.migrations import alembic_config

    _install_sqlite_pragmas()
    _make_home_folder(url)
    with init_lock(url):
        runner = _migration_engine(url, engine)
        try:
            with runner.begin() as conn:
                cfg = alembic_config(url, conn)
                _stamp_if_unversioned(conn, cfg)
                action(cfg)
        finally:
            if runner is not engine:
                runner.dispose()
        set_wal(url)


def _migration_engine(url: str, engine: Engine | None) -> Engine:
    """An engine whose transactions hold DDL too (pysqlite commits before DDL on its own).

    An in-memory SQLite database exists only in its engine's connection: that engine is used.
    """
    if url.startswith("sqlite") and sqlite_path(url) is None and engine is not None:
        return engine
    kwargs: dict[str, Any] = {"poolclass": sa.pool.NullPool}
    if not url.startswith("sqlite"):
        return sa.create_engine(url, **kwargs)
    runner = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)

    @sa.event.listens_for(runner, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(runner, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock now, not midway

    return runner


def _stamp_if_unversioned(conn: Connection, cfg: Config) -> None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    from ml.migrations import BASELINE, VERSION_TABLE
    from ml.migrations.baseline import TABLES, bring_to_baseline

    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    if context.get_current_heads():
        return
    present = set(TABLES) & set(sa.inspect(conn).get_table_names())
    if not present:
        return  # a fresh database: the migrations create everything
    log.info(
        "driftloop's tables (%s) predate migrations: stamping them at revision %s",
        ", ".join(sorted(present)),
        BASELINE,
    )
    bring_to_baseline(conn)
    command.stamp(cfg, BASELINE)
