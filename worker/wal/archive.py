"""Archiving finished logs (zstd), retention cleanup, and finding logs on disk.

Archive order (DESIGN §11): compress to a temp file, fsync it, rename it into place, fsync
the directory, and only then delete the ``.wal``. A crash at any point leaves either the
log or a complete archive (or both, and archiving again is harmless).

Layout mirrors the WAL: ``<ARCHIVE_DIR>/<worker_id>/<job_id>.<attempt>.wal.zst``, so logs
of one execution written by two workers never collide.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

from worker.wal.format import KIND_META, WalError, check_header, scan
from worker.wal.joblog import SUFFIX, JobLog
from worker.wal.log import WalLocked, fsync_dir
from worker.wal.metrics import WalMetrics

ARCHIVE_SUFFIX = SUFFIX + ".zst"
# Level 9: archiving is off the hot path, and it beats level 3 by a few points on logs.
ZSTD_LEVEL = 9


def list_logs(wal_dir: Path, worker_id: str | None = None) -> list[Path]:
    """``<wal_dir>/<worker>/*.wal`` for one worker, or for every worker."""
    dirs = [wal_dir / worker_id] if worker_id else sorted(p for p in _subdirs(wal_dir))
    return sorted(p for d in dirs if d.is_dir() for p in d.glob("*" + SUFFIX) if p.is_file())


def _subdirs(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def _free_name(directory: Path, base: str) -> Path:
    """``base.wal.zst``, or ``base~N.wal.zst`` if a log of that name was archived before."""
    candidate = directory / (base + ARCHIVE_SUFFIX)
    n = 1
    while candidate.exists():
        n += 1
        candidate = directory / f"{base}~{n}{ARCHIVE_SUFFIX}"
    return candidate


def archive_file(wal_path: Path, archive_dir: Path) -> Path:
    """Compress ``wal_path`` into ``archive_dir`` durably, then delete it. The log must be
    closed (or at least no longer appended to)."""
    archive_dir.mkdir(parents=True, exist_ok=True)
    final = _free_name(archive_dir, wal_path.name.removesuffix(SUFFIX))
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(wal_path, "rb") as src, open(tmp, "wb") as dst:
            size = os.fstat(src.fileno()).st_size
            zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(src, dst, size=size)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(tmp, final)
        fsync_dir(archive_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    wal_path.unlink()
    fsync_dir(wal_path.parent)
    return final


def read_archive(path: Path) -> bytes:
    """The original log bytes of an archive."""
    with open(path, "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def last_archived_seq(directory: Path, name: str) -> int:
    """The highest seq in the archives of execution ``name`` (0 if none)."""
    last = 0
    if not directory.is_dir():
        return last
    for p in directory.iterdir():
        base = p.name.removesuffix(ARCHIVE_SUFFIX)
        if p.name.endswith(ARCHIVE_SUFFIX) and (base == name or base.startswith(name + "~")):
            try:
                data = read_archive(p)
                check_header(data, str(p))
            except (WalError, zstandard.ZstdError, OSError):
                continue
            last = max([last, *(r.seq for r in scan(data).records if r.kind != KIND_META)])
    return last


def archive_size(archive_dir: Path) -> int:
    return sum(p.stat().st_size for p in archive_dir.rglob("*" + ARCHIVE_SUFFIX) if p.is_file())


def cleanup(archive_dir: Path, older_than_seconds: float, now: float | None = None) -> list[Path]:
    """Delete archives (and stray temp files) last modified more than ``older_than_seconds``
    before ``now``; return what was deleted."""
    cutoff = (time.time() if now is None else now) - older_than_seconds
    deleted: list[Path] = []
    if not archive_dir.is_dir():
        return deleted
    touched: set[Path] = set()
    for pattern in ("*" + ARCHIVE_SUFFIX, "*" + ARCHIVE_SUFFIX + ".tmp"):
        for p in archive_dir.rglob(pattern):
            try:
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    deleted.append(p)
                    touched.add(p.parent)
            except FileNotFoundError:
                continue
    for d in touched:
        fsync_dir(d)
    return sorted(deleted)


@dataclass
class ArchiveReport:
    archived: list[Path]
    kept: list[tuple[Path, str]]  # (log, why it stays)


def archive_finished(
    wal_dir: Path, archive_dir: Path, metrics: WalMetrics, worker_id: str | None = None
) -> ArchiveReport:
    """Archive every log whose execution is over and fully sent: its last event is
    terminal (COMPLETED, FAILED, CANCELLED or LEASE_LOST) and its checkpoint covers every
    event. Logs held by a running worker, unfinished or unsent logs and foreign files are
    left alone."""
    report = ArchiveReport([], [])
    for path in list_logs(wal_dir, worker_id):
        try:
            jl = JobLog.open(path, metrics)
        except WalLocked:
            report.kept.append((path, "in use by a running worker"))
            continue
        except WalError as e:
            report.kept.append((path, str(e)))
            continue
        try:
            if not jl.terminal:
                report.kept.append((path, "execution not finished (last event is not terminal)"))
            elif jl.unacked:
                report.kept.append((path, f"{jl.unacked} events not yet sent"))
            else:
                # Archived while still locked, so no worker can open it meanwhile.
                out = archive_file(path, archive_dir / path.parent.name)
                metrics.archive_bytes.inc(out.stat().st_size)
                report.archived.append(out)
        finally:
            jl.close()
    return report
