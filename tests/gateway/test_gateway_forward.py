"""Forwarding and failover against real fake workers over HTTP on 127.0.0.1.

Each fake worker is a minimal ``DeploymentService`` served by uvicorn in a thread. It
answers with its own id and records the tenant, token, deadline and request it got, so
the tests assert what actually crossed the wire. The fakes (and ``LosingWorker``, a raw
socket server that reads a call and hangs up without answering) are reused by
``tests/gateway/test_gateway_app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pytest
import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from pyqwest import Client

from gateway.forward import Forwarder, is_transport_failure
from gateway.health import HealthView
from gateway.ring import TenantRing
from jennah.asgi import compose
from jennah.rpc import TENANT_HEADER, WORKER_TOKEN_HEADER
from jennah.v1 import deployment_pb2 as pb
from jennah.v1.deployment_connect import DeploymentServiceASGIApplication

T = TypeVar("T")
Ctx = RequestContext[Any, Any]
SLOW_SECONDS = 2.0


# --- fake workers ------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    tenant: str
    token: str
    timeout_ms: float | None
    request: Any


@dataclass
class FakeWorker:
    """A tiny DeploymentService. ``job_id`` picks a behaviour: ``missing`` (not_found),
    ``store-down`` (the worker's own unavailable), ``slow`` (sleeps), else an echo."""

    worker_id: str
    seen: list[Seen] = field(default_factory=list)

    def _record(self, method: str, request: Any, ctx: Ctx) -> Seen:
        seen = Seen(
            method, ctx.request_headers.get(TENANT_HEADER, ""),
            ctx.request_headers.get(WORKER_TOKEN_HEADER, ""), ctx.timeout_ms, request,
        )
        self.seen.append(seen)
        return seen

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    async def _behave(self, job_id: str) -> None:
        if job_id == "missing":
            raise ConnectError(Code.NOT_FOUND, "job missing not found")
        if job_id == "store-down":
            raise ConnectError(Code.UNAVAILABLE, "job store unavailable")
        if job_id == "slow":
            await asyncio.sleep(SLOW_SECONDS)

    def _job(self, job_id: str, seen: Seen) -> pb.Job:
        return pb.Job(job_id=job_id, tenant_id=seen.tenant, owner_worker_id=self.worker_id,
                      labels={"token": seen.token})

    async def submit_job(self, request: pb.SubmitJobRequest, ctx: Ctx) -> pb.SubmitJobResponse:
        self._record("SubmitJob", request, ctx)
        return pb.SubmitJobResponse(job_id=f"job-{request.request_id}", worker_id=self.worker_id,
                                    status=pb.JOB_STATUS_PENDING)

    async def get_job(self, request: pb.GetJobRequest, ctx: Ctx) -> pb.GetJobResponse:
        seen = self._record("GetJob", request, ctx)
        await self._behave(request.job_id)
        return pb.GetJobResponse(job=self._job(request.job_id, seen))

    async def list_jobs(self, request: pb.ListJobsRequest, ctx: Ctx) -> pb.ListJobsResponse:
        seen = self._record("ListJobs", request, ctx)
        return pb.ListJobsResponse(jobs=[self._job("j1", seen)], next_page_token="next")

    async def cancel_job(self, request: pb.CancelJobRequest, ctx: Ctx) -> pb.CancelJobResponse:
        seen = self._record("CancelJob", request, ctx)
        await self._behave(request.job_id)
        return pb.CancelJobResponse(job=self._job(request.job_id, seen))

    async def delete_job(self, request: pb.DeleteJobRequest, ctx: Ctx) -> pb.DeleteJobResponse:
        self._record("DeleteJob", request, ctx)
        await self._behave(request.job_id)
        return pb.DeleteJobResponse(job_id=request.job_id)

    async def get_current_tenant(
        self, request: pb.GetCurrentTenantRequest, ctx: Ctx
    ) -> pb.GetCurrentTenantResponse:
        self._record("GetCurrentTenant", request, ctx)
        raise ConnectError(Code.INTERNAL, "the gateway answers GetCurrentTenant itself")

    async def list_job_events(
        self, request: pb.ListJobEventsRequest, ctx: Ctx
    ) -> pb.ListJobEventsResponse:
        self._record("ListJobEvents", request, ctx)
        await self._behave(request.job_id)
        return pb.ListJobEventsResponse(events=[
            pb.JobEvent(job_id=request.job_id, seq=s, worker_id=self.worker_id)
            for s in range(request.after_seq + 1, request.after_seq + 3)
        ])

    async def list_tasks(self, request: pb.ListTasksRequest, ctx: Ctx) -> pb.ListTasksResponse:
        self._record("ListTasks", request, ctx)
        await self._behave(request.job_id)
        return pb.ListTasksResponse(tasks=[pb.Task(index=i) for i in range(2)])

    async def list_notifications(
        self, request: pb.ListNotificationsRequest, ctx: Ctx
    ) -> pb.ListNotificationsResponse:
        self._record("ListNotifications", request, ctx)
        return pb.ListNotificationsResponse(
            notifications=[pb.Notification(id="n1", job_id=self.worker_id)], unread_count=1)

    async def ack_notification(
        self, request: pb.AckNotificationRequest, ctx: Ctx
    ) -> pb.AckNotificationResponse:
        self._record("AckNotification", request, ctx)
        return pb.AckNotificationResponse(success=True)

    async def watch_job_events(
        self, request: pb.WatchJobEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.JobEvent]:
        self._record("WatchJobEvents", request, ctx)
        await self._behave(request.job_id)
        for seq in range(request.after_seq + 1, request.after_seq + 4):
            yield pb.JobEvent(job_id=request.job_id, seq=seq, worker_id=self.worker_id,
                              message=f"event {seq}")
            await asyncio.sleep(0.01)


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


class ServerThread:
    """uvicorn serving ``app`` on a free 127.0.0.1 port, in a background thread."""

    def __init__(
        self, app: Any, *, lifespan: Literal["on", "off"] = "off", port: int = 0
    ) -> None:
        self.sock = _listen(port)
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False,
                                ws="none", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@dataclass
class RunningWorker:
    fake: FakeWorker
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


def start_worker(worker_id: str, port: int = 0) -> RunningWorker:
    fake = FakeWorker(worker_id)

    async def ready() -> tuple[bool, str]:
        return True, "fake"

    app = compose(DeploymentServiceASGIApplication(fake), ready=ready)
    return RunningWorker(fake, ServerThread(app, port=port).start())


class LosingWorker:
    """Answers ``GET /health``; reads any other request whole, records it, and hangs up
    without a response: a worker that dies after receiving a call."""

    def __init__(self) -> None:
        self.sock = _listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.bodies: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"GET /health"):
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        self.bodies.append(body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def workers() -> Iterator[list[RunningWorker]]:
    started = [start_worker(f"w{i}") for i in range(3)]
    yield started
    for w in started:
        w.server.stop()


# --- helpers -----------------------------------------------------------------------------


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=30))


