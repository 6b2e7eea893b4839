"""``jennah wal …``: the operations commands of the runbook (DESIGN §6, §11).

``add_wal_commands`` registers them on the ``jennah`` parser; each subcommand sets
``fn(args) -> int`` (the exit code). ``run(argv)`` is a standalone entry for tests and
``python -m worker.wal.cli``. Exit codes: 0 fine, 1 damage found (or files skipped),
2 usage errors, files that are not WALs, bad settings.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from jennah.errors import JennahError, SettingsError
from jennah.models import JobEvent
from jennah.settings import jennah_home
from worker.wal import archive
from worker.wal.codec import PayloadError, event_from_payload, kind_name, meta_from_payload
from worker.wal.format import (
    HEADER_SIZE,
    KIND_CHECKPOINT,
    KIND_META,
    ScanResult,
    WalError,
    check_header,
    scan,
)
from worker.wal.joblog import SUFFIX, JobLog
from worker.wal.log import WalLocked, read_wal
from worker.wal.metrics import wal_metrics

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms])\s*$")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_REPLAY_BATCH = 500

ARCHIVE_HELP = """Archive (zstd, into ARCHIVE_DIR/<worker>/<job>.<attempt>.wal.zst) every log
whose execution is over and fully sent: its last event is terminal (COMPLETED, FAILED,
CANCELLED or LEASE_LOST) and its checkpoint covers every event. Logs held by a running
worker, unfinished or unsent logs and files that are not WALs are left alone."""


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
    if path.name.endswith(archive.ARCHIVE_SUFFIX):
        data = archive.read_archive(path)
        check_header(data, str(path))
        return data, scan(data)
    return read_wal(path)


def _fmt_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms}ms"


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        data, result = _load(path)
    except (WalError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"file: {path}")
    print(f"header: magic JNWAL001, version 1, {HEADER_SIZE} bytes")
    for r in result.records:
        print(f"offset {r.offset:>10}  seq {r.seq:>12}  {kind_name(r.kind):<14} "
              f"{_fmt_ms(r.unix_ms)}  size {r.size:>7}  crc {r.crc:016x} ok")
    print(f"{len(result.records)} valid records, {result.end} of {len(data)} bytes")
    if result.error:
        print(f"corrupt at offset {result.end}")
        print(f"reason: {result.error}")
        return 1
    print("clean")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from database import create_store
    from jennah.settings import load_worker_settings

    try:
        settings = load_worker_settings()
    except JennahError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wal_dir = Path(args.wal_dir) if args.wal_dir else settings.wal_dir
    paths = archive.list_logs(wal_dir) if args.all else [Path(args.file)]
    store = create_store(settings.store)
    status = 0
    try:
        store.migrate()
        for path in paths:
            status = max(status, _replay_one(path, store.append_events))
    finally:
        store.close()
    return status


def _replay_one(path: Path, append: Callable[[Sequence[JobEvent]], None]) -> int:
    try:
        _, result = _load(path)
    except (WalError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tenant = ""
    events: list[JobEvent] = []
    try:
        for r in result.records:
            if r.kind == KIND_META:
                tenant = meta_from_payload(r.payload).tenant_id
            elif r.kind != KIND_CHECKPOINT:
                events.append(event_from_payload(r.payload, tenant))
    except PayloadError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    for i in range(0, len(events), _REPLAY_BATCH):
        append(events[i : i + _REPLAY_BATCH])
    note = ""
    if events and not result.error and path.name.endswith(SUFFIX):
        note = _checkpoint(path, max(e.seq for e in events))
    print(f"{path}: delivered {len(events)} events{note}")
    if result.error:
        print(f"{path}: corrupt at offset {result.end} ({result.error}); later records skipped")
        return 1
    return 0


def _checkpoint(path: Path, seq: int) -> str:
    """Record the replay as the sent watermark, unless a running worker holds the log."""
    try:
        jl = JobLog.open(path, wal_metrics(CollectorRegistry()))
    except WalLocked:
        return " (log in use by a running worker: watermark left to it)"
    try:
        jl.checkpoint(seq)
    finally:
        jl.close()
    return ", watermark now " + str(seq)


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
    report = archive.archive_finished(wal_dir, archive_dir, wal_metrics(CollectorRegistry()))
    for p in report.archived:
        print(f"archived {p}")
    for p, why in report.kept:
        print(f"kept {p}: {why}")
    print(f"{len(report.archived)} archived, {len(report.kept)} kept")
    return 0


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
    """Register ``wal inspect|replay|cleanup|archive`` on the ``jennah`` parser."""
    wal = subparsers.add_parser("wal", help="operate on the event write-ahead log")
    sub = wal.add_subparsers(dest="wal_command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a log's header, records and CRC status",
                       description="Read-only: never truncates. Exit 0 clean, 1 damaged "
                       "(prints 'corrupt at offset N'), 2 not a WAL file.")
    p.add_argument("file", help="a .wal file (or an archived .wal.zst)")
    p.set_defaults(fn=_guard(_inspect))

    p = sub.add_parser("replay", help="deliver a log's events (or every log's) to the store",
                       description="Sends every valid event to the store (idempotent on "
                       "job_id and seq), then records the watermark if no worker holds the log.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("file", nargs="?", help="a .wal or .wal.zst file")
    which.add_argument("--all", action="store_true", help="every log under WAL_DIR")
    p.add_argument("--wal-dir", help="default: WAL_DIR")
    p.set_defaults(fn=_guard(_replay))

    p = sub.add_parser("cleanup", help="delete archives older than a duration",
                       description="Delete archives last modified before now - DURATION.")
    p.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                   help="e.g. 30d, 12h, 15m, 90s (default: WAL_RETENTION_DAYS)")
    p.add_argument("--archive-dir", help="default: ARCHIVE_DIR")
    p.set_defaults(fn=_guard(_cleanup))

    p = sub.add_parser("archive", help="archive logs of finished, fully sent executions",
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
