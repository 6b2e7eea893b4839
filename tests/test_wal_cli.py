"""``jennah wal inspect|replay|cleanup|archive`` (DESIGN §6, §11), in-process and as a
subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from database.sqlite import SQLiteStore
from jennah.models import EventKind, Job, JobSpec, JobStatus
from worker.wal.archive import archive_file
from worker.wal.cli import add_wal_commands, parse_duration, run
from worker.wal.format import HEADER_SIZE, scan
from worker.wal.joblog import JobLog
from worker.wal.metrics import wal_metrics

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def _write_log(path: Path, job_id: str = "job-1", n: int = 4, acked: bool = False) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    job = Job(job_id=job_id, tenant_id="acme", spec=JobSpec(image_uri="busybox"),
              lease_version=1)
    jl = JobLog.create(path, job, path.parent.name, wal_metrics(CollectorRegistry()))
    jl.append(1, EventKind.RUNNING, JobStatus.RUNNING, "started", "", T0, "w1")
    for i in range(n):
        jl.append(1, EventKind.OUTPUT, None, "", f"line {i}\n", T0, "w1")
    jl.append(1, EventKind.COMPLETED, JobStatus.COMPLETED, "exit 0", "", T0, "w1")
    if acked:
        jl.checkpoint(jl.last_seq)
    jl.close()
    return path.read_bytes()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.wal.cli", *args], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**os.environ, **(env or {})},
    )


def test_inspect_clean_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w1" / "job-1.0.wal"
    original = _write_log(path)
    assert run(["wal", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "header: magic JNWAL001, version 1" in out
    lines = [line for line in out.splitlines() if line.startswith("offset")]
    assert len(lines) == 7  # META + RUNNING + 4 OUTPUT + COMPLETED
    assert "META" in lines[0] and "RUNNING" in lines[1] and "COMPLETED" in lines[-1]
    assert all(" ok" in line and "size" in line and "2025-05-01T12:00:00" in line
               for line in lines[1:])
    assert "seq            6" in lines[-1]
    assert out.rstrip().endswith("clean")
    assert path.read_bytes() == original


def test_inspect_damaged_file_reports_the_offset_and_never_truncates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w1" / "job-1.0.wal"
    original = _write_log(path)
    third = scan(original).records[3]
    damaged = bytearray(original)
    damaged[third.offset + 30] ^= 0x40
    path.write_bytes(bytes(damaged))
    assert run(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"corrupt at offset {third.offset}" in out.splitlines()
    assert "3 valid records" in out
    assert path.read_bytes() == bytes(damaged)


def test_inspect_torn_tail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w1" / "job-1.0.wal"
    original = _write_log(path)
    path.write_bytes(original[:-5])
    last = scan(original).records[-1]
    assert run(["inspect", str(path)]) == 1
    assert f"corrupt at offset {last.offset}" in capsys.readouterr().out.splitlines()
    assert path.read_bytes() == original[:-5]


@pytest.mark.parametrize("content", [b"", b"hello\n", b"JNWAL001\x02\0\0\0\0\0\0\0"])
def test_inspect_refuses_a_foreign_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "notes.wal"
    path.write_bytes(content)
    assert run(["wal", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("not a Jennah WAL" in err or "version" in err)
    assert path.read_bytes() == content


def test_inspect_an_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w1" / "job-1.0.wal"
    _write_log(path)
    out = archive_file(path, tmp_path / "archive")
    assert run(["inspect", str(out)]) == 0
    assert "clean" in capsys.readouterr().out


def test_inspect_as_a_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "w1" / "job-1.0.wal"
    original = _write_log(path)
    clean = _cli("wal", "inspect", str(path))
    assert clean.returncode == 0, clean.stderr
    assert "COMPLETED" in clean.stdout
    path.write_bytes(original[: HEADER_SIZE + 10])
    damaged = _cli("inspect", str(path))
    assert damaged.returncode == 1
    assert f"corrupt at offset {HEADER_SIZE}" in damaged.stdout.splitlines()
    foreign = tmp_path / "x.bin"
    foreign.write_bytes(b"\x00" * 100)
    refused = _cli("wal", "inspect", str(foreign))
    assert refused.returncode == 2 and "not a Jennah WAL" in refused.stderr
    assert "Traceback" not in refused.stderr
    via_c = subprocess.run(
        [sys.executable, "-c",
         "import sys; from worker.wal.cli import run; sys.exit(run(sys.argv[1:]))",
         "wal", "inspect", str(foreign)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert via_c.returncode == 2


def test_durations() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("15m") == 900
    assert parse_duration("90s") == 90
    assert parse_duration("2") == 2 * 86400
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("30x")
    assert run(["cleanup", "--older-than", "soon"]) == 2


def test_cleanup_and_archive_use_the_env_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wal, archive = tmp_path / "wal", tmp_path / "archive"
    monkeypatch.setenv("WAL_DIR", str(wal))
    monkeypatch.setenv("ARCHIVE_DIR", str(archive))
    _write_log(wal / "w1" / "sent.0.wal", "sent", acked=True)
    _write_log(wal / "w1" / "unsent.0.wal", "unsent", acked=False)
    assert run(["archive"]) == 0
    out = capsys.readouterr().out
    assert (archive / "w1" / "sent.0.wal.zst").exists()
    assert (wal / "w1" / "unsent.0.wal").exists()
    assert "1 archived, 1 kept" in out
    old = archive / "w1" / "sent.0.wal.zst"
    os.utime(old, (time.time() - 3 * 3600,) * 2)
    assert run(["cleanup", "--older-than", "4h"]) == 0
    assert old.exists()
    assert run(["cleanup", "--older-than", "2h"]) == 0
    assert not old.exists()
    assert "1 archives older than" in capsys.readouterr().out


def test_archive_help_explains_its_rule() -> None:
    parser = argparse.ArgumentParser(prog="jennah")
    add_wal_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["wal", "inspect", "f.wal"])
    assert callable(args.fn)
    proc = _cli("archive", "--help")
    assert proc.returncode == 0
    assert "terminal" in proc.stdout and "fully sent" in proc.stdout


def test_replay_delivers_to_the_store_from_settings(tmp_path: Path) -> None:
    db = tmp_path / "jennah.db"
    store = SQLiteStore(db)
    store.migrate()
    for job_id in ("job-1", "job-2"):
        store.create_job(Job(job_id=job_id, tenant_id="acme", spec=JobSpec(image_uri="busybox"),
                             owner_worker_id="w1"), 30)
    store.close()
    wal = tmp_path / "wal"
    _write_log(wal / "w1" / "job-1.0.wal", "job-1", n=3)
    damaged = _write_log(wal / "w2" / "job-2.0.wal", "job-2", n=3)
    cut = scan(damaged).records[3].offset + 3
    (wal / "w2" / "job-2.0.wal").write_bytes(damaged[:cut])
    env = {"DB_PROVIDER": "sqlite", "DB_PATH": str(db), "JENNAH_DEV_MODE": "1",
           "WAL_DIR": str(wal), "ARCHIVE_DIR": str(tmp_path / "archive"),
           "JENNAH_HOME": str(tmp_path / "home")}

    one = _cli("wal", "replay", str(wal / "w1" / "job-1.0.wal"), env=env)
    assert one.returncode == 0, one.stderr
    assert "delivered 5 events" in one.stdout
    every = _cli("replay", "--all", env=env)
    assert every.returncode == 1  # job-2's log is damaged: its valid prefix is delivered
    assert f"corrupt at offset {scan(damaged).records[3].offset}" in every.stdout

    store = SQLiteStore(db)
    try:
        assert [e.seq for e in store.list_events("acme", "job-1", 0, 100)] == [1, 2, 3, 4, 5]
        assert [e.seq for e in store.list_events("acme", "job-2", 0, 100)] == [1, 2]
        assert store.list_events("acme", "job-1", 0, 100)[-1].status is JobStatus.COMPLETED
    finally:
        store.close()
    # Replay recorded the watermark, so the finished, sent log can now be archived.
    archived = _cli("archive", env=env)
    assert archived.returncode == 0
    assert (tmp_path / "archive" / "w1" / "job-1.0.wal.zst").exists()


def test_replay_reports_bad_settings_in_one_line(tmp_path: Path) -> None:
    proc = _cli("replay", "--all", env={"DB_PROVIDER": "nosuchdb", "JENNAH_DEV_MODE": "1",
                                        "JENNAH_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "DB_PROVIDER" in proc.stderr and "Traceback" not in proc.stderr
