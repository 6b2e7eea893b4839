"""One job execution's log, seen as events: seq order, the sent watermark, the unsent tail.

The sent watermark is persisted as CHECKPOINT records in the same file (DESIGN §6 allows
a checkpoint record or a sidecar). A checkpoint rides the same group commit as the event
appends, needs no extra file, and is archived with the log. Recovery takes the highest
checkpoint; every event above it is unacknowledged and is sent again.

Events are written to the file and queued for the sender under one lock, so the queue is
always in file order; the sender only takes entries whose bytes are already durable.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio.to_thread

from jennah.models import EventKind, Job, JobEvent, JobStatus
from worker.wal.codec import (
    TERMINAL_KINDS,
    Meta,
    PayloadError,
    event_from_payload,
    event_payload,
    kind_byte,
    meta_from_payload,
    meta_payload,
    unix_ms,
)
from worker.wal.format import KIND_CHECKPOINT, KIND_META, Record, WalError, encode_record
from worker.wal.log import AsyncCommit, FsyncFn, WalFile
from worker.wal.metrics import WalMetrics

SUFFIX = ".wal"
_INLINE_WRITE = 64 * 1024  # bigger events are encoded and written in a worker thread


@dataclass(frozen=True, slots=True)
class Pending:
    seq: int
    end: int  # file offset after the record: durable once the file is synced past it
    event: JobEvent
    size: int


def log_name(job_id: str, attempt: int) -> str:
    return f"{job_id}.{attempt}"


class JobLog:
    """An open execution log. Thread-safe."""

    def __init__(
        self, wal: WalFile, meta: Meta, last_seq: int, watermark: int,
        last_kind: EventKind | None, pending: list[Pending], metrics: WalMetrics,
    ) -> None:
        self.wal = wal
        self.meta = meta
        self.last_seq = last_seq
        self.watermark = watermark
        self.last_kind = last_kind
        self.finished = False
        self._pending: deque[Pending] = deque(pending)
        self._lock = threading.Lock()
        self._metrics = metrics
        self._closed = False
        self._commit = AsyncCommit(wal)

    @property
    def path(self) -> Path:
        return self.wal.path

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(SUFFIX)

    @property
    def owner(self) -> str:
        """The worker directory the log lives in."""
        return self.path.parent.name

    @classmethod
    def create(
        cls, path: Path, job: Job, worker_id: str, metrics: WalMetrics, *,
        last_seq: int = 0, fsync: FsyncFn | None = None,
    ) -> JobLog:
        meta = Meta(job.job_id, job.tenant_id, job.attempt, worker_id, job.lease_version)
        head = encode_record(0, KIND_META, int(time.time() * 1000), meta_payload(meta))
        wal = WalFile.create(path, head) if fsync is None else WalFile.create(path, head, fsync)
        return cls(wal, meta, last_seq, last_seq, None, [], metrics)

    @classmethod
    def open(cls, path: Path, metrics: WalMetrics, *, fsync: FsyncFn | None = None) -> JobLog:
        """Open and recover ``path``: a torn or corrupt tail is cut off."""
        wal, result = WalFile.open(path) if fsync is None else WalFile.open(path, fsync)
        try:
            return cls._from_records(wal, result.records, metrics)
        except BaseException:
            wal.close()
            raise

    @classmethod
    def _from_records(cls, wal: WalFile, records: list[Record], metrics: WalMetrics) -> JobLog:
        job_id, _, attempt = wal.path.name.removesuffix(SUFFIX).rpartition(".")
        meta = Meta(job_id, "", int(attempt) if attempt.isdigit() else 0, wal.path.parent.name, 0)
        events: list[tuple[JobEvent, int, int]] = []
        watermark = 0
        for i, rec in enumerate(records):
            try:
                if rec.kind == KIND_META:
                    meta = meta_from_payload(rec.payload)
                elif rec.kind == KIND_CHECKPOINT:
                    watermark = max(watermark, rec.seq)
                else:
                    ev = event_from_payload(rec.payload, meta.tenant_id)
                    events.append((ev, rec.offset + rec.size, rec.size))
            except PayloadError:
                # Same rule as a bad CRC: keep everything before, drop this and the rest.
                wal.truncate(records[i].offset)
                break
        last_seq = max((ev.seq for ev, _, _ in events), default=0)
        pending = [Pending(ev.seq, end, ev, size) for ev, end, size in events if ev.seq > watermark]
        metrics.pending.inc(len(pending))
        last_kind = events[-1][0].kind if events else None
        return cls(wal, meta, max(last_seq, watermark), watermark, last_kind, pending, metrics)

    # --- writing ---------------------------------------------------------------------

    def _write(
        self, min_seq: int, kind: EventKind, status: JobStatus | None, message: str,
        output: str, created_at: datetime, worker_id: str,
    ) -> tuple[JobEvent, int]:
        """Number and write one event (not yet durable); queue it for the sender."""
        with self._lock:
            if self._closed:
                raise LogClosed(str(self.path))
            seq = max(self.last_seq + 1, min_seq)
            ev = JobEvent(
                job_id=self.meta.job_id, tenant_id=self.meta.tenant_id, seq=seq, kind=kind,
                status=status, message=message, created_at=created_at, worker_id=worker_id,
                output=output,
            )
            rec = encode_record(seq, kind_byte(kind), unix_ms(created_at), event_payload(ev))
            try:
                end = self.wal.write(rec)
            except WalError:
                self._metrics.failures.labels("append").inc()
                raise
            self.last_seq = seq
            self.last_kind = kind
            self._pending.append(Pending(seq, end, ev, len(rec)))
            return ev, end

    def _appended(self, started: float) -> None:
        self._metrics.appends.inc()
        self._metrics.pending.inc()
        self._metrics.append_seconds.observe(time.perf_counter() - started)

    def append(
        self, min_seq: int, kind: EventKind, status: JobStatus | None, message: str,
        output: str, created_at: datetime, worker_id: str,
    ) -> JobEvent:
        """Number, write and fsync one event (blocking; for threads); return it once it
        is durable. ``seq`` is the next one, but at least ``min_seq``."""
        started = time.perf_counter()
        ev, end = self._write(min_seq, kind, status, message, output, created_at, worker_id)
        try:
            self.wal.sync_to(end)
        except WalError:
            self._metrics.failures.labels("append").inc()
            raise
        self._appended(started)
        return ev

    async def append_async(
        self, min_seq: int, kind: EventKind, status: JobStatus | None, message: str,
        output: str, created_at: datetime, worker_id: str,
    ) -> JobEvent:
        """``append`` for asyncio tasks: concurrent tasks share fsyncs (``AsyncCommit``).
        Small records are written on the loop (a page-cache write); big ones in a thread."""
        started = time.perf_counter()
        args = (min_seq, kind, status, message, output, created_at, worker_id)
        if len(output) + len(message) < _INLINE_WRITE:
            ev, end = self._write(*args)
        else:
            ev, end = await anyio.to_thread.run_sync(self._write, *args)
        try:
            await self._commit.wait(end)
        except WalError:
            self._metrics.failures.labels("append").inc()
            raise
        self._appended(started)
        return ev

    def _write_checkpoint(self, seq: int) -> int | None:
        with self._lock:
            dropped = 0
            while self._pending and self._pending[0].seq <= seq:
                self._pending.popleft()
                dropped += 1
            self._metrics.pending.dec(dropped)
            if seq <= self.watermark:
                return None
            self.watermark = seq
            if self._closed:
                return None
            return self.wal.write(
                encode_record(seq, KIND_CHECKPOINT, int(time.time() * 1000), b"")
            )

    def checkpoint(self, seq: int) -> None:
        """Events up to ``seq`` are acknowledged: forget them and persist the watermark."""
        end = self._write_checkpoint(seq)
        if end is not None:
            self.wal.sync_to(end)

    async def checkpoint_async(self, seq: int) -> None:
        end = self._write_checkpoint(seq)
        if end is not None:
            await self._commit.wait(end)

    # --- reading ---------------------------------------------------------------------

    def durable_pending(
        self, max_count: int, max_bytes: int, at_least_one: bool = True
    ) -> list[Pending]:
        """The oldest unacknowledged events already on disk, within the caps; with
        ``at_least_one``, the first ready event is returned whatever its size."""
        out: list[Pending] = []
        size = 0
        with self._lock:
            synced = self.wal.synced
            for p in self._pending:
                if p.end > synced or len(out) >= max_count:
                    break
                if size + p.size > max_bytes and (out or not at_least_one):
                    break
                out.append(p)
                size += p.size
        return out

    @property
    def unacked(self) -> int:
        return len(self._pending)

    @property
    def terminal(self) -> bool:
        """The last event says the execution is over (this worker will add nothing)."""
        return self.last_kind in TERMINAL_KINDS

    def seal_if_done(self) -> bool:
        """Refuse further appends if the log is finished and fully acknowledged; True if
        sealed now. The file stays open (and locked) until ``close``, so the caller can
        archive it while no other process can open it."""
        with self._lock:
            if self._closed or self._pending or not self.finished:
                return False
            self._closed = True
            return True

    def close(self) -> None:
        """Close without acknowledging: unsent events stay in the file for the next start."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._metrics.pending.dec(len(self._pending))
        self.wal.close()


class LogClosed(WalError):
    """The log was archived meanwhile; the caller opens a fresh one."""

