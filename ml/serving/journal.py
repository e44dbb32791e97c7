"""The prediction log's write-ahead journal: rows flushed to a locked file before they are queued.

A process killed outright loses no row it answered: the next start adopts the journals of
processes that are gone (nobody holds their ``flock``). See docs/prediction-log.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

STALE_TMP_SECONDS = 60.0  # a journal's temporary name lives microseconds; older ones are debris


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


def count_lines(path: Path) -> int:
    """Lines (rows) in a journal or spool file; 0 when it cannot be read."""
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


class Journal:
    """The journal files of one :class:`ml.serving.predlog.PredictionLog`, oldest first.

    Together its segments hold exactly the rows of the log's memory queue, in the same order:
    :meth:`append` as rows are queued, :meth:`release` as they are written or spooled. The
    log serialises both (it holds its queue's lock).

    Args:
        folder: The ``journal/`` folder under the spool folder.
        segment_rows: Start a new file after this many rows, so one never grows without bound.
    """

    def __init__(self, folder: Path, segment_rows: int) -> None:
        self.folder = folder
        self.segment_rows = segment_rows
        self._segments: deque[_Segment] = deque()
        self._current: _Segment | None = None  # the segment being appended to
        self._failing = False
        self._retry_at = 0.0

    def paths(self) -> set[Path | None]:
        """The files this journal writes (so :meth:`adopt_orphans` leaves them alone)."""
        return {seg.path for seg in self._segments}

    def append(self, data: bytes, rows: int) -> None:
        """Append ``rows`` encoded rows to the current segment (the caller serialises calls)."""
        seg = self._current or self._open_segment()
        seg.rows += rows
        seg.appended += rows
        if seg.fh is None:  # the file could not be created; the rows are still counted here
            return
        try:
            seg.fh.write(data)
            seg.fh.flush()  # to the OS: enough to outlive this process, not the machine
        except OSError as exc:  # a full disk, most likely
            self._failed(f"cannot write journal {seg.path}", exc)
            self._current = None  # a cut-short line ends this file
            try:
                seg.fh.close()  # not one open file per failed call; the file goes with its rows
            except OSError:
                pass
            seg.fh = None
            return
        if self._failing:
            log.warning("prediction log: the journal is written again")
            self._failing = False
        if seg.appended >= self.segment_rows:
            self._current = None  # rotate; this file stays until its rows are out

    def _open_segment(self) -> _Segment:
        """Start a journal file: created and locked under a temporary name, then renamed.

        Renaming only once it is locked means no other process can ever see it unlocked and
        take it for an orphan.
        """
        if time.monotonic() < self._retry_at:
            return self._fileless_segment()
        name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        path = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        fh: BinaryIO | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fh = tmp.open("xb")
            _lock(fh)
            os.replace(tmp, path)
        except OSError as exc:
            if fh is not None:
                fh.close()
                tmp.unlink(missing_ok=True)
            self._failed(f"cannot create a journal in {self.folder}", exc)
            return self._fileless_segment()
        seg = _Segment(path=path, fh=fh)
        self._segments.append(seg)
        self._current = seg
        return seg

    def _fileless_segment(self) -> _Segment:
        """Where rows are counted while the journal cannot be written (so the count stays true)."""
        last = self._segments[-1] if self._segments else None
        if last is not None and last.path is None:
            return last
        seg = _Segment(path=None, fh=None)
        self._segments.append(seg)
        return seg

    def _failed(self, what: str, exc: OSError) -> None:
        # Try a new file at most once a second, not on every call while the disk is full.
        self._retry_at = time.monotonic() + 1.0
        if not self._failing:
            log.error(
                "prediction log: %s (%s); rows are still logged but a killed process would "
                "lose them until the journal works again",
                what,
                exc,
            )
        self._failing = True

    def release(self, rows: int) -> None:
        """Forget the oldest ``rows`` journaled rows: they are written or spooled now.

        The caller serialises calls. A segment left with no rows is deleted, the current one
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
            if seg is self._current:
                self._current = None
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

    def adopt_orphans(self, spool_dir: Path, ours: set[Path | None]) -> None:
        """Move the journals of processes that are gone into the spool folder, to be written.

        A journal is an orphan when nobody holds its ``flock``; that covers a killed process, a
        pid since reused (a restarted container often gets the same pid back), a forgotten
        :class:`PredictionLog` of this very process, and another container's pid namespace.
        Where the file system has no locks, the pid in the name must have exited instead. (A
        child ``fork()``-ed after the log opened a journal shares its lock; driftloop spawns.)
        Rows already in the database are written again harmlessly (every write is idempotent).
        """
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.jsonl")):
            if path in ours:
                continue
            target = spool_dir / f"{path.stem}-journal.jsonl"
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
                count_lines(target),
            )
        self._sweep_stale_tmp()

    def _sweep_stale_tmp(self) -> None:
        """Delete journal files left under their temporary name (a kill between open and rename)."""
        cutoff = time.time() - STALE_TMP_SECONDS
        for tmp in self.folder.glob(".*.jsonl.tmp"):
            try:
                if tmp.stat().st_mtime >= cutoff:
                    continue
                with tmp.open("rb") as fh:
                    if _lock(fh) is not False:
                        tmp.unlink()  # empty: nothing is written before the rename
            except OSError:
                continue
