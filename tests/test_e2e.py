"""End to end with real processes: `jennah gateway` + two `jennah worker`s, the local
provider running real subprocesses, talked to over HTTP exactly as curl would.

Runs on SQLite and on PostgreSQL (a private server started by the fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, call, free_port, start_jennah, stop, wait_http, wait_until

pytestmark = pytest.mark.e2e

ACME = {"X-Tenant-Id": "acme"}
OTHER = {"X-Tenant-Id": "other"}


@dataclass
class Stack:
    gateway: str
    workers: list[str]
    home: Path
    local_dir: Path


def _start_stack(tmp: Path, db_env: dict[str, str]) -> Iterator[Stack]:
    common = {
        "JENNAH_DEV_MODE": "1",
        "JENNAH_HOME": str(tmp),
        "BATCH_PROVIDER": "local",
        "LOCAL_BATCH_DIR": str(tmp / "local"),
        "WORKER_POLL_INTERVAL_SECONDS": "0.2",
        "WORKER_LEASE_TTL_SECONDS": "10",
        "WORKER_CLAIM_INTERVAL_SECONDS": "1",
        **db_env,
    }
    procs = []
    workers = []
    try:
        for i in (1, 2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = dict(common, WORKER_ID=f"w{i}", WORKER_PORT=str(port))
            proc = start_jennah("worker", env, tmp / f"w{i}.log")
            procs.append(proc)
            wait_http(f"{url}/health", proc=proc)
            workers.append(url)
        gport = free_port()
        gw = start_jennah(
            "gateway",
            dict(common, GATEWAY_PORT=str(gport), WORKER_ENDPOINTS=",".join(workers)),
            tmp / "gateway.log",
        )
        procs.append(gw)
        gateway = f"http://127.0.0.1:{gport}"
        wait_http(f"{gateway}/health", proc=gw)
        yield Stack(gateway, workers, tmp, tmp / "local")
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e-sqlite")
    yield from _start_stack(tmp, {"DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "jennah.db")})


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e-pg")
    yield from _start_stack(tmp, {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_url})


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest) -> Stack:
    name = "sqlite_stack" if request.param == "sqlite" else "pg_stack"
    result: Stack = request.getfixturevalue(name)
    return result


def submit(stack: Stack, body: dict[str, Any], headers: dict[str, str] = ACME) -> str:
    status, resp = call(stack.gateway, "SubmitJob", body, headers)
    assert status == 200, resp
    job_id: str = resp["jobId"]
    return job_id


def get(stack: Stack, job_id: str, headers: dict[str, str] = ACME) -> dict[str, Any]:
    status, resp = call(stack.gateway, "GetJob", {"job_id": job_id}, headers)
    assert status == 200, resp
    job: dict[str, Any] = resp["job"]
    return job


def wait_status(
    stack: Stack, job_id: str, statuses: set[str], timeout: float = 20
) -> dict[str, Any]:
    seen: list[str] = []

    def done() -> dict[str, Any] | None:
        job = get(stack, job_id)
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        return job if job["status"] in statuses else None

    job: dict[str, Any] = wait_until(done, timeout)
    job["_seen"] = seen
    return job


def test_acceptance_submit_runs_to_completion(stack: Stack) -> None:
    marker = stack.home / f"ran-{uuid.uuid4().hex}"
    job_id = submit(stack, {
        "image_uri": "busybox",
        "commands": ["sh", "-c", f'echo hello; echo "$A" >> {marker}'],
        "env_vars": {"A": "1"},
    })
    first = get(stack, job_id)
    assert first["status"] in {"JOB_STATUS_PENDING", "JOB_STATUS_SCHEDULED", "JOB_STATUS_RUNNING"}
    job = wait_status(stack, job_id, {"JOB_STATUS_COMPLETED"})
    assert job["startedAt"] and job["completedAt"] and job["scheduledAt"]
    assert job["exitCode"] == 0
    assert job["envVarNames"] == ["A"]
    assert "envVars" not in job
    assert marker.read_text() == "1\n"  # the env var reached the job, which ran once
    assert job["ownerWorkerId"] in {"w1", "w2"}

    _, listed = call(stack.gateway, "ListJobs", {}, ACME)
    assert job_id in [j["jobId"] for j in listed["jobs"]]
    _, other = call(stack.gateway, "ListJobs", {}, OTHER)
    assert job_id not in [j["jobId"] for j in other.get("jobs", [])]

    _, events = call(stack.gateway, "ListJobEvents", {"job_id": job_id, "after_seq": 0}, ACME)
    seqs = [int(e["seq"]) for e in events["events"]]
    assert seqs[0] == 1 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    kinds = [e["kind"] for e in events["events"]]
    assert kinds[0] == "EVENT_KIND_SUBMITTED" and kinds[-1] == "EVENT_KIND_COMPLETED"
    assert any("hello" in e.get("output", "") for e in events["events"])


def test_health_and_ready(stack: Stack) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{stack.gateway}/health") as resp:
        assert resp.read().decode().strip() == "ok"
    with urllib.request.urlopen(f"{stack.workers[0]}/ready") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        ({"image_uri": "Not A Valid Image!", "commands": ["true"]}, ACME, "image_uri"),
        ({"image_uri": "busybox", "env_vars": {"1BAD": "x"}}, ACME, "env var name"),
        ({"image_uri": "busybox", "commands": ["true"]}, {}, "X-Tenant-Id"),
        ({"image_uri": "busybox"}, {"X-Tenant-Id": "Bad_Tenant"}, "tenant"),
        ({"image_uri": "busybox", "resource_profile": "giant"}, ACME, "resource_profile"),
    ],
)
def test_bad_input_is_invalid_argument_and_stores_nothing(
    stack: Stack, body: dict[str, Any], headers: dict[str, str], fragment: str
) -> None:
    _, before = call(stack.gateway, "ListJobs", {"page_size": 500}, ACME)
    status, resp = call(stack.gateway, "SubmitJob", body, headers)
    assert status == 400
    assert resp["code"] == "invalid_argument"
    assert fragment in resp["message"]
    _, after = call(stack.gateway, "ListJobs", {"page_size": 500}, ACME)
    assert len(after.get("jobs", [])) == len(before.get("jobs", []))


def test_camel_case_fields_and_request_id_idempotency(stack: Stack) -> None:
    marker = stack.home / f"once-{uuid.uuid4().hex}"
    rid = f"req-{uuid.uuid4().hex}"
    body = {"imageUri": "busybox", "commands": ["sh", "-c", f"echo x >> {marker}"],
            "requestId": rid}
    first = submit(stack, body)
    second = submit(stack, body)
    assert first == second
    wait_status(stack, first, {"JOB_STATUS_COMPLETED"})
    assert marker.read_text() == "x\n"  # ran exactly once
    assert len([d for d in os.listdir(stack.local_dir) if first in d]) == 1
    # Another tenant with the same request_id gets its own job.
    assert submit(stack, body, OTHER) != first


def test_nonzero_exit_is_failed_user_error(stack: Stack) -> None:
    job_id = submit(stack, {"image_uri": "busybox", "commands": ["sh", "-c", "exit 3"]})
    job = wait_status(stack, job_id, {"JOB_STATUS_FAILED", "JOB_STATUS_COMPLETED"})
    assert job["status"] == "JOB_STATUS_FAILED"
    assert job["exitCode"] == 3
    assert job["failureClass"] == "FAILURE_CLASS_USER_ERROR"
    assert job["completedAt"]


def _processes_with(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                continue
    return pids


def test_cancel_running_job(stack: Stack) -> None:
    import time

    marker = f"jennah-cancel-{uuid.uuid4().hex}"
    job_id = submit(stack, {"image_uri": "busybox",
                            "commands": ["sh", "-c", f"sleep 60; echo {marker}"]})
    wait_status(stack, job_id, {"JOB_STATUS_RUNNING"})
    assert _processes_with(marker)
    started = time.monotonic()
    status, resp = call(stack.gateway, "CancelJob", {"job_id": job_id}, ACME)
    assert status == 200, resp
    job = wait_status(stack, job_id, {"JOB_STATUS_CANCELLED"}, timeout=2)
    assert time.monotonic() - started < 2.0
    assert job["completedAt"]
    wait_until(lambda: not _processes_with(marker), 2)
    # Cancelling again is a failed precondition: the job is terminal.
    status, resp = call(stack.gateway, "CancelJob", {"job_id": job_id}, ACME)
    assert (status, resp["code"]) == (400, "failed_precondition")


def test_tenant_isolation_and_not_found(stack: Stack) -> None:
    job_id = submit(stack, {"image_uri": "busybox", "commands": ["true"]})
    for method in ("GetJob", "CancelJob", "DeleteJob", "ListJobEvents"):
        status, resp = call(stack.gateway, method, {"job_id": job_id}, OTHER)
        assert (status, resp["code"]) == (404, "not_found"), method
    status, resp = call(stack.gateway, "GetJob", {"job_id": "no-such-job"}, ACME)
    assert (status, resp["code"]) == (404, "not_found")
    wait_status(stack, job_id, {"JOB_STATUS_COMPLETED"})
    status, _ = call(stack.gateway, "DeleteJob", {"job_id": job_id}, ACME)
    assert status == 200
    status, resp = call(stack.gateway, "GetJob", {"job_id": job_id}, ACME)
    assert (status, resp["code"]) == (404, "not_found")


def test_list_paging_filters_and_current_tenant(stack: Stack) -> None:
    tenant = {"X-Tenant-Id": f"pg-{uuid.uuid4().hex[:8]}"}
    ids = [submit(stack, {"image_uri": "busybox", "commands": ["true"], "name": f"batch-{i}",
                          "labels": {"team": "a" if i % 2 else "b"}}, tenant)
           for i in range(5)]
    _, page1 = call(stack.gateway, "ListJobs", {"page_size": 2}, tenant)
    _, page2 = call(stack.gateway, "ListJobs", {"page_size": 2,
                                                "page_token": page1["nextPageToken"]}, tenant)
    listed = [j["jobId"] for j in page1["jobs"] + page2["jobs"]]
    assert listed == list(reversed(ids))[:4]  # newest first, no overlap
    _, team_a = call(stack.gateway, "ListJobs", {"labels": {"team": "a"}}, tenant)
    assert sorted(j["jobId"] for j in team_a["jobs"]) == sorted(ids[1::2])
    _, named = call(stack.gateway, "ListJobs", {"name_prefix": "batch-3"}, tenant)
    assert [j["jobId"] for j in named["jobs"]] == [ids[3]]
    _, me = call(stack.gateway, "GetCurrentTenant", {}, tenant)
    assert me["tenantId"] == tenant["X-Tenant-Id"]


def test_worker_rejects_calls_without_tenant(stack: Stack) -> None:
    status, resp = call(stack.workers[0], "ListJobs", {}, {})
    assert (status, resp["code"]) == (400, "invalid_argument")


def test_python_connect_client_through_gateway(stack: Stack) -> None:
    from jennah.v1 import deployment_pb2 as pb
    from jennah.v1.deployment_connect import DeploymentServiceClientSync

    client = DeploymentServiceClientSync(stack.gateway)
    resp = client.submit_job(
        pb.SubmitJobRequest(image_uri="busybox", commands=["sh", "-c", "exit 0"]),
        headers={"x-tenant-id": "acme"},
    )
    assert resp.worker_id in {"w1", "w2"}
    got = client.get_job(pb.GetJobRequest(job_id=resp.job_id), headers={"x-tenant-id": "acme"})
    assert got.job.tenant_id == "acme"


def _jennah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jennah", *args], capture_output=True,
                          text=True, timeout=60, check=check, cwd=REPO)


def test_cli_round_trip(sqlite_stack: Stack) -> None:
    url = ["--url", sqlite_stack.gateway, "--tenant", "cli-tenant"]
    out = _jennah("submit", *url, "--name", "cli-job", "-e", "WHO=world", "busybox", "--",
                  "sh", "-c", 'echo "hello $WHO"; sleep 0.5; echo bye >&2')
    job_id = json.loads(out.stdout)["jobId"]
    follow = _jennah("events", *url, job_id, "--follow")  # returns when the job ends
    lines = follow.stdout.splitlines()
    assert "SUBMITTED" in lines[0] and "COMPLETED" in lines[-1]
    assert any("hello world" in line for line in lines)
    assert any("bye" in line for line in lines)
    got = json.loads(_jennah("get", *url, job_id).stdout)
    assert got["status"] == "JOB_STATUS_COMPLETED" and got["envVarNames"] == ["WHO"]
    listed = _jennah("list", *url).stdout
    assert job_id in listed and "COMPLETED" in listed and "cli-job" in listed
    refused = _jennah("cancel", *url, job_id, check=False)
    assert refused.returncode == 1 and "failed_precondition" in refused.stderr
    assert json.loads(_jennah("delete", *url, job_id).stdout)["jobId"] == job_id
    gone = _jennah("get", *url, job_id, check=False)
    assert gone.returncode == 1 and "not_found" in gone.stderr


def test_buf_curl_streams_watch_job_events(sqlite_stack: Stack) -> None:
    buf = Path(sys.executable).parent / "buf"
    job_id = submit(sqlite_stack, {"image_uri": "busybox",
                                   "commands": ["sh", "-c", "echo one; sleep 0.3; echo two"]})
    proc = subprocess.run(
        [str(buf), "curl", "--schema", str(REPO / "proto"), "--protocol", "connect",
         "-H", "X-Tenant-Id: acme", "-d", json.dumps({"job_id": job_id}),
         f"{sqlite_stack.gateway}/jennah.v1.DeploymentService/WatchJobEvents"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    decoder = json.JSONDecoder()
    text, events, pos = proc.stdout, [], 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text):
            obj, pos = decoder.raw_decode(text, pos)
            events.append(obj)
    seqs = [int(e["seq"]) for e in events]
    assert seqs == sorted(seqs) and seqs[0] == 1
    assert events[-1]["kind"] == "EVENT_KIND_COMPLETED"  # the stream ends with the job
    output = "".join(e.get("output", "") for e in events)
    assert "one" in output and "two" in output
