"""``WalEventLog``: the production ``EventLog`` (DESIGN §6, ``worker/events.py``).

``emit`` numbers the event in the owner's lease block, appends it durably to the
execution's log ``<WAL_DIR>/<worker_id>/<job_id>.<attempt>.wal`` and wakes the sender.
A finished execution's log is archived once every event is acknowledged, either at
``job_finished`` or later by the sender if the sink was down then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random as _random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry

from jennah.models import EventKind, Job, JobEvent, JobStatus
from worker.events import first_seq
from worker.wal import archive
from worker.wal.format import WalError
from worker.wal.joblog import SUFFIX, JobLog, LogClosed, log_name
from worker.wal.log import FsyncFn, fsync_dir
from worker.wal.metrics import wal_metrics
from worker.wal.sender import DEFAULT_CONFIG, EventSink, Sender, SenderConfig

log = logging.getLogger(__name__)
_HINTS = 10_000  # last seqs remembered for archived logs (a re-opened execution continues)
# Opening, creating and archiving a log hold a lock for its name. Striped, so that memory
# stays bounded however many jobs a worker runs; two names rarely share a stripe.
_STRIPES = 64


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WalEventLog:
    """Per-execution WAL files, an async sender to ``sink``, archive and cleanup."""

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
        finish_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        self.worker_id = worker_id
        self._wal_dir = Path(wal_dir)
        self._dir = self._wal_dir / worker_id
        self._archive_dir = Path(archive_dir)
        self._clock = clock
        self._retention_seconds = retention_days * 86400.0
        self._fsync = fsync
        self._finish_timeout = finish_timeout
        self._close_timeout = close_timeout
        self._metrics = wal_metrics(registry)
        self._logs: dict[tuple[str, str], JobLog] = {}  # (owner, name) -> open log
        self._stripes = [asyncio.Lock() for _ in range(_STRIPES)]
        self._hints: OrderedDict[str, int] = OrderedDict()
        self._sender = Sender(
            sink, self._open_logs, self._metrics,
            sender_config, sleep=sleep, random=random, on_acked=self._archive_done,
        )
        self._task: asyncio.Task[None] | None = None
        self._swept = False
        self._dir_ready = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Sweep this worker's logs (resume unsent events) and start the sender."""
        if not self._swept:
            await self.sweep()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._sender.run())

    async def sweep(self) -> list[str]:
        """Open every log of this worker left on disk (after a restart or a crash), so its
        unacknowledged events are sent again; delete archives past retention."""
        self._swept = True
        await self._ensure_dir()
        found = await anyio.to_thread.run_sync(_own_logs, self._wal_dir, self.worker_id)
        opened = await self._open_existing(found, self.worker_id, finished=None)
        await self.cleanup()
        return opened

    async def adopt(self, job_ids: Collection[str], from_worker: str | None = None) -> list[str]:
        """Take over another worker's logs of ``job_ids`` (jobs whose leases this worker
        has claimed): send what is unacknowledged, then archive them. ``from_worker=None``
        looks in every other worker's directory (a claim does not say who held the lease)."""
        wanted = set(job_ids)
        found = await anyio.to_thread.run_sync(archive.list_logs, self._wal_dir, from_worker)
        opened: list[str] = []
        by_owner: dict[str, list[Path]] = {}
        for p in found:
            job_id = p.name.removesuffix(SUFFIX).rpartition(".")[0]
            if p.parent.name != self.worker_id and job_id in wanted:
                by_owner.setdefault(p.parent.name, []).append(p)
        for owner, paths in by_owner.items():
            opened += await self._open_existing(paths, owner, finished=True)
        return opened

    async def close(self) -> None:
        """Flush for a bounded time, stop the sender, close the files. Unsent events stay
        in the WAL (never marked failed) and are sent at the next start."""
        if self._task is not None:
            await self.flush(self._close_timeout)
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        for key, jl in list(self._logs.items()):
            del self._logs[key]
            jl.close()

    async def cleanup(self) -> list[Path]:
        """Delete archives older than the retention."""
        deleted = await anyio.to_thread.run_sync(
            archive.cleanup, self._archive_dir, self._retention_seconds, self._clock().timestamp()
        )
        size = await anyio.to_thread.run_sync(archive.archive_size, self._archive_dir)
        self._metrics.archive_bytes.set(size)
        return deleted

    # --- EventLog --------------------------------------------------------------------------

    async def emit(
        self,
        job: Job,
        kind: EventKind,
        status: JobStatus | None,
        message: str = "",
        output: str = "",
    ) -> JobEvent:
        await self.start()
        name = log_name(job.job_id, job.attempt)
        created_at = self._clock()
        min_seq = first_seq(job.lease_version)
        while True:
            jl = await self._own_log(job, name)
            try:
                ev = await jl.append_async(
                    min_seq, kind, status, message, output, created_at, self.worker_id
                )
                break
            except LogClosed:
                continue  # archived meanwhile: the next round opens a fresh log
            except WalError:
                # A failed write or fsync: drop the file; the next emit reopens (recovers) it.
                await self._drop(jl)
                raise
        self._sender.wake()
        return ev

    async def job_finished(self, job: Job) -> None:
        """Flush the job's events (bounded by ``finish_timeout``), then archive its logs.
        If the sink is down, the sender archives them once they are acknowledged."""
        logs = [jl for jl in self._logs.values() if jl.meta.job_id == job.job_id]
        if not logs:
            return
        await self.start()
        for jl in logs:
            jl.finished = True
        await self._sender.wait_until(lambda: all(jl.unacked == 0 for jl in logs),
                                      self._finish_timeout)
        await self._archive_done(logs)

    async def flush(self, timeout: float) -> bool:
        """True once every event emitted so far is acknowledged by the sink."""
        targets = [(jl, jl.last_seq) for jl in self._logs.values()]
        if all(jl.watermark >= seq for jl, seq in targets):
            return True
        await self.start()
        return await self._sender.wait_until(
            lambda: all(jl.watermark >= seq or jl.unacked == 0 for jl, seq in targets), timeout
        )

    # --- internals -------------------------------------------------------------------------

    def _open_logs(self) -> list[JobLog]:
        return list(self._logs.values())

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._stripes[hash(key) % _STRIPES]

    async def _ensure_dir(self) -> None:
        if not self._dir_ready:
            await anyio.to_thread.run_sync(_make_dir, self._dir)
            self._dir_ready = True

    async def _own_log(self, job: Job, name: str) -> JobLog:
        key = (self.worker_id, name)
        jl = self._logs.get(key)
        if jl is not None:
            return jl
        async with self._lock(key):
            jl = self._logs.get(key)
            if jl is None:
                await self._ensure_dir()
                path = self._dir / (name + SUFFIX)
                if path.exists():
                    jl = await anyio.to_thread.run_sync(self._open, path)
                else:
                    jl = await anyio.to_thread.run_sync(self._create, path, job, name)
                self._logs[key] = jl
            return jl

    def _open(self, path: Path) -> JobLog:
        return JobLog.open(path, self._metrics, fsync=self._fsync)

    def _create(self, path: Path, job: Job, name: str) -> JobLog:
        # An execution archived earlier (job_finished, then events again) continues its seq.
        last = self._hints.get(name)
        if last is None:
            last = archive.last_archived_seq(self._archive_dir / self.worker_id, name)
        return JobLog.create(path, job, self.worker_id, self._metrics, last_seq=last,
                             fsync=self._fsync)

    async def _open_existing(
        self, paths: list[Path], owner: str, finished: bool | None
    ) -> list[str]:
        opened: list[str] = []
        for path in paths:
            key = (owner, path.name.removesuffix(SUFFIX))
            async with self._lock(key):
                if key in self._logs:
                    continue
                try:
                    jl = await anyio.to_thread.run_sync(self._open, path)
                except WalError as e:
                    self._metrics.failures.labels("recover").inc()
                    log.error("WAL log skipped: %s", e)
                    continue
                jl.finished = jl.terminal if finished is None else finished
                self._logs[key] = jl
                opened.append(key[1])
        if opened:
            await self.start()
            self._sender.wake()
            await self._archive_done([jl for jl in self._open_logs() if jl.finished])
        return opened

    async def _archive_done(self, logs: list[JobLog]) -> None:
        for jl in logs:
            key = (jl.owner, jl.name)
            if not jl.finished or jl.unacked:
                continue
            async with self._lock(key):
                if self._logs.get(key) is not jl or not jl.seal_if_done():
                    continue
                del self._logs[key]
                if jl.owner == self.worker_id:
                    self._hints[jl.name] = jl.last_seq
                    while len(self._hints) > _HINTS:
                        self._hints.popitem(last=False)
                try:
                    out = await anyio.to_thread.run_sync(self._archive, jl)
                    self._metrics.archive_bytes.inc(out.stat().st_size)
                except (OSError, WalError) as e:
                    self._metrics.failures.labels("archive").inc()
                    log.error("WAL archive of %s failed (the log stays): %s", jl.path, e)
                finally:
                    jl.close()

    async def _drop(self, jl: JobLog) -> None:
        key = (jl.owner, jl.name)
        async with self._lock(key):
            if self._logs.get(key) is jl:
                del self._logs[key]
                jl.close()

    def _archive(self, jl: JobLog) -> Path:
        # The last checkpoint may still be queued in memory: make it part of the archive.
        jl.wal.sync_to(jl.wal.size)
        return archive.archive_file(jl.path, self._archive_dir / jl.owner)


def _own_logs(wal_dir: Path, worker_id: str) -> list[Path]:
    for tmp in (wal_dir / worker_id).glob("*" + SUFFIX + ".tmp"):
        tmp.unlink(missing_ok=True)  # a create that crashed before its rename: never used
    return archive.list_logs(wal_dir, worker_id)


def _make_dir(path: Path) -> None:
    new = not path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    if new:
        fsync_dir(path.parent)
