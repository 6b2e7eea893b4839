"""Admission control (worker/admission.py): unit tests on an injected clock, then over HTTP.

No test sleeps: time is a number the test moves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from database.memory import MemoryStore
from gateway.app import create_app as create_gateway
from jennah.errors import ResourceExhausted, SettingsError
from jennah.models import Job, JobFilter, JobPatch, JobSpec, JobStatus
from jennah.rpc import retry_after_of, to_connect_error
from jennah.settings import AdmissionSettings, load_gateway_settings, load_worker_settings
from providers import aws, azure, gcp
from providers.local import LocalProvider
from providers.memory import DryProvider
from tests.helpers import SERVICE, ThreadServer
from tests.worker.test_worker_jobs import ScriptedProvider
from worker.admission import (
    Admission,
    TokenBucket,
    provider_submit_rate,
    store_active_counter,
)
from worker.app import build_runtime, create_app


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Counter:
    """A fake active-jobs count that records how often it was asked."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.calls = 0

    def __call__(self, tenant_id: str, limit: int) -> int:
        self.calls += 1
        return self.value


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def limits(rate: float = 0, burst: int = 1, active: int = 0,
           provider: float | None = 0, tasks: int = 0) -> AdmissionSettings:
    return AdmissionSettings(tenant_submit_rate=rate, tenant_submit_burst=burst,
                             tenant_max_active_jobs=active, provider_submit_rate=provider,
                             tenant_max_active_tasks=tasks)


async def admit_n(adm: Admission, tenant: str, n: int, rid: str = "") -> int:
    """Admit and 'store' up to n submits; return how many were admitted."""
    ok = 0
    for _ in range(n):
        try:
            ticket = await adm.admit(tenant, rid)
        except ResourceExhausted:
            continue
        ticket.stored(created=True)
        ok += 1
    return ok


# --- token bucket --------------------------------------------------------------------


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    for _ in range(3):
        assert b.wait(0.0) == 0
        b.take(0.0)
    assert b.wait(0.0) == pytest.approx(0.5)
    assert b.wait(0.25) == pytest.approx(0.25)
    assert b.wait(0.5) == 0
    assert b.full(100.0) and b.tokens == 3  # never above the burst


# --- per-tenant rate ---------------------------------------------------------------------


def test_tenant_rate_burst_then_refusal_with_hint() -> None:
    clock = Clock()
    adm = Admission(limits(rate=2, burst=5), provider="local", clock=clock)
    assert run(admit_n(adm, "acme", 5)) == 5
    with pytest.raises(ResourceExhausted) as err:
        run(adm.admit("acme", ""))
    assert err.value.retry_after_seconds == pytest.approx(0.5)
    assert "acme" in str(err.value) and "submit rate" in str(err.value)
    assert run(admit_n(adm, "other", 5)) == 5  # tenants do not share a bucket
    clock.advance(0.5)
    assert run(admit_n(adm, "acme", 2)) == 1  # one token back after 1/rate seconds
    clock.advance(10)
    assert run(admit_n(adm, "acme", 10)) == 5  # refilled to the burst, not beyond


def test_zero_rate_and_zero_cap_disable_the_limits() -> None:
    adm = Admission(limits(rate=0, active=0), provider="dry", counter=Counter(10**6),
                    clock=Clock())
    assert run(admit_n(adm, "acme", 2000)) == 2000
    assert adm.counts == 0


# --- per-provider rate --------------------------------------------------------------------


def test_provider_defaults_are_the_published_limits(tmp_path: Path) -> None:
    assert aws.SUBMIT_RATE == 50
    assert gcp.SUBMIT_RATE == 100  # 6,000 job changes a minute
    assert azure.SUBMIT_RATE == 20 and azure.AzureBatchProvider.capabilities.submit_rate == 20
    assert LocalProvider(tmp_path).capabilities.submit_rate is None
    assert DryProvider().capabilities.submit_rate is None
    assert provider_submit_rate(50, None) == 50
    assert provider_submit_rate(50, 7.5) == 7.5
    assert provider_submit_rate(50, 0) is None  # explicitly off


def test_provider_rate_is_shared_by_all_tenants_and_by_workers() -> None:
    clock = Clock()
    adm = Admission(limits(provider=None), provider="aws", provider_rate=50, clock=clock)
    admitted = sum(run(admit_n(adm, f"t{i}", 10)) for i in range(10))
    assert admitted == 50  # one second's worth, whoever asks
    with pytest.raises(ResourceExhausted) as err:
        run(adm.admit("t99", ""))
    assert "aws" in str(err.value)
    assert err.value.retry_after_seconds == pytest.approx(0.1)  # ceil(1/50 s) to 0.1 s
    clock.advance(1)
    adm.set_worker_count(5)  # five live workers: each takes 10/s
    assert sum(run(admit_n(adm, f"t{i}", 10)) for i in range(5)) == 10
    with pytest.raises(ResourceExhausted) as err:
        run(adm.admit("t1", ""))
    assert err.value.retry_after_seconds == pytest.approx(0.1)
    clock.advance(1)
    adm.set_worker_count(0)  # no membership rows yet: act as the only worker
    assert adm.workers == 1


