"""A worker's event WAL: one log for all its jobs, in segments (docs/design.md §6).

Layout: ``<WAL_DIR>/<worker_id>/<first_lsn:020d>.wal``. Records carry a log sequence
number (LSN), increasing across segments. Appends from every job go to the one open
segment and share its fsyncs (``WalFile`` group commit, ``AsyncCommit`` for asyncio
callers), so a worker makes about one fsync per batch of output, whatever the number of
jobs. A segment is rolled once it reaches ``segment_bytes``; the new one starts with a
CHECKPOINT record, so the acknowledged watermark survives the archiving of old segments.

**Acknowledgement.** The sender delivers pending events in LSN order and calls
:meth:`WorkerWal.ack`: events up to that LSN are dropped from memory and a CHECKPOINT
record is written (it rides the next fsync: a checkpoint lost in a crash only means a
resend, which the store's dedup keys make harmless). A segment that is no longer open
and whose events are all acknowledged is *done*; the owner archives and deletes it.

**Recovery** (:meth:`WorkerWal.open`): the newest segment is opened (and locked) first,
so the WAL of a running worker raises ``WalLocked`` before anything in it is touched.
Then the segments are scanned in LSN order. A bad record in the last segment is a torn
append: the segment is truncated there. A bad record in an older one is damage: reading
that segment stops there and the problem is reported (``corrupt at offset N``), the rest
is still read; a segment whose header is unreadable is reported and left as it is. Every
event after the highest checkpoint is pending again. Nothing here raises on bad bytes.

**Failures.** A failed write or fsync breaks the open segment (its page cache is in an
unknown state): the appenders waiting on it get ``WalError``, so nothing they wrote is
acknowledged to them, nothing of it is delivered, and their producers read it again. The
next append (or :meth:`WorkerWal.probe`) cuts the segment back to what was made durable,
rolls to a new segment and closes the old one; while that fails too (a full disk: the new
segment cannot be written or synced), every append fails and :attr:`WorkerWal.error` says
why. Events above ``max_pending_bytes`` (the store is far behind) are refused with
``WalFull``, before anything is written. If no segment can be started at :meth:`open`
either, recovery still completes (the pending events can be delivered) and
:attr:`WorkerWal.error` says why appends fail.

**Rolling.** The new segment is created (and locked) before the old one is closed, so
the newest segment of a running worker is always locked: a tool that can lock the newest
segment (and still finds it the newest afterwards) knows the worker is stopped. A name
already taken (a segment whose creation failed half way, or one recovery could not read)
is never overwritten: the new segment takes the next free LSN.

**Threads.** Every method runs on one event loop thread (or, for :meth:`open`,
:meth:`close` and the tools, on one thread with no loop running). Executor threads only do
file work (create, cut, sync, close); the bookkeeping (pending events, the segment list)
always happens on the calling thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jennah.blocking import blocking
from jennah.models import JobEvent
from worker.wal.codec import PayloadError, kind_byte, wal_event, wal_payload
from worker.wal.format import (
    KIND_CHECKPOINT,
    RECORD_OVERHEAD,
    ScanResult,
    WalError,
    WalFormatError,
    WalFull,
    check_header,
    encode_record,
    scan,
)
from worker.wal.log import AsyncCommit, FsyncFn, WalFile, WalLocked, fsync_dir

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".wal"
SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
DEFAULT_SEGMENT_BYTES = 16 << 20
DEFAULT_MAX_PENDING_BYTES = 256 << 20


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(first_lsn, path)`` of every segment in ``directory``, in LSN order."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = SEGMENT_NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


@dataclass
class Segment:
    first_lsn: int
    path: Path
    last_lsn: int = 0  # the highest event LSN in it (0: none)
    file: WalFile | None = None  # open while it is the current segment (or being closed)
    commit: AsyncCommit | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    lsn: int
    event: JobEvent
    size: int
    segment: Segment
    end: int  # offset after the record in its segment: durable once synced past it


@dataclass
class Recovery:
    """What :meth:`WorkerWal.open` found."""

    segments: int = 0
    pending: int = 0
    checkpoint: int = 0
    truncated: list[str] = field(default_factory=list)  # torn tails cut off
    damaged: list[str] = field(default_factory=list)  # "<path>: corrupt at offset N"


class WorkerWal:
    """The open WAL of one worker."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        fsync: FsyncFn = os.fdatasync,
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_pending_bytes = max_pending_bytes
        self._fsync = fsync
        self._reset()

    def _reset(self) -> None:
        self._roll_lock = asyncio.Lock()  # (re)made here: a reopened WAL may be on a new loop
        self._segments: list[Segment] = []  # oldest first; the last one is current
        self._pending: deque[Pending] = deque()
        self._pending_bytes = 0
        self._next_lsn = 1
        self.acked = 0  # every event at or below this LSN is acknowledged
        self.error = ""  # why the last append failed to write ("" once one succeeds)
        self.fsyncs_before = 0  # fsyncs of segments already closed (for the metric)

    # --- opening and recovery -----------------------------------------------------------

    def _lock_newest(self) -> tuple[list[tuple[int, Path]], WalFile | None, ScanResult | None]:
        """Open (lock, recover) the newest segment before touching anything else: a
        running worker holds it (``WalLocked``). Returns the segments found, and the open
        newest one with what its recovery scan found (None if it is not readable)."""
        for _ in range(100):
            found = list_segments(self.directory)
            if not found:
                return found, None, None
            path = found[-1][1]
            try:
                wal, result = WalFile.open(path, self._fsync)
            except WalFormatError:
                return found, None, None  # reported as damage by the scan in open()
            except FileNotFoundError:
                continue  # archived meanwhile by its worker: look again
            if list_segments(self.directory)[-1][1] == path:
                return found, wal, result
            wal.close()  # its worker rolled meanwhile: the newer one is the one to lock
        raise WalLocked(f"{self.directory}: segments keep changing (a worker is running)")

    def open(self) -> Recovery:
        """Create the directory or recover what is in it (blocking). ``WalLocked`` if a
        running worker holds it. Opening again first closes what this object has open."""
        self.close()
        self._reset()
        report = Recovery()
        new_dir = not self.directory.is_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        if new_dir:
            fsync_dir(self.directory.parent)
        found, newest, newest_scan = self._lock_newest()
        try:
            checkpoint = self._recover(found, newest, newest_scan, report)
        except BaseException:
            if newest is not None:
                newest.close()
            raise
        report.segments = len(self._segments)
        report.pending = len(self._pending)
        report.checkpoint = checkpoint
        current = self._segments[-1] if self._segments else None
        if current is None or current.file is None or current.file.size >= self.segment_bytes:
            try:
                self._roll()
            except (OSError, WalError) as e:
                self.error = f"cannot start a WAL segment: {e}"
                log.error("WAL %s: %s", self.directory, self.error)
        return report

    def _recover(
        self,
        found: list[tuple[int, Path]],
        newest: WalFile | None,
        newest_scan: ScanResult | None,
        report: Recovery,
    ) -> int:
        """Read every segment (the newest one already open); return the checkpoint."""
        for tmp in self.directory.glob("*" + SEGMENT_SUFFIX + ".tmp"):
            tmp.unlink(missing_ok=True)  # a roll that crashed before its rename
        events: list[tuple[int, bytes, Segment, int]] = []
        checkpoint = 0
        highest = 0
        unreadable: list[int] = []
        for i, (first, path) in enumerate(found):
            seg = Segment(first, path)
            if i == len(found) - 1 and newest is not None and newest_scan is not None:
                # The newest segment: a bad record there is a torn append, already cut off
                # by WalFile.open; we keep appending to it if it has room.
                result = newest_scan
                if result.error:
                    report.truncated.append(f"{path}: {result.error}")
                seg.file = newest
                seg.commit = AsyncCommit(newest)
            else:
                try:
                    data = path.read_bytes()
                    check_header(data, str(path))
                except (OSError, WalFormatError) as e:
                    report.damaged.append(f"{path}: {e}")
                    unreadable.append(first)
                    continue
                result = scan(data)
                if result.error:
                    report.damaged.append(
                        f"{path}: corrupt at offset {result.end} ({result.error})")
            for rec in result.records:
                if rec.kind == KIND_CHECKPOINT:
                    checkpoint = max(checkpoint, rec.lsn)
                else:
                    events.append((rec.lsn, rec.payload, seg, rec.offset + rec.size))
                    seg.last_lsn = max(seg.last_lsn, rec.lsn)
                highest = max(highest, rec.lsn)
            self._segments.append(seg)
        self.acked = checkpoint
        # Past every LSN in use, and past the names of segments we could not read.
        self._next_lsn = max(highest, checkpoint, *(s.first_lsn - 1 for s in self._segments),
                             *unreadable, 0) + 1  # fmt: skip
        for lsn, payload, seg, end in events:
            if lsn <= checkpoint:
                continue
            try:
                ev = wal_event(payload)
            except PayloadError as e:
                report.damaged.append(f"{seg.path}: record {lsn}: {e}")
                continue
            self._queue(Pending(lsn, ev, len(payload) + RECORD_OVERHEAD, seg, end))
        return checkpoint

    # --- segments -----------------------------------------------------------------------

    def _queue(self, p: Pending) -> None:
        self._pending.append(p)
        self._pending_bytes += p.size

    @property
    def current(self) -> Segment:
        return self._segments[-1]

    def _new_segment(self, first: int, acked: int) -> Segment:
        """Create and lock a segment starting at LSN ``first`` (or the next free name),
        headed by a checkpoint of ``acked`` (blocking; any thread)."""
        path = self.directory / segment_name(first)
        while path.exists():  # never overwrite: a failed roll's leftover, or damage
            first += 1
            path = self.directory / segment_name(first)
        head = encode_record(acked, KIND_CHECKPOINT, int(time.time() * 1000), b"")
        wal = WalFile.create(path, head, self._fsync)
        return Segment(first, path, 0, wal, AsyncCommit(wal))

    @staticmethod
    def _cut_io(f: WalFile) -> None:
        """Cut a broken file back to what was made durable (blocking; any thread). Bytes
        past that may be half written, or whole records nobody was told are durable."""
        with contextlib.suppress(OSError, WalError):
            f.cut_to_synced()

    @classmethod
    def _close_io(cls, f: WalFile) -> None:
        """Make what is written durable and close (blocking; any thread). A file that
        fails now is cut back first, so it never leaves a torn tail in an older
        segment."""
        with contextlib.suppress(WalError):
            f.sync_to(f.size)
        if f.broken:
            cls._cut_io(f)
        f.close()

    def _cut(self, seg: Segment) -> None:
        """Bookkeeping after ``_cut_io``: forget the events that were never durable (their
        appenders got the error, so their producers read them again)."""
        assert seg.file is not None
        synced = seg.file.synced
        self._drop(lambda p: p.segment is seg and p.end > synced)

    def _closed(self, seg: Segment) -> None:
        """Bookkeeping after ``_close_io``."""
        assert seg.file is not None
        self._cut(seg)
        self.fsyncs_before += seg.file.fsyncs
        seg.file = None
        seg.commit = None
        mine = [p.lsn for p in self._pending if p.segment is seg]
        seg.last_lsn = max(mine, default=min(seg.last_lsn, self.acked))

    def _added(self, seg: Segment) -> None:
        self._segments.append(seg)
        self._next_lsn = max(self._next_lsn, seg.first_lsn)

    def _roll(self) -> None:
        """Start a new segment and close the current one (blocking; no loop running)."""
        old = self._segments[-1] if self._segments else None
        if old is not None and old.file is not None and old.file.broken:
            self._cut_io(old.file)
            self._cut(old)
        self._added(self._new_segment(self._next_lsn, self.acked))
        if old is not None and old.file is not None:
            self._close_io(old.file)
            self._closed(old)

    async def _roll_async(self) -> None:
        """``_roll`` for the event loop: file work in a thread (``jennah.blocking``: a
        cancelled roll still waits for the file step it started), bookkeeping here."""
        old = self._segments[-1] if self._segments else None
        if old is not None and old.file is not None and old.file.broken:
            await blocking(self._cut_io, old.file)
            self._cut(old)
        new = await blocking(self._new_segment, self._next_lsn, self.acked)
        self._added(new)
        if old is not None and old.file is not None:
            await blocking(self._close_io, old.file)
            self._closed(old)

    def _drop(self, doomed: Callable[[Pending], bool]) -> None:
        if any(doomed(p) for p in self._pending):
            self._pending = deque(p for p in self._pending if not doomed(p))
            self._pending_bytes = sum(p.size for p in self._pending)

    async def _ensure_room(self) -> Segment:
        """The segment to append to, rolling first if the current one is full, broken
        or closed."""
        async with self._roll_lock:
            seg = self._segments[-1] if self._segments else None
            if (seg is None or seg.file is None or seg.file.broken
                    or seg.file.size >= self.segment_bytes):  # fmt: skip
                try:
                    await self._roll_async()
                except (OSError, WalError) as e:
                    self.error = f"cannot start a WAL segment: {e}"
                    raise WalError(self.error) from e
            return self.current

    async def probe(self) -> bool:
        """After a write error: cut the broken segment and try to start a fresh one (a
        real write and sync); True if writing works."""
        if self.error:
            with contextlib.suppress(WalError):
                seg = await self._ensure_room()
                if seg.file is not None and not seg.file.broken:
                    self.error = ""
        return not self.error

    def seal(self) -> None:
        """For tools, on a stopped worker's WAL (blocking): if every event of the current
        segment is acknowledged, roll, so that it is closed and done (archivable) while a
        fresh segment keeps the checkpoint and the LSNs going."""
        cur = self._segments[-1] if self._segments else None
        if cur is not None and cur.file is not None and 0 < cur.last_lsn <= self.acked:
            self._roll()

    # --- appending ----------------------------------------------------------------------

    async def append(self, events: Sequence[JobEvent]) -> list[int]:
        """Write ``events`` and return their LSNs once they are durable; ``WalError``
        (nothing acknowledged, nothing delivered) if they could not be made durable."""
        if not events:
            return []
        records = [wal_payload(ev) for ev in events]
        size = sum(len(r) + RECORD_OVERHEAD for r in records)
        if self._pending_bytes + size > self.max_pending_bytes and self._pending:
            raise WalFull(f"{self._pending_bytes} bytes of events wait for the store")
        seg = await self._ensure_room()
        assert seg.file is not None and seg.commit is not None
        now = int(time.time() * 1000)
        lsns: list[int] = []
        end = 0
        added: list[Pending] = []
        try:
            for ev, payload in zip(events, records, strict=True):
                lsn = self._next_lsn
                end = seg.file.write(encode_record(lsn, kind_byte(ev.kind), now, payload))
                self._next_lsn += 1
                lsns.append(lsn)
                added.append(Pending(lsn, ev, len(payload) + RECORD_OVERHEAD, seg, end))
        except WalError as e:
            self.error = str(e)
            raise
        for p in added:
            self._queue(p)
        seg.last_lsn = max(seg.last_lsn, lsns[-1])
        try:
            await seg.commit.wait(end)
        except WalError as e:
            self.error = str(e)
            mine = {id(p) for p in added}
            self._drop(lambda p: id(p) in mine)
            raise
        self.error = ""
        return lsns

    # --- delivery -----------------------------------------------------------------------

    def durable(self, max_count: int, max_bytes: int) -> list[Pending]:
        """The oldest unacknowledged events already on disk, within the caps (at least
        one, whatever its size)."""
        out: list[Pending] = []
        size = 0
        for p in self._pending:
            f = p.segment.file
            if f is not None and p.end > f.synced:
                break
            if len(out) >= max_count or (out and size + p.size > max_bytes):
                break
            out.append(p)
            size += p.size
        return out

    def ack(self, lsn: int) -> list[Segment]:
        """Events up to ``lsn`` are acknowledged. Writes the checkpoint record (not
        waited for) and returns the closed segments that are now done, for archiving."""
        if lsn <= self.acked:
            return []
        self.acked = lsn
        while self._pending and self._pending[0].lsn <= lsn:
            self._pending_bytes -= self._pending.popleft().size
        seg = self._segments[-1] if self._segments else None
        if seg is not None and seg.file is not None and not seg.file.broken:
            with contextlib.suppress(WalError):
                seg.file.write(encode_record(lsn, KIND_CHECKPOINT, int(time.time() * 1000),
                                             b""))  # fmt: skip
        return self.done_segments()

    def done_segments(self) -> list[Segment]:
        """Closed segments whose events are all acknowledged."""
        return [s for s in self._segments[:-1] if s.file is None and s.last_lsn <= self.acked]

    def forget(self, seg: Segment) -> None:
        """``seg`` was archived (or found useless): stop tracking it."""
        if seg in self._segments:
            self._segments.remove(seg)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_events(self) -> list[Pending]:
        return list(self._pending)

    def first_pending_lsn(self) -> int:
        """The LSN of the oldest unacknowledged event (0 if none)."""
        return self._pending[0].lsn if self._pending else 0

    def last_pending_lsn(self) -> int:
        """The LSN of the newest unacknowledged event (0 if none)."""
        return self._pending[-1].lsn if self._pending else 0

    @property
    def fsyncs(self) -> int:
        return self.fsyncs_before + sum(s.file.fsyncs for s in self._segments if s.file)

    def segments(self) -> list[Segment]:
        return list(self._segments)

    def close(self) -> None:
        """Make what is written durable (best effort) and close the open segments
        (blocking; nothing else may run on this WAL meanwhile)."""
        for seg in self._segments:
            if seg.file is not None:
                self._close_io(seg.file)
                self._closed(seg)
