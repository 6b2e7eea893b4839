"""Archive (zstd, durable order), retention cleanup, and the archiving of done segments by
the worker (docs/design.md §6, §11)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from database.memory import MemoryStore
from tests.fixtures.deps import missing_dependency
from tests.worker.wal.test_wal_support import (
    RecordingSink,
    Stream,
    metric,
    new_log,
    running_job,
    segment_paths,
    stored,
    wait_for,
)
from worker.wal import archive as archive_mod
from worker.wal.archive import archive_file, cleanup, read_archive
from worker.wal.format import KIND_CHECKPOINT, scan
from worker.wal.segments import list_segments


def _zstd() -> str:
    path = shutil.which("zstd") or "/usr/bin/zstd"
    if not os.access(path, os.X_OK):
        missing_dependency("the zstd command-line tool", "not on PATH")
    return path


def _segments_of_output(base: Path, n: int = 300, segment_bytes: int = 1 << 20) -> list[Path]:
    """A stopped worker's WAL holding ``n`` realistic output events, all delivered."""
    store = MemoryStore()
    running_job(store, "job-1")
    out = Stream("job-1")

    async def main() -> None:
        log = new_log(base, RecordingSink(store), segment_bytes=segment_bytes)
        for i in range(n):
            await log.append([out.next(f"epoch {i // 10} step {i} loss=0.{i * 7919 % 10000:04d}"
                                       f" lr=3.0e-04\n" * 3)])
        assert await log.flush(5)
        await log.close()

    asyncio.run(main())
    return segment_paths(base / "wal" / "w1")


def test_archive_decompresses_with_the_zstd_tool_to_the_exact_bytes(tmp_path: Path) -> None:
    [segment] = _segments_of_output(tmp_path)
    original = segment.read_bytes()
    out = archive_file(segment, tmp_path / "elsewhere" / "w1")
    assert out == tmp_path / "elsewhere" / "w1" / (segment.name + ".zst")
    assert not segment.exists()
    assert not list(out.parent.glob("*.tmp"))
    plain = subprocess.run([_zstd(), "-d", "-c", str(out)], capture_output=True, check=True,
                           timeout=30).stdout
    assert plain == original
    assert read_archive(out) == original
    assert out.stat().st_size < len(original) / 4


def test_a_failed_archive_keeps_the_segment(tmp_path: Path) -> None:
    [segment] = _segments_of_output(tmp_path, n=5)
    original = segment.read_bytes()
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the archive directory should be")
    with pytest.raises(OSError):
        archive_file(segment, blocker / "w1")
    assert segment.read_bytes() == original


def test_archiving_the_same_name_twice_never_overwrites(tmp_path: Path) -> None:
    a = tmp_path / "archive"
    first = tmp_path / "w" / "00000000000000000001.wal"
    first.parent.mkdir()
    first.write_bytes(b"first")
    out1 = archive_file(first, a)
    first.write_bytes(b"second")
    out2 = archive_file(first, a)
    assert out1 != out2 and out2.name == "00000000000000000001~2.wal.zst"
    assert read_archive(out1) == b"first" and read_archive(out2) == b"second"


def test_cleanup_deletes_only_archives_past_retention(tmp_path: Path) -> None:
    a = tmp_path / "archive" / "w1"
    a.mkdir(parents=True)
    now = time.time()
    old, new = a / "00000000000000000001.wal.zst", a / "00000000000000000100.wal.zst"
    stray_tmp = a / "00000000000000000200.wal.zst.tmp"
    other = a / "notes.txt"
    for p in (old, new, other, stray_tmp):
        p.write_bytes(b"x")
    os.utime(old, (now - 31 * 86400, now - 31 * 86400))
    os.utime(stray_tmp, (now - 31 * 86400, now - 31 * 86400))
    os.utime(other, (now - 99 * 86400, now - 99 * 86400))
    os.utime(new, (now - 29 * 86400, now - 29 * 86400))
    assert cleanup(tmp_path / "archive", 30 * 86400, now) == sorted([old, stray_tmp])
    assert not old.exists() and new.exists() and other.exists()