def test_a_refused_submit_spends_no_token() -> None:
    clock = Clock()
    # The tenant bucket barely refills; the provider allows 1/s.
    adm = Admission(limits(rate=0.001, burst=2, provider=1), provider="aws", provider_rate=50,
                    clock=clock)
    assert run(admit_n(adm, "acme", 1)) == 1
    with pytest.raises(ResourceExhausted, match="aws"):
        run(adm.admit("acme", ""))  # the provider refuses: the tenant keeps its token
    clock.advance(1)
    assert run(admit_n(adm, "acme", 1)) == 1
    clock.advance(1)
    with pytest.raises(ResourceExhausted, match="acme is over its submit rate"):
        run(adm.admit("acme", ""))


# --- active jobs cap -------------------------------------------------------------------


def test_active_cap_counts_once_when_far_from_the_cap() -> None:
    counter = Counter(0)
    adm = Admission(limits(active=1000), provider="local", counter=counter, clock=Clock())
    assert run(admit_n(adm, "acme", 300)) == 300
    assert counter.calls == 1  # first sight of the tenant only; no scan per submit


def test_active_cap_refuses_at_the_cap_and_recounts_at_most_once_per_interval() -> None:
    clock = Clock()
    counter = Counter(0)
    adm = Admission(limits(active=10), provider="local", counter=counter, clock=clock)
    assert run(admit_n(adm, "acme", 10)) == 10
    counter.value = 10  # what the store now says
    for _ in range(50):
        with pytest.raises(ResourceExhausted) as err:
            run(adm.admit("acme", ""))
    assert "10 active jobs" in str(err.value) and err.value.retry_after_seconds
    assert counter.calls <= 2  # the first sight plus at most one recount in this second
    counter.value = 7  # three jobs finished
    clock.advance(1)
    assert run(admit_n(adm, "acme", 5)) == 3
    assert counter.calls <= 3


def test_in_flight_submits_count_against_the_cap() -> None:
    async def scenario() -> tuple[int, int]:
        adm = Admission(limits(active=3), provider="local", counter=Counter(0), clock=Clock())
        tickets = [await adm.admit("acme", "") for _ in range(3)]  # not stored yet
        with pytest.raises(ResourceExhausted):
            await adm.admit("acme", "")
        tickets[0].abandon()  # that store write failed: its place is free again
        tickets.append(await adm.admit("acme", ""))
        tickets[1].abandon()
        tickets[1].abandon()  # idempotent
        entry = adm._active["acme"]
        return entry.inflight, entry.count

    assert run(scenario()) == (2, 0)


def test_store_active_counter_counts_only_active_jobs_and_stops_at_the_limit() -> None:
    store = MemoryStore()
    for i in range(7):
        store.create_job(Job(job_id=f"j{i}", tenant_id="acme", spec=JobSpec("busybox"),
                             owner_worker_id="w"), 30)
    done, _ = store.create_job(Job(job_id="done", tenant_id="acme", spec=JobSpec("busybox"),
                                   owner_worker_id="w"), 30)
    store.update_job("done", done.lease, JobPatch(status=JobStatus.CANCELLED))
    store.create_job(Job(job_id="x", tenant_id="other", spec=JobSpec("busybox"),
                         owner_worker_id="w"), 30)
    count = store_active_counter(store)
    assert count("acme", 100) == (7, 7)
    assert count("acme", 3)[0] >= 3
    assert count("nobody", 100) == (0, 0)


# --- idempotent retries ----------------------------------------------------------------


def test_a_known_request_id_is_never_refused() -> None:
    clock = Clock()
    adm = Admission(limits(rate=0.001, burst=1, active=1, provider=1), provider="aws",
                    counter=Counter(0), clock=clock)
    ticket = run(adm.admit("acme", "req-1"))
    ticket.stored(created=True)
    for _ in range(100):  # rate, provider and active cap are all exhausted
        run(adm.admit("acme", "req-1")).stored(created=False)
    with pytest.raises(ResourceExhausted):
        run(adm.admit("acme", "req-2"))
    with pytest.raises(ResourceExhausted):
        run(adm.admit("other", "req-1"))  # keyed by tenant too


