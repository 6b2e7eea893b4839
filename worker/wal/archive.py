"""Archiving done segments (zstd), retention cleanup, and finding WAL files on disk.

Archive order (docs/design.md §11): compress to a temp file, fsync it, rename it into place, fsync
the directory, and only then delete the ``.wal``. A crash at any point leaves either the
segment or a complete archive (or both, and archiving again is harmless). Archive
directories created on the way are made durable in their parents first, or a crash could
keep the deletion of the segment and lose the directory holding its archive.

Layout mirrors the WAL: ``<ARCHIVE_DIR>/<worker_id>/<first_lsn>.wal.zst`` for segments
(``<job_id>.<attempt>.wal.zst`` for the v1 logs the upgrade archives), so files of two
workers never collide.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import zstandard

from worker.wal.log import fsync_dir

SUFFIX = ".wal"
ARCHIVE_SUFFIX = SUFFIX + ".zst"
# Level 9: archiving is off the hot path, and it beats level 3 by a few points on logs.
ZSTD_LEVEL = 9


def list_logs(wal_dir: Path, worker_id: str | None = None) -> list[Path]:
    """``<wal_dir>/<worker>/*.wal`` (segments and v1 logs) for one worker, or for every
    worker."""
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


def make_dirs(path: Path) -> None:
    """``mkdir -p``, durably: each directory created is fsync'd into its parent."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    fsync_dir(path.parent)


def archive_file(wal_path: Path, archive_dir: Path) -> Path:
    """Compress ``wal_path`` into ``archive_dir`` durably, then delete it. The file must be
    closed (or at least no longer appended to)."""
    make_dirs(archive_dir)
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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def read_archive_prefix(path: Path) -> tuple[bytes, str]:
    """``(bytes, error)``: what a possibly damaged archive decodes to, up to its damage,
    and why decoding stopped early ("" for a whole, clean archive). ``OSError`` if it
    cannot be read; a file that is not zstd at all is reported as an error with no bytes."""
    raw = path.read_bytes()
    if not raw.startswith(ZSTD_MAGIC):
        return b"", "not a zstd archive"
    dobj = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    pos = 0
    step = 1 << 16
    try:
        while pos < len(raw) and not dobj.eof:
            out += dobj.decompress(raw[pos : pos + step])
            pos += step
    except zstandard.ZstdError as e:
        return bytes(out), f"archive undecodable after {len(out)} bytes: {e}"
    if not dobj.eof:
        return bytes(out), f"archive truncated after {len(out)} bytes"
    return bytes(out), ""


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