def test_done_segments_are_archived_with_identical_bytes_and_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore()
    running_job(store, "job-1")
    sink = RecordingSink(store)
    registry = CollectorRegistry()
    before: dict[str, bytes] = {}
    real = archive_mod.archive_file

    def spy(path: Path, archive_dir: Path) -> Path:
        before[path.name] = path.read_bytes()
        return real(path, archive_dir)

    monkeypatch.setattr(archive_mod, "archive_file", spy)
    out = Stream("job-1")

    async def main() -> None:
        log = new_log(tmp_path, sink, registry=registry, segment_bytes=4096)
        for i in range(200):
            await log.append([out.next(f"step {i} loss=0.{i:04d}\n")])
        assert await log.flush(5)
        await wait_for(lambda: not log.wal.done_segments())
        await log.close()

    asyncio.run(main())
    archives = sorted((tmp_path / "archive" / "w1").glob("*.wal.zst"))
    assert len(archives) >= 3
    assert sorted(a.name.removesuffix(".zst") for a in archives) == sorted(before)
    lsns: list[int] = []
    for a in archives:
        data = read_archive(a)
        assert data == before[a.name.removesuffix(".zst")]
        recs = scan(data).records
        assert recs[0].kind == KIND_CHECKPOINT
        events = [r.lsn for r in recs if r.kind != KIND_CHECKPOINT]
        assert int(a.name[:20]) == events[0]  # named by its first LSN
        lsns += events
    left = list_segments(tmp_path / "wal" / "w1")
    assert len(left) == 1  # only the open segment stays on disk
    assert lsns == list(range(1, left[0][0]))
    assert metric(registry, "wal_archive_size_bytes") == sum(a.stat().st_size for a in archives)
    assert "".join(e.output for e in stored(store, "job-1")) == "".join(
        f"step {i} loss=0.{i:04d}\n" for i in range(200))


def test_done_segments_left_by_the_last_run_are_archived_once(tmp_path: Path) -> None:
    """Run 1 delivers everything but cannot archive (the archive directory is a file),
    then stops with a few events undelivered. Run 2 archives the done segments at start
    while its sender delivers the rest (and finds the same segments done): each is
    archived exactly once, without a failure."""
    store = MemoryStore()
    running_job(store, "x")
    out = Stream("x")
    sink = RecordingSink(store)
    (tmp_path / "archive").write_text("not a directory")

    async def first() -> None:
        log = new_log(tmp_path, sink, segment_bytes=2048, close_timeout=0.01)
        for i in range(120):
            await log.append([out.next(f"line {i}\n")])
        assert await log.flush(5)
        sink.down = True
        await log.append([out.next("last\n")])
        await log.close()

    asyncio.run(first())
    done = segment_paths(tmp_path / "wal" / "w1")[:-1]
    assert len(done) >= 3
    (tmp_path / "archive").unlink()
    sink.down = False
    registry = CollectorRegistry()

    async def second() -> None:
        log = new_log(tmp_path, sink, registry=registry, segment_bytes=2048)
        await log.start()
        assert await log.flush(5)
        await wait_for(lambda: not log.wal.done_segments())
        await log.close()

    asyncio.run(second())
    names = sorted(a.name for a in (tmp_path / "archive" / "w1").iterdir())
    # Every segment left done by the first run is archived, once (no "~1" copy). The
    # last segment may be archived too if the second run finished it before closing,
    # which depends on timing on a loaded machine.
    assert set(names) >= {p.name + ".zst" for p in done}
    assert not [n for n in names if "~" in n]
    assert len(names) <= len(done) + 1
    assert metric(registry, "wal_failures_total", {"op": "archive"}) == 0
    assert not any(p.exists() for p in done)
    assert stored(store, "x")[-1].output == "last\n"


def test_cleanup_uses_the_clock_and_the_retention(tmp_path: Path) -> None:
    now = [datetime.now(UTC)]
    registry = CollectorRegistry()
    _segments_of_output(tmp_path, n=50, segment_bytes=2048)
    archives = sorted((tmp_path / "archive" / "w1").glob("*.wal.zst"))
    assert archives

    async def main() -> None:
        log = new_log(tmp_path, RecordingSink(), clock=lambda: now[0], retention_days=7,
                      registry=registry)
        assert await log.cleanup() == []
        assert metric(registry, "wal_archive_size_bytes") == sum(
            a.stat().st_size for a in archives)
        now[0] += timedelta(days=8)
        assert await log.cleanup() == archives
        assert metric(registry, "wal_archive_size_bytes") == 0
        await log.close()

    asyncio.run(main())


def test_a_running_worker_deletes_archives_past_retention_without_a_restart(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    running_job(store, "x")
    now = [datetime.now(UTC)]
    old = tmp_path / "archive" / "w0" / "00000000000000000001.wal.zst"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    week = 7 * 86400
    os.utime(old, (time.time() - week + 600,) * 2)  # expires in 10 minutes
    out = Stream("x")

    async def main() -> None:
        log = new_log(tmp_path, RecordingSink(store), clock=lambda: now[0], retention_days=7,
                      segment_bytes=2048)
        await log.start()
        assert old.exists()  # not expired at start
        now[0] += timedelta(hours=2)  # the worker runs on
        for i in range(40):  # segments fill up, are delivered and archived
            await log.append([out.next(f"line {i}\n" * 5)])
        assert await log.flush(5)
        await wait_for(lambda: not old.exists())
        assert list((tmp_path / "archive" / "w1").glob("*.wal.zst"))  # new ones are kept
        await log.close()

    asyncio.run(main())