def make_forwarder(
    urls: list[str], *, token: str = "", forward_timeout: float = 10.0
) -> tuple[Forwarder, HealthView, list[str]]:
    failovers: list[str] = []
    client = Client()
    health = HealthView(urls, interval=60, client=client)
    fwd = Forwarder(TenantRing(), health, worker_token=token,
                    forward_timeout_seconds=forward_timeout, http_client=client,
                    on_failover=failovers.append)
    return fwd, health, failovers


def by_url(workers: list[RunningWorker]) -> dict[str, RunningWorker]:
    return {w.url: w for w in workers}


def tenant_homed_at(ring: TenantRing, url: str) -> str:
    return next(t for t in (f"tenant-{i}" for i in range(10_000)) if ring.node_for(t) == url)


async def get_job(fwd: Forwarder, tenant: str, job_id: str,
                  timeout_ms: float | None = None) -> pb.GetJobResponse:
    req = pb.GetJobRequest(job_id=job_id)
    return await fwd.unary(tenant, timeout_ms,
                           lambda c, h, t: c.get_job(req, headers=h, timeout_ms=t))


async def watch(fwd: Forwarder, tenant: str, job_id: str) -> list[pb.JobEvent]:
    req = pb.WatchJobEventsRequest(job_id=job_id)
    stream = fwd.stream(tenant, None,
                        lambda c, h, t: c.watch_job_events(req, headers=h, timeout_ms=t))
    return [ev async for ev in stream]


# --- tests -------------------------------------------------------------------------------


def test_transport_failure_classification() -> None:
    unavailable = ConnectError(Code.UNAVAILABLE, "x")
    assert is_transport_failure(unavailable, None)  # no HTTP response at all
    assert is_transport_failure(unavailable, 502)   # a proxy could not reach the worker
    assert not is_transport_failure(unavailable, 503)  # the worker's own answer
    assert not is_transport_failure(ConnectError(Code.NOT_FOUND, "x"), None)
    assert not is_transport_failure(ConnectError(Code.DEADLINE_EXCEEDED, "x"), None)
    try:
        raise ConnectError(Code.UNAVAILABLE, "reset") from ConnectionResetError()
    except ConnectError as chained:
        assert is_transport_failure(chained, 200)


