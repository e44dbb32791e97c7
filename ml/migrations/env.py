"""Alembic's entry point for driftloop's revisions (see ``ml.migrations``).

Runs on the connection :func:`ml.migrations.alembic_config` was given (``ml.db.migrate`` passes
one, inside its transaction and lock), else opens ``sqlalchemy.url``. It leaves logging alone:
no ``fileConfig``. Autogenerate compares ``ml.db.metadata`` with driftloop's tables only, so the
MLflow tables that may share the database are never proposed for dropping.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from ml.migrations import VERSION_TABLE

config = context.config


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == "table":
        from ml.db import metadata

        return name in metadata.tables
    return True


def _run(connection: sa.engine.Connection) -> None:
    from ml.db import metadata

    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=_include_name,
        render_as_batch=True,  # SQLite rebuilds tables to alter them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no sqlalchemy.url to migrate (use ml.db.migrate)")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError(
        "driftloop's migrations read and rewrite rows, so they cannot be rendered as SQL "
        "(offline mode); run them against the database with ml.db.migrate"
    )
run_online()
