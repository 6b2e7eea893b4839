"""``jennah wal …``: the operations commands of the runbook (docs/design.md §6, §11).

``add_wal_commands`` registers them on the ``jennah`` parser; each subcommand sets
``fn(args) -> int`` (the exit code). ``run(argv)`` is a standalone entry for tests and
``python -m commands.wal``. Exit codes: 0 fine, 1 damage found (or files skipped),
2 usage errors, files that are not WALs, bad settings.

* ``inspect FILE``: a segment, an archive or a v1 log, record by record (read-only). A
  damaged archive shows the records it still decodes to, then ``corrupt at offset N``
  (N: an offset in the original log).
* ``replay``: deliver what a stopped worker's WAL still holds (and its v1 logs) to the
  store; safe to repeat, the store keeps each event once. Exit 1 if segments are damaged.
* ``archive``: archive the segments of stopped workers whose events are all delivered.
* ``cleanup``: delete archives past the retention.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from database.base import JobStore
from jennah.blocking import blocking
from jennah.errors import JennahError, SettingsError
from jennah.models import JobEvent, Placed
from jennah.settings import jennah_home
from worker.wal import archive
from worker.wal.codec import PayloadError, kind_name, wal_event
from worker.wal.format import (
    HEADER_SIZE,
    KIND_CHECKPOINT,
    KIND_META,
    ScanResult,
    WalError,
    WalFormatError,
    check_header,
    scan,
)
from worker.wal.legacy import V1_NAME, find_v1_logs, import_v1_logs, read_v1_log
from worker.wal.log import WalLocked, read_wal
from worker.wal.segments import SEGMENT_NAME, WorkerWal

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms])\s*$")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_REPLAY_BATCH = 500

ARCHIVE_HELP = """Archive (zstd, into ARCHIVE_DIR/<worker>/<first_lsn>.wal.zst) the segments
of every stopped worker whose events are all delivered (their LSNs are at or below the
checkpoint), the last one included: a fresh, empty segment holding the checkpoint takes
its place, so the worker's LSNs keep increasing. A running worker's WAL (locked) is left
to it; it archives its own segments as they are delivered. Damage found is printed (exit
1): a segment with a bad record is archived as it is once its readable events are
delivered; one whose header is unreadable stays in place."""


@dataclass(frozen=True)
class WalDirs:
    wal_dir: Path
    archive_dir: Path
    retention_days: float


def wal_dirs(env: Mapping[str, str]) -> WalDirs:
    """WAL_DIR, ARCHIVE_DIR and WAL_RETENTION_DAYS with the defaults of
    ``jennah.settings``, without the rest of the worker settings (no store, no token)."""
    home = jennah_home(env)
    raw = env.get("WAL_RETENTION_DAYS", "").strip()
    try:
        days = float(raw) if raw else 30.0
    except ValueError:
        raise SettingsError(f"invalid settings: WAL_RETENTION_DAYS={raw!r}") from None
    return WalDirs(
        Path(env.get("WAL_DIR", "").strip() or home / "wal").expanduser(),
        Path(env.get("ARCHIVE_DIR", "").strip() or home / "archive").expanduser(),
        days,
    )


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` (or a bare number of days) → seconds."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
        return float(text) * 86400.0
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 30d, 12h, 15m, 90s)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def _load(path: Path) -> tuple[bytes, ScanResult]:
    """A file's bytes and its scan. For a damaged archive: the bytes it still decodes
    to, and a scan that stops where they stop (offset 0 if even the header is lost)."""
    if path.name.endswith(archive.ARCHIVE_SUFFIX):
        data, damage = archive.read_archive_prefix(path)
        if not damage:
            check_header(data, str(path))
            return data, scan(data)
        if not data.startswith(b"JNWAL") and damage == "not a zstd archive":
            raise WalFormatError(f"{path}: not a Jennah WAL archive ({damage})")
        if len(data) < HEADER_SIZE:
            return data, ScanResult([], 0, f"{damage}; the header is lost")
        check_header(data, str(path))
        result = scan(data)
        return data, ScanResult(result.records, result.end, result.error or damage)
    return read_wal(path)


def _fmt_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms}ms"


def _describe(kind: int, payload: bytes) -> str:
    if kind in (KIND_META, KIND_CHECKPOINT):
        return ""
    try:
        ev = wal_event(payload)
    except PayloadError:
        return ""  # a v1 record (a bare JobEvent) or not ours: the kind says enough
    return f"  job {ev.job_id}  key {ev.dedup_key}"


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        data, result = _load(path)
    except (WalError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"file: {path}")
    print(f"header: magic JNWAL001, version 1, {HEADER_SIZE} bytes")
    label = "seq" if V1_NAME.match(path.name.removesuffix(".zst")) else "lsn"
    for r in result.records:
        print(f"offset {r.offset:>10}  {label} {r.lsn:>12}  {kind_name(r.kind):<14} "
              f"{_fmt_ms(r.unix_ms)}  size {r.size:>7}  crc {r.crc:016x} ok"
              f"{_describe(r.kind, r.payload) if args.verbose else ''}")
    print(f"{len(result.records)} valid records, {result.end} of {len(data)} bytes")
    if result.error:
        print(f"corrupt at offset {result.end}")
        print(f"reason: {result.error}")
        return 1
    print("clean")
    return 0


def _store_from_env() -> JobStore:
    from database import STORES, create_store
    from jennah.settings import load_store_settings

    store = create_store(load_store_settings(stores=STORES))
    store.migrate()
    return store


class _StoreSink:
    """``EventSink`` straight to a store (the tools run without a worker)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def deliver(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        return await blocking(self.store.append_execution_events, events, legacy)


def _workers(wal_dir: Path, worker: str | None) -> list[str]:
    if worker:
        return [worker]
    return sorted(p.name for p in wal_dir.iterdir() if p.is_dir()) if wal_dir.is_dir() else []


def _replay(args: argparse.Namespace) -> int:
    dirs = wal_dirs(os.environ)
    wal_dir = Path(args.wal_dir) if args.wal_dir else dirs.wal_dir
    archive_dir = Path(args.archive_dir) if args.archive_dir else dirs.archive_dir
    store = _store_from_env()
    try:
        if args.file:
            return asyncio.run(_replay_file(Path(args.file), _StoreSink(store)))
        status = 0
        for worker in _workers(wal_dir, args.worker):
            status = max(status, asyncio.run(_replay_worker(
                wal_dir, archive_dir, worker, _StoreSink(store), args.timeout,
                dirs.retention_days)))
        return status
    finally:
        store.close()


async def _replay_worker(
    wal_dir: Path, archive_dir: Path, worker: str, sink: _StoreSink, timeout: float,
    retention_days: float = 30.0,
) -> int:
    """Deliver a stopped worker's WAL: its pending segments' events, then its v1 logs."""
    from worker.wal.eventlog import WalExecutionLog

    log = WalExecutionLog(wal_dir, archive_dir, worker, sink, registry=CollectorRegistry(),
                          retention_days=retention_days)  # fmt: skip
    try:
        await log.start()
    except WalLocked:
        print(f"{worker}: in use by a running worker (it delivers its own events)")
        return 1
    try:
        pending = log.recovery.pending if log.recovery else log.wal.pending
        flushed = await log.flush(timeout)
        await log.wait_ready(timeout)  # the v1 import runs in the background
        left = log.wal.pending
        print(f"{worker}: delivered {pending - left} of {pending} pending events"
              f"{'' if log.ready else '; v1 logs not imported yet'}")
        damaged = log.recovery.damaged if log.recovery else []
        for line in damaged:
            print(f"{worker}: damaged: {line}")
        return 0 if flushed and log.ready and not damaged else 1
    finally:
        await log.close()


async def _replay_file(path: Path, sink: _StoreSink) -> int:
    """Send every event of one file (a segment, an archive or a v1 log) again."""
    if V1_NAME.match(path.name) and path.suffix == ".wal":
        v1 = read_v1_log(path)
        stored = 0
        for i in range(0, len(v1.pending), _REPLAY_BATCH):
            placed = await sink.deliver(v1.pending[i : i + _REPLAY_BATCH], True)
            stored += sum(p is Placed.STORED for p, _ in placed)
        print(f"{path}: v1 log, {len(v1.pending)} undelivered events, {stored} stored")
        return 1 if v1.damage else 0
    try:
        _, result = _load(path)
    except (WalError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    events = []
    for r in result.records:
        if r.kind in (KIND_META, KIND_CHECKPOINT):
            continue
        try:
            events.append(wal_event(r.payload))
        except PayloadError as e:
            print(f"{path}: record {r.lsn}: {e}", file=sys.stderr)
            return 1
    stored = 0
    for i in range(0, len(events), _REPLAY_BATCH):
        placed = await sink.deliver(events[i : i + _REPLAY_BATCH])
        stored += sum(p is Placed.STORED for p, _ in placed)
    print(f"{path}: sent {len(events)} events, {stored} new to the store")
    if result.error:
        print(f"{path}: corrupt at offset {result.end} ({result.error}); later records skipped")
        return 1
    return 0


def _import_v1(args: argparse.Namespace) -> int:
    dirs = wal_dirs(os.environ)
    wal_dir = Path(args.wal_dir) if args.wal_dir else dirs.wal_dir
    archive_dir = Path(args.archive_dir) if args.archive_dir else dirs.archive_dir
    store = _store_from_env()
    try:
        paths = find_v1_logs(wal_dir, args.worker)
        report = asyncio.run(import_v1_logs(paths, archive_dir, _StoreSink(store).deliver))
    finally:
        store.close()
    print(f"v1 logs: {report.logs} imported ({report.stored} events stored, "
          f"{report.duplicates} already there), {len(report.archived)} archived")
    for line in report.skipped:
        print(f"skipped {line}")
    return 1 if report.skipped else 0


def _cleanup(args: argparse.Namespace) -> int:
    dirs = wal_dirs(os.environ)
    archive_dir = Path(args.archive_dir) if args.archive_dir else dirs.archive_dir
    seconds = args.older_than if args.older_than is not None else dirs.retention_days * 86400
    deleted = archive.cleanup(archive_dir, seconds)
    for p in deleted:
        print(f"deleted {p}")
    print(f"{len(deleted)} archives older than {seconds:g}s deleted from {archive_dir}")
    return 0


def _archive(args: argparse.Namespace) -> int:
    dirs = wal_dirs(os.environ)
    wal_dir = Path(args.wal_dir) if args.wal_dir else dirs.wal_dir
    archive_dir = Path(args.archive_dir) if args.archive_dir else dirs.archive_dir
    archived = kept = damaged = 0
    for worker in _workers(wal_dir, None):
        wal = WorkerWal(wal_dir / worker)
        if not any(SEGMENT_NAME.match(p.name) for p in (wal_dir / worker).iterdir()):
            continue
        try:
            report = wal.open()
        except WalLocked:
            print(f"kept {wal_dir / worker}: in use by a running worker")
            kept += 1
            continue
        try:
            wal.seal()  # the last segment too, if delivered: a fresh one takes its place
        finally:
            wal.close()
        for line in report.damaged:  # a segment it cannot read at all stays where it is
            print(f"damaged {line}")
            damaged += 1
        segments = wal.segments()
        for seg in segments:
            if seg.last_lsn > wal.acked:
                print(f"kept {seg.path}: events up to {seg.last_lsn} not all delivered "
                      f"(checkpoint {wal.acked}); run 'jennah wal replay' first")
                kept += 1
                continue
            if seg is segments[-1]:
                continue  # no events: it holds the checkpoint and the next LSN
            print(f"archived {archive.archive_file(seg.path, archive_dir / worker)}")
            archived += 1
    print(f"{archived} archived, {kept} kept" + (f", {damaged} damaged" if damaged else ""))
    return 1 if damaged else 0


Handler = Callable[[argparse.Namespace], int]


def _guard(func: Handler) -> Handler:
    """Turn our own errors (bad settings, I/O on a log) into one line and exit code 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            code = func(args)
        except JennahError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return code

    return wrapped


def add_wal_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``wal inspect|replay|import-v1|cleanup|archive`` on the ``jennah`` parser."""
    wal = subparsers.add_parser("wal", help="operate on the event write-ahead log")
    sub = wal.add_subparsers(dest="wal_command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a WAL file's header, records and CRC status",
                       description="Read-only: never truncates. Exit 0 clean, 1 damaged "
                       "(prints 'corrupt at offset N'), 2 not a WAL file.")
    p.add_argument("file", help="a segment (.wal), an archive (.wal.zst) or a v1 log")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also print each event's job and dedup key")
    p.set_defaults(fn=_guard(_inspect))

    p = sub.add_parser("replay", help="deliver what a stopped worker's WAL holds to the store",
                       description="Delivers every event after the checkpoint of each "
                       "worker's WAL under WAL_DIR (or one --worker's, or every event of one "
                       "FILE), and imports v1 logs. The store keeps each event once, so "
                       "replaying twice is harmless. A running worker's WAL is left to it.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("file", nargs="?", help="one segment, archive or v1 log")
    which.add_argument("--worker", help="only this worker's WAL (default: every worker)")
    p.add_argument("--wal-dir", help="default: WAL_DIR")
    p.add_argument("--archive-dir", help="default: ARCHIVE_DIR")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per worker")
    p.set_defaults(fn=_guard(_replay))

    p = sub.add_parser("import-v1", help="deliver v1 per-execution logs once, then archive",
                       description="The upgrade from the v1 WAL: every undelivered event of "
                       "every <job>.<attempt>.wal under WAL_DIR goes to the store once (by its "
                       "v1 dedup key), then the log is archived. Workers do this for their own "
                       "directory at start-up; this is for the directories of workers that are "
                       "gone.")
    p.add_argument("--worker", help="only this worker's logs (default: every worker)")
    p.add_argument("--wal-dir", help="default: WAL_DIR")
    p.add_argument("--archive-dir", help="default: ARCHIVE_DIR")
    p.set_defaults(fn=_guard(_import_v1))

    p = sub.add_parser("cleanup", help="delete archives older than a duration",
                       description="Delete archives last modified before now - DURATION.")
    p.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                   help="e.g. 30d, 12h, 15m, 90s (default: WAL_RETENTION_DAYS)")
    p.add_argument("--archive-dir", help="default: ARCHIVE_DIR")
    p.set_defaults(fn=_guard(_cleanup))

    p = sub.add_parser("archive", help="archive delivered segments of stopped workers",
                       description=ARCHIVE_HELP)
    p.add_argument("--wal-dir", help="default: WAL_DIR")
    p.add_argument("--archive-dir", help="default: ARCHIVE_DIR")
    p.set_defaults(fn=_guard(_archive))


def run(argv: list[str]) -> int:
    """``jennah wal …`` on its own: ``run(["wal", "inspect", FILE])`` (the leading
    ``wal`` may be left out)."""
    parser = argparse.ArgumentParser(prog="jennah")
    add_wal_commands(parser.add_subparsers(dest="command", required=True))
    if argv[:1] != ["wal"]:
        argv = ["wal", *argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
