"""``jennah.client.JennahClient`` and the CLI on it: every submit carries a request id, and
``unavailable`` / ``deadline_exceeded`` are retried with that same id (docs/design.md §6, the submit
path: a lost answer must never make a second job). Against a real Connect server
(uvicorn in a thread) whose first answers fail."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from prometheus_client import CollectorRegistry

from jennah.asgi import compose
from jennah.client import JennahClient, RetryPolicy
from jennah.v1 import deployment_pb2 as pb
from jennah.v1.deployment_connect import DeploymentService, DeploymentServiceASGIApplication
from tests.helpers import ThreadServer


class Flaky(DeploymentService):
    """SubmitJob fails ``failures`` times with ``code`` (after storing the job, as a
    worker whose answer was lost would), then answers; one job per request id."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = Code.UNAVAILABLE
        self.request_ids: list[str] = []
        self.jobs: dict[str, str] = {}
        self.events_failures = 0

    async def submit_job(self, request: pb.SubmitJobRequest, ctx: Any) -> pb.SubmitJobResponse:
        self.request_ids.append(request.request_id)
        job_id = self.jobs.setdefault(request.request_id, f"job-{len(self.jobs) + 1}")
        if self.failures:
            self.failures -= 1
            raise ConnectError(self.code, "lost answer (test)")
        return pb.SubmitJobResponse(job_id=job_id, status="JOB_STATUS_SCHEDULED")

    async def get_job(self, request: pb.GetJobRequest, ctx: Any) -> pb.GetJobResponse:
        if self.failures:
            self.failures -= 1
            raise ConnectError(Code.INVALID_ARGUMENT, "not retried")
        return pb.GetJobResponse(job=pb.Job(job_id=request.job_id))

    async def watch_job_events(
        self, request: pb.WatchJobEventsRequest, ctx: Any
    ) -> Any:
        for seq in range(request.after_seq + 1, 6):
            yield pb.JobEvent(job_id=request.job_id, seq=seq)
            if seq == 2 and self.events_failures:
                self.events_failures -= 1
                raise ConnectError(Code.UNAVAILABLE, "stream broken (test)")


@pytest.fixture
def server() -> Iterator[tuple[str, Flaky]]:
    svc = Flaky()

    async def ready() -> tuple[bool, str]:
        return True, "test"

    async def lifecycle() -> AsyncIterator[Flaky]:
        yield svc

    app = compose(DeploymentServiceASGIApplication(lifecycle()),  # type: ignore[arg-type]
                  ready=ready, registry=CollectorRegistry())  # fmt: skip
    with ThreadServer(app) as srv:
        yield srv.url, svc


def client(url: str) -> tuple[JennahClient, list[float]]:
    slept: list[float] = []
    return JennahClient(url, tenant="acme", retry=RetryPolicy(attempts=4, random=lambda: 1.0),
                        sleep=slept.append), slept  # fmt: skip


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
def test_a_submit_is_retried_with_its_request_id(server: tuple[str, Flaky], code: Code) -> None:
    url, svc = server
    svc.failures, svc.code = 2, code
    c, slept = client(url)
    req = pb.SubmitJobRequest(image_uri="busybox")
    resp = c.submit_job(req)
    assert len(svc.request_ids) == 3 and len(set(svc.request_ids)) == 1
    assert svc.request_ids[0].startswith("py-")
    assert resp.job_id == "job-1" and list(svc.jobs) == svc.request_ids[:1]
    assert req.request_id == ""  # the caller's message is left alone
    assert slept == [0.2, 0.4] and c.retries == 2  # random() = 1: the backoff's ceilings


def test_a_given_request_id_is_kept_and_retries_give_up(server: tuple[str, Flaky]) -> None:
    url, svc = server
    svc.failures = 10
    c, slept = client(url)
    with pytest.raises(ConnectError) as err:
        c.submit_job(pb.SubmitJobRequest(image_uri="busybox", request_id="mine"))
    assert err.value.code is Code.UNAVAILABLE
    assert svc.request_ids == ["mine"] * 4 and slept == [0.2, 0.4, 0.8]


def test_other_codes_are_not_retried(server: tuple[str, Flaky]) -> None:
    url, svc = server
    svc.failures = 1
    c, slept = client(url)
    with pytest.raises(ConnectError) as err:
        c.get_job("x")
    assert err.value.code is Code.INVALID_ARGUMENT and slept == []


def test_a_broken_watch_resumes_after_the_last_event(server: tuple[str, Flaky]) -> None:
    url, svc = server
    svc.events_failures = 1
    c, _ = client(url)
    seqs = [e.seq for e in c.watch_job_events(pb.WatchJobEventsRequest(job_id="j"))]
    assert seqs == [1, 2, 3, 4, 5]  # none missed, none twice


def test_the_cli_submit_sends_a_request_id_and_retries(server: tuple[str, Flaky]) -> None:
    url, svc = server
    svc.failures = 1
    proc = subprocess.run(
        [sys.executable, "-m", "jennah", "submit", "--url", url, "--tenant", "acme",
         "busybox", "--", "true"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"jobId": "job-1"' in proc.stdout
    assert len(svc.request_ids) == 2 and svc.request_ids[0] == svc.request_ids[1] != ""
