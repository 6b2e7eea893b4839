"""The worker's /metrics (worker/metrics.py): names exposed by a running worker, and values
that follow what the worker did; provider errors counted by class."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from database.memory import MemoryStore
from jennah.errors import ProviderQuotaExceeded
from jennah.models import JobSpec
from jennah.settings import load_worker_settings
from providers.base import Capabilities, ProviderStatus, ProviderTask
from providers.memory import FakeProvider
from tests.helpers import REPO, call, free_port, stop, wait_http, wait_until
from worker.app import build_runtime
from worker.metrics import InstrumentedProvider, worker_metrics

pytestmark = pytest.mark.timeout(60)

WORKER_METRICS = (
    "jennah_worker_requests",
    "jennah_worker_request_duration_seconds",
    "jennah_worker_jobs",
    "jennah_worker_job_events",
    "jennah_worker_leases_held",
    "jennah_worker_lease_claims",
    "jennah_worker_leases_lost",
    "jennah_worker_poll_cycle_duration_seconds",
    "jennah_worker_poll_cycle_failures",
    "jennah_worker_provider_call_duration_seconds",
    "jennah_worker_provider_errors",
    "jennah_worker_info",
    "wal_appends", "wal_append_duration_seconds", "wal_pending_events",
)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
         **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.mark.e2e
def test_running_worker_exposes_its_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JENNAH_", "OTEL_"))}
    env.pop("PORT", None)
    env.update({"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path), "WORKER_ID": "mw-1",
                "WORKER_PORT": str(port), "BATCH_PROVIDER": "local",
                "WORKER_POLL_INTERVAL_SECONDS": "0.1", "WORKER_LEASE_TTL_SECONDS": "3"})
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jennah", "worker"], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    tenant = {"X-Tenant-Id": "acme"}

    def scrape() -> str:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    try:
        wait_http(f"{base}/health", proc=proc)
        # A job that runs until cancelled: it is RUNNING and leased while we look.
        status, body = call(base, "SubmitJob", {"image_uri": "busybox",
                                                "commands": ["sleep", "30"]}, tenant)
        assert status == 200, body
        job_id = body["jobId"]
        assert call(base, "GetJob", {"job_id": "missing"}, tenant)[0] == 404

        def running_and_leased() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            s = _samples(scrape())
            ok = (_get(s, "jennah_worker_jobs", worker="mw-1", status="RUNNING") == 1
                  and _get(s, "jennah_worker_leases_held", worker="mw-1") == 1)
            return s if ok else None

        samples = wait_until(running_and_leased, timeout=15)
        text = scrape()
        assert call(base, "CancelJob", {"job_id": job_id}, tenant)[0] == 200
        after = wait_until(lambda: (s := _samples(scrape())) and _get(
            s, "jennah_worker_job_events_total", kind="CANCELLED") == 1 and s, timeout=10)
    finally:
        stop(proc)

    names = {f.name for f in text_string_to_metric_families(text)}
    missing = [n for n in WORKER_METRICS if n not in names]
    assert not missing, f"not exposed: {missing}"
    assert _get(samples, "jennah_worker_requests_total", method="SubmitJob", code="ok") == 1
    assert _get(samples, "jennah_worker_requests_total", method="GetJob", code="not_found") == 1
    assert _get(samples, "jennah_worker_request_duration_seconds_count", method="SubmitJob") == 1
    assert _get(samples, "jennah_worker_jobs", worker="mw-1", status="PENDING") == 0
    assert (_get(samples, "jennah_worker_job_events_total", kind="SUBMITTED") or 0) >= 1
    assert (_get(samples, "jennah_worker_poll_cycle_duration_seconds_count") or 0) >= 1
    # >= 1: the poller may submit a job it sees before the RPC stored the resource path
    # (same provider id, deduped by the provider).
    assert (_get(samples, "jennah_worker_provider_call_duration_seconds_count", op="submit")
            or 0) >= 1
    assert (_get(samples, "jennah_worker_provider_call_duration_seconds_count", op="status")
            or 0) >= 1
    assert _get(samples, "jennah_worker_info", worker="mw-1", store="sqlite",
                provider="local") == 1
    # After the cancel: no active jobs, the cancel went through the provider.
    assert (_get(after, "jennah_worker_provider_call_duration_seconds_count", op="cancel")
            or 0) >= 1


class _Throttled:
    name = "fake"
    capabilities = Capabilities()

    def submit(self, task: ProviderTask) -> str:
        raise ProviderQuotaExceeded("slow down")

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        return {p: ProviderStatus(state=None) for p in resource_paths}

    def cancel(self, resource_path: str) -> None:
        pass

    def close(self) -> None:
        pass

    def read_output(self, path: str) -> str:
        return "passed through"


def test_provider_errors_are_counted_by_class() -> None:
    registry = CollectorRegistry()
    provider = InstrumentedProvider(_Throttled(), worker_metrics(registry))
    task = ProviderTask(provider_job_id="j-x-0", job_id="x", tenant_id="acme", attempt=0,
                        spec=None)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(ProviderQuotaExceeded):
            provider.submit(task)
    assert provider.status(["a", "b"]).keys() == {"a", "b"}
    assert provider.read_output("p") == "passed through"  # optional methods delegate
    assert provider.name == "fake"
    value = registry.get_sample_value
    assert value("jennah_worker_provider_errors_total",
                 {"op": "submit", "error": "ProviderQuotaExceeded"}) == 2
    assert value("jennah_worker_provider_call_duration_seconds_count", {"op": "submit"}) == 2
    assert value("jennah_worker_provider_call_duration_seconds_count", {"op": "status"}) == 1
    assert value("jennah_worker_provider_errors_total", {"op": "status", "error":
                                                          "ProviderQuotaExceeded"}) is None
    assert worker_metrics(registry) is worker_metrics(registry)  # registered once


def test_a_built_worker_is_instrumented_before_anything_uses_it() -> None:
    """build_runtime gives JobService and the poller the instrumented provider and the
    event-counting hook at construction: the first submit is counted and timed, with no
    app created and nothing installed afterwards."""
    registry = CollectorRegistry()
    settings = load_worker_settings({
        "JENNAH_HOME": tempfile.mkdtemp(prefix="jennah-metrics-"), "JENNAH_DEV_MODE": "1",
        "WORKER_ID": "mw-2", "DB_PROVIDER": "memory", "BATCH_PROVIDER": "fake"})
    rt = build_runtime(settings, store=MemoryStore(), provider=FakeProvider(),
                       registry=registry)
    assert isinstance(rt.provider, InstrumentedProvider)

    async def go() -> None:
        await rt.jobs.submit("acme", JobSpec(image_uri="busybox"), "r-1")
        await rt.committer.close()

    asyncio.run(go())
    value = registry.get_sample_value
    assert value("jennah_worker_job_events_total", {"kind": "SUBMITTED"}) == 1
    assert value("jennah_worker_job_events_total", {"kind": "SCHEDULED"}) == 1
    assert value("jennah_worker_provider_call_duration_seconds_count", {"op": "submit"}) == 1
    assert value("jennah_worker_info", {"worker": "mw-2", "store": "memory",
                                        "provider": "fake"}) == 1
