"""The prediction and feedback log in ``DATABASE_URL``, written off the request path.

The service hands rows to :class:`PredictionLog`, which returns at once; a background thread
writes them in batches. The request id is the primary key and every insert is idempotent
(``ON CONFLICT DO NOTHING`` for predictions; for feedback the label with the latest ``at`` wins,
so a row written again, late or twice, never undoes a newer one).

Before a row is queued it is appended to a write-ahead journal (``journal/`` under the spool
folder) and flushed to the operating system, so a process killed outright (SIGKILL, the OOM
killer) loses no row it had answered: the next :meth:`PredictionLog.start` on the same folder
moves the journals of processes that are gone into the spool, and the spool path writes them.
Flushing to the OS, not ``fsync``, is deliberate: it survives the death of the process, which is
the common failure, at the cost of one ``write`` per request; a crash of the whole machine can
still lose the last rows. A journal file is deleted once all its rows are in the database or a
spool file; each holds an exclusive ``flock`` while its writer lives, which is how another
process tells a live journal from an orphan (a pid alone is not enough: pids are reused, and
containers sharing the folder see different pid namespaces).

When the database is unreachable the rows wait in memory; after ``spool_after_seconds`` of
outage, or past ``max_memory_rows``, they go to JSON-lines files under the spool folder (written
to a temporary name and renamed, so a file is complete or absent). When the database returns the
spool files are written first, oldest first, then the memory queue. Nothing is dropped: a file is
deleted only after its rows are committed, and :meth:`PredictionLog.close` spools what it could
not write, for the next process to pick up. A row the database rejects for what it holds (not
for being unreachable) is set aside in ``rejected/`` rather than blocking the rows behind it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import sqlalchemy as sa

from ml.db import feedback, get_engine, normalise_url, predictions
from ml.params import LABELS

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

PREDICTION = "p"
FEEDBACK = "f"
JOURNAL_DIR = "journal"
STALE_TMP_SECONDS = 60.0  # a journal's temporary name lives microseconds; older ones are debris


def new_request_id() -> str:
    """A random 32-character hex id for one prediction."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class PredictionRecord:
    """One logged prediction. ``scores`` follow :data:`ml.params.LABELS` order."""

    request_id: str
    at: datetime
    model_name: str
    model_version: str
    text: str
    label: str
    scores: tuple[float, ...]
    latency_ms: float
    cached: bool = False

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "request_id": self.request_id,
            "at": self.at,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "text": self.text,
            "label": self.label,
            "latency_ms": float(self.latency_ms),
            "cached": bool(self.cached),
        }
        for name, score in zip(LABELS, self.scores, strict=True):
            row[f"score_{name}"] = float(score)
        return row


@dataclass(frozen=True)
class FeedbackRecord:
    """The true label a client reported for a logged prediction."""

    request_id: str
    label: str
    at: datetime = field(default_factory=lambda: datetime.now(tz=UTC))

    def to_row(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "label": self.label, "at": self.at}


@dataclass(frozen=True)
class LogStats:
    """Where the rows are: waiting in memory, spooled on disk, committed by this process."""

    pending: int
    spooled: int
    written: int
    rejected: int
    database_ok: bool
    last_error: str | None


Item = tuple[str, dict[str, Any]]


def _encode(item: Item) -> str:
    kind, row = item
    return json.dumps(
        {
            "kind": kind,
            "row": {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()},
        },
        ensure_ascii=True,  # any text survives the round trip, lone surrogates included
    )


def _decode(line: str) -> Item:
    obj = json.loads(line)
    row = dict(obj["row"])
    row["at"] = datetime.fromisoformat(row["at"])
    return obj["kind"], row


@dataclass(slots=True)
class _Segment:
    """One journal file and how many rows of the memory queue it still holds.

    The handle stays open until the file is deleted, rotated or not, because the ``flock`` it
    holds is what tells other processes that the journal's writer is alive.
    """

    path: Path | None  # None: the file could not be created; its rows are counted all the same
    fh: BinaryIO | None
    rows: int = 0  # rows journaled here that are neither written nor spooled yet
    appended: int = 0  # rows ever appended, for rotation


def _lock(fh: BinaryIO) -> bool | None:
    """Take an exclusive ``flock`` without waiting: True, False (held elsewhere), None (no locks).

    ``flock`` locks belong to the open file, so a second handle in the same process is refused
    too, and the kernel drops them when their process dies, however it dies.
    """
    if sys.platform == "win32":  # pragma: no cover - driftloop serves on Linux
        return None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (ENOLCK): the pid rule decides instead
        return None
    return True


