"""The prediction and feedback log in ``DATABASE_URL``, written off the request path.

Batched, idempotent inserts; rows wait out a database outage in memory, then in spool files,
and a write-ahead journal (:mod:`ml.serving.journal`) keeps them through a kill. The design,
its guarantees and their costs: docs/prediction-log.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ml.db import feedback, get_engine, normalise_url, predictions, shadow_predictions
from ml.serving.journal import Journal, count_lines
from ml.serving.records import (
    FEEDBACK,
    PREDICTION,
    SHADOW,
    FeedbackRecord,
    Item,
    PredictionRecord,
    ShadowRecord,
    decode,
    encode,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"


@dataclass(frozen=True)
class LogStats:
    """Where the rows are: waiting in memory, spooled on disk, committed by this process."""

    pending: int
    spooled: int
    written: int
    rejected: int
    database_ok: bool
    last_error: str | None


def _is_connectivity_error(exc: BaseException) -> bool:
    """True when the database could not be reached (retry later), not when it refused a row."""
    if isinstance(exc, sa.exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(
            exc, sa.exc.OperationalError | sa.exc.InterfaceError
        )
    return isinstance(exc, OSError | sa.exc.TimeoutError)


class PredictionLog:
    """Batched, idempotent, outage-proof writer of predictions and feedback.

    Args:
        database_url: Where the ``predictions`` and ``feedback`` tables live.
        spool_dir: Folder for rows that wait out an outage on disk (created on demand).
        batch_size: Rows per transaction.
        flush_interval: Seconds between writes when rows trickle in.
        max_memory_rows: Spool once this many rows wait in memory.
        spool_after_seconds: Spool rows that have waited this long for the database.
        retry_max_seconds: Longest pause between attempts while the database is down.
        journal: Append every row to a journal before queueing it, so a killed process loses
            nothing it answered (docs/prediction-log.md). Costs one JSON encode and one
            ``write`` per call.
        journal_segment_rows: Start a new journal file after this many rows, so one never
            grows without bound while the database is away.
    """

    def __init__(
        self,
        database_url: str,
        spool_dir: Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        max_memory_rows: int = 20_000,
        spool_after_seconds: float = 10.0,
        retry_max_seconds: float = 5.0,
        journal: bool = True,
        journal_segment_rows: int = 5_000,
    ) -> None:
        self.database_url = normalise_url(database_url)
        self.spool_dir = Path(spool_dir)
        self.rejected_dir = self.spool_dir / "rejected"
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_memory_rows = max_memory_rows
        self.spool_after_seconds = spool_after_seconds
        self.retry_max_seconds = retry_max_seconds
        self._queue: deque[Item] = deque()
        self._oldest_pending: float | None = None
        self._cond = threading.Condition()
        self._write_lock = threading.RLock()  # one writer at a time (thread, flush or close)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._written = 0
        self._rejected = 0
        self._db_ok = True
        self._last_error: str | None = None
        self._retry_delay = 0.0
        self._seq = 0
        self.journal = journal
        # Its files hold exactly the rows of ``_queue``, in the same order (when ``journal``).
        self._journal = Journal(self.spool_dir / JOURNAL_DIR, journal_segment_rows)

    # ------------------------------------------------------------------ producer side

    def start(self) -> PredictionLog:
        """Start the writer thread; journals and spool files left by dead processes are written."""
        if self._thread is None:
            with self._cond:
                ours = self._journal.paths()
            self._journal.adopt_orphans(self.spool_dir, ours)
            self._thread = threading.Thread(target=self._run, name="driftloop-predlog", daemon=True)
            self._thread.start()
        return self

    def log_predictions(self, records: Iterable[PredictionRecord]) -> None:
        """Queue predictions for writing; never blocks on the database."""
        self._put((PREDICTION, r.to_row()) for r in records)

    def log_shadow(self, records: Iterable[ShadowRecord]) -> None:
        """Queue shadow predictions (the model that did not answer) for writing."""
        self._put((SHADOW, r.to_row()) for r in records)

    def log_feedback(self, record: FeedbackRecord) -> None:
        """Queue one feedback row for writing; never blocks on the database."""
        self._put([(FEEDBACK, record.to_row())])

    def _put(self, items: Iterable[Item]) -> None:
        batch = list(items)
        if not batch:
            return
        # The journal costs one JSON encode and one buffered write + flush (a single write
        # syscall) per call: no fsync, no open or close except when a segment starts. That is
        # some 10-25 us, mostly the encoding (done outside the lock), against milliseconds of
        # inference, and it is what makes a killed process lose nothing it answered.
        data = (
            "".join(encode(item) + "\n" for item in batch).encode("ascii") if self.journal else b""
        )
        with self._cond:
            if self.journal:
                self._journal.append(data, len(batch))
            before = len(self._queue)
            self._queue.extend(batch)
            if before == 0 and self._queue:
                self._oldest_pending = time.monotonic()
            if len(self._queue) >= self.batch_size and self._db_ok:
                self._cond.notify()

    # ------------------------------------------------------------------ inspection

    def stats(self) -> LogStats:
        return LogStats(
            pending=len(self._queue),
            spooled=sum(count_lines(p) for p in self._spool_files()),
            written=self._written,
            rejected=self._rejected,
            database_ok=self._db_ok,
            last_error=self._last_error,
        )

    def has_prediction(self, request_id: str, model_name: str | None = None) -> bool | None:
        """Whether a prediction with this id (made by ``model_name``'s versions, when given) is
        logged or waiting to be; None if unknown.

        None means the database could not be asked (the caller decides what to do then).
        """

        def matches(row: dict[str, Any]) -> bool:
            return row["request_id"] == request_id and (
                model_name is None or row.get("model_name") == model_name
            )

        with self._cond:
            if any(k == PREDICTION and matches(r) for k, r in self._queue):
                return True
        query = sa.select(predictions.c.request_id).where(predictions.c.request_id == request_id)
        if model_name is not None:
            query = query.where(predictions.c.model_name == model_name)
        try:
            with self._engine().connect() as conn:
                found = conn.execute(query).first()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot tell"
            log.debug("cannot look up request %s: %s", request_id, exc)
            return None
        if found is not None:
            return True
        for path in self._spool_files():
            for line in path.read_text(encoding="utf-8").split("\n"):
                if request_id not in line:
                    continue
                try:
                    kind, row = decode(line)
                except (ValueError, KeyError, TypeError):
                    continue  # torn or unreadable: the writer sets it aside
                if kind == PREDICTION and matches(row):
                    return True
        return False

    def label_for(self, request_id: str) -> str | None:
        """The label already recorded (or waiting to be) for this id; None if none is known.

        None also when the database cannot be asked: the write then keeps the first label anyway
        (:meth:`_insert`), so a later different one never replaces it.
        """
        with self._cond:
            for kind, row in self._queue:
                if kind == FEEDBACK and row["request_id"] == request_id:
                    return str(row["label"])
        try:
            with self._engine().connect() as conn:
                found = conn.execute(
                    sa.select(feedback.c.label).where(feedback.c.request_id == request_id)
                ).first()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot tell"
            log.debug("cannot look up the label of %s: %s", request_id, exc)
            return None
        return None if found is None else str(found[0])

    # ------------------------------------------------------------------ writer side

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything queued or spooled now; True when nothing is left waiting."""
        deadline = time.monotonic() + timeout
        while True:
            ok = self._drain()
            if ok and not self._queue and not self._spool_files():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def close(self, timeout: float = 5.0) -> LogStats:
        """Stop the writer; write what can be written and spool the rest to disk."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._write_lock.acquire(timeout=timeout):
            try:
                self._drain()
                if self._queue:
                    self._spool_memory(reason="shutting down with the database unreachable")
            finally:
                self._write_lock.release()
        return self.stats()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                wait = self._retry_delay if self._retry_delay else self.flush_interval
                self._cond.wait(timeout=wait)
                if self._stopping:
                    return
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - the writer must outlive any surprise
                log.exception("prediction log writer failed; retrying")
                self._retry_delay = self.retry_max_seconds

    def _drain(self) -> bool:
        """Write spool files then the memory queue; False when the database is unreachable."""
        with self._write_lock:
            try:
                for path in self._spool_files():
                    try:
                        items = self._read_spool(path)
                    except FileNotFoundError:
                        continue  # another process sharing the folder wrote it first
                    for start in range(0, len(items), self.batch_size):
                        self._write(items[start : start + self.batch_size])
                    path.unlink(missing_ok=True)
                    log.info("wrote %d spooled rows from %s", len(items), path.name)
                while True:
                    with self._cond:
                        batch = [
                            self._queue[i] for i in range(min(self.batch_size, len(self._queue)))
                        ]
                    if not batch:
                        break
                    self._write(batch)
                    with self._cond:
                        for _ in batch:  # only this (locked) writer ever pops
                            self._queue.popleft()
                        self._journal.release(len(batch))
                        self._oldest_pending = time.monotonic() if self._queue else None
            except Exception as exc:
                if not _is_connectivity_error(exc):
                    raise
                self._mark_down(exc)
                self._maybe_spool()
                return False
            self._mark_up()
            return True

    def _engine(self) -> Engine:
        return get_engine(self.database_url)

    def _write(self, items: Sequence[Item]) -> None:
        preds = [row for kind, row in items if kind == PREDICTION]
        shadows = [row for kind, row in items if kind == SHADOW]
        fb: dict[str, dict[str, Any]] = {}
        for kind, row in items:
            if kind == FEEDBACK:
                first = fb.get(row["request_id"])
                if first is None or row["at"] < first["at"]:
                    fb[row["request_id"]] = row  # the first label for an id stands
        rejected = 0
        try:
            with self._engine().begin() as conn:
                orphans = self._insert(conn, preds, list(fb.values()), shadows)
        except Exception as exc:  # DBAPIError, or a value the driver refused (NUL in text)
            if _is_connectivity_error(exc):
                raise
            log.warning("the database refused a batch (%s); writing its rows one by one", exc)
            orphans = []
            rejected = self._write_one_by_one(preds, list(fb.values()), shadows)
        if orphans:
            self._set_aside_orphans(orphans)
        self._written += len(preds) + len(fb) + len(shadows) - rejected - len(orphans)

    def _set_aside_orphans(self, orphans: list[dict[str, Any]]) -> None:
        """Labels for request ids no prediction has: kept in ``rejected/``, never in the table."""
        log.error(
            "%d labels name request ids with no logged prediction; set aside in %s",
            len(orphans),
            self.rejected_dir,
        )
        self._rejected += len(orphans)
        self._write_file(self.rejected_dir, [(FEEDBACK, row) for row in orphans])

    def _insert(
        self,
        conn: Connection,
        preds: list[dict[str, Any]],
        fb: list[dict[str, Any]],
        shadows: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Insert the rows; return the feedback rows whose request id has no prediction.

        Predictions go first, so a label written in the same batch as its prediction finds it.
        A label for an id that already has one is dropped: the first label stands.
        """
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = conn.dialect.name
        insert: Any
        if dialect == "postgresql":
            insert = postgresql.insert
        elif dialect == "sqlite":
            insert = sqlite.insert
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            raise RuntimeError(f"unsupported database for the prediction log: {dialect}")
        if preds:
            conn.execute(
                insert(predictions).on_conflict_do_nothing(index_elements=["request_id"]), preds
            )
        if shadows:
            conn.execute(
                insert(shadow_predictions).on_conflict_do_nothing(index_elements=["request_id"]),
                shadows,
            )
        orphans: list[dict[str, Any]] = []
        if fb:
            ids = [row["request_id"] for row in fb]
            known = {
                rid
                for (rid,) in conn.execute(
                    sa.select(predictions.c.request_id).where(predictions.c.request_id.in_(ids))
                )
            }
            orphans = [row for row in fb if row["request_id"] not in known]
            rows = [row for row in fb if row["request_id"] in known]
            if rows:
                stmt = insert(feedback)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["request_id"],
                        set_={
                            "label": stmt.excluded.label,
                            "at": stmt.excluded.at,
                            "source": stmt.excluded.source,
                        },
                        # The first label stands: only an earlier one (a replayed journal or
                        # spool file can bring it after a later one) replaces the stored label.
                        where=feedback.c.at > stmt.excluded.at,
                    ),
                    rows,
                )
        return orphans

    def _write_one_by_one(
        self, preds: list[dict[str, Any]], fb: list[dict[str, Any]], shadows: list[dict[str, Any]]
    ) -> int:
        bad: list[Item] = []
        items = (
            [(PREDICTION, r) for r in preds]
            + [(SHADOW, r) for r in shadows]
            + [(FEEDBACK, r) for r in fb]
        )
        for kind, row in items:
            try:
                with self._engine().begin() as conn:
                    if kind == PREDICTION:
                        self._insert(conn, [row], [])
                    elif kind == SHADOW:
                        self._insert(conn, [], [], [row])
                    elif self._insert(conn, [], [row]):
                        bad.append((kind, row))  # no prediction has this id
            except Exception as exc:  # noqa: BLE001 - set aside, never lost
                if _is_connectivity_error(exc):
                    raise
                log.error("the database rejected %s row %s: %s", kind, row["request_id"], exc)
                bad.append((kind, row))
        if bad:
            self._rejected += len(bad)
            self._write_file(self.rejected_dir, bad)
        return len(bad)

    # ------------------------------------------------------------------ outage handling

    def _mark_down(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self._db_ok:
            log.warning(
                "prediction log: database unreachable (%s); %d rows wait in memory and will "
                "be spooled to %s if it lasts",
                message,
                len(self._queue),
                self.spool_dir,
            )
        self._db_ok = False
        self._last_error = message
        self._retry_delay = min(max(self._retry_delay * 2, 0.25), self.retry_max_seconds)

    def _mark_up(self) -> None:
        if not self._db_ok:
            log.warning("prediction log: database is back; waiting rows are written")
        self._db_ok = True
        self._retry_delay = 0.0

    def _maybe_spool(self) -> None:
        waited = (
            time.monotonic() - self._oldest_pending if self._oldest_pending is not None else 0.0
        )
        if self._queue and (
            len(self._queue) >= self.max_memory_rows or waited >= self.spool_after_seconds
        ):
            self._spool_memory(
                reason=f"{len(self._queue)} rows waited {waited:.0f} s for the database"
            )

    def _spool_memory(self, *, reason: str) -> None:
        with self._cond:
            items = list(self._queue)
        if not items:
            return
        path = self._write_file(self.spool_dir, items)
        with self._cond:
            for _ in items:
                self._queue.popleft()
            self._journal.release(len(items))
            self._oldest_pending = time.monotonic() if self._queue else None
        log.warning("spooled %d rows to %s (%s)", len(items), path, reason)

    def _write_file(self, folder: Path, items: Sequence[Item]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.jsonl"
        tmp = folder / f".{name}.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for item in items:
                fh.write(encode(item) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        final = folder / name
        os.replace(tmp, final)
        return final

    def _spool_files(self) -> list[Path]:
        if not self.spool_dir.is_dir():
            return []
        return sorted(self.spool_dir.glob("*.jsonl"))

    def _read_spool(self, path: Path) -> list[Item]:
        items: list[Item] = []
        lines = path.read_text(encoding="utf-8").split("\n")
        last = lines.pop()  # "" when the file ends with a newline, as every complete file does
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                items.append(decode(line))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("unreadable line %d in spool file %s: %s", n, path, exc)
                self._write_raw_rejected(line)
        if last.strip():
            try:
                items.append(decode(last))  # whole, only its newline missing
            except (ValueError, KeyError, TypeError):
                # Torn: the process died in this write, so the row was never answered.
                log.info("skipped the incomplete last line of %s (a write cut short)", path.name)
        return items

    def _write_raw_rejected(self, line: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        with (self.rejected_dir / "unreadable.txt").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        self._rejected += 1
