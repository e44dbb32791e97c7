"""driftloop's schema migrations (ml/migrations, docs/migrations.md) on SQLite and PostgreSQL.

A database made by a driftloop from before migrations (fixed ``score_<label>`` columns, no
version table) is built here from a copy of the old table definitions, never through ml.db, then
opened with ``get_engine``: it is stamped at the baseline and upgraded with every row kept.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ml import db

OLD_LABELS = ("negative", "neutral", "positive")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def old_metadata(*, feedback_source: bool = True) -> sa.MetaData:
    """driftloop's tables as an older driftloop created them (before revision 0001 existed)."""
    md = sa.MetaData()
    sa.Table(
        "alias_audit", md,
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
    )  # fmt: skip
    sa.Table(
        "predictions", md,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False, index=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("score_negative", sa.Float, nullable=False),
        sa.Column("score_neutral", sa.Float, nullable=False),
        sa.Column("score_positive", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("cached", sa.Boolean, nullable=False, default=False),
    )  # fmt: skip
    source = (
        [sa.Column("source", sa.String(64), nullable=False, server_default="unknown", index=True)]
        if feedback_source
        else []
    )
    sa.Table(
        "feedback", md,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("label", sa.String(16), nullable=False),
        *source,
    )  # fmt: skip
    sa.Table(
        "shadow_predictions", md,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("model_version", sa.String(32), nullable=False, index=True),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("score_negative", sa.Float, nullable=False),
        sa.Column("score_neutral", sa.Float, nullable=False),
        sa.Column("score_positive", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )  # fmt: skip
    sa.Table(
        "retraining_lock", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )  # fmt: skip
    return md


# Scores whose shortest decimal forms need all 17 digits: a lossy backfill would show.
SCORES = [
    (0.1 + 0.2, 1 / 3, 1 - (0.1 + 0.2) - 1 / 3),
    (0.7, 0.2, 0.1),
    (1e-9, 0.123456789012345678, 1 - 1e-9 - 0.123456789012345678),
    (0.25, 0.5, 0.25),  # a tie for nothing: the max is 0.5
]


def build_old_database(url: str, *, feedback_source: bool = True, n: int = 40) -> None:
    """An older driftloop's database with rows in every table."""
    md = old_metadata(feedback_source=feedback_source)
    engine = sa.create_engine(db.normalise_url(url), poolclass=sa.pool.NullPool)
    t = md.tables
    preds, shadows, labels = [], [], []
    for i in range(n):
        neg, neu, pos = SCORES[i % len(SCORES)]
        rid = f"r{i:04d}"
        at = T0 + timedelta(seconds=i)
        best = OLD_LABELS[max(range(3), key=(neg, neu, pos).__getitem__)]
        preds.append(
            {
                "request_id": rid,
                "at": at,
                "model_name": "sentiment",
                "model_version": str(1 + i % 2),
                "text": f"tweet {i} \u00e9\U0001f600",
                "label": best,
                "score_negative": neg,
                "score_neutral": neu,
                "score_positive": pos,
                "latency_ms": 3.5 + i,
                "cached": i % 3 == 0,
            }
        )
        if i % 2 == 0:
            shadows.append(
                {
                    "request_id": rid,
                    "at": at,
                    "model_version": "2",
                    "label": best,
                    "score_negative": pos,
                    "score_neutral": neu,
                    "score_positive": neg,
                    "latency_ms": 9.25,
                }
            )
        if i % 4 != 3:
            row = {"request_id": rid, "at": at + timedelta(seconds=1), "label": "neutral"}
            if feedback_source and i % 4 == 0:
                row["source"] = f"k-{i % 5}"  # the others take the server default, "unknown"
            labels.append(row)
    try:
        md.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(t["predictions"]), preds)
            conn.execute(sa.insert(t["shadow_predictions"]), shadows)
            with_source = [r for r in labels if "source" in r]
            if with_source:
                conn.execute(sa.insert(t["feedback"]), with_source)
            conn.execute(sa.insert(t["feedback"]), [r for r in labels if "source" not in r])
            conn.execute(sa.insert(t["alias_audit"]), [
                {"at": T0, "model_name": "sentiment", "alias": "champion", "from_version": None,
                 "to_version": "1", "actor": "t", "action": "promote", "reason": "first",
                 "evidence": {"accuracy": 0.9, "labels": [1, 2]}},
                {"at": T0 + timedelta(hours=1), "model_name": "sentiment", "alias": "champion",
                 "from_version": "1", "to_version": "2", "actor": "t", "action": "promote",
                 "reason": "better", "evidence": None},
            ])  # fmt: skip
            conn.execute(sa.insert(t["retraining_lock"]), [
                {"name": "retraining", "token": "tok", "acquired_at": T0, "reason": "drift"}
            ])  # fmt: skip
    finally:
        engine.dispose()


def snapshot(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of driftloop's tables, as the database holds them (reflected, in key order)."""
    engine = sa.create_engine(db.normalise_url(url), poolclass=sa.pool.NullPool)
    out = {}
    try:
        md = sa.MetaData()
        md.reflect(engine, only=["alias_audit", "predictions", "feedback", "shadow_predictions",
                                 "retraining_lock"])  # fmt: skip
        with engine.connect() as conn:
            for name, table in md.tables.items():
                key = list(table.primary_key.columns)
                rows = conn.execute(sa.select(table).order_by(*key)).mappings().all()
                out[name] = [dict(r) for r in rows]
    finally:
        engine.dispose()
    return out


def as_new(old_row: dict[str, Any]) -> dict[str, Any]:
    """What an old prediction row becomes at revision 0002."""
    row = {k: v for k, v in old_row.items() if not k.startswith("score_")}
    row["scores"] = {label: old_row[f"score_{label}"] for label in OLD_LABELS}
    row["confidence"] = max(row["scores"].values())
    return row


def columns(url: str, table: str) -> list[str]:
    engine = sa.create_engine(db.normalise_url(url), poolclass=sa.pool.NullPool)
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'driftloop.db'}"
    return request.getfixturevalue("pg_database")("migrate")


def test_an_old_database_is_stamped_upgraded_and_keeps_every_row(url: str) -> None:
    build_old_database(url)
    before = snapshot(url)
    assert db.current_revision(url) is None  # no version table: made before migrations

    db.get_engine(url)
    assert db.current_revision(url) == db.head_revision() == "0002"
    after = snapshot(url)
    for table in ("alias_audit", "feedback", "retraining_lock"):
        assert after[table] == before[table], table
    for table in ("predictions", "shadow_predictions"):
        assert after[table] == [as_new(r) for r in before[table]], table
        assert len(after[table]) == len(before[table]) > 0
        for row in after[table]:
            assert list(row["scores"]) == list(OLD_LABELS)  # the model's label order
            assert row["confidence"] == max(row["scores"].values())
        assert not {c for c in columns(url, table) if c.startswith("score_")}
    sources = {r["source"] for r in after["feedback"]}
    assert "unknown" in sources and "k-0" in sources
    assert after["alias_audit"][0]["evidence"] == {"accuracy": 0.9, "labels": [1, 2]}

    assert db.migrate(url) == "0002"  # a second migrate changes nothing
    assert snapshot(url) == after

    assert db.downgrade(url, "0001") == "0001"
    assert snapshot(url) == before  # the old columns, every value exact
    assert db.migrate(url) == "0002"
    assert snapshot(url) == after


def test_an_older_feedback_table_without_source_gets_it(url: str) -> None:
    build_old_database(url, feedback_source=False)
    before = snapshot(url)
    assert db.migrate(url) == "0002"
    after = snapshot(url)
    assert after["feedback"] == [{**r, "source": "unknown"} for r in before["feedback"]]
    assert after["predictions"] == [as_new(r) for r in before["predictions"]]
    engine = sa.create_engine(db.normalise_url(url), poolclass=sa.pool.NullPool)
    try:
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("feedback")}
    finally:
        engine.dispose()
    assert "ix_feedback_source" in indexes