def _owner_is_gone(path: Path) -> bool:
    """The pid rule, used only where ``flock`` is unavailable: the pid in the name has exited."""
    try:
        pid = int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # perhaps another PredictionLog of this process: never take its rows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


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
            nothing it answered (see the module docstring). Costs one JSON encode and one
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
        self.journal_dir = self.spool_dir / JOURNAL_DIR
        self.journal_segment_rows = journal_segment_rows
        # Oldest first; together they hold exactly the rows of ``_queue``, in the same order.
        self._segments: deque[_Segment] = deque()
        self._journal_current: _Segment | None = None  # the segment being appended to
        self._journal_failing = False
        self._journal_retry_at = 0.0

    # ------------------------------------------------------------------ producer side

    def start(self) -> PredictionLog:
        """Start the writer thread; journals and spool files left by dead processes are written."""
        if self._thread is None:
            self._adopt_journals()
            self._thread = threading.Thread(target=self._run, name="driftloop-predlog", daemon=True)
            self._thread.start()
        return self

    def log_predictions(self, records: Iterable[PredictionRecord]) -> None:
        """Queue predictions for writing; never blocks on the database."""
        self._put((PREDICTION, r.to_row()) for r in records)

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
            "".join(_encode(item) + "\n" for item in batch).encode("ascii") if self.journal else b""
        )
        with self._cond:
            if self.journal:
                self._journal_append(data, len(batch))
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
            spooled=sum(self._count_lines(p) for p in self._spool_files()),
            written=self._written,
            rejected=self._rejected,
            database_ok=self._db_ok,
            last_error=self._last_error,
        )

    def has_prediction(self, request_id: str) -> bool | None:
        """Whether a prediction with this id is logged or waiting to be; None if unknown.

        None means the database could not be asked (the caller decides what to do then).
        """
        with self._cond:
            if any(k == PREDICTION and r["request_id"] == request_id for k, r in self._queue):
                return True
        try:
            with self._engine().connect() as conn:
                found = conn.execute(
                    sa.select(predictions.c.request_id).where(
                        predictions.c.request_id == request_id
                    )
                ).first()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot tell"
            log.debug("cannot look up request %s: %s", request_id, exc)
            return None
        if found is not None:
            return True
        for path in self._spool_files():
            if request_id in path.read_text(encoding="utf-8"):
                return True
        return False

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
                        self._journal_release(len(batch))
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
        fb: dict[str, dict[str, Any]] = {}
        for kind, row in items:
            if kind == FEEDBACK:
                fb[row["request_id"]] = row  # the latest label for an id wins
        rejected = 0
        try:
            with self._engine().begin() as conn:
                self._insert(conn, preds, list(fb.values()))
        except Exception as exc:  # DBAPIError, or a value the driver refused (NUL in text)
            if _is_connectivity_error(exc):
                raise
            log.warning("the database refused a batch (%s); writing its rows one by one", exc)
            rejected = self._write_one_by_one(preds, list(fb.values()))
        self._written += len(preds) + len(fb) - rejected

    def _insert(
        self, conn: Connection, preds: list[dict[str, Any]], fb: list[dict[str, Any]]
    ) -> None:
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
        if fb:
            stmt = insert(feedback)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["request_id"],
                    set_={"label": stmt.excluded.label, "at": stmt.excluded.at},
                    # A replayed journal or spool file may bring an older label after a newer one.
                    where=feedback.c.at <= stmt.excluded.at,
                ),
                fb,
            )

    def _write_one_by_one(self, preds: list[dict[str, Any]], fb: list[dict[str, Any]]) -> int:
        bad: list[Item] = []
        for kind, row in [(PREDICTION, r) for r in preds] + [(FEEDBACK, r) for r in fb]:
            try:
                with self._engine().begin() as conn:
                    if kind == PREDICTION:
                        self._insert(conn, [row], [])
                    else:
                        self._insert(conn, [], [row])
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
            self._journal_release(len(items))
            self._oldest_pending = time.monotonic() if self._queue else None
        log.warning("spooled %d rows to %s (%s)", len(items), path, reason)

    def _write_file(self, folder: Path, items: Sequence[Item]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.jsonl"
        tmp = folder / f".{name}.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for item in items:
                fh.write(_encode(item) + "\n")
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
                items.append(_decode(line))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("unreadable line %d in spool file %s: %s", n, path, exc)
                self._write_raw_rejected(line)
        if last.strip():
            try:
                items.append(_decode(last))  # whole, only its newline missing
            except (ValueError, KeyError, TypeError):
                # Torn: the process died in this write, so the row was never answered.
                log.info("skipped the incomplete last line of %s (a write cut short)", path.name)
        return items

    def _write_raw_rejected(self, line: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        with (self.rejected_dir / "unreadable.txt").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        self._rejected += 1

    @staticmethod
    def _count_lines(path: Path) -> int:
        try:
            with path.open("rb") as fh:
                return sum(1 for _ in fh)
        except OSError:
            return 0

    # ------------------------------------------------------------------ write-ahead journal

    def _journal_append(self, data: bytes, rows: int) -> None:
        """Append ``rows`` encoded rows to the current segment (the caller holds ``_cond``)."""
        seg = self._journal_current or self._open_segment()
        seg.rows += rows
        seg.appended += rows
        if seg.fh is None:  # the file could not be created; the rows are still counted here
            return
        try:
            seg.fh.write(data)
            seg.fh.flush()  # to the OS: enough to outlive this process, not the machine
        except OSError as exc:  # a full disk, most likely
            self._journal_failed(f"cannot write journal {seg.path}", exc)
            self._journal_current = None  # a cut-short line ends this file
            try:
                seg.fh.close()  # not one open file per failed call; the file goes with its rows
            except OSError:
                pass
            seg.fh = None
            return
        if self._journal_failing:
            log.warning("prediction log: the journal is written again")
            self._journal_failing = False
        if seg.appended >= self.journal_segment_rows:
            self._journal_current = None  # rotate; this file stays until its rows are out

    def _open_segment(self) -> _Segment:
        """Start a journal file: created and locked under a temporary name, then renamed.

        Renaming only once it is locked means no other process can ever see it unlocked and
        take it for an orphan.
        """
        if time.monotonic() < self._journal_retry_at:
            return self._fileless_segment()
        name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        path = self.journal_dir / name
        tmp = self.journal_dir / f".{name}.tmp"
        fh: BinaryIO | None = None
        try:
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            fh = tmp.open("xb")
            _lock(fh)
            os.replace(tmp, path)
        except OSError as exc:
            if fh is not None:
                fh.close()
                tmp.unlink(missing_ok=True)
            self._journal_failed(f"cannot create a journal in {self.journal_dir}", exc)
            return self._fileless_segment()
        seg = _Segment(path=path, fh=fh)
        self._segments.append(seg)
        self._journal_current = seg
        return seg

    def _fileless_segment(self) -> _Segment:
        """Where rows are counted while the journal cannot be written (so the count stays true)."""
        last = self._segments[-1] if self._segments else None
        if last is not None and last.path is None:
            return last
        seg = _Segment(path=None, fh=None)
        self._segments.append(seg)
        return seg

    def _journal_failed(self, what: str, exc: OSError) -> None:
        # Try a new file at most once a second, not on every call while the disk is full.
        self._journal_retry_at = time.monotonic() + 1.0
        if not self._journal_failing:
            log.error(
                "prediction log: %s (%s); rows are still logged but a killed process would "
                "lose them until the journal works again",
                what,
                exc,
            )
        self._journal_failing = True

    def _journal_release(self, rows: int) -> None:
        """Forget the oldest ``rows`` journaled rows: they are written or spooled now.

        The caller holds ``_cond``. A segment left with no rows is deleted, the current one
        too (the next call starts a fresh file), so an idle log leaves no journal behind.
        """
        while rows > 0 and self._segments:
            seg = self._segments[0]
            taken = min(rows, seg.rows)
            seg.rows -= taken
            rows -= taken
            if seg.rows > 0:
                break
            self._segments.popleft()
            if seg is self._journal_current:
                self._journal_current = None
            self._drop_segment(seg)

    @staticmethod
    def _drop_segment(seg: _Segment) -> None:
        # Delete before closing: while the lock is held nobody can adopt (and so replay) it.
        try:
            if seg.path is not None:
                seg.path.unlink(missing_ok=True)
        except OSError as exc:  # left behind it is only replayed (harmlessly) by the next start
            log.warning("cannot delete journal %s: %s", seg.path, exc)
        if seg.fh is not None:
            try:
                seg.fh.close()
            except OSError as exc:  # the data it could not write is in the database already
                log.debug("closing journal %s: %s", seg.path, exc)

    def _adopt_journals(self) -> None:
        """Move the journals of processes that are gone into the spool folder, to be written.

        A journal is an orphan when nobody holds its ``flock``; that covers a killed process, a
        pid since reused (a restarted container often gets the same pid back), a forgotten
        :class:`PredictionLog` of this very process, and another container's pid namespace.
        Where the file system has no locks, the pid in the name must have exited instead. (A
        child ``fork()``-ed after the log opened a journal shares its lock; driftloop spawns.)
        Rows already in the database are written again harmlessly (every write is idempotent).
        """
        if not self.journal_dir.is_dir():
            return
        with self._cond:
            ours = {seg.path for seg in self._segments}
        for path in sorted(self.journal_dir.glob("*.jsonl")):
            if path in ours:
                continue
            target = self.spool_dir / f"{path.stem}-journal.jsonl"
            try:
                with path.open("rb") as fh:
                    locked = _lock(fh)
                    if locked is False or (locked is None and not _owner_is_gone(path)):
                        continue  # its writer is alive
                    os.replace(path, target)  # under the lock: a second adopter finds nothing
            except FileNotFoundError:
                continue  # deleted by its writer, or adopted by another process just now
            except OSError as exc:
                log.warning("cannot adopt journal %s: %s", path, exc)
                continue
            log.warning(
                "adopted journal %s (%d rows) of a process that ended without closing its "
                "prediction log; its rows are written with the spool",
                path.name,
                self._count_lines(target),
            )
        self._sweep_stale_tmp()

    def _sweep_stale_tmp(self) -> None:
        """Delete journal files left under their temporary name (a kill between open and rename)."""
        cutoff = time.time() - STALE_TMP_SECONDS
        for tmp in self.journal_dir.glob(".*.jsonl.tmp"):
            try:
                if tmp.stat().st_mtime >= cutoff:
                    continue
                with tmp.open("rb") as fh:
                    if _lock(fh) is not False:
                        tmp.unlink()  # empty: nothing is written before the rename
            except OSError:
                continue
