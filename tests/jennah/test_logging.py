"""Structured logs (jennah/logging.py): Cloud Logging JSON lines, context fields, secrets.

Records carry severity/message/time, the job/tenant/worker ids (from ``extra=`` or the
context), and the trace fields while a span is active. A real worker's captured stdout
and stderr never contain a job's env var value, nor the worker token.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from jennah.errors import SettingsError
from jennah.logging import (
    REDACTED,
    SPAN_KEY,
    TRACE_KEY,
    JsonFormatter,
    Redactor,
    TextFormatter,
    configure_logging,
    log_context,
)
from tests.helpers import REPO, call, free_port, stop, wait_http, wait_until

pytestmark = pytest.mark.timeout(60)


def _record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("jennah.test")
    record = logger.makeRecord("jennah.test", logging.WARNING, __file__, 42, msg, args or
                               ("world",), None, extra=extra or None)
    return record


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def test_json_record_has_the_cloud_logging_fields() -> None:
    line = JsonFormatter("worker").format(_record(job_id="j-1", tenant_id="acme"))
    entry = json.loads(line)
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "hello world"
    assert entry["service"] == "worker"
    assert entry["job_id"] == "j-1" and entry["tenant_id"] == "acme"
    assert entry["time"].endswith("Z")
    datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    assert entry["logging.googleapis.com/sourceLocation"]["line"] == "42"
    assert TRACE_KEY not in entry and SPAN_KEY not in entry  # no active span
    assert "\n" not in line


def test_context_fields_and_extra_precedence() -> None:
    fmt = JsonFormatter("worker")
    with log_context(job_id="ctx-job", tenant_id="ctx-tenant"):
        inside = json.loads(fmt.format(_record()))
        override = json.loads(fmt.format(_record(job_id="extra-job")))
    after = json.loads(fmt.format(_record()))
    assert (inside["job_id"], inside["tenant_id"]) == ("ctx-job", "ctx-tenant")
    assert override["job_id"] == "extra-job" and override["tenant_id"] == "ctx-tenant"
    assert "job_id" not in after and "tenant_id" not in after


def test_trace_fields_while_a_span_is_active() -> None:
    tracer = TracerProvider().get_tracer("t")
    fmt = JsonFormatter("gateway", project="my-proj")
    with tracer.start_as_current_span("s") as span:
        entry = json.loads(fmt.format(_record()))
        ctx = span.get_span_context()
    assert entry[TRACE_KEY] == f"projects/my-proj/traces/{ctx.trace_id:032x}"
    assert entry[SPAN_KEY] == f"{ctx.span_id:016x}"
    assert entry["logging.googleapis.com/trace_sampled"] is True


def test_exceptions_go_into_the_message() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed",
                                                   (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "ERROR"
    assert entry["message"].startswith("failed\nTraceback") and "ValueError: boom" in entry[
        "message"]


def test_text_format_appends_ids() -> None:
    text = TextFormatter().format(_record(job_id="j-9", tenant_id="acme"))
    assert text.endswith("hello world [job_id=j-9 tenant_id=acme]")
    assert "WARNING" in text


def test_redactor_replaces_secret_env_values() -> None:
    env = {"JENNAH_WORKER_TOKEN": "tok-abcdefgh-1234", "AZURE_BATCH_ACCOUNT_KEY": "azkey12345",
           "DATABASE_URL": "postgresql://u:pw12345678@h/db", "HOME": "/root-home-dir",
           "SHORT_KEY": "abc"}
    redact = Redactor.from_env(env)
    text = redact("t=tok-abcdefgh-1234 k=azkey12345 d=postgresql://u:pw12345678@h/db "
                  "h=/root-home-dir")
    assert text == f"t={REDACTED} k={REDACTED} d={REDACTED} h=/root-home-dir"
    assert redact("abc") == "abc"  # too short to be a secret worth matching


def test_configure_logging_formats_and_errors(root_restored: None) -> None:
    out = io.StringIO()
    configure_logging("worker", {"JENNAH_LOG_FORMAT": "json", "JENNAH_WORKER_TOKEN":
                                 "sekrit-token-value"}, worker_id="w-7", stream=out)
    configure_logging("worker", {"JENNAH_LOG_FORMAT": "json", "JENNAH_WORKER_TOKEN":
                                 "sekrit-token-value"}, worker_id="w-7", stream=out)
    logging.getLogger("jennah.x").info("token is %s", "sekrit-token-value")
    logging.getLogger("jennah.x").debug("not at INFO")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # configured twice, one handler; DEBUG filtered
    entry = json.loads(lines[0])
    assert entry["worker_id"] == "w-7" and entry["message"] == f"token is {REDACTED}"
    with pytest.raises(SettingsError, match=r"JENNAH_LOG_FORMAT='xml'.*JENNAH_LOG_LEVEL='LOUD'"):
        configure_logging("worker", {"JENNAH_LOG_FORMAT": "xml", "JENNAH_LOG_LEVEL": "loud"})


def test_bad_log_format_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path),
           "JENNAH_LOG_FORMAT": "xml"}
    out = subprocess.run([sys.executable, "-m", "jennah", "worker"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "jennah worker: invalid logging settings: JENNAH_LOG_FORMAT='xml' (expected json or text)"]


@pytest.mark.e2e
def test_real_worker_logs_json_and_never_a_secret(tmp_path: Path) -> None:
    secret = "s3cr3t-env-value-do-not-log-7781"
    token = "worker-token-do-not-log-5512"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JENNAH_", "OTEL_"))}
    env.pop("PORT", None)
    env.update({"JENNAH_HOME": str(tmp_path), "WORKER_PORT": str(port), "WORKER_ID": "lw-1",
                "JENNAH_WORKER_TOKEN": token, "JENNAH_LOG_FORMAT": "json",
                "JENNAH_LOG_LEVEL": "DEBUG", "JENNAH_OTEL": "console",
                "BATCH_PROVIDER": "local", "WORKER_POLL_INTERVAL_SECONDS": "0.1"})
    with (tmp_path / "out").open("wb") as out, (tmp_path / "err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "jennah", "worker"], env=env, cwd=REPO,
                                stdout=out, stderr=err)
    base = f"http://127.0.0.1:{port}"
    headers = {"X-Tenant-Id": "acme", "X-Jennah-Worker-Token": token}
    try:
        wait_http(f"{base}/health", proc=proc)
        # A job whose env holds the secret; the command fails, so a FAILED path runs too.
        status, body = call(base, "SubmitJob", {
            "image_uri": "busybox", "commands": ["sh", "-c", "exit 3"],
            "env_vars": {"API_SECRET": secret}}, headers)
        assert status == 200, body
        job_id = body["jobId"]

        def finished() -> bool:
            _, got = call(base, "GetJob", {"job_id": job_id}, headers)
            return got["job"]["status"] == "JOB_STATUS_FAILED"

        wait_until(finished, timeout=20)
        _, got = call(base, "GetJob", {"job_id": job_id}, headers)
        assert secret not in json.dumps(got)  # values are write-only (docs/design.md §2)
        # Refused calls log nothing secret either.
        status, _ = call(base, "GetJob", {"job_id": job_id}, {"X-Tenant-Id": "acme",
                                                             "X-Jennah-Worker-Token": "wrong"})
        assert status == 401
        time.sleep(0.3)
    finally:
        stop(proc)
    stdout = (tmp_path / "out").read_text()
    stderr = (tmp_path / "err").read_text()
    for text in (stdout, stderr):
        assert secret not in text
        assert token not in text
    entries = [json.loads(line) for line in stdout.splitlines()]  # every line is JSON
    assert entries, "the worker logged nothing"
    assert all({"severity", "message", "time"} <= e.keys() for e in entries)
    assert all(e["worker_id"] == "lw-1" for e in entries)
    # The console span exporter did run (stderr), so the secret check covered spans too.
    assert '"name": "jennah.v1.DeploymentService/SubmitJob"' in stderr
