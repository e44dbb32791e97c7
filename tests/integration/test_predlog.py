"""The prediction log: batched idempotent writes, and no row lost or doubled over an outage.

SQLite for the basics; a real PostgreSQL for the rest. The outage tests stop and restart a
PostgreSQL server of their own (:class:`servers.PrivateServices`: ``scripts/services.sh`` with a
private state folder and port), so the session's shared server keeps running for everyone else.
The journal tests kill a real child process with SIGKILL and read what it left behind.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from ml.db import feedback, get_engine, predictions
from ml.serving.predlog import PredictionLog
from ml.serving.records import PREDICTION, FeedbackRecord, PredictionRecord, encode, new_request_id
from tests.harness.servers import PrivateServices

REPO_ROOT = Path(__file__).resolve().parents[2]


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
            scores={"negative": 0.2, "neutral": 0.5, "positive": 0.3},
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


def labels_in(url: str) -> dict[str, str]:
    with get_engine(url).connect() as conn:
        return dict(conn.execute(sa.select(feedback.c.request_id, feedback.c.label)).all())


def journal_files(spool: Path) -> list[Path]:
    """Everything in the journal folder, temporary names included."""
    folder = spool / "journal"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines())


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
    assert row["scores"] == pytest.approx({"negative": 0.2, "neutral": 0.5, "positive": 0.3})
    assert row["confidence"] == pytest.approx(0.5)
    assert row["model_version"] == "1" and row["latency_ms"] == pytest.approx(3.5)


def test_the_first_label_stands_and_orphan_labels_are_set_aside(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLog(url, tmp_path / "spool").start()
    (rec,) = records(1)
    log.log_predictions([rec])
    log.log_feedback(FeedbackRecord(rec.request_id, "negative", source="k-one"))
    log.log_feedback(FeedbackRecord(rec.request_id, "positive", source="k-two"))
    log.log_feedback(FeedbackRecord("e" * 32, "positive", source="k-two"))  # no such prediction
    assert log.flush(timeout=30)
    assert log.label_for(rec.request_id) == "negative"
    log.log_feedback(FeedbackRecord(rec.request_id, "neutral"))
    stats = log.close()
    with get_engine(url).connect() as conn:
        rows = conn.execute(
            sa.select(feedback.c.request_id, feedback.c.label, feedback.c.source)
        ).all()
    assert [tuple(r) for r in rows] == [(rec.request_id, "negative", "k-one")]
    assert stats.rejected == 1
    (kept,) = (tmp_path / "spool" / "rejected").glob("*.jsonl")
    assert "e" * 32 in kept.read_text()
    assert log.has_prediction(rec.request_id) is True
    assert log.has_prediction("f" * 32) is False
    assert log.label_for("f" * 32) is None
    # A task asks about its own model's predictions only (feedback on /tasks/<name>/feedback).
    assert log.has_prediction(rec.request_id, model_name="sentiment") is True
    assert log.has_prediction(rec.request_id, model_name="emotion") is False


def test_a_prediction_waiting_in_memory_or_a_spool_file_is_known_to_its_model_only(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = PredictionLog(url, tmp_path / "spool", flush_interval=3600)  # the writer never runs
    (waiting,) = records(1)
    log.log_predictions([waiting])
    assert log.has_prediction(waiting.request_id, model_name="sentiment") is True
    assert log.has_prediction(waiting.request_id, model_name="emotion") is False
    (spooled,) = records(1, text="spooled")
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    (spool / "0001-1.jsonl").write_text(encode((PREDICTION, spooled.to_row())) + "\n")
    assert log.has_prediction(spooled.request_id, model_name="sentiment") is True
    assert log.has_prediction(spooled.request_id, model_name="emotion") is False


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
    assert journal_files(spool) == []  # spooled rows leave the journal (and are counted once)
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


@pytest.fixture(scope="module")
def private_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServices]:
    servers = PrivateServices(tmp_path_factory.mktemp("services"))
    servers.run("start-postgres")
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.mark.integration
def test_postgres_outage_loses_and_doubles_nothing(
    private_services: PrivateServices, tmp_path: Path
) -> None:
    url = private_services.database_url
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
    private_services.run("stop-postgres")
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
        private_services.run("start-postgres")
    assert log.flush(timeout=60)
    stats = log.close()
    assert stats.database_ok and stats.pending == 0 and stats.spooled == 0
    sent = [r.request_id for r in before + during + still_during]
    got = ids_in(url)
    assert len(got) == len(sent) == 90
    assert sorted(got) == sorted(sent)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_earliest_feedback_label_stands_whatever_order_it_is_written_in(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A replayed journal or spool file can bring an old label after a newer one is written."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'log.db'}"
    else:
        url = request.getfixturevalue("pg_database")("predlog")
    log = PredictionLog(url, tmp_path / "spool", flush_interval=60.0)
    (rec,) = records(1)
    now = datetime.now(tz=UTC)
    log.log_predictions([rec])
    log.log_feedback(FeedbackRecord(rec.request_id, "positive", at=now))
    assert log.flush(timeout=30)
    log.log_feedback(FeedbackRecord(rec.request_id, "negative", at=now - timedelta(minutes=5)))
    assert log.flush(timeout=30)
    assert labels_in(url) == {rec.request_id: "negative"}  # the earlier label was the first
    log.log_feedback(FeedbackRecord(rec.request_id, "neutral", at=now + timedelta(seconds=1)))
    log.close()
    assert labels_in(url) == {rec.request_id: "negative"}


# ------------------------------------------------------------------------------- the journal


def test_written_rows_leave_no_journal_behind_and_segments_rotate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    spool = tmp_path / "spool"
    # Not started and a long interval: the rows wait in memory until flush() writes them.
    log = PredictionLog(url, spool, flush_interval=60.0, journal_segment_rows=10)
    batch = records(25)
    for rec in batch:
        log.log_predictions([rec])
    log.log_feedback(FeedbackRecord(batch[0].request_id, "negative"))
    # Rotated every 10 rows: 10 + 10 + 6 rows, each in a file named for its time and our pid.
    segments = journal_files(spool)
    assert [line_count(p) for p in segments] == [10, 10, 6]
    assert all(p.name.endswith(f"-{os.getpid()}.jsonl") for p in segments)
    assert batch[-1].request_id in segments[-1].read_text()
    assert log.flush(timeout=30)
    assert journal_files(spool) == []
    assert log.stats().pending == 0
    log.log_predictions(records(3))  # a fresh segment once the last one was emptied and deleted
    assert [line_count(p) for p in journal_files(spool)] == [3]
    stats = log.close()
    assert journal_files(spool) == [] and list(spool.glob("*.jsonl")) == []
    assert stats.written == 25 + 1 + 3 and count(url) == 28

    off = PredictionLog(url, tmp_path / "spool-off", flush_interval=60.0, journal=False)
    off.log_predictions(records(2))
    assert journal_files(tmp_path / "spool-off") == []
    off.close()
    assert count(url) == 30


CHILD = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime
    from pathlib import Path

    from ml.serving.predlog import PredictionLog
    from ml.serving.records import FeedbackRecord, PredictionRecord

    url, spool, prefix, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # Writes wait a minute and a batch is never full: every row stays in memory (and the journal).
    log = PredictionLog(url, spool, flush_interval=60.0, batch_size=100_000).start()
    now = datetime.now(tz=UTC)
    for i in range(n):  # one call per row, as requests arrive
        log.log_predictions(
            [PredictionRecord(f"{prefix}{i:06d}", now, "sentiment", "1", f"tweet {i}",
                              "neutral", {"negative": 0.2, "neutral": 0.5, "positive": 0.3},
                              3.5)]
        )
    for i in range(0, n, 10):
        log.log_feedback(FeedbackRecord(f"{prefix}{i:06d}", "positive"))
    print("logged", flush=True)
    time.sleep(600)
    """
)


