"""``JENNAH_SERVER=pyvoy``: a real ``jennah worker`` process served by pyvoy (Envoy).

Checks what commands/serve.py promises for pyvoy: host/port honoured, the ASGI lifespan runs
inside Envoy (startup: the poller drives a job to COMPLETED; shutdown on SIGTERM: the
lease hand-over line is logged and the process exits 0 within the grace, a follow-watch
that outlived the drain ended first), Connect JSON unary and server-streaming, gRPC over
h2c with a grpcio client, and a client that leaves a watch ending it. Empty request
bodies and client addresses are checked under every server, pyvoy included, in
tests/commands/test_serve_empty_body.py and tests/commands/test_proxy_trust.py.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SERVICE, call, free_port, start_jennah, stop, wait_http, wait_until

pytest.importorskip("pyvoy")

pytestmark = pytest.mark.timeout(120)

TENANT = {"X-Tenant-Id": "acme"}
GRACE = 4.0


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    base: str
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    home = tmp_path_factory.mktemp("pyvoy")
    port = free_port()
    log = home / "worker.log"
    env = {
        "JENNAH_SERVER": "pyvoy",
        "JENNAH_DEV_MODE": "1",
        "JENNAH_HOME": str(home),
        "DB_PROVIDER": "sqlite",
        "BATCH_PROVIDER": "dry",
        "HOST": "127.0.0.1",
        "WORKER_PORT": str(port),
        "WORKER_ID": "pyvoy-1",
        "SHUTDOWN_GRACE_SECONDS": str(GRACE),
        "JENNAH_LOG_FORMAT": "text",
    }
    proc = start_jennah("worker", env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout=30, proc=proc)
        yield Worker(proc, base, port, log)
    finally:
        stop(proc, timeout=GRACE + 15)


def submit(w: Worker, commands: list[str]) -> str:
    status, body = call(w.base, "SubmitJob", {"image_uri": "busybox", "commands": commands},
                        TENANT)
    assert status == 200, body
    assert body["workerId"] == "pyvoy-1"
    job_id: str = body["jobId"]
    return job_id


def get_status(w: Worker, job_id: str) -> str:
    status, body = call(w.base, "GetJob", {"job_id": job_id}, TENANT)
    assert status == 200, body
    value: str = body["job"]["status"]
    return value


def test_health_and_connect_unary_with_lifespan_startup(worker: Worker) -> None:
    with urllib.request.urlopen(f"{worker.base}/health", timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"ok\n")
    job_id = submit(worker, ["echo", "hi"])
    # Only the poller (started by the lifespan inside Envoy) records COMPLETED.
    wait_until(lambda: get_status(worker, job_id) == "JOB_STATUS_COMPLETED", 15)
    status, body = call(worker.base, "GetJob", {"job_id": "no-such-job"}, TENANT)
    assert (status, body["code"]) == (404, "not_found")
    status, body = call(worker.base, "GetCurrentTenant", {}, TENANT)
    assert (status, body["tenantId"]) == (200, "acme")
    with urllib.request.urlopen(f"{worker.base}/info", timeout=5) as resp:
        assert json.loads(resp.read())["poll_cycles"] > 0


def events_delivered(w: Worker, job_id: str) -> bool:
    """The job's COMPLETED event reached the store's event table. Events go through the
    WAL and land a moment after the job row turns terminal; a watch that starts in that
    window ends without them (worker/service.py, reported), so the tests wait first."""
    status, body = call(w.base, "ListJobEvents", {"job_id": job_id}, TENANT)
    assert status == 200, body
    return any(e["kind"] == "EVENT_KIND_COMPLETED" for e in body.get("events", []))


def frames(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        flags, size = struct.unpack(">BI", data[i : i + 5])
        out.append((flags, data[i + 5 : i + 5 + size]))
        i += 5 + size
    assert i == len(data), "truncated Connect envelope"
    return out


def test_connect_server_streaming(worker: Worker) -> None:
    job_id = submit(worker, ["true"])
    wait_until(lambda: events_delivered(worker, job_id), 15)
    payload = json.dumps({"job_id": job_id}).encode()
    req = urllib.request.Request(
        f"{worker.base}{SERVICE}/WatchJobEvents",
        data=struct.pack(">BI", 0, len(payload)) + payload,
        headers={"Content-Type": "application/connect+json", **TENANT}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=15) as resp:
        assert resp.headers["Content-Type"] == "application/connect+json"
        got = frames(resp.read())
    *messages, (end_flags, end) = got
    assert end_flags == 0x02 and json.loads(end) == {}, end  # end of stream, no error
    kinds = [json.loads(m)["kind"] for flags, m in messages if flags == 0]
    assert kinds[0] == "EVENT_KIND_SUBMITTED" and kinds[-1] == "EVENT_KIND_COMPLETED", kinds
    seqs = [int(json.loads(m)["seq"]) for _, m in messages]
    assert seqs == sorted(seqs) and seqs[0] == 1


def test_grpc_over_h2c(worker: Worker) -> None:
    grpc = pytest.importorskip("grpc")
    from jennah.v1 import deployment_pb2 as pb

    meta = (("x-tenant-id", "acme"),)
    with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        submit_rpc = channel.unary_unary(
            f"{SERVICE}/SubmitJob", request_serializer=pb.SubmitJobRequest.SerializeToString,
            response_deserializer=pb.SubmitJobResponse.FromString)
        watch_rpc = channel.unary_stream(
            f"{SERVICE}/WatchJobEvents",
            request_serializer=pb.WatchJobEventsRequest.SerializeToString,
            response_deserializer=pb.JobEvent.FromString)
        get_rpc = channel.unary_unary(
            f"{SERVICE}/GetJob", request_serializer=pb.GetJobRequest.SerializeToString,
            response_deserializer=pb.GetJobResponse.FromString)
        answer: Any = submit_rpc(pb.SubmitJobRequest(image_uri="busybox", commands=["true"]),
                                 metadata=meta, timeout=10)
        assert answer.job_id
        assert get_rpc(pb.GetJobRequest(job_id=answer.job_id), metadata=meta,
                       timeout=10).job.job_id == answer.job_id
        wait_until(lambda: events_delivered(worker, answer.job_id), 15)
        events = list(watch_rpc(pb.WatchJobEventsRequest(job_id=answer.job_id),
                                metadata=meta, timeout=10))
        assert events[-1].kind == pb.EVENT_KIND_COMPLETED
        with pytest.raises(grpc.RpcError) as err:
            get_rpc(pb.GetJobRequest(job_id="nope"), metadata=meta, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def canceled_watches(w: Worker) -> float:
    with urllib.request.urlopen(f"{w.base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    pattern = r'jennah_worker_requests_total\{(?=[^}]*code="canceled")(?=[^}]*WatchJobEvents)' \
        r"[^}]*\} (\S+)"
    return sum(float(v) for v in re.findall(pattern, text))


def test_a_client_leaving_a_follow_watch_is_noticed(worker: Worker) -> None:
    """After the request body pyvoy's ``receive()`` is polled, not awaited (commands/serve.py):
    a client that goes away still ends its call, within about the poll interval."""
    before = canceled_watches(worker)
    payload = json.dumps({"follow": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    conn.request("POST", f"{SERVICE}/WatchJobEvents", struct.pack(">BI", 0, len(payload))
                 + payload, {"Content-Type": "application/connect+json", **TENANT})
    assert conn.getresponse().status == 200
    time.sleep(0.3)
    conn.close()
    left = time.monotonic()
    wait_until(lambda: canceled_watches(worker) > before, 5)
    assert time.monotonic() - left < 2


def test_sigterm_drains_runs_lifespan_shutdown_and_exits_within_grace(worker: Worker) -> None:
    submit(worker, ["true"])
    # A follow-watch stays in flight: the drain must close the listener at once but let
    # this request run on until the grace is spent.
    payload = json.dumps({"follow": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=GRACE + 10)
    conn.request("POST", f"{SERVICE}/WatchJobEvents", struct.pack(">BI", 0, len(payload))
                 + payload, {"Content-Type": "application/connect+json", **TENANT})
    resp = conn.getresponse()
    assert resp.status == 200
    body: list[bytes] = []

    def pump() -> None:
        try:
            while chunk := resp.read1(65536):
                body.append(chunk)
        except (http.client.HTTPException, OSError):
            body.append(b"<cut>")  # a follow-watch is cut when the grace ends

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    time.sleep(0.3)
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", worker.port), 0.5).close()
        except OSError:
            return True
        return False

    wait_until(refused, 3)
    assert worker.proc.poll() is None, "exited without waiting for the in-flight call"
    code = worker.proc.wait(timeout=GRACE + 12)
    took = time.monotonic() - started
    reader.join(5)
    conn.close()
    assert code in (0, -signal.SIGTERM), code
    assert GRACE - 0.5 < took < GRACE + 5, took
    assert b"EVENT_KIND_SUBMITTED" in b"".join(body)  # the watch streamed during the drain
    text = worker.text()
    # Logged by worker.app.stop(), i.e. by the lifespan shutdown that ran inside Envoy.
    assert re.search(r"shutdown: loops stopped in .* released \d+ leases .* events flushed",
                     text), text[-3000:]
    assert " ERROR " not in text, text[-3000:]