def test_delete_and_resubmit_under_one_request_id_is_charged() -> None:
    clock = Clock()
    adm = Admission(limits(rate=1, burst=2), provider="local", clock=clock)
    run(adm.admit("acme", "r")).stored(created=True)
    # The job was deleted; the same request id creates a new job: let through, but charged.
    for _ in range(3):
        run(adm.admit("acme", "r")).stored(created=True)
    with pytest.raises(ResourceExhausted) as err:
        run(adm.admit("acme", "fresh"))
    assert err.value.retry_after_seconds == pytest.approx(3.0)  # two tokens in debt


# --- settings and the RPC mapping --------------------------------------------------------


def test_settings_are_read_and_validated() -> None:
    base = {"JENNAH_DEV_MODE": "1"}
    s = load_worker_settings(base).admission
    assert (s.tenant_submit_rate, s.tenant_submit_burst, s.tenant_max_active_jobs,
            s.provider_submit_rate) == (50, 200, 1000, None)
    s = load_worker_settings({**base, "TENANT_SUBMIT_RATE": "2.5", "TENANT_SUBMIT_BURST": "4",
                              "TENANT_MAX_ACTIVE_JOBS": "0", "PROVIDER_SUBMIT_RATE": "0"}
                             ).admission
    assert (s.tenant_submit_rate, s.tenant_submit_burst, s.tenant_max_active_jobs,
            s.provider_submit_rate) == (2.5, 4, 0, 0)
    with pytest.raises(SettingsError) as err:
        load_worker_settings({**base, "TENANT_SUBMIT_RATE": "-1", "TENANT_SUBMIT_BURST": "0",
                              "TENANT_MAX_ACTIVE_JOBS": "lots", "PROVIDER_SUBMIT_RATE": "nan"})
    for name in ("TENANT_SUBMIT_RATE", "TENANT_SUBMIT_BURST", "TENANT_MAX_ACTIVE_JOBS",
                 "PROVIDER_SUBMIT_RATE"):
        assert name in str(err.value)


def test_resource_exhausted_maps_to_a_connect_error_with_retry_info() -> None:
    err = to_connect_error(ResourceExhausted("over the limit", retry_after_seconds=2.34))
    assert err.code == Code.RESOURCE_EXHAUSTED
    assert err.message == "over the limit; retry after 3 s"
    assert retry_after_of(err) == pytest.approx(2.4)
    assert retry_after_of(to_connect_error(ResourceExhausted("no hint"))) is None


# --- over HTTP -----------------------------------------------------------------------------


def _worker(store: MemoryStore, extra: dict[str, str], provider: Any = None) -> ThreadServer:
    env = {"JENNAH_HOME": tempfile.mkdtemp(prefix="jennah-adm-"), "JENNAH_DEV_MODE": "1",
           "WORKER_ID": "w-adm", "DB_PROVIDER": "memory", "BATCH_PROVIDER": "dry",
           "WORKER_POLL_INTERVAL_SECONDS": "0.05", **extra}
    settings = load_worker_settings(env)
    registry = CollectorRegistry()
    rt = build_runtime(settings, store=store, provider=provider, registry=registry)
    return ThreadServer(create_app(settings, rt, registry))


