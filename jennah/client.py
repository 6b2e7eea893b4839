"""A Python client for Jennah: the generated Connect client plus the habits every caller
needs (docs/design.md §6, "The submit path").

* **Every SubmitJob carries a ``request_id``.** One is made (``py-<uuid4>``) when the
  request has none, *before* the first attempt, so that every retry of that submit names
  the same job.
* **``unavailable`` and ``deadline_exceeded`` are retried** with the same request, with
  capped exponential backoff and full jitter (``jennah.backoff``). Either answer can come
  after the server stored the job (the response was lost, or the deadline passed while the
  server finished); the retry then returns that job instead of creating a second one.
  Reads are retried the same way. Other codes (``invalid_argument``,
  ``resource_exhausted``...) are raised at once: retrying cannot change them, or the
  caller must decide.

``jennah`` (the CLI) uses this client. Usage::

    from jennah.client import JennahClient
    from jennah.v1 import deployment_pb2 as pb

    client = JennahClient("http://127.0.0.1:8080", tenant="acme")
    job = client.submit_job(pb.SubmitJobRequest(image_uri="busybox", commands=["true"]))
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from jennah.backoff import Backoff
from jennah.v1 import deployment_pb2 as pb
from jennah.v1.deployment_connect import DeploymentServiceClientSync

T = TypeVar("T")
RETRIED = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times (``attempts``, in all, the first included) and how patiently a call
    is tried; the client's retry loop asks it for each wait."""

    attempts: int = 6
    base_seconds: float = 0.2
    cap_seconds: float = 5.0
    random: Callable[[], float] = field(default=random.random, compare=False)
    _backoff: Backoff = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_backoff",
                           Backoff(self.base_seconds, self.cap_seconds, self.random))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0 for the first)."""
        return self._backoff.delay(attempt)


def new_request_id() -> str:
    return f"py-{uuid.uuid4()}"


class JennahClient:
    """``jennah.v1.DeploymentService`` over Connect, with request ids and retries."""

    def __init__(
        self,
        url: str,
        *,
        tenant: str = "",
        api_key: str = "",
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.raw = DeploymentServiceClientSync(url, timeout_ms=int(timeout * 1000))
        self.headers: dict[str, str] = {}
        if tenant:
            self.headers["x-tenant-id"] = tenant
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self.retries = 0  # retried attempts, over the client's life

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except ConnectError as err:
                if err.code not in RETRIED or attempt + 1 >= self.retry.attempts:
                    raise
                self.retries += 1
                self._sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def submit_job(self, request: pb.SubmitJobRequest) -> pb.SubmitJobResponse:
        """Submit; the request gets a ``request_id`` first if it has none (the caller's
        object is not changed), and every retry sends that same id."""
        if not request.request_id:
            copy = pb.SubmitJobRequest()
            copy.CopyFrom(request)
            copy.request_id = new_request_id()
            request = copy
        return self._call(lambda: self.raw.submit_job(request, headers=self.headers))

    def get_job(self, job_id: str) -> pb.Job:
        req = pb.GetJobRequest(job_id=job_id)
        return self._call(lambda: self.raw.get_job(req, headers=self.headers)).job

    def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        return self._call(lambda: self.raw.list_jobs(request, headers=self.headers))

    def cancel_job(self, job_id: str) -> pb.Job:
        """A retry of a cancel that had in fact succeeded answers ``failed_precondition``
        (the job is already CANCELLED), which tells the truth."""
        req = pb.CancelJobRequest(job_id=job_id)
        return self._call(lambda: self.raw.cancel_job(req, headers=self.headers)).job

    def delete_job(self, job_id: str) -> pb.DeleteJobResponse:
        req = pb.DeleteJobRequest(job_id=job_id)
        return self._call(lambda: self.raw.delete_job(req, headers=self.headers))

    def get_current_tenant(self) -> pb.GetCurrentTenantResponse:
        req = pb.GetCurrentTenantRequest()
        return self._call(lambda: self.raw.get_current_tenant(req, headers=self.headers))

    def list_job_events(self, job_id: str, after_seq: int = 0) -> list[pb.JobEvent]:
        req = pb.ListJobEventsRequest(job_id=job_id, after_seq=after_seq)
        return list(self._call(lambda: self.raw.list_job_events(req, headers=self.headers))
                    .events)  # fmt: skip

    def list_tasks(self, request: pb.ListTasksRequest) -> pb.ListTasksResponse:
        return self._call(lambda: self.raw.list_tasks(request, headers=self.headers))

    def list_notifications(
        self, limit: int = 0, unread_only: bool = False
    ) -> pb.ListNotificationsResponse:
        req = pb.ListNotificationsRequest(limit=limit, unread_only=unread_only)
        return self._call(lambda: self.raw.list_notifications(req, headers=self.headers))

    def ack_notification(self, notification_id: str) -> bool:
        req = pb.AckNotificationRequest(notification_id=notification_id)
        return self._call(lambda: self.raw.ack_notification(req, headers=self.headers)).success

    def watch_job_events(self, request: pb.WatchJobEventsRequest) -> Iterator[pb.JobEvent]:
        """Stream events; a stream broken by ``unavailable`` is resumed after the last
        event received (by seq for a job, by position for a tenant), so none is missed
        or repeated."""
        attempt = 0
        while True:
            try:
                for event in self.raw.watch_job_events(request, headers=self.headers,
                                                       timeout_ms=None):  # fmt: skip
                    attempt = 0
                    if request.job_id:
                        request.after_seq = event.seq
                    else:
                        request.after_position = event.position
                    yield event
                return
            except ConnectError as err:
                if err.code is not Code.UNAVAILABLE or attempt + 1 >= self.retry.attempts:
                    raise
                self.retries += 1
                self._sleep(self.retry.delay(attempt))
                attempt += 1

    def close(self) -> None:
        self.raw.close()
