"""``WalExecutionLog``: the production ``ExecutionLog`` (``worker/events.py``, docs/design.md §6).

One WAL per worker (``segments.WorkerWal``), an async sender to the store, archiving of
done segments, retention cleanup, and the v1 upgrade (``legacy``) at start-up.

* ``append`` writes the events to the open segment and returns once they are durable
  (one fsync shared by everything appended meanwhile), then wakes the sender.
* The sender delivers in LSN order; output the store refuses as out of order marks the
  job for a resync (``take_resync``), and the job's other undelivered output up to that
  point is acknowledged without being sent: the poller reads it again from the store's
  offsets, so nothing is lost and nothing goes in twice.
* ``flush_job`` is true only once every event of the job is in the store: events
  recovered from an earlier run count (they are the job's too), and so does output the
  store refused: until the poller has taken the job's resync (``take_resync``) and read
  that output again, the job is not flushed.
* A segment whose events are all in the store is archived to
  ``<ARCHIVE_DIR>/<worker_id>/<first_lsn>.wal.zst`` and deleted (one segment at a time,
  whoever notices it is done first), so a worker keeps a bounded number of files open
  (one) and on disk (the unacknowledged tail). Archives past the retention are deleted at
  start and then, while the worker runs, at most once per ``CLEANUP_INTERVAL_SECONDS``
  after an archive is written (so a worker that runs for months does not fill its disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random as _random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
from prometheus_client import CollectorRegistry

from database._common import output_key
from database.base import OutputOffsets
from jennah.backoff import Backoff
from jennah.blocking import blocking
from jennah.models import EventKind, JobEvent, Placed
from worker.wal import archive
from worker.wal.format import WalError, WalFull
from worker.wal.legacy import find_v1_logs, import_v1_logs
from worker.wal.log import FsyncFn
from worker.wal.metrics import wal_metrics
from worker.wal.segments import (
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_SEGMENT_BYTES,
    Pending,
    Recovery,
    Segment,
    WorkerWal,
)
from worker.wal.sender import DEFAULT_CONFIG, EventSink, Sender, SenderConfig

log = logging.getLogger(__name__)
PROBE_INTERVAL_SECONDS = 1.0
# Between tries of the v1 import while the store is down.
V1_IMPORT_BASE_SECONDS = 0.1
V1_IMPORT_CAP_SECONDS = 5.0
CLEANUP_INTERVAL_SECONDS = 3600.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WalExecutionLog:
    """Execution events: the worker's WAL, delivered to the store by a sender."""

    def __init__(
        self,
        wal_dir: Path,
        archive_dir: Path,
        worker_id: str,
        sink: EventSink,
        *,
        clock: Callable[[], datetime] = _utcnow,
        retention_days: float = 30.0,
        registry: CollectorRegistry | None = None,
        sender_config: SenderConfig = DEFAULT_CONFIG,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        random: Callable[[], float] = _random.random,
        fsync: FsyncFn = os.fdatasync,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        close_timeout: float = 5.0,
    ) -> None:
        self.worker_id = worker_id
        self._wal_dir = Path(wal_dir)
        self._archive_dir = Path(archive_dir)
        self._sink = sink
        self._clock = clock
        self._retention_seconds = retention_days * 86400.0
        self._close_timeout = close_timeout
        self._metrics = wal_metrics(registry)
        self._sleep = sleep
        self._import_backoff = Backoff(V1_IMPORT_BASE_SECONDS, V1_IMPORT_CAP_SECONDS, random)
        self.wal = WorkerWal(self._wal_dir / worker_id, segment_bytes=segment_bytes,
                             max_pending_bytes=max_pending_bytes, fsync=fsync)  # fmt: skip
        # Undelivered output of these jobs up to this LSN is dropped (refused by the store).
        self._doomed: dict[str, int] = {}
        self._resync: set[str] = set()
        self._last_lsn: dict[str, int] = {}  # the job's last appended LSN
        self._sender = Sender(
            sink, self.wal, self._metrics, sender_config, sleep=sleep, random=random,
            skip=self._skip, on_placed=self._placed, on_acked=self._archive_done,
        )  # fmt: skip
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._archive_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._last_probe = 0.0
        self._last_cleanup: float | None = None  # clock time of the last retention cleanup
        self.recovery: Recovery | None = None  # what the last start() found

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) for the v1 import; True once it is done."""
        with anyio.move_on_after(timeout):
            await self._ready.wait()
        return self.ready

    async def start(self) -> None:
        """Recover the WAL, start the sender, and import v1 logs in the background."""
        async with self._open_lock:
            if self._opened:
                return
            report = await blocking(self.wal.open)
            self.recovery = report
            for line in report.truncated:
                log.warning("WAL recovery cut a torn tail: %s", line)
            for line in report.damaged:
                self._metrics.failures.labels("recover").inc()
                log.error("WAL damaged: %s", line)
            log.info("WAL %s: %d segments, %d events to deliver after checkpoint %d",
                     self.wal.directory, report.segments, report.pending, report.checkpoint)
            self._metrics.pending.set(self.wal.pending)
            # Recovered events belong to their jobs: flush_job waits for them too.
            self._last_lsn = {p.event.job_id: p.lsn for p in self.wal.pending_events()}
            self._opened = True
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._sender.run())]
            if await blocking(find_v1_logs, self._wal_dir, self.worker_id):
                self._tasks.append(loop.create_task(self._import_v1()))
            else:
                self._ready.set()  # nothing to upgrade: the poller may start at once
            if self.wal.pending:
                self._sender.wake()
        await self._archive_done(self.wal.done_segments())
        await self.cleanup()

    async def _import_v1(self) -> None:
        """Deliver this worker's v1 logs (an upgrade), retrying while the store is down."""
        attempt = 0
        while True:
            paths = await blocking(find_v1_logs, self._wal_dir, self.worker_id)
            if not paths:
                break
            try:
                rep = await import_v1_logs(paths, self._archive_dir, self._sink.deliver)
            except Exception as exc:  # the store is down: try again
                log.warning("importing v1 logs failed (%s); retrying", exc)
                await self._sleep(self._import_backoff.delay(attempt))
                attempt += 1
                continue
            log.info("imported %d v1 logs: %d events stored, %d already there; skipped: %s",
                     rep.logs, rep.stored, rep.duplicates, rep.skipped or "none")
            break
        self._ready.set()

    async def close(self) -> None:
        """Flush for a bounded time, stop the sender, close the segment. Unsent events
        stay in the WAL (never marked failed) and are sent at the next start."""
        if not self._opened:
            return
        await self.flush(self._close_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks)
        self._tasks = []
        await blocking(self.wal.close)
        self._opened = False

    async def cleanup(self) -> list[Path]:
        """Delete archives older than the retention."""
        now = self._clock().timestamp()
        self._last_cleanup = now
        deleted = await blocking(
            archive.cleanup, self._archive_dir, self._retention_seconds, now
        )
        size = await blocking(archive.archive_size, self._archive_dir)
        self._metrics.archive_bytes.set(size)
        return deleted

    # --- ExecutionLog ------------------------------------------------------------------

    async def append(self, events: Sequence[JobEvent]) -> None:
        if not events:
            return
        await self.start()
        started = time.perf_counter()
        try:
            lsns = await self.wal.append(events)
        except WalFull:
            raise
        except WalError:
            self._metrics.write_errors.inc()
            self._metrics.failures.labels("append").inc()
            self._sender.recheck()  # its events left the queue: flush barriers look again
            raise
        for ev, lsn in zip(events, lsns, strict=True):
            self._last_lsn[ev.job_id] = lsn
        self._metrics.appends.inc(len(events))
        self._metrics.append_seconds.observe(time.perf_counter() - started)
        self._metrics.pending.set(self.wal.pending)
        self._sender.wake()

    def pending_ends(self, job_id: str) -> OutputOffsets:
        ends: OutputOffsets = {}
        doomed = self._doomed.get(job_id, 0)
        for p in self.wal.pending_events():
            ev = p.event
            if ev.job_id == job_id and ev.kind is EventKind.OUTPUT and p.lsn > doomed:
                key = output_key(ev)
                ends[key] = max(ends.get(key, 0), ev.end)
        return ends

    def take_resync(self) -> set[str]:
        out, self._resync = self._resync, set()
        return out

    def _delivered_up_to(self, lsn: int) -> bool:
        """No event at or below ``lsn`` waits any more (acknowledged, or dropped because
        its append failed)."""
        first = self.wal.first_pending_lsn()
        return self.wal.acked >= lsn or not first or first > lsn

    async def flush_job(self, job_id: str, timeout: float) -> bool:
        last = self._last_lsn.get(job_id, 0)
        if last and not self._delivered_up_to(last):
            await self.start()
            if not await self._sender.wait_until(lambda: self._delivered_up_to(last), timeout):
                return False
        if job_id in self._resync:
            return False  # output refused and skipped: not in the store until read again
        if self._last_lsn.get(job_id) == last:
            self._last_lsn.pop(job_id, None)
        return True

    async def flush(self, timeout: float) -> bool:
        target = self.wal.last_pending_lsn()
        if not target:
            return True
        return await self._sender.wait_until(lambda: self._delivered_up_to(target), timeout)

    async def health(self) -> tuple[bool, str]:
        if self.wal.error and time.monotonic() - self._last_probe > PROBE_INTERVAL_SECONDS:
            self._last_probe = time.monotonic()
            await self.wal.probe()
        if self.wal.error:
            return False, f"WAL cannot write: {self.wal.error}"
        return True, f"WAL ok, {self.wal.pending} events to deliver"

    # --- the sender's callbacks ----------------------------------------------------------

    def _skip(self, p: Pending) -> bool:
        doomed = self._doomed.get(p.event.job_id)
        if doomed is None:
            return False
        if p.lsn > doomed:
            return False
        return p.event.kind is EventKind.OUTPUT

    def _placed(self, placed: list[tuple[Placed, JobEvent]]) -> None:
        refused = {ev.job_id for p, ev in placed if p is Placed.OUT_OF_ORDER}
        if not refused:
            return
        last = self.wal.last_pending_lsn()
        for job_id in refused:
            self._doomed[job_id] = last  # its output queued so far was read on wrong offsets
            log.info("output of job %s refused as out of order: re-reading from the store",
                     job_id)
        self._resync |= refused
        # Forget dooms that no pending event is under any more.
        acked_past = [j for j, lsn in self._doomed.items() if lsn <= self.wal.acked]
        for job_id in acked_past:
            if job_id not in refused:
                del self._doomed[job_id]

    async def _archive_done(self, segments: list[Segment]) -> None:
        async with self._archive_lock:  # start() and the sender may both find a segment done
            archived = False
            for seg in segments:
                if seg not in self.wal.segments():
                    continue  # archived already
                archived = await self._archive_one(seg) or archived
            last = self._last_cleanup
            due = last is None or self._clock().timestamp() - last >= CLEANUP_INTERVAL_SECONDS
            if archived and due:
                try:
                    await self.cleanup()
                except OSError as e:
                    self._metrics.failures.labels("archive").inc()
                    log.error("WAL archive cleanup failed: %s", e)

    async def _archive_one(self, seg: Segment) -> bool:
        try:
            out = await blocking(
                archive.archive_file, seg.path, self._archive_dir / self.worker_id)
            self._metrics.archive_bytes.inc(out.stat().st_size)
        except OSError as e:
            self._metrics.failures.labels("archive").inc()
            log.error("WAL archive of %s failed (the segment stays): %s", seg.path, e)
            return False
        self.wal.forget(seg)
        return True