def test_a_fresh_database_is_created_at_head_and_takes_any_label_set(url: str) -> None:
    from ml.serving.records import PredictionRecord

    engine = db.get_engine(url)
    assert db.current_revision(url) == "0002"
    record = PredictionRecord("x1", T0, "topics", "1", "t", "sport",
                              {"sport": 0.6, "politics": 0.3, "music": 0.1}, 2.0)  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.insert(db.predictions), [record.to_row()])
    (row,) = snapshot(url)["predictions"]
    assert list(row["scores"].items()) == [("sport", 0.6), ("politics", 0.3), ("music", 0.1)]
    assert row["confidence"] == 0.6
    with pytest.raises(RuntimeError, match="other than exactly"):
        db.downgrade(url, "0001")  # the old columns cannot hold these labels
    assert db.current_revision(url) == "0002" and snapshot(url)["predictions"] == [row]


def test_mlflow_may_keep_its_own_alembic_version_in_the_same_database(url: str) -> None:
    engine = sa.create_engine(db.normalise_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            conn.execute(sa.text("INSERT INTO alembic_version VALUES ('mlflow-rev')"))
        assert db.migrate(url) == "0002"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                ("mlflow-rev",)
            ]
    finally:
        engine.dispose()


def test_rows_spooled_by_the_old_code_are_written_after_the_upgrade(
    url: str, tmp_path: Path
) -> None:
    from ml.serving.predlog import PredictionLog

    spool = tmp_path / "spool"
    spool.mkdir()
    old = {
        "request_id": "old1",
        "at": T0.isoformat(),
        "model_name": "sentiment",
        "model_version": "1",
        "text": "spooled",
        "label": "positive",
        "score_negative": 0.1,
        "score_neutral": 0.2,
        "score_positive": 0.7,
        "latency_ms": 3.0,
        "cached": False,
    }
    shadow = {"request_id": "old1", "at": T0.isoformat(), "model_version": "2",
              "label": "neutral", "score_negative": 0.2, "score_neutral": 0.5,
              "score_positive": 0.3, "latency_ms": 4.0}  # fmt: skip
    lines = [{"kind": "p", "row": old}, {"kind": "s", "row": shadow}]
    (spool / "00000000000000000001-1-000001.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines)
    )
    log = PredictionLog(url, spool, flush_interval=0.05).start()
    assert log.flush(timeout=30)
    stats = log.close()
    assert (stats.written, stats.rejected) == (2, 0)
    rows = snapshot(url)
    (pred,) = rows["predictions"]
    assert pred["scores"] == {"negative": 0.1, "neutral": 0.2, "positive": 0.7}
    assert pred["confidence"] == 0.7
    (sh,) = rows["shadow_predictions"]
    assert sh["scores"] == {"negative": 0.2, "neutral": 0.5, "positive": 0.3}
    assert sh["confidence"] == 0.5


