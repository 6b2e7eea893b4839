"""The `jennah` command's operations and settings handling (no servers needed)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def _jennah(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "BATCH_"))}
    return subprocess.run([sys.executable, "-m", "jennah", *args], capture_output=True,
                          text=True, timeout=60, env={**full, **env}, cwd=REPO)


def test_db_migrate_creates_the_schema_once(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "jennah.db"
    env = {"DB_PROVIDER": "sqlite", "DB_PATH": str(db)}
    first = _jennah("db", "migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied 2 migration(s)" in first.stdout and "0002_events_v2.sql" in first.stdout
    second = _jennah("db", "migrate", env=env)
    assert second.returncode == 0 and "applied 0 migration(s)" in second.stdout
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tenants", "jobs", "job_transitions", "job_events", "workers"} <= tables


def test_bad_settings_stop_start_up_with_one_line_naming_every_variable(tmp_path: Path) -> None:
    env = {"JENNAH_HOME": str(tmp_path), "BATCH_PROVIDER": "aws", "DB_PROVIDER": "postgres",
           "WORKER_LEASE_TTL_SECONDS": "soon", "JENNAH_DEV_MODE": "maybe"}
    proc = _jennah("worker", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    for name in ("AWS_JOB_QUEUE", "AWS_JOB_DEFINITION", "DATABASE_URL",
                 "WORKER_LEASE_TTL_SECONDS", "JENNAH_DEV_MODE", "BATCH_REGION or AWS_REGION"):
        assert name in lines[0], name
    gw = _jennah("gateway", env={"JENNAH_DEV_MODE": "1"})
    assert gw.returncode == 2 and "WORKER_ENDPOINTS" in gw.stderr


def test_list_status_choices_are_the_protos_and_a_bad_one_is_a_usage_error() -> None:
    from jennah.cli import JOB_STATUS_CHOICES
    from jennah.v1 import deployment_pb2 as pb

    names = tuple(n.removeprefix("JOB_STATUS_").lower() for n in pb.JobStatus.keys()[1:])
    assert names == JOB_STATUS_CHOICES
    proc = _jennah("list", "--status", "bogus", "--url", "http://127.0.0.1:9", env={})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice: 'bogus'" in proc.stderr