@contextmanager
def journaling_child(url: str, spool: Path, prefix: str, n: int) -> Iterator[subprocess.Popen[str]]:
    """A process that has logged ``n`` predictions (and feedback on every tenth) and waits."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(spool), prefix, str(n)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().strip() == "logged", "the child did not log"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def child_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


def test_a_process_killed_with_sigkill_loses_no_answered_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    spool = tmp_path / "spool"
    prefix, n = uuid.uuid4().hex[:8], 300
    with journaling_child(url, spool, prefix, n) as child:
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    assert count(url) == 0  # nothing reached the database: the rows were only in memory
    (segment,) = journal_files(spool)
    assert line_count(segment) == n + n // 10

    log = PredictionLog(url, spool, flush_interval=0.05).start()
    assert log.flush(timeout=60)
    stats = log.close()
    assert sorted(ids_in(url)) == child_ids(prefix, n)  # each once
    assert labels_in(url) == {rid: "positive" for rid in child_ids(prefix, n)[::10]}
    assert (stats.pending, stats.spooled, stats.rejected) == (0, 0, 0)
    assert journal_files(spool) == [] and list(spool.glob("*.jsonl")) == []


def test_the_journal_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    spool = tmp_path / "spool"
    prefix, n = uuid.uuid4().hex[:8], 50
    with journaling_child(url, spool, prefix, n) as child:
        (theirs,) = journal_files(spool)
        assert theirs.name.endswith(f"-{child.pid}.jsonl")
        before = theirs.read_bytes()
        ours = records(5)
        log = PredictionLog(url, spool, flush_interval=0.05).start()
        log.log_predictions(ours)
        assert log.flush(timeout=30)
        log.close()
        # Ours written, and our journal gone; theirs untouched, still in place and not written.
        assert sorted(ids_in(url)) == sorted(r.request_id for r in ours)
        assert journal_files(spool) == [theirs] and theirs.read_bytes() == before
        assert list(spool.glob("*.jsonl")) == []
        child.kill()
        child.wait(timeout=30)
    again = PredictionLog(url, spool, flush_interval=0.05).start()  # now it is an orphan
    assert again.flush(timeout=30)
    again.close()
    assert sorted(ids_in(url)) == sorted([r.request_id for r in ours] + child_ids(prefix, n))
    assert journal_files(spool) == []


def test_an_unlocked_journal_is_adopted_and_its_torn_last_line_skipped(tmp_path: Path) -> None:
    """A journal named after a live pid nobody writes (pids are reused: here, our own)."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    spool = tmp_path / "spool"
    (spool / "journal").mkdir(parents=True)
    batch = records(3)
    lines = [encode(("p", r.to_row())) for r in batch]
    torn = encode(("p", records(1)[0].to_row()))[:40]  # killed in the middle of this write
    orphan = spool / "journal" / f"{time.time_ns():020d}-{os.getpid()}.jsonl"
    orphan.write_text(f"{lines[0]}\n{lines[1]}\nnot json\n{lines[2]}\n{torn}", encoding="utf-8")

    log = PredictionLog(url, spool, flush_interval=0.05).start()
    assert log.flush(timeout=30)
    stats = log.close()
    assert sorted(ids_in(url)) == sorted(r.request_id for r in batch)
    # The garbage line in the middle is set aside; the torn last one, never answered, is not.
    assert stats.rejected == 1
    assert (spool / "rejected" / "unreadable.txt").read_text() == "not json\n"
    assert journal_files(spool) == [] and list(spool.glob("*.jsonl")) == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_live_log_of_this_process_keeps_its_journal_and_a_forgotten_one_is_adopted(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    spool = tmp_path / "spool"
    first = PredictionLog(url, spool, flush_interval=60.0)  # never started, never closed
    kept = records(4)
    first.log_predictions(kept)
    (segment,) = journal_files(spool)

    second = PredictionLog(url, spool, flush_interval=0.05).start()
    assert second.flush(timeout=30)
    second.close()
    assert journal_files(spool) == [segment] and count(url) == 0  # same pid, but alive

    del first  # dropped without close(): its handle, and so its lock, goes with it
    gc.collect()
    third = PredictionLog(url, spool, flush_interval=0.05).start()
    assert third.flush(timeout=30)
    third.close()
    assert sorted(ids_in(url)) == sorted(r.request_id for r in kept)
    assert journal_files(spool) == []
