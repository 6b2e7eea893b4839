"""One WAL file open for appending: durable appends with group commit, and recovery.

``append`` returns only once its bytes are on disk. Appenders only copy their record into
an in-memory batch; whoever then needs durability either becomes the leader, writing the
whole batch with one ``pwrite`` and making it durable with one fsync, or waits for the
leader already at work and checks again (leader/follower group commit). Appends go on
while a leader writes and syncs, so under load each fsync covers a whole batch.

A failed write or fsync (or any error while a batch is written) leaves the page cache in
an unknown state, so the file refuses further appends and every waiter not yet durable gets
``WalError``; the owner cuts it back to what was made durable (``cut_to_synced``) or
reopens it, and recovery keeps the valid prefix. ``close`` refuses appends from the moment
it starts, so a record is never accepted into a batch that nobody will write.

``fsync`` is injectable (tests simulate a failing disk with it); it is used for every sync
of the file's data, the creation of the file included.

The file is ``flock``-ed while open, so two processes never append to one log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

from jennah.blocking import FSYNC
from worker.wal.format import (
    HEADER_SIZE,
    ScanResult,
    WalError,
    check_header,
    encode_header,
    scan,
)

FsyncFn = Callable[[int], None]
_FLAGS = os.O_RDWR | os.O_CLOEXEC


class WalLocked(WalError):
    """Another process (or another open in this one) holds the log."""


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WalLocked(f"{path}: in use by another process") from None


def read_wal(path: Path) -> tuple[bytes, ScanResult]:
    """Read-only scan (for ``wal inspect`` and replay): never writes, never truncates."""
    data = path.read_bytes()
    check_header(data, str(path))
    return data, scan(data)


class WalFile:
    """An open, locked WAL file. Thread-safe; see the module docstring."""

    def __init__(self, path: Path, fd: int, size: int, fsync: FsyncFn) -> None:
        self.path = path
        self._fd = fd
        self._fsync = fsync
        self._lock = threading.Lock()
        # Everyone waits for the batch being synced (_inflight) if it covers their bytes,
        # else for the next one (_next); so a finished batch wakes only the appenders it
        # made durable, plus one waiter of the next batch to lead it.
        self._cond = threading.Condition(self._lock)  # idle: close() and truncate() wait here
        self._inflight = threading.Condition(self._lock)
        self._next = threading.Condition(self._lock)
        self._inflight_end = size
        self._buf = bytearray()  # appended, not yet written: it starts at _written
        self._written = size
        self._end = size  # logical end: _written + len(_buf)
        self._synced = size  # durable up to here
        self._syncing = False
        self._broken: str = ""
        self._closing = False  # close() started: no more writes
        self._closed = False
        self.fsyncs = 0

    @classmethod
    def create(cls, path: Path, initial: bytes = b"", fsync: FsyncFn = os.fdatasync) -> WalFile:
        """Create ``path`` atomically with the header and ``initial`` records: written to a
        temp file, synced (with ``fsync``), renamed into place, directory fsync'd. So a
        ``.wal`` file always has a whole header, even after a crash during creation."""
        if path.exists():
            raise WalError(f"{path}: already exists")
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, _FLAGS | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _lock(fd, tmp)
            data = encode_header() + initial
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            fsync(fd)
            os.rename(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, fd, len(data), fsync)

    @classmethod
    def open(cls, path: Path, fsync: FsyncFn = os.fdatasync) -> tuple[WalFile, ScanResult]:
        """Open an existing log and recover it: keep every valid record and truncate the
        file at the first bad one. A file that is not ours raises ``WalFormatError`` and is
        left exactly as it was."""
        fd = os.open(path, _FLAGS)
        try:
            _lock(fd, path)
            data = _read_all(fd)
            check_header(data, str(path))
            result = scan(data, HEADER_SIZE)
            if result.error:
                os.ftruncate(fd, result.end)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, result.end, fsync), result

    @property
    def size(self) -> int:
        return self._end

    @property
    def synced(self) -> int:
        return self._synced

    @property
    def broken(self) -> bool:
        """A write or fsync failed: the file takes no more appends."""
        return bool(self._broken)

    def cut_to_synced(self) -> None:
        """Truncate a broken file to what was made durable (dropping a torn tail)."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if not self._closed:
                self._broken = self._broken or "cut back to what was synced"
                os.ftruncate(self._fd, self._synced)
                os.fsync(self._fd)
                self._buf.clear()
                self._end = self._written = self._synced

    def write(self, record: bytes | bytearray) -> int:
        """Queue ``record`` at the end (not yet durable); return the offset after it."""
        with self._cond:
            if self._closing or self._broken:
                raise WalError(f"{self.path}: {self._broken or 'closed'}")
            self._buf += record
            self._end += len(record)
            return self._end

    def sync_to(self, end: int) -> None:
        """Return once every byte before ``end`` is durable (group commit)."""
        with self._cond:
            while self._synced < end:
                if self._closed or self._broken:
                    raise WalError(f"{self.path}: {self._broken or 'closed'}")
                if self._syncing:
                    (self._inflight if end <= self._inflight_end else self._next).wait()
                    continue
                self._lead()

    def _lead(self) -> None:
        """Write the batch and fsync it, with the lock released meanwhile."""
        self._syncing = True
        batch, self._buf = self._buf, bytearray()
        offset, target = self._written, self._end
        self._inflight_end = target
        # Whoever waited for "the next batch" is covered by this one.
        self._inflight, self._next = self._next, threading.Condition(self._lock)
        error: BaseException | None = None
        ok = False
        self._cond.release()
        try:
            view = memoryview(batch)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            self._fsync(self._fd)
            ok = True
        except BaseException as e:  # whatever it was, the batch is not durable
            error = e
        finally:
            self._cond.acquire()
            self._syncing = False
            if ok:
                self.fsyncs += 1
                self._written = target
                self._synced = target
            elif error is not None:
                self._broken = f"write or fsync failed: {error}"
            self._inflight.notify_all()
            if self._broken or self._closed:
                self._next.notify_all()
            else:
                self._next.notify()
            self._cond.notify_all()
        if error is not None:
            if not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and the like: the file is broken all the same
            raise WalError(f"{self.path}: write or fsync failed: {error}") from error

    def truncate(self, offset: int) -> None:
        """Cut the file at ``offset`` (a record boundary found by recovery), durably."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
            self._buf.clear()
            self._end = self._synced = self._written = offset

    def append(self, record: bytes) -> int:
        """Write and make durable; return the offset after the record."""
        end = self.write(record)
        self.sync_to(end)
        return end

    def close(self) -> None:
        """Make queued records durable (best effort), then close the file and drop the
        lock. Idempotent."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._closed:
                return
            self._closing = True  # from here on, write() refuses: nothing is left behind
            if self._buf and not self._broken:
                with contextlib.suppress(WalError):
                    self._lead()
            self._closed = True
            for cond in (self._cond, self._inflight, self._next):
                cond.notify_all()
            os.close(self._fd)


