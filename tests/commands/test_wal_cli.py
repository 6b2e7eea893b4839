"""``jennah wal inspect|replay|import-v1|archive|cleanup`` (docs/design.md §6, §11), in-process and
as a subprocess, on segments, archives and v1 logs; replay into a SQLite store given by
the environment."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commands.wal import add_wal_commands, parse_duration, run
from database.sqlite import SQLiteStore
from jennah.models import EventKind, Job, JobSpec
from tests.worker.wal.test_wal_legacy import life, write_v1_log
from tests.worker.wal.test_wal_support import (
    RecordingSink,
    Stream,
    detail,
    new_log,
    running_job,
    segment_paths,
    stored,
)
from worker.wal.archive import archive_file, read_archive
from worker.wal.format import HEADER_SIZE, KIND_CHECKPOINT, scan
from worker.wal.segments import WorkerWal, list_segments

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "commands.wal", *args], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**os.environ, **(env or {})},
    )


def _sqlite(path: Path, *jobs: str) -> SQLiteStore:
    store = SQLiteStore(path)
    store.migrate()
    for j in jobs:
        running_job(store, j)
    return store


def stopped_worker(
    base: Path, store: SQLiteStore, worker: str = "w1", jobs: tuple[str, ...] = ("x",),
    n: int = 6, delivered: int = 0, segment_bytes: int = 16 << 20, outputs: bool = True,
) -> list[tuple[str, str]]:
    """A stopped worker's WAL: ``n`` events per job (output and details), the first
    ``delivered`` rounds of them in the store, the rest pending. Returns the (job, dedup
    key) of every event appended, in order."""
    sink = RecordingSink(store)
    keys: list[tuple[str, str]] = []

    async def main() -> None:
        log = new_log(base, sink, worker, close_timeout=0.01, segment_bytes=segment_bytes)
        streams = {j: Stream(j) for j in jobs}
        for i in range(n):
            if i == delivered:
                assert await log.flush(5)
                sink.down = True
            for j in jobs:
                use_output = outputs and i % 3
                ev = streams[j].next(f"{j} line {i}\n") if use_output else detail(j, f"{j}-{i}")
                await log.append([ev])
                keys.append((j, ev.dedup_key))
        if delivered >= n:
            assert await log.flush(5)
        await log.close()

    asyncio.run(main())
    return keys


def _segment(tmp_path: Path) -> tuple[Path, bytes]:
    stopped_worker(tmp_path, _sqlite(tmp_path / "db.sqlite", "x"), n=6, delivered=6)
    [path] = segment_paths(tmp_path / "wal" / "w1")
    return path, path.read_bytes()


def _records(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("offset")]


def test_inspect_a_clean_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, original = _segment(tmp_path)
    assert run(["wal", "inspect", "-v", str(path)]) == 0
    out = capsys.readouterr().out
    assert "header: magic JNWAL001, version 1" in out
    lines = _records(out)
    recs = scan(original).records
    assert len(lines) == len(recs)
    assert "CHECKPOINT" in lines[0] and "lsn            0" in lines[0]
    assert "STATUS_DETAIL" in lines[1] and "lsn            1" in lines[1]
    assert "job x  key detail:x-0" in lines[1]
    assert any("OUTPUT" in line and "key out:0:0:stdout:0" in line for line in lines)
    assert all(" ok" in line and "crc" in line for line in lines)
    assert f"{len(recs)} valid records, {len(original)} of {len(original)} bytes" in out
    assert out.rstrip().endswith("clean")
    assert path.read_bytes() == original


def test_inspect_a_damaged_segment_reports_the_offset_and_never_truncates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, original = _segment(tmp_path)
    third = scan(original).records[3]
    damaged = bytearray(original)
    damaged[third.offset + 30] ^= 0x40
    path.write_bytes(bytes(damaged))
    assert run(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"corrupt at offset {third.offset}" in out.splitlines()
    assert "3 valid records" in out and len(_records(out)) == 3
    assert path.read_bytes() == bytes(damaged)
    path.write_bytes(original[:-5])  # a torn tail
    assert run(["inspect", str(path)]) == 1
    last = scan(original).records[-1]
    assert f"corrupt at offset {last.offset}" in capsys.readouterr().out.splitlines()
    assert path.read_bytes() == original[:-5]


@pytest.mark.parametrize("content", [b"", b"hello\n", b"JNWAL001\x02\0\0\0\0\0\0\0"])
def test_inspect_refuses_a_file_that_is_not_a_wal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "notes.wal"
    path.write_bytes(content)
    assert run(["wal", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("not a Jennah WAL" in err or "version" in err)
    assert path.read_bytes() == content


def test_inspect_archives_clean_and_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = _segment(tmp_path)
    out = archive_file(path, tmp_path / "archive")
    packed = out.read_bytes()
    assert run(["inspect", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("clean")
    out.write_bytes(packed[: len(packed) // 2])  # truncated: nothing decodes
    assert run(["inspect", str(out)]) == 1
    text = capsys.readouterr().out
    assert "corrupt at offset 0" in text.splitlines() and "truncated" in text
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0x10
    out.write_bytes(bytes(flipped))
    assert run(["inspect", str(out)]) == 1
    assert any(line.startswith("corrupt at offset ") for line in capsys.readouterr().out
               .splitlines())  # fmt: skip
    junk = tmp_path / "archive" / "junk.wal.zst"
    junk.write_bytes(b"not zstd at all")
    assert run(["inspect", str(junk)]) == 2
    assert "not a Jennah WAL archive" in capsys.readouterr().err


def test_inspect_a_v1_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w1" / "j1.0.wal"
    write_v1_log(path, "j1", life("j1"), checkpoint=2)
    assert run(["inspect", str(path)]) == 0
    lines = _records(capsys.readouterr().out)
    assert "META" in lines[0] and "seq            0" in lines[0]
    assert "SUBMITTED" in lines[1] and "seq            1" in lines[1]
    assert "CHECKPOINT" in lines[3] and "COMPLETED" in lines[-1]


def test_inspect_as_a_subprocess(tmp_path: Path) -> None:
    path, original = _segment(tmp_path)
    clean = _cli("wal", "inspect", str(path))
    assert clean.returncode == 0, clean.stderr
    assert "STATUS_DETAIL" in clean.stdout
    path.write_bytes(original[: HEADER_SIZE + 10])
    damaged = _cli("inspect", str(path))
    assert damaged.returncode == 1
    assert f"corrupt at offset {HEADER_SIZE}" in damaged.stdout.splitlines()
    foreign = tmp_path / "x.bin"
    foreign.write_bytes(b"\x00" * 100)
    refused = _cli("wal", "inspect", str(foreign))
    assert refused.returncode == 2 and "not a Jennah WAL" in refused.stderr
    assert "Traceback" not in refused.stderr


def _env(tmp_path: Path) -> dict[str, str]:
    return {"DB_PROVIDER": "sqlite", "DB_PATH": str(tmp_path / "jennah.db"),
            "WAL_DIR": str(tmp_path / "wal"), "ARCHIVE_DIR": str(tmp_path / "archive"),
            "JENNAH_HOME": str(tmp_path / "home"), "WAL_RETENTION_DAYS": "60"}


def test_replay_a_stopped_workers_wal_into_the_store_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _env(tmp_path)
    store = _sqlite(tmp_path / "jennah.db", "x", "y")
    keys = stopped_worker(tmp_path, store, "w1", ("x", "y"), n=9, delivered=4)
    store.close()
    kept = tmp_path / "archive" / "w0" / "00000000000000000001.wal.zst"  # 40 days old
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    os.utime(kept, (time.time() - 40 * 86400,) * 2)

    proc = _cli("wal", "replay", env=env)  # the real command, settings from the env
    assert proc.returncode == 0, proc.stderr
    assert "w1: delivered 10 of 10 pending events" in proc.stdout
    assert kept.exists()  # WAL_RETENTION_DAYS=60 is the retention, not a default of 30
    store = SQLiteStore(tmp_path / "jennah.db")
    try:
        got = [(j, e.dedup_key) for j in ("x", "y") for e in stored(store, j)]
        assert sorted(got) == sorted(keys) and len(set(got)) == len(got)
    finally:
        store.close()

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run(["replay"]) == 0  # again: nothing left to deliver
    assert "w1: delivered 0 of 0 pending events" in capsys.readouterr().out
    segment = segment_paths(tmp_path / "wal" / "w1")[0]
    assert run(["replay", str(segment)]) == 0  # every event of one file, sent again
    out = capsys.readouterr().out
    assert f"sent {len(keys)} events, 0 new to the store" in out
    store = SQLiteStore(tmp_path / "jennah.db")
    try:
        assert sorted((j, e.dedup_key) for j in ("x", "y") for e in stored(store, j)) == sorted(
            keys)
    finally:
        store.close()


def test_replay_leaves_a_running_workers_wal_alone_and_reports_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    store = _sqlite(tmp_path / "jennah.db", "x")
    keys = stopped_worker(tmp_path, store, "w1", n=30, delivered=0, segment_bytes=1024,
                          outputs=False)
    running = WorkerWal(tmp_path / "wal" / "w1")
    running.open()
    try:
        assert run(["replay", "--worker", "w1"]) == 1
        assert "in use by a running worker" in capsys.readouterr().out
        assert stored(store, "x") == []
    finally:
        running.close()
    older = segment_paths(tmp_path / "wal" / "w1")[0]
    data = bytearray(older.read_bytes())
    recs = scan(bytes(data)).records
    bad = recs[2]
    data[bad.offset + 28] ^= 1
    older.write_bytes(bytes(data))
    assert run(["replay", "--worker", "w1"]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {older}: corrupt at offset {bad.offset}" in out
    lost = {k for r, k in zip(recs[1:], keys, strict=False) if r.offset >= bad.offset}
    assert lost  # the rest of that segment; every other event went in
    assert [("x", e.dedup_key) for e in stored(store, "x")] == [k for k in keys if k not in lost]
    store.close()


def test_archive_a_stopped_workers_delivered_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    store = _sqlite(tmp_path / "jennah.db", "x", "y")
    stopped_worker(tmp_path, store, "w1", ("x",), n=30, delivered=30, segment_bytes=1 << 20)
    stopped_worker(tmp_path, store, "w2", ("y",), n=5, delivered=2)
    [w1_segment] = segment_paths(tmp_path / "wal" / "w1")
    before = w1_segment.read_bytes()
    last_lsn = max(r.lsn for r in scan(before).records)
    assert run(["archive"]) == 0
    out = capsys.readouterr().out
    assert f"archived {tmp_path / 'archive' / 'w1' / (w1_segment.name + '.zst')}" in out
    assert "1 archived, 1 kept" in out  # w2 has undelivered events
    assert read_archive(tmp_path / "archive" / "w1" / (w1_segment.name + ".zst")) == before
    assert not w1_segment.exists()
    [(first, fresh)] = list_segments(tmp_path / "wal" / "w1")
    assert first == last_lsn + 1  # a fresh segment keeps the checkpoint and the LSNs
    assert [(r.kind, r.lsn) for r in scan(fresh.read_bytes()).records] == [
        (KIND_CHECKPOINT, last_lsn)]
    assert len(segment_paths(tmp_path / "wal" / "w2")) == 1  # kept

    async def restart() -> int:
        log = new_log(tmp_path, RecordingSink(store), "w1")
        await log.start()
        assert log.wal.pending == 0
        await log.append([detail("x", "after")])
        assert await log.flush(5)
        await log.close()
        return max(r.lsn for r in scan(fresh.read_bytes()).records)

    assert asyncio.run(restart()) == last_lsn + 1  # LSNs go on after the archived ones
    assert run(["archive"]) == 0
    assert f"archived {tmp_path / 'archive' / 'w1' / (fresh.name + '.zst')}" in (
        capsys.readouterr().out)
    store.close()


def test_import_v1_and_cleanup_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    store = SQLiteStore(tmp_path / "jennah.db")
    store.migrate()
    store.create_job(Job(job_id="j1", tenant_id="acme", spec=JobSpec(image_uri="busybox"),
                         owner_worker_id="w9"), 30)  # fmt: skip
    write_v1_log(tmp_path / "wal" / "w9" / "j1.0.wal", "j1", life("j1"), checkpoint=3)
    assert run(["import-v1"]) == 0
    out = capsys.readouterr().out
    assert "v1 logs: 1 imported (2 events stored, 0 already there), 1 archived" in out
    keys = [e.dedup_key for e in store.list_events("acme", "j1", 0, 100)]
    assert keys[-2:] == ["v1:4", "v1:5"]
    assert [e.kind for e in store.list_events("acme", "j1", 0, 100)][-1] is EventKind.COMPLETED
    store.close()

    archived = tmp_path / "archive" / "w9" / "j1.0.wal.zst"
    os.utime(archived, (time.time() - 3 * 3600,) * 2)
    assert run(["cleanup", "--older-than", "4h"]) == 0
    assert archived.exists()
    assert run(["cleanup", "--older-than", "2h"]) == 0
    assert not archived.exists()
    assert "1 archives older than 7200s deleted" in capsys.readouterr().out


def test_durations_help_and_bad_settings() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("15m") == 900
    assert parse_duration("90s") == 90
    assert parse_duration("2") == 2 * 86400
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("30x")
    assert run(["cleanup", "--older-than", "soon"]) == 2
    parser = argparse.ArgumentParser(prog="jennah")
    add_wal_commands(parser.add_subparsers(dest="command"))
    assert callable(parser.parse_args(["wal", "inspect", "f.wal"]).fn)
    proc = _cli("replay", env={"DB_PROVIDER": "nosuchdb", "JENNAH_HOME": "/nonexistent"})
    assert proc.returncode == 2
    assert "DB_PROVIDER" in proc.stderr and "Traceback" not in proc.stderr
