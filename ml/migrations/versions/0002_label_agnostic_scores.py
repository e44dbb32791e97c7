"""Label-agnostic scores: a scores object and a confidence column replace score_<label>.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

In ``predictions`` and ``shadow_predictions``, ``scores`` (label -> probability, NOT NULL JSON)
and ``confidence`` (the highest score, so SQL aggregates it without JSON functions) replace
``score_negative``, ``score_neutral`` and ``score_positive``. The backfill runs in SQL on
PostgreSQL and in chunks of :data:`CHUNK` rows elsewhere (SQLite's ``json_object`` keeps only 15
digits of a float; Python's JSON keeps them all), so a large table is never read into memory at
once. The downgrade is possible while every row's scores name exactly the three old labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("predictions", "shadow_predictions")
OLD_LABELS = ("negative", "neutral", "positive")
OLD_COLUMNS = tuple(f"score_{label}" for label in OLD_LABELS)
CHUNK = 5_000


def _table(name: str, *columns: sa.ColumnClause[Any]) -> sa.TableClause:
    return sa.table(name, sa.column("request_id", sa.String), *columns)


def _chunks(
    bind: sa.Connection, table: sa.TableClause, names: Sequence[str]
) -> Iterator[list[Any]]:
    """Rows of ``table`` (request id, then ``names``) in request id order, CHUNK at a time."""
    rid = table.c.request_id
    last: str | None = None
    while True:
        query = sa.select(rid, *(table.c[n] for n in names)).order_by(rid).limit(CHUNK)
        if last is not None:
            query = query.where(rid > last)
        rows = list(bind.execute(query))
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def upgrade() -> None:
    bind = op.get_bind()
    for name in TABLES:
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column("scores", sa.JSON, nullable=True))
            batch.add_column(sa.Column("confidence", sa.Float, nullable=True))
        if bind.dialect.name == "postgresql":
            # float8 -> JSON text at full precision on any server version.
            bind.execute(sa.text("SET LOCAL extra_float_digits = 3"))
            pairs = ", ".join(
                f"'{label}', {col}" for label, col in zip(OLD_LABELS, OLD_COLUMNS, strict=True)
            )
            bind.execute(
                sa.text(
                    f"UPDATE {name} SET scores = json_build_object({pairs}), "
                    f"confidence = GREATEST({', '.join(OLD_COLUMNS)})"
                )
            )
        else:
            old = _table(name, *(sa.column(c, sa.Float) for c in OLD_COLUMNS))
            new = _table(name, sa.column("scores", sa.JSON), sa.column("confidence", sa.Float))
            update = (
                sa.update(new)
                .where(new.c.request_id == sa.bindparam("rid"))
                .values(scores=sa.bindparam("s"), confidence=sa.bindparam("c"))
            )
            for rows in _chunks(bind, old, OLD_COLUMNS):
                params = []
                for rid, *values in rows:
                    scores = {label: float(v) for label, v in zip(OLD_LABELS, values, strict=True)}
                    params.append({"rid": rid, "s": scores, "c": max(scores.values())})
                bind.execute(update, params)
        with op.batch_alter_table(name) as batch:
            batch.alter_column("scores", existing_type=sa.JSON, nullable=False)
            batch.alter_column("confidence", existing_type=sa.Float, nullable=False)
            for col in OLD_COLUMNS:
                batch.drop_column(col)


def _check_downgradable(bind: sa.Connection, name: str) -> None:
    table = _table(name, sa.column("scores", sa.JSON))
    bad: list[str] = []
    count = 0
    for rows in _chunks(bind, table, ["scores"]):
        for rid, scores in rows:
            if not isinstance(scores, dict) or set(scores) != set(OLD_LABELS):
                count += 1
                if len(bad) < 5:
                    labels = sorted(scores) if isinstance(scores, dict) else scores
                    bad.append(f"{rid} {labels}")
    if count:
        raise RuntimeError(
            f"cannot downgrade {name} below revision 0002: {count} rows have scores for labels "
            f"other than exactly {list(OLD_LABELS)} (e.g. {'; '.join(bad)}), and the old schema "
            "has a column for each of those three only. Nothing was changed"
        )


def downgrade() -> None:
    bind = op.get_bind()
    for name in TABLES:  # every table is checked before any is changed
        _check_downgradable(bind, name)
    for name in TABLES:
        with op.batch_alter_table(name) as batch:
            for col in OLD_COLUMNS:
                batch.add_column(sa.Column(col, sa.Float, nullable=True))
        if bind.dialect.name == "postgresql":
            sets = ", ".join(
                f"{col} = CAST(scores ->> '{label}' AS DOUBLE PRECISION)"
                for label, col in zip(OLD_LABELS, OLD_COLUMNS, strict=True)
            )
            bind.execute(sa.text(f"UPDATE {name} SET {sets}"))
        else:
            old = _table(name, *(sa.column(c, sa.Float) for c in OLD_COLUMNS))
            update = (
                sa.update(old)
                .where(old.c.request_id == sa.bindparam("rid"))
                .values({c: sa.bindparam(f"v_{c}") for c in OLD_COLUMNS})
            )
            source = _table(name, sa.column("scores", sa.JSON))
            for rows in _chunks(bind, source, ["scores"]):
                params = [
                    {
                        "rid": rid,
                        **{
                            f"v_{c}": float(s[lb])
                            for lb, c in zip(OLD_LABELS, OLD_COLUMNS, strict=True)
                        },
                    }
                    for rid, s in rows
                ]
                bind.execute(update, params)
        with op.batch_alter_table(name) as batch:
            for col in OLD_COLUMNS:
                batch.alter_column(col, existing_type=sa.Float, nullable=False)
            batch.drop_column("confidence")
            batch.drop_column("scores")
