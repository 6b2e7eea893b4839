"""Shared helpers of the WAL tests (no tests here): events, running jobs, sinks, fds.

The sink the tests use is a real store (``MemoryStore``, or SQLite on a temp file) behind
``RecordingSink``, which records every delivery, can be taken down, gated, or told to
fail, so each test can check "each event once in the store" and "nothing sent twice".
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from database._common import output_dedup_key
from database.base import JobStore
from database.memory import MemoryStore
from jennah.models import EventKind, Job, JobEvent, JobPatch, JobSpec, JobStatus, Lease, Placed
from worker.wal import SenderConfig, WalExecutionLog
from worker.wal.segments import list_segments

T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
TENANT = "acme"
FAST = SenderConfig(backoff_base=0.001, backoff_cap=0.01)


def detail(job_id: str, key: str, message: str = "", attempt: int = 0) -> JobEvent:
    """A STATUS_DETAIL event (placed by its dedup key)."""
    return JobEvent(job_id=job_id, tenant_id=TENANT, seq=0, kind=EventKind.STATUS_DETAIL,
                    status=JobStatus.RUNNING, message=message or f"detail {key}",
                    created_at=T0, worker_id="w1", attempt=attempt,
                    dedup_key=f"detail:{key}")  # fmt: skip


def output(job_id: str, offset: int, text: str, stream: str = "stdout",
           attempt: int = 0) -> JobEvent:  # fmt: skip
    """An OUTPUT event for bytes ``offset..offset+len(text)`` of ``stream``."""
    return JobEvent(job_id=job_id, tenant_id=TENANT, seq=0, kind=EventKind.OUTPUT,
                    status=JobStatus.RUNNING, message=stream, output=text, created_at=T0,
                    worker_id="w1", attempt=attempt, offset=offset,
                    end=offset + len(text.encode()),
                    dedup_key=output_dedup_key(attempt, 0, stream, offset))  # fmt: skip


class Stream:
    """Contiguous output of one job's stream, as the poller would cut it."""

    def __init__(self, job_id: str, stream: str = "stdout") -> None:
        self.job_id = job_id
        self.stream = stream
        self.end = 0

    def next(self, text: str) -> JobEvent:
        ev = output(self.job_id, self.end, text, self.stream)
        self.end = ev.end
        return ev


def running_job(store: JobStore, job_id: str, owner: str = "w1") -> Job:
    """A job in the store, RUNNING at attempt 0 (so its output can be placed)."""
    job, _ = store.create_job(Job(job_id=job_id, tenant_id=TENANT,
                                  spec=JobSpec(image_uri="busybox"), owner_worker_id=owner),
                              30)  # fmt: skip
    return store.update_job(job_id, Lease(owner, job.lease_version),
                            JobPatch(status=JobStatus.RUNNING, started_at=T0))


def stored(store: JobStore, job_id: str) -> list[JobEvent]:
    """The job's execution events in the store (lifecycle events left out)."""
    return [e for e in store.list_events(TENANT, job_id, 0, 100_000)
            if e.kind in (EventKind.OUTPUT, EventKind.STATUS_DETAIL)]  # fmt: skip


def key_of(ev: JobEvent) -> tuple[str, str]:
    return (ev.job_id, ev.dedup_key)


class SinkDown(Exception):
    pass


class RecordingSink:
    """``EventSink`` onto a real store that records what it was asked to deliver.

    ``down``: raise instead of delivering. ``gate``: wait for it before delivering.
    ``fail_next``: raise on the next N calls. What the store does with each event
    (stored, duplicate, out of order, stale) is the real store's verdict.
    """

    def __init__(self, store: JobStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.down = False
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.failures = 0
        self.batches: list[list[JobEvent]] = []
        self.sent: Counter[tuple[str, str]] = Counter()
        self.legacy_batches: list[list[JobEvent]] = []

    async def deliver(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down or self.fail_next:
            self.fail_next = max(0, self.fail_next - 1)
            self.failures += 1
            raise SinkDown("the store is down")
        (self.legacy_batches if legacy else self.batches).append(list(events))
        self.sent.update(key_of(e) for e in events)
        return self.store.append_execution_events(events, legacy)

    @property
    def sent_events(self) -> list[JobEvent]:
        return [e for b in self.batches for e in b]


def new_log(base: Path, sink: Any, worker: str = "w1", **kw: Any) -> WalExecutionLog:
    kw.setdefault("sender_config", FAST)
    kw.setdefault("registry", CollectorRegistry())
    kw.setdefault("close_timeout", 1.0)
    return WalExecutionLog(base / "wal", base / "archive", worker, sink, **kw)


def segment_paths(wal_dir: Path) -> list[Path]:
    return [p for _, p in list_segments(wal_dir)]


def open_fds_under(directory: Path, writable: bool = False) -> list[str]:
    """Targets of this process's open file descriptors that are files in ``directory``
    (only those open for writing, with ``writable``: not an archiver reading a segment)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = int(info.split("flags:")[1].split()[0], 8)
        if Path(target).parent == directory and (
                not writable or flags & os.O_ACCMODE != os.O_RDONLY):  # fmt: skip
            out.append(target)
    return out


def metric(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` (a condition on in-process state) until true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


class FailingFsync:
    """A WAL ``fsync`` that raises ``OSError(err)`` while ``failing`` is set (a full disk,
    an I/O error) and otherwise makes the file durable."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.err = err
        self.failing = threading.Event()

    def __call__(self, fd: int) -> None:
        if self.failing.is_set():
            raise OSError(self.err, os.strerror(self.err))
        os.fdatasync(fd)