def post(url: str, method: str, body: dict[str, Any], tenant: str = "acme"
         ) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(f"{url}{SERVICE}/{method}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "X-Tenant-Id": tenant}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), dict(err.headers)


@pytest.fixture
def stack() -> Iterator[tuple[str, str, MemoryStore]]:
    """A worker limited to a burst of 3 submits per tenant, and a gateway in front of it."""
    store = MemoryStore()
    with _worker(store, {"TENANT_SUBMIT_RATE": "0.01", "TENANT_SUBMIT_BURST": "3"}) as worker:
        gw_settings = load_gateway_settings({"JENNAH_DEV_MODE": "1",
                                             "WORKER_ENDPOINTS": worker.url})
        with ThreadServer(create_gateway(gw_settings, registry=CollectorRegistry())) as gw:
            yield worker.url, gw.url, store


def _retry_info(resp: dict[str, Any]) -> float:
    [detail] = [d for d in resp.get("details", []) if d["type"] == "google.rpc.RetryInfo"]
    raw = detail["value"]
    info = RetryInfo.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


@pytest.mark.parametrize("via", ["worker", "gateway"])
def test_over_the_rate_is_resource_exhausted_with_a_retry_hint_and_stores_nothing(
    stack: tuple[str, str, MemoryStore], via: str
) -> None:
    worker, gateway, store = stack
    url = worker if via == "worker" else gateway
    tenant = f"rate-{via}"
    body = {"image_uri": "busybox", "commands": ["true"]}
    first = post(url, "SubmitJob", {**body, "request_id": "r-1"}, tenant)
    assert first[0] == 200
    for i in (2, 3):
        assert post(url, "SubmitJob", {**body, "request_id": f"r-{i}"}, tenant)[0] == 200
    status, resp, headers = post(url, "SubmitJob", {**body, "request_id": "r-4"}, tenant)
    assert (status, resp["code"]) == (429, "resource_exhausted")
    assert "over its submit rate" in resp["message"]
    assert resp["message"].endswith("; retry after 100 s")  # 1 token at 0.01/s
    assert _retry_info(resp) == pytest.approx(100.0)
    assert headers.get("retry-after") == "100"
    listed = store.list_jobs(tenant, JobFilter(), 50, "").jobs
    assert sorted(j.request_id for j in listed) == ["r-1", "r-2", "r-3"]  # r-4 not stored
    # An idempotent retry of a stored submit is answered, not refused.
    again = post(url, "SubmitJob", {**body, "request_id": "r-1"}, tenant)
    assert again[0] == 200 and again[1]["jobId"] == first[1]["jobId"]
    assert len(store.list_jobs(tenant, JobFilter(), 50, "").jobs) == 3


def test_active_cap_over_http() -> None:
    store = MemoryStore()
    # ScriptedProvider keeps jobs SCHEDULED until told otherwise: they stay active.
    with _worker(store, {"TENANT_MAX_ACTIVE_JOBS": "2"}, ScriptedProvider()) as worker:
        body = {"image_uri": "busybox", "commands": ["true"]}
        assert post(worker.url, "SubmitJob", body)[0] == 200
        assert post(worker.url, "SubmitJob", body)[0] == 200
        status, resp, headers = post(worker.url, "SubmitJob", body)
        assert (status, resp["code"]) == (429, "resource_exhausted")
        assert "2 active jobs" in resp["message"] and resp["message"].endswith("; retry after 5 s")
        assert headers.get("retry-after") == "5"
        assert len(store.list_jobs("acme", JobFilter(), 50, "").jobs) == 2
        assert post(worker.url, "SubmitJob", body, tenant="other")[0] == 200


# --- tasks (docs/design.md §16) ----------------------------------------------------------


def test_the_task_cap_counts_the_tasks_of_active_jobs_and_of_the_new_one() -> None:
    counted: list[int] = []

    def counter(tenant_id: str, limit: int) -> tuple[int, int]:
        counted.append(limit)
        return 2, 9_000  # two active jobs holding 9,000 tasks

    adm = Admission(limits(tasks=10_000), provider="local", counter=counter, clock=Clock())
    ticket = run(adm.admit("acme", "", tasks=1_000))  # 9,000 + 1,000: at the cap, allowed
    ticket.stored(True)
    with pytest.raises(ResourceExhausted, match="10000 active tasks and this job has 1"):
        run(adm.admit("acme", "", tasks=1))
    with pytest.raises(ResourceExhausted, match="TENANT_MAX_ACTIVE_TASKS"):
        run(adm.admit("acme", "", tasks=500))
    assert counted  # the store was asked
    # A refused submit holds nothing back: another tenant, or fewer tasks later, pass.
    assert run(adm.admit("beta", "", tasks=1_000))


def test_a_refused_task_count_releases_its_inflight_tasks() -> None:
    adm = Admission(limits(tasks=10), provider="local", counter=lambda t, n: (0, 0),
                    clock=Clock())
    with pytest.raises(ResourceExhausted):
        run(adm.admit("acme", "", tasks=11))
    first = run(adm.admit("acme", "", tasks=10))
    first.abandon()  # the store failed: its tasks are not counted
    run(adm.admit("acme", "", tasks=10)).stored(True)
    with pytest.raises(ResourceExhausted):
        run(adm.admit("acme", "", tasks=1))


def test_the_provider_rate_counts_provider_calls_and_never_refuses_a_big_job_for_ever() -> None:
    clock = Clock()
    adm = Admission(limits(provider=10), provider="azure", clock=clock)
    run(adm.admit("acme", "", calls=101))  # 10 tokens were there: 91 in debt
    with pytest.raises(ResourceExhausted) as refused:
        run(adm.admit("acme", "", calls=1))
    assert refused.value.retry_after_seconds == 9.2  # 92 tokens at 10/s
    clock.now += 9.3
    assert run(adm.admit("acme", "", calls=1))


def test_store_counter_counts_the_tasks_of_active_jobs() -> None:
    store = MemoryStore()
    for i, n in enumerate((1, 5, 7)):
        store.create_job(Job(job_id=f"j{i}", tenant_id="acme", owner_worker_id="w",
                             spec=JobSpec(image_uri="busybox", task_count=n)), 30)
    done = store.get_job("acme", "j2")
    store.update_job("j2", done.lease, JobPatch(status=JobStatus.CANCELLED))
    assert store_active_counter(store)("acme", 1000) == (2, 6)
