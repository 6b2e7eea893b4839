"""The upgrade from v1: deliver what the per-execution logs still hold, once, then archive.

v1 kept one log per job execution, ``<WAL_DIR>/<worker>/<job_id>.<attempt>.wal``: a META
record (the job's identity), then events numbered by the owner (``seq``), and CHECKPOINT
records holding the delivered watermark. Every event above the watermark may be missing
from the store. The v2 store numbers events itself, and its migration gave each v1 event
already stored the dedup key ``v1:<old seq>`` (``_common.renumber_v1``); so each pending
v1 event is delivered with that same key, in the log's order, and the store keeps it only
if it does not have it yet. Then the log is archived like any WAL file.

A log held by a running process (a v1 worker still up) is left alone and reported. So is
a log whose events went in but whose archive failed (a full or read-only archive disk):
it stays in place, the next import delivers it again (the store keeps each event once)
and retries the archive; the upgrade itself is not held up by it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jennah.blocking import blocking
from jennah.models import JobEvent, Placed
from worker.wal import archive
from worker.wal.codec import PayloadError, event_from_payload, meta_from_payload
from worker.wal.format import KIND_CHECKPOINT, KIND_META, WalError, check_header, scan

log = logging.getLogger(__name__)

V1_NAME = re.compile(r"^(?P<job>.+)\.(?P<attempt>\d+)\.wal$")
# Events per store call: one huge log must not become one huge transaction (Spanner caps
# the mutations of a commit), which would fail, be retried forever and hold the worker up.
DELIVER_BATCH = 500

Deliver = Callable[[Sequence[JobEvent], bool], Awaitable[list[tuple[Placed, JobEvent]]]]


@dataclass
class V1Log:
    path: Path
    job_id: str
    tenant_id: str
    attempt: int
    pending: list[JobEvent]  # above the watermark, with their v1 dedup keys
    damage: str = ""


@dataclass
class ImportReport:
    logs: int = 0
    stored: int = 0
    duplicates: int = 0
    archived: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def find_v1_logs(wal_dir: Path, worker_id: str | None = None) -> list[Path]:
    """The v1 logs under ``wal_dir`` (one worker's, or every worker's)."""
    return [p for p in archive.list_logs(wal_dir, worker_id) if V1_NAME.match(p.name)]


def read_v1_log(path: Path) -> V1Log:
    """Read a v1 log without changing it: its identity and its undelivered events. A
    damaged tail is skipped (what follows the first bad record cannot be trusted)."""
    m = V1_NAME.match(path.name)
    if m is None:
        raise WalError(f"{path}: not a v1 log name")
    data = path.read_bytes()
    check_header(data, str(path))
    result = scan(data)
    job_id, tenant_id, attempt = m.group("job"), "", int(m.group("attempt"))
    watermark = 0
    events: list[JobEvent] = []
    damage = result.error
    for rec in result.records:
        try:
            if rec.kind == KIND_META:
                meta = meta_from_payload(rec.payload)
                job_id, tenant_id, attempt = meta.job_id, meta.tenant_id, meta.attempt
            elif rec.kind == KIND_CHECKPOINT:
                watermark = max(watermark, rec.lsn)
            else:
                events.append(event_from_payload(rec.payload, tenant_id))
        except PayloadError as e:
            damage = f"record at offset {rec.offset}: {e}"
            break
    pending = [dataclasses.replace(ev, tenant_id=tenant_id, attempt=attempt,
                                   dedup_key=f"v1:{ev.seq}", seq=0)
               for ev in events if ev.seq > watermark]  # fmt: skip
    return V1Log(path, job_id, tenant_id, attempt, pending, damage)


def _lock(path: Path) -> int | None:
    """An fd holding ``path``'s flock, or None if a running process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # OSError: gone meanwhile, unreadable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


async def import_v1_logs(
    paths: Sequence[Path], archive_dir: Path, deliver: Deliver
) -> ImportReport:
    """Deliver every v1 log's pending events (legacy placement), then archive the log.
    A delivery failure (the store is down) raises; what was not archived is retried by
    the next call. A log that cannot be read, locked or archived is reported in
    ``skipped`` and the others go on."""
    report = ImportReport()
    for path in paths:
        try:
            fd = await blocking(_lock, path)
        except OSError as e:
            report.skipped.append(f"{path}: {e}")
            continue
        if fd is None:
            report.skipped.append(f"{path}: in use by a running process")
            continue
        try:
            try:
                v1 = await blocking(read_v1_log, path)
            except (OSError, WalError) as e:
                report.skipped.append(f"{path}: {e}")
                continue
            if v1.damage:
                log.warning("v1 log %s is damaged (%s): importing what precedes it",
                            path, v1.damage)
            for i in range(0, len(v1.pending), DELIVER_BATCH):  # in order, in bounded batches
                placed = await deliver(v1.pending[i : i + DELIVER_BATCH], True)
                report.stored += sum(p is Placed.STORED for p, _ in placed)
                report.duplicates += sum(p is Placed.DUPLICATE for p, _ in placed)
            report.logs += 1
            try:
                out = await blocking(
                    archive.archive_file, path, archive_dir / path.parent.name)
            except OSError as e:
                log.error("v1 log %s delivered but not archived (it stays): %s", path, e)
                report.skipped.append(f"{path}: delivered, but the archive failed: {e}")
                continue
            report.archived.append(out)
        finally:
            os.close(fd)
    return report
