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
    assert "applied 3 migration(s)" in first.stdout and "0002_events_v2.sql" in first.stdout
    assert "0003_tasks_notifications.sql" in first.stdout
    second = _jennah("db", "migrate", env=env)
    assert second.returncode == 0 and "applied 0 migration(s)" in second.stdout
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tenants", "jobs", "job_transitions", "job_events", "workers",
            "notifications"} <= tables


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
    from commands.cli import JOB_STATUS_CHOICES
    from jennah.v1 import deployment_pb2 as pb

    names = tuple(n.removeprefix("JOB_STATUS_").lower() for n in pb.JobStatus.keys()[1:])
    assert names == JOB_STATUS_CHOICES
    from commands.cli import TASK_STATUS_CHOICES

    tasks = tuple(n.removeprefix("TASK_STATUS_").lower() for n in pb.TaskStatus.keys()[1:])
    assert tasks == TASK_STATUS_CHOICES
    proc = _jennah("list", "--status", "bogus", "--url", "http://127.0.0.1:9", env={})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice: 'bogus'" in proc.stderr


def test_submit_options_go_before_or_after_the_image_and_the_command_follows_dashes(
        tmp_path: Path) -> None:
    from commands.cli import parse_args, submit_request

    job = tmp_path / "job.yaml"
    job.write_text("imageUri: alpine\ncommands: [echo, file]\nenv_vars: {A: '0', B: '2'}\n"
                   "labels: {team: ml}\nmax_retries: 2\n")
    args = parse_args(["submit", "-e", "A=1", "busybox", "--name", "hello", "-f", str(job),
                       "--timeout", "15m", "--gpus", "2", "--", "sh", "-c", "echo",
                       "--name", "-e", "X=1"])
    req = submit_request(args)
    assert req.image_uri == "busybox" and req.name == "hello"  # type: ignore[attr-defined]
    assert list(req.commands) == ["sh", "-c", "echo", "--name", "-e", "X=1"]  # type: ignore[attr-defined]
    assert dict(req.env_vars) == {"A": "1", "B": "2"}  # type: ignore[attr-defined]
    assert dict(req.labels) == {"team": "ml"} and req.max_retries == 2  # type: ignore[attr-defined]
    assert req.resource_override.max_run_duration_seconds == 900  # type: ignore[attr-defined]
    assert req.accelerator.count == 2  # type: ignore[attr-defined]
    assert (req.task_count, req.parallelism) == (0, 0)  # type: ignore[attr-defined]
    tasks = submit_request(parse_args(["submit", "busybox", "--tasks", "100",
                                       "--parallelism", "10", "--", "true"]))
    assert (tasks.task_count, tasks.parallelism) == (100, 10)  # type: ignore[attr-defined]
    from_file = submit_request(parse_args(["submit", "-f", str(job)]))
    assert from_file.image_uri == "alpine" and list(from_file.commands) == ["echo", "file"]  # type: ignore[attr-defined]


def test_submit_usage_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_uri: busybox\ncomands: [x]\n")
    for args, text in ((["submit", "busybox", "--timeout", "soon"], "not a duration"),
                       (["submit", "-f", str(bad)], "comands"),
                       (["submit", "--name", "x"], "needs an IMAGE")):
        proc = _jennah(*args, "--url", "http://127.0.0.1:9", env={})
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert text in proc.stderr