class AsyncCommit:
    """Durability waits for asyncio tasks on one ``WalFile``.

    Tasks write on the event loop (a page-cache write of a few hundred bytes) and await
    here; one background task runs ``sync_to`` in the ``FSYNC`` lane (``jennah.blocking``)
    for everything written so far, then resolves every waiter it covered. That costs one
    thread hop per fsync batch instead of one per append, and shares fsyncs with thread
    appenders through ``WalFile.sync_to``. Cancelled (loop shutdown), the task still waits
    for the fsync it started (the lane's rule) before it cancels the waiters.
    """

    def __init__(self, wal: WalFile) -> None:
        self._wal = wal
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def wait(self, end: int) -> None:
        if self._wal.synced >= end:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((end, fut))
        if self._task is None:
            self._task = loop.create_task(self._run())
        await fut

    async def _run(self) -> None:
        try:
            while self._waiters:
                target = self._wal.size
                try:
                    await FSYNC.run(self._wal.sync_to, target)
                except WalError as e:
                    for _, fut in self._waiters:
                        if not fut.done():
                            fut.set_exception(e)
                    self._waiters = []
                    return
                synced = self._wal.synced
                waiting = self._waiters
                self._waiters = [w for w in waiting if w[0] > synced]
                woken = 0
                for end, fut in waiting:
                    if end <= synced and not fut.done():
                        fut.set_result(None)
                        woken += 1
                if woken and self._waiters:
                    # Let the tasks just woken append again before the next batch starts.
                    await asyncio.sleep(0)
        finally:
            self._task = None
            # Cancelled (loop shutdown): nobody will sync for the others; let them know.
            for _, fut in self._waiters:
                fut.cancel()
            self._waiters = []
