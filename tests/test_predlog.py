"""The prediction log: batched idempotent writes, and no row lost or doubled over an outage.

SQLite for the basics; a real PostgreSQL for the rest. The outage tests stop and restart a
PostgreSQL server of their own (``scripts/services.sh`` with a private state folder and port), so
the session's shared server keeps running for everyone else.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from ml.db import feedback, get_engine, predictions
from ml.predlog import FeedbackRecord, PredictionLog, PredictionRecord, new_request_id

REPO_ROOT = Path(__file__).resolve().parents[1]


def records(n: int, *, version: str = "1", text: str = "tweet") -> list[PredictionRecord]:
    now = datetime.now(tz=UTC)
    return [
        PredictionRecord(
            request_id=new_request_id(),
            at=now,
            model_name="sentiment",
            model_version=version,
            text=f"{text} {i}",
            label="neutral",
            scores=(0.2, 0.5, 0.3),
            latency_ms=3.5,
        )
        for i in range(n)
    ]


def count(url: str, table: sa.Table = predictions) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def ids_in(url: str) -> list[str]:
    with get_engine(url).connect() as conn:
        return [r[0] for r in conn.execute(sa.select(predictions.c.request_id))]


def test_rows_are_written_in_batches_and_never_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLog(url, tmp_path / "spool", batch_size=7, flush_interval=0.05).start()
    batch = records(30)
    log.log_predictions(batch)
    log.log_predictions(batch[:10])  # the same request ids again: ignored
    assert log.flush(timeout=30)
    log.close()
    assert sorted(ids_in(url)) == sorted(r.request_id for r in batch)
    with get_engine(url).connect() as conn:
        row = conn.execute(sa.select(predictions).limit(1)).mappings().one()
    assert (row["score_negative"], row["score_neutral"], row["score_positive"]) == pytest.approx(
        (0.2, 0.5, 0.3)
    )
    assert row["model_version"] == "1" and row["latency_ms"] == pytest.approx(3.5)


def test_feedback_keeps_the_latest_label(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLog(url, tmp_path / "spool").start()
    (rec,) = records(1)
    log.log_predictions([rec])
    log.log_feedback(FeedbackRecord(rec.request_id, "negative"))
    log.log_feedback(FeedbackRecord(rec.request_id, "positive"))
    assert log.flush(timeout=30)
    log.log_feedback(FeedbackRecord(rec.request_id, "neutral"))
    log.close()
    with get_engine(url).connect() as conn:
        rows = conn.execute(sa.select(feedback.c.request_id, feedback.c.label)).all()
    assert [tuple(r) for r in rows] == [(rec.request_id, "neutral")]
    assert log.has_prediction(rec.request_id) is True
    assert log.has_prediction("f" * 32) is False


def test_an_unreachable_database_spools_and_a_new_process_writes_the_spool(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'log.db'}"  # its folder does not exist yet
    spool = tmp_path / "spool"
    log = PredictionLog(url, spool, flush_interval=0.05, spool_after_seconds=0.2).start()
    batch = records(25)
    log.log_predictions(batch)
    deadline = time.monotonic() + 20
    while log.stats().spooled < 25 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = log.stats()
    assert (stats.spooled, stats.pending, stats.database_ok) == (25, 0, False)
    later = records(5, text="after the spool")
    log.log_predictions(later)
    closed = log.close(timeout=5)  # still unreachable: the rest is spooled too
    assert closed.spooled == 30 and closed.pending == 0
    assert len(list(spool.glob("*.jsonl"))) == 2

    (tmp_path / "missing").mkdir()  # the database "comes back"
    again = PredictionLog(url, spool, flush_interval=0.05).start()
    assert again.flush(timeout=30)
    again.close()
    assert sorted(ids_in(url)) == sorted(r.request_id for r in batch + later)
    assert list(spool.glob("*.jsonl")) == []


# ------------------------------------------------------------------------------- PostgreSQL


def test_postgres_log_is_idempotent_and_sets_aside_rows_it_refuses(
    pg_database,
    tmp_path: Path,  # noqa: ANN001 - conftest's factory
) -> None:
    url = pg_database("predlog")
    log = PredictionLog(url, tmp_path / "spool", batch_size=50, flush_interval=0.05).start()
    good = records(40)
    poison = records(1, text="nul \x00 byte")  # PostgreSQL text cannot hold NUL
    log.log_predictions(good[:20] + poison + good[20:])
    log.log_predictions(good)
    assert log.flush(timeout=30)
    stats = log.close()
    assert sorted(ids_in(url)) == sorted(r.request_id for r in good)
    assert stats.rejected == 1
    (rejected,) = (tmp_path / "spool" / "rejected").glob("*.jsonl")
    assert poison[0].request_id in rejected.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of this test module alone, stopped and started at will."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = free_port()
        self.env = {
            **os.environ,
            "DRIFTLOOP_SERVICES_DIR": str(state),
            "DRIFTLOOP_PG_PORT": str(self.port),
        }
        self.url = f"postgresql://driftloop@127.0.0.1:{self.port}/driftloop"

    def run(self, command: str) -> None:
        proc = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "services.sh"), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if proc.returncode == 3 and os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
            pytest.skip(f"PostgreSQL is not installed here: {proc.stderr.strip()}")
        assert proc.returncode == 0, f"services.sh {command}: {proc.stderr}"

    def cleanup(self) -> None:
        data = (self.state / "postgres").resolve()
        self.run("stop-postgres")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(tmp_path_factory.mktemp("pg"))
    server.run("start-postgres")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.integration
def test_postgres_outage_loses_and_doubles_nothing(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    url = private_postgres.url
    log = PredictionLog(
        url,
        tmp_path / "spool",
        batch_size=20,
        flush_interval=0.05,
        spool_after_seconds=1.0,
        retry_max_seconds=0.5,
    ).start()
    before = records(30, text="before")
    log.log_predictions(before)
    assert log.flush(timeout=30)
    private_postgres.run("stop-postgres")
    try:
        during = records(50, text="during")
        for i in range(0, 50, 10):  # rows keep arriving while the database is away
            log.log_predictions(during[i : i + 10])
            time.sleep(0.1)
        deadline = time.monotonic() + 20
        while log.stats().spooled == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = log.stats()
        assert not stats.database_ok and stats.spooled > 0
        still_during = records(10, text="still during")
        log.log_predictions(still_during)
    finally:
        private_postgres.run("start-postgres")
    assert log.flush(timeout=60)
    stats = log.close()
    assert stats.database_ok and stats.pending == 0 and stats.spooled == 0
    sent = [r.request_id for r in before + during + still_during]
    got = ids_in(url)
    assert len(got) == len(sent) == 90
    assert sorted(got) == sorted(sent)
