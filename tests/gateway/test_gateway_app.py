"""The gateway as a served ASGI app: real HTTP on 127.0.0.1 in front of fake workers.

Clients are the generated Connect client and plain curl-style JSON POSTs (urllib).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from prometheus_client import CollectorRegistry

from commands.gateway import main
from database import create_store
from database.base import JobStore
from gateway.app import create_app
from gateway.ring import TenantRing
from jennah.settings import GatewaySettings, StoreSettings
from jennah.v1 import deployment_pb2 as pb
from jennah.v1.deployment_connect import DeploymentServiceClientSync
from tests.gateway.test_gateway_forward import (
    LosingWorker,
    RunningWorker,
    ServerThread,
    start_worker,
    tenant_homed_at,
)

SERVICE = "/jennah.v1.DeploymentService"


def settings_for(urls: list[str], **overrides: Any) -> GatewaySettings:
    base = GatewaySettings(
        host="127.0.0.1", port=0, dev_mode=True, worker_token="", worker_endpoints=tuple(urls),
        health_interval_seconds=0.1, forward_timeout_seconds=10.0, api_keys_file="",
        server="uvicorn", read_max_bytes=1024 * 1024, discover_from_store=False,
        shutdown_grace_seconds=8.0,
        store=StoreSettings(),
    )
    return replace(base, **overrides)


class Gateway:
    def __init__(self, settings: GatewaySettings, store: JobStore | None = None) -> None:
        self.registry = CollectorRegistry()
        app = create_app(settings, registry=self.registry, store=store)
        self.server = ServerThread(app, lifespan="on").start()
        self.url = self.server.url
        self.client = DeploymentServiceClientSync(self.url, timeout_ms=10_000)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(http_get(f"{self.url}/info")[1])
        return info

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def post_json(url: str, method: str, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{url}{SERVICE}/{method}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def workers() -> Iterator[list[RunningWorker]]:
    started = [start_worker(f"w{i}") for i in range(3)]
    yield started
    for w in started:
        w.server.stop()


@pytest.fixture
def gateway(workers: list[RunningWorker]) -> Iterator[Gateway]:
    gw = Gateway(settings_for([w.url for w in workers], worker_token="tok"))
    yield gw
    gw.stop()


def home_of(workers: list[RunningWorker], tenant: str) -> RunningWorker:
    url = TenantRing([w.url for w in workers]).node_for(tenant)
    return next(w for w in workers if w.url == url)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_health_ready_metrics_info(gateway: Gateway, workers: list[RunningWorker]) -> None:
    assert http_get(f"{gateway.url}/health") == (200, "ok\n")
    assert http_get(f"{gateway.url}/ready") == (200, "ready: 3/3 workers healthy\n")
    status, text = http_get(f"{gateway.url}/metrics")
    assert status == 200
    for w in workers:
        assert f'jennah_gateway_worker_up{{worker="{w.url}"}} 1.0' in text
    info = gateway.info()
    assert info["workers"] == {w.url: "up" for w in workers}
    assert info["health_rounds"] >= 1


def test_get_current_tenant_is_answered_by_the_gateway(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    resp = gateway.client.get_current_tenant(pb.GetCurrentTenantRequest(),
                                             headers={"x-tenant-id": "acme"})
    assert (resp.tenant_id, resp.auth_method) == ("acme", "dev-header")
    assert all(not w.fake.seen for w in workers)


def test_unary_calls_reach_the_tenants_worker_with_headers(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    tenant = "acme"
    home = home_of(workers, tenant)
    headers = {"x-tenant-id": tenant}
    c = gateway.client
    assert c.get_job(pb.GetJobRequest(job_id="j1"), headers=headers).job.owner_worker_id == \
        home.fake.worker_id
    assert c.list_jobs(pb.ListJobsRequest(page_size=5), headers=headers).next_page_token == "next"
    assert c.cancel_job(pb.CancelJobRequest(job_id="j1"), headers=headers).job.job_id == "j1"
    assert c.delete_job(pb.DeleteJobRequest(job_id="j1"), headers=headers).job_id == "j1"
    events = c.list_job_events(pb.ListJobEventsRequest(job_id="j1", after_seq=4), headers=headers)
    assert [e.seq for e in events.events] == [5, 6]
    tasks = c.list_tasks(pb.ListTasksRequest(job_id="j1"), headers=headers)
    assert [t.index for t in tasks.tasks] == [0, 1]
    notes = c.list_notifications(pb.ListNotificationsRequest(limit=3), headers=headers)
    assert (notes.unread_count, notes.notifications[0].job_id) == (1, home.fake.worker_id)
    assert c.ack_notification(pb.AckNotificationRequest(notification_id="n1"),
                              headers=headers).success
    assert [s.method for s in home.fake.seen] == [
        "GetJob", "ListJobs", "CancelJob", "DeleteJob", "ListJobEvents", "ListTasks",
        "ListNotifications", "AckNotification"]
    assert {(s.tenant, s.token) for s in home.fake.seen} == {(tenant, "tok")}
    assert home.fake.calls("ListJobs")[0].request.page_size == 5
    ok = gateway.metric("jennah_gateway_requests_total", method="GetJob", code="ok")
    assert ok == 1.0


def test_client_cannot_forge_the_worker_token(workers: list[RunningWorker]) -> None:
    gw = Gateway(settings_for([w.url for w in workers]))  # no token configured
    try:
        tenant = "acme"
        gw.client.get_job(pb.GetJobRequest(job_id="j"),
                          headers={"x-tenant-id": tenant, "x-jennah-worker-token": "forged"})
    finally:
        gw.stop()
    (seen,) = home_of(workers, tenant).fake.calls("GetJob")
    assert seen.token == ""


def test_json_post_in_both_field_spellings(gateway: Gateway, workers: list[RunningWorker]) -> None:
    tenant = "json-co"
    home = home_of(workers, tenant)
    for body in ({"image_uri": "busybox:1", "commands": ["echo", "hi"]},
                 {"imageUri": "busybox:2", "requestId": "r-2"}):
        status, resp = post_json(gateway.url, "SubmitJob", body, {"X-Tenant-Id": tenant})
        assert status == 200, resp
        assert resp["workerId"] == home.fake.worker_id
        assert resp["status"] == "JOB_STATUS_PENDING"
    first, second = home.fake.calls("SubmitJob")
    assert (first.request.image_uri, list(first.request.commands)) == ("busybox:1", ["echo", "hi"])
    assert (second.request.image_uri, second.request.request_id) == ("busybox:2", "r-2")


def test_submit_gets_a_request_id_when_missing_and_keeps_a_given_one(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    tenant = "idem"
    headers = {"x-tenant-id": tenant}
    req = pb.SubmitJobRequest(image_uri="busybox")
    resp = gateway.client.submit_job(req, headers=headers)
    given = gateway.client.submit_job(pb.SubmitJobRequest(image_uri="busybox", request_id="mine"),
                                      headers=headers)
    first, second = home_of(workers, tenant).fake.calls("SubmitJob")
    assert re.fullmatch(r"gw-[0-9a-f-]{36}", first.request.request_id)
    assert resp.job_id == f"job-{first.request.request_id}"
    assert second.request.request_id == "mine" and given.job_id == "job-mine"


def test_submit_retried_after_a_lost_response_keeps_its_request_id(
    workers: list[RunningWorker],
) -> None:
    losing = LosingWorker()
    urls = [losing.url, *(w.url for w in workers)]
    gw = Gateway(settings_for(urls))
    try:
        ring = TenantRing(urls)
        tenant = tenant_homed_at(ring, losing.url)
        resp = gw.client.submit_job(pb.SubmitJobRequest(image_uri="busybox"),
                                    headers={"x-tenant-id": tenant})
        assert gw.metric("jennah_gateway_failovers_total") == 1.0
    finally:
        gw.stop()
        losing.close()
    lost = pb.SubmitJobRequest.FromString(losing.bodies[0])
    second = next(w for w in workers if w.url == ring.candidates(tenant)[1])
    (retried,) = second.fake.calls("SubmitJob")
    assert lost.request_id.startswith("gw-")
    assert retried.request.request_id == lost.request_id
    assert resp.worker_id == second.fake.worker_id


def test_missing_or_invalid_tenant_is_invalid_argument(gateway: Gateway) -> None:
    status, body = post_json(gateway.url, "GetJob", {"job_id": "j"})
    assert status == 400
    assert body == {"code": "invalid_argument", "message": "missing X-Tenant-Id header"}
    status, body = post_json(gateway.url, "GetJob", {"job_id": "j"}, {"X-Tenant-Id": "Bad_One"})
    assert (status, body["code"]) == (400, "invalid_argument")
    assert gateway.metric("jennah_gateway_requests_total", method="GetJob",
                          code="invalid_argument") == 2.0


def test_outside_dev_mode_every_rpc_is_unauthenticated(workers: list[RunningWorker]) -> None:
    gw = Gateway(settings_for([w.url for w in workers], dev_mode=False, worker_token="tok"))
    try:
        status, body = post_json(gw.url, "GetCurrentTenant", {}, {"X-Tenant-Id": "acme"})
        assert (status, body["code"]) == (401, "unauthenticated")
        assert body["message"] == "API keys are not configured"
        assert http_get(f"{gw.url}/health")[0] == 200  # probes need no key
    finally:
        gw.stop()
    assert all(not w.fake.seen for w in workers)


def test_worker_errors_reach_the_client_with_their_code(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    headers = {"x-tenant-id": "acme"}
    with pytest.raises(ConnectError) as err:
        gateway.client.get_job(pb.GetJobRequest(job_id="missing"), headers=headers)
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "job missing not found")
    status, body = post_json(gateway.url, "GetJob", {"job_id": "store-down"},
                             {"X-Tenant-Id": "acme"})
    assert (status, body["code"], body["message"]) == (503, "unavailable", "job store unavailable")
    assert sum(len(w.fake.seen) for w in workers) == 2  # the unavailable was not retried
    assert gateway.metric("jennah_gateway_failovers_total") == 0.0


def test_deadline_is_propagated_to_the_worker(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectError) as err:
        gateway.client.get_job(pb.GetJobRequest(job_id="slow"), headers={"x-tenant-id": "acme"},
                               timeout_ms=300)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    (seen,) = home_of(workers, "acme").fake.calls("GetJob")
    assert seen.timeout_ms is not None and 0 < seen.timeout_ms < 300


def test_failover_through_the_gateway(gateway: Gateway, workers: list[RunningWorker]) -> None:
    tenant = tenant_homed_at(TenantRing([w.url for w in workers]), workers[2].url)
    workers[2].server.stop()
    resp = gateway.client.get_job(pb.GetJobRequest(job_id="j"), headers={"x-tenant-id": tenant})
    assert resp.job.owner_worker_id in {"w0", "w1"}
    assert gateway.info()["workers"][workers[2].url] == "down"
    assert gateway.metric("jennah_gateway_worker_up", worker=workers[2].url) == 0.0
    assert http_get(f"{gateway.url}/ready") == (200, "ready: 2/3 workers healthy\n")


def test_not_ready_when_every_worker_is_down(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    for w in workers:
        w.server.stop()
    wait_for(lambda: http_get(f"{gateway.url}/ready")[0] == 503)
    assert http_get(f"{gateway.url}/ready") == (503, "not ready: 0/3 workers healthy\n")
    with pytest.raises(ConnectError) as err:
        gateway.client.get_job(pb.GetJobRequest(job_id="j"), headers={"x-tenant-id": "acme"})
    assert err.value.code == Code.UNAVAILABLE


def test_watch_is_streamed_through_the_gateway(
    gateway: Gateway, workers: list[RunningWorker]
) -> None:
    tenant = "streamer"
    stream = gateway.client.watch_job_events(pb.WatchJobEventsRequest(job_id="job-9"),
                                             headers={"x-tenant-id": tenant})
    events = list(stream)
    assert [(e.seq, e.message) for e in events] == [(1, "event 1"), (2, "event 2"), (3, "event 3")]
    assert {e.worker_id for e in events} == {home_of(workers, tenant).fake.worker_id}
    with pytest.raises(ConnectError) as err:
        list(gateway.client.watch_job_events(pb.WatchJobEventsRequest(job_id="missing"),
                                             headers={"x-tenant-id": tenant}))
    assert err.value.code == Code.NOT_FOUND
    assert gateway.metric("jennah_gateway_requests_total", method="WatchJobEvents",
                          code="ok") == 1.0


def test_main_refuses_bad_settings_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("WORKER_ENDPOINTS", "GATEWAY_DISCOVER_WORKERS", "PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JENNAH_DEV_MODE", "1")
    assert main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WORKER_ENDPOINTS" in err and "Traceback" not in err


def test_workers_discovered_from_store_membership(workers: list[RunningWorker]) -> None:
    store = create_store(StoreSettings(kind="memory"))
    for w in workers[:2]:
        store.heartbeat_worker(w.fake.worker_id, w.url + "/")
    settings = settings_for([], discover_from_store=True, store=StoreSettings(kind="memory"))
    gw = Gateway(settings, store=store)
    try:
        assert set(gw.info()["workers"]) == {workers[0].url, workers[1].url}
        resp = gw.client.get_job(pb.GetJobRequest(job_id="j"), headers={"x-tenant-id": "acme"})
        assert resp.job.owner_worker_id in {"w0", "w1"}
        store.heartbeat_worker(workers[2].fake.worker_id, workers[2].url)
        wait_for(lambda: len(gw.info()["workers"]) == 3)
    finally:
        gw.stop()