def _open(path: str, barrier: Any) -> None:
    from ml import db as child_db

    barrier.wait(timeout=60)
    child_db.get_engine(f"sqlite:///{path}")


@pytest.mark.parametrize("old", [False, True], ids=["fresh", "old"])
def test_two_processes_migrating_at_once_leave_the_database_at_head(
    tmp_path: Path, old: bool
) -> None:
    path = tmp_path / "driftloop.db"
    url = f"sqlite:///{path}"
    if old:
        build_old_database(url)
        before = snapshot(url)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_open, args=(str(path), barrier)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert db.current_revision(url) == "0002"
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        (versions,) = conn.execute("SELECT COUNT(*) FROM driftloop_alembic_version").fetchone()
    assert versions == 1
    assert not [t for t in tables if t.startswith("_alembic_tmp_")], tables
    assert {"alias_audit", "predictions", "feedback", "shadow_predictions",
            "retraining_lock"} <= tables  # fmt: skip
    if old:
        assert snapshot(url)["predictions"] == [as_new(r) for r in before["predictions"]]


def test_a_migration_that_fails_midway_changes_nothing_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "driftloop.db"
    url = f"sqlite:///{path}"
    build_old_database(url)
    with sqlite3.connect(path) as conn:  # SQLite keeps text in a REAL column: the backfill fails
        conn.execute("UPDATE shadow_predictions SET score_neutral = 'oops' WHERE rowid = 1")
    before = snapshot(url)
    with pytest.raises(ValueError, match="oops"):
        db.migrate(url)  # predictions is migrated first, then shadow_predictions fails
    assert snapshot(url) == before and db.current_revision(url) is None
    assert "score_negative" in columns(url, "predictions")
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "driftloop_alembic_version" not in tables
    assert not [t for t in tables if t.startswith("_alembic_tmp_")], tables
