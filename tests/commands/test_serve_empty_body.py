"""An empty request body is answered at once under every server (commands/serve.py).

An empty message in binary proto is zero bytes: ``ListJobs({})`` from connect-es, our own
``jennah list`` or the gateway forwarding to a worker sends ``Content-Length: 0``. Under
pyvoy such a call hung until the client's deadline and froze the whole process (pyvoy's
``receive()`` never suspends once a bodiless request has ended, and connectrpc's
disconnect watch spun on it), so a gateway marked its workers down. For each server a
real ``jennah worker`` and ``jennah gateway`` in dev mode (SQLite, dry provider) get
empty-body Connect calls, and gRPC calls over h2c where the server speaks gRPC
(hypercorn, pyvoy): each must answer within 2 s with the right result, and the gateway
must still see its worker up afterwards.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jennah.v1 import deployment_pb2 as pb
from tests.commands.test_proxy_trust import SERVERS
from tests.helpers import SERVICE, call, free_port, start_jennah, stop, wait_http

pytestmark = pytest.mark.timeout(120)

TENANT = {"X-Tenant-Id": "acme"}
BUDGET = 2.0  # seconds an empty-body call may take


@dataclass
class Stack:
    server: str
    gateway: int  # ports
    worker: int
    gateway_log: Path
    job_id: str  # a job of tenant acme, submitted through the gateway


@pytest.fixture(scope="module", params=SERVERS)
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server: str = request.param
    tmp = tmp_path_factory.mktemp(f"empty-{server}")
    common = {
        "JENNAH_SERVER": server, "JENNAH_DEV_MODE": "1", "HOST": "127.0.0.1",
        "JENNAH_HOME": str(tmp), "DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "jennah.db"),
        "BATCH_PROVIDER": "dry", "JENNAH_LOG_FORMAT": "text", "SHUTDOWN_GRACE_SECONDS": "1",
    }
    wport, gport = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_jennah("worker", dict(common, WORKER_ID="w1",
                                                 WORKER_PORT=str(wport)), tmp / "worker.log"))
        wait_http(f"http://127.0.0.1:{wport}/health", timeout=30, proc=procs[-1])
        procs.append(start_jennah("gateway", dict(
            common, GATEWAY_PORT=str(gport), WORKER_ENDPOINTS=f"http://127.0.0.1:{wport}",
            GATEWAY_HEALTH_INTERVAL_SECONDS="0.2",
        ), tmp / "gateway.log"))
        wait_http(f"http://127.0.0.1:{gport}/health", timeout=30, proc=procs[-1])
        status, body = call(f"http://127.0.0.1:{gport}", "SubmitJob",
                            {"image_uri": "busybox", "commands": ["true"]}, TENANT)
        assert status == 200, body
        yield Stack(server, gport, wport, tmp / "gateway.log", body["jobId"])
    finally:
        for proc in reversed(procs):
            stop(proc)


def post_empty(port: int, method: str) -> tuple[int, str, bytes, float]:
    """A Connect unary call whose binary message is empty: ``Content-Length: 0``.
    Returns (status, content type, body, seconds taken)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BUDGET + 3)
    started = time.monotonic()
    try:
        conn.request("POST", f"{SERVICE}/{method}", body=b"",
                     headers={"Content-Type": "application/proto", **TENANT})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers["Content-Type"], data, time.monotonic() - started
    finally:
        conn.close()


def worker_states(stack: Stack) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway}/info", timeout=5) as resp:
        workers: dict[str, str] = json.loads(resp.read())["workers"]
    return workers


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_empty_binary_messages_are_answered_at_once(stack: Stack, target: str) -> None:
    port = stack.gateway if target == "gateway" else stack.worker
    for _ in range(4):  # four of these once froze a pyvoy gateway for good
        status, content_type, data, took = post_empty(port, "ListJobs")
        assert (status, content_type) == (200, "application/proto"), data[:200]
        assert took < BUDGET, took
        assert stack.job_id in [j.job_id for j in pb.ListJobsResponse.FromString(data).jobs]
    status, _, data, took = post_empty(port, "GetCurrentTenant")
    assert status == 200 and took < BUDGET, (status, took)
    assert pb.GetCurrentTenantResponse.FromString(data).tenant_id == "acme"


def test_the_gateway_keeps_its_worker_up(stack: Stack) -> None:
    for _ in range(4):
        assert post_empty(stack.gateway, "ListJobs")[0] == 200
    time.sleep(0.5)  # a few health rounds (0.2 s)
    assert set(worker_states(stack).values()) == {"up"}
    assert "marked down" not in stack.gateway_log.read_text(errors="replace")


def test_empty_messages_over_grpc(stack: Stack) -> None:
    if stack.server == "uvicorn":
        pytest.skip("uvicorn serves no gRPC (HTTP/1.1 only)")
    grpc = pytest.importorskip("grpc")
    for port in (stack.gateway, stack.worker):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            list_jobs = channel.unary_unary(
                f"{SERVICE}/ListJobs", request_serializer=pb.ListJobsRequest.SerializeToString,
                response_deserializer=pb.ListJobsResponse.FromString)
            whoami = channel.unary_unary(
                f"{SERVICE}/GetCurrentTenant",
                request_serializer=pb.GetCurrentTenantRequest.SerializeToString,
                response_deserializer=pb.GetCurrentTenantResponse.FromString)
            meta = tuple((k.lower(), v) for k, v in TENANT.items())
            grpc.channel_ready_future(channel).result(timeout=5)
            for _ in range(4):
                started = time.monotonic()
                listed: Any = list_jobs(pb.ListJobsRequest(), metadata=meta, timeout=BUDGET)
                assert time.monotonic() - started < BUDGET
                assert stack.job_id in [j.job_id for j in listed.jobs]
            assert whoami(pb.GetCurrentTenantRequest(), metadata=meta,
                          timeout=BUDGET).tenant_id == "acme"
    assert set(worker_states(stack).values()) == {"up"}