def test_forwards_to_the_tenants_ring_node_with_tenant_and_token(
    workers: list[RunningWorker],
) -> None:
    urls = [w.url for w in workers]

    async def go() -> dict[str, str]:
        fwd, _, failovers = make_forwarder(urls, token="s3cret")
        answered = {}
        for i in range(30):
            tenant = f"acme-{i}"
            resp = await get_job(fwd, tenant, f"job-{i}")
            assert resp.job.tenant_id == tenant
            assert resp.job.labels["token"] == "s3cret"
            answered[tenant] = resp.job.owner_worker_id
        assert failovers == []
        return answered

    answered = run(go)
    ring = TenantRing(urls)
    ids = by_url(workers)
    for tenant, worker_id in answered.items():
        assert ids[ring.node_for(tenant) or ""].fake.worker_id == worker_id
    assert len(set(answered.values())) == 3  # 30 tenants reach all three workers


def test_no_token_header_without_a_configured_token(workers: list[RunningWorker]) -> None:
    async def go() -> pb.GetJobResponse:
        fwd, _, _ = make_forwarder([w.url for w in workers])
        return await get_job(fwd, "acme", "j")

    assert run(go).job.labels["token"] == ""


def test_failover_when_the_tenants_worker_is_stopped(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    ring = TenantRing(urls)
    tenant = tenant_homed_at(ring, urls[0])
    home, second = ring.candidates(tenant)[:2]
    workers[0].server.stop()

    async def go() -> tuple[list[str], bool, list[str]]:
        fwd, health, failovers = make_forwarder(urls)
        first = await get_job(fwd, tenant, "a")
        again = await get_job(fwd, tenant, "b")  # skips the worker now marked down
        return [first.job.owner_worker_id, again.job.owner_worker_id], health.healthy(home), \
            failovers

    answered_by, home_healthy, failovers = run(go)
    assert answered_by == [by_url(workers)[second].fake.worker_id] * 2
    assert not home_healthy
    assert failovers == [home]  # one failover: the second call went straight to `second`


def test_all_marked_down_still_tries_in_ring_order(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    tenant = "globex"

    async def go() -> str:
        fwd, health, _ = make_forwarder(urls)
        for url in urls:
            health.mark_down(url)
        return (await get_job(fwd, tenant, "x")).job.owner_worker_id

    home = TenantRing(urls).node_for(tenant) or ""
    assert run(go) == by_url(workers)[home].fake.worker_id


def test_every_worker_unreachable_is_unavailable(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    for w in workers:
        w.server.stop()

    async def go() -> None:
        fwd, _, _ = make_forwarder(urls)
        await get_job(fwd, "acme", "x")

    with pytest.raises(ConnectError) as err:
        run(go)
    assert err.value.code == Code.UNAVAILABLE
    assert err.value.message == "no worker is reachable (tried 3)"


@pytest.mark.parametrize(
    ("job_id", "code", "message"),
    [("missing", Code.NOT_FOUND, "job missing not found"),
     ("store-down", Code.UNAVAILABLE, "job store unavailable")],
)
def test_worker_errors_pass_through_without_failover(
    workers: list[RunningWorker], job_id: str, code: Code, message: str
) -> None:
    urls = [w.url for w in workers]
    tenant = "initech"
    home = TenantRing(urls).node_for(tenant) or ""

    async def go() -> tuple[bool, list[str]]:
        fwd, health, failovers = make_forwarder(urls)
        with pytest.raises(ConnectError) as err:
            await get_job(fwd, tenant, job_id)
        assert (err.value.code, err.value.message) == (code, message)
        return health.healthy(home), failovers

    home_healthy, failovers = run(go)
    assert home_healthy and failovers == []
    assert [len(w.fake.calls("GetJob")) for w in workers] == [
        1 if w.url == home else 0 for w in workers
    ]


def test_client_deadline_is_propagated(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    tenant = "hooli"

    async def go() -> float:
        fwd, _, failovers = make_forwarder(urls)
        started = time.monotonic()
        with pytest.raises(ConnectError) as err:
            await get_job(fwd, tenant, "slow", timeout_ms=300)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        assert failovers == []
        return time.monotonic() - started

    elapsed = run(go)
    assert elapsed < 1.5
    home = by_url(workers)[TenantRing(urls).node_for(tenant) or ""]
    (seen,) = home.fake.calls("GetJob")
    assert seen.timeout_ms is not None and 0 < seen.timeout_ms <= 300


def test_forward_timeout_caps_a_call_without_deadline(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]

    async def go() -> None:
        fwd, _, _ = make_forwarder(urls, forward_timeout=0.4)
        with pytest.raises(ConnectError) as err:
            await get_job(fwd, "hooli", "slow")
        assert err.value.code == Code.DEADLINE_EXCEEDED

    run(go)
    (seen,) = [s for w in workers for s in w.fake.calls("GetJob")]
    assert seen.timeout_ms is not None and 0 < seen.timeout_ms <= 400


def test_stream_is_relayed(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    tenant = "umbrella"
    home = by_url(workers)[TenantRing(urls).node_for(tenant) or ""]

    async def go() -> list[pb.JobEvent]:
        fwd, _, _ = make_forwarder(urls, token="tok")
        return await watch(fwd, tenant, "job-1")

    events = run(go)
    assert [e.seq for e in events] == [1, 2, 3]
    assert {e.worker_id for e in events} == {home.fake.worker_id}
    (seen,) = home.fake.calls("WatchJobEvents")
    assert (seen.tenant, seen.token) == (tenant, "tok")


def test_stream_fails_over_before_the_first_message(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    ring = TenantRing(urls)
    tenant = tenant_homed_at(ring, urls[1])
    second = by_url(workers)[ring.candidates(tenant)[1]]
    workers[1].server.stop()

    async def go() -> tuple[list[pb.JobEvent], list[str]]:
        fwd, _, failovers = make_forwarder(urls)
        return await watch(fwd, tenant, "job-2"), failovers

    events, failovers = run(go)
    assert [e.worker_id for e in events] == [second.fake.worker_id] * 3
    assert failovers == [urls[1]]


def test_stream_error_from_the_worker_propagates(workers: list[RunningWorker]) -> None:
    async def go() -> None:
        fwd, _, failovers = make_forwarder([w.url for w in workers])
        with pytest.raises(ConnectError) as err:
            await watch(fwd, "umbrella", "missing")
        assert err.value.code == Code.NOT_FOUND
        assert failovers == []

    run(go)


def test_lost_response_is_retried_on_the_next_worker(workers: list[RunningWorker]) -> None:
    losing = LosingWorker()
    try:
        urls = [losing.url, *(w.url for w in workers)]
        ring = TenantRing(urls)
        tenant = tenant_homed_at(ring, losing.url)
        second = by_url(workers)[ring.candidates(tenant)[1]]

        async def go() -> pb.GetJobResponse:
            fwd, _, _ = make_forwarder(urls)
            return await get_job(fwd, tenant, "job-7")

        resp = run(go)
    finally:
        losing.close()
    assert pb.GetJobRequest.FromString(losing.bodies[0]).job_id == "job-7"
    assert resp.job.owner_worker_id == second.fake.worker_id


def test_health_checks_mark_down_and_up_again() -> None:
    worker = start_worker("w-restart")
    port = worker.server.port

    async def check(health: HealthView) -> bool:
        await health.check_once()
        return health.healthy(worker.url)

    health = HealthView([worker.url], interval=60, timeout=1.0)
    try:
        assert health.known_state(worker.url) is None and health.healthy(worker.url)
        assert asyncio.run(check(health))
        worker.server.stop()
        assert not asyncio.run(check(health))
        worker = start_worker("w-restart", port=port)
        assert asyncio.run(check(health))
        assert health.rounds == 3
    finally:
        worker.server.stop()


def test_discovery_updates_membership_and_the_ring(workers: list[RunningWorker]) -> None:
    urls = [w.url for w in workers]
    answers: list[list[str] | Exception] = [urls[:2], RuntimeError("store down"), urls[1:]]

    async def discover() -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def go() -> list[tuple[str, ...]]:
        client = Client()
        health = HealthView([], interval=60, client=client, discover=discover)
        fwd = Forwarder(TenantRing(), health, worker_token="", forward_timeout_seconds=5,
                        http_client=client)
        rings = []
        for _ in range(3):
            await health.check_once()
            rings.append(fwd.ring.nodes)
            resp = await get_job(fwd, "acme", "j")
            assert fwd.ring.node_for("acme") in health.members
            assert resp.job.owner_worker_id == by_url(workers)[
                fwd.ring.node_for("acme") or ""].fake.worker_id
        return rings

    rings = run(go)
    assert rings == [tuple(sorted(urls[:2])), tuple(sorted(urls[:2])), tuple(sorted(urls[1:]))]


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_cancellation_is_not_turned_into_an_error(
    workers: list[RunningWorker], kind: str
) -> None:
    # connectrpc's client turns a cancelled call into ConnectError(CANCELED); the
    # forwarder must give the cancellation back, or the server's own deadline handling
    # (asyncio.timeout) would report "canceled" instead of "deadline_exceeded".
    async def go() -> bool:
        fwd, _, _ = make_forwarder([w.url for w in workers])
        call = get_job(fwd, "acme", "slow") if kind == "unary" else watch(fwd, "acme", "slow")
        task = asyncio.ensure_future(call)
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert run(go)
