"""The disk fails under the WAL (docs/design.md §6 "Failures"): an fsync that raises, and a real
full disk (a 256 KiB tmpfs). ``append`` raises ``WalError``, nothing of what failed is
ever delivered, ``wal_write_errors_total`` counts it, ``health()`` says why; once writes
work again, the probe notices and appends succeed. ``wal_pending_events`` never goes
negative and always matches the WAL.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from database.memory import MemoryStore
from tests.worker.wal.test_wal_support import (
    FAST,
    FailingFsync,
    RecordingSink,
    Stream,
    detail,
    key_of,
    metric,
    new_log,
    running_job,
    stored,
    wait_for,
)
from worker.wal import WalError, WalExecutionLog, eventlog


@pytest.fixture
def probe_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """health() probes the disk at most once a second; tests need it every call."""
    monkeypatch.setattr(eventlog, "PROBE_INTERVAL_SECONDS", 0.0)


def _gauge_ok(log: WalExecutionLog, registry: CollectorRegistry) -> None:
    gauge = metric(registry, "wal_pending_events")
    assert gauge >= 0
    assert gauge == log.wal.pending


def test_failing_fsync_refuses_appends_until_the_disk_is_back(
    tmp_path: Path, probe_at_once: None
) -> None:
    store = MemoryStore()
    running_job(store, "x")
    sink = RecordingSink(store)
    registry = CollectorRegistry()
    fsync = FailingFsync(errno.ENOSPC)
    failing = fsync.failing

    out = Stream("x")
    ok1 = [out.next("first\n")]
    lost = [out.next("lost 1\n"), detail("x", "lost")]

    async def main() -> None:
        log = new_log(tmp_path, sink, registry=registry, fsync=fsync)
        await log.start()
        await log.append(ok1)
        assert await log.flush(5)
        assert await log.health() == (True, "WAL ok, 0 events to deliver")
        failing.set()
        with pytest.raises(WalError, match="No space left"):
            await log.append(lost)
        assert metric(registry, "wal_write_errors_total") == 1
        _gauge_ok(log, registry)
        ok, why = await log.health()
        assert not ok and "WAL cannot write" in why and "No space" in why
        with pytest.raises(WalError):
            await log.append(lost)  # the poller tries the same bytes again: still full
        assert metric(registry, "wal_write_errors_total") == 2
        assert not (await log.health())[0]
        _gauge_ok(log, registry)
        assert await log.flush(1)  # nothing of the failed appends waits for delivery
        failing.clear()
        ok, why = await log.health()  # the probe starts a fresh segment: it works
        assert ok, why
        await log.append(lost)  # read again, appended again
        assert await log.flush(5)
        _gauge_ok(log, registry)
        await log.close()

    asyncio.run(main())
    assert [key_of(e) for e in sink.sent_events] == [key_of(e) for e in ok1 + lost]
    assert max(sink.sent.values()) == 1  # the failed attempts were never sent
    assert [e.dedup_key for e in stored(store, "x")] == [e.dedup_key for e in ok1 + lost]
    assert metric(registry, "wal_failures_total", {"op": "append"}) == 2


def test_health_does_not_recover_while_the_disk_still_fails(
    tmp_path: Path, probe_at_once: None
) -> None:
    """The probe must go through the same fsync as appends: a fresh segment that was
    made durable some other way would say 'ok' while every append still fails."""
    fsync = FailingFsync(errno.EIO)
    failing = fsync.failing

    async def main() -> None:
        log = new_log(tmp_path, RecordingSink(), fsync=fsync)
        await log.start()
        failing.set()
        with pytest.raises(WalError):
            await log.append([detail("x", "1")])
        for _ in range(3):
            assert not (await log.health())[0]
        await log.close()

    asyncio.run(main())


# --- a real full disk -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs. Needs root and mount(8); skipped (with the reason) otherwise."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: cannot make a small disk to fill")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"mounting a 256 KiB tmpfs is not permitted here "
                    f"({proc.stderr.strip() or proc.returncode}): the full-disk test needs "
                    "root (CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_real_full_disk(tmp_path: Path, small_disk: Path, probe_at_once: None) -> None:
    """The WAL fills a 256 KiB disk while the store is down. Appends then fail with
    ENOSPC and health says so; once the store is back, delivered segments are archived
    (elsewhere) and deleted, space comes back, the probe notices and appends go on. Every
    event whose append returned is in the store once; none whose append failed is."""
    store = MemoryStore()
    running_job(store, "x")
    sink = RecordingSink(store)
    sink.down = True
    registry = CollectorRegistry()
    appended: list[str] = []
    refused: list[str] = []

    async def main() -> None:
        log = WalExecutionLog(small_disk / "wal", tmp_path / "archive", "w1", sink,
                              registry=registry, segment_bytes=16 << 10, close_timeout=1.0,
                              sender_config=FAST)  # fmt: skip
        await log.start()
        n = 0
        while not refused:
            ev = detail("x", f"{n:05d}", message="m" * 120)
            n += 1
            try:
                await log.append([ev])
                appended.append(ev.dedup_key)
            except WalError as e:
                assert "No space left" in str(e)
                refused.append(ev.dedup_key)
            assert n < 5000, "the disk never filled up"
        assert metric(registry, "wal_write_errors_total") >= 1
        _gauge_ok(log, registry)
        ok, why = await log.health()
        assert not ok and "No space left" in why
        with pytest.raises(WalError):
            await log.append([detail("x", "still-full")])
        refused.append("detail:still-full")
        sink.down = False  # the store is back: segments get delivered, archived, deleted
        assert await log.flush(10)
        await wait_for(lambda: not log.wal.done_segments())
        ok, why = await log.health()
        assert ok, why
        later = detail("x", "after")
        await log.append([later])
        appended.append(later.dedup_key)
        assert await log.flush(5)
        _gauge_ok(log, registry)
        await log.close()

    asyncio.run(main())
    assert len(appended) > 100
    keys = [e.dedup_key for e in stored(store, "x")]
    assert keys == appended
    assert not set(refused) & {k for _, k in sink.sent}
    assert list((tmp_path / "archive" / "w1").glob("*.wal.zst"))


def test_a_flush_waiting_for_an_append_that_fails_returns_at_once(tmp_path: Path) -> None:
    """The flush barrier waits for events that are queued; an append that fails takes
    its events out of the queue, and the barrier must notice without a delivery."""
    entered, release = threading.Event(), threading.Event()
    failing = threading.Event()

    def fsync(fd: int) -> None:
        if failing.is_set():
            entered.set()
            assert release.wait(10)
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)

    async def main() -> None:
        log = new_log(tmp_path, RecordingSink(), fsync=fsync)
        await log.start()
        failing.set()
        appending = asyncio.create_task(log.append([detail("x", "doomed")]))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, entered.wait, 10)
        flushing = asyncio.create_task(log.flush(30))
        await asyncio.sleep(0)  # the barrier is waiting for the append's event
        assert not flushing.done()
        failing.clear()
        release.set()
        with pytest.raises(WalError):
            await appending
        assert await asyncio.wait_for(flushing, 5)
        await log.close()

    asyncio.run(main())
