"""The worker's RPC boundary over real HTTP: codes, generic internal errors, auth, limits."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from database.memory import MemoryStore
from jennah.errors import StoreUnavailable
from jennah.models import JobFilter
from jennah.settings import load_worker_settings
from tests.helpers import ThreadServer, call
from tests.worker.test_worker_jobs import ScriptedProvider
from worker.app import build_runtime, create_app

SECRET_DETAIL = "password=hunter2 at db-internal:5432"


class FlakyStore(MemoryStore):
    """A memory store that can be switched to failing modes."""

    mode = ""

    def get_job(self, tenant_id: str, job_id: str) -> Any:
        if self.mode == "crash":
            raise RuntimeError(SECRET_DETAIL)
        if self.mode == "down":
            raise StoreUnavailable("job store unreachable")
        return super().get_job(tenant_id, job_id)

    def write_batch(self, ops: Any) -> Any:
        if self.mode == "down":
            raise StoreUnavailable("job store unreachable")
        return super().write_batch(ops)


def _server(token: str = "", dev: bool = True) -> tuple[ThreadServer, FlakyStore]:
    home = tempfile.mkdtemp(prefix="jennah-rpc-")
    env = {"JENNAH_HOME": home,"JENNAH_DEV_MODE": "1" if dev else "0", "JENNAH_WORKER_TOKEN": token,
           "WORKER_ID": "w-test", "DB_PROVIDER": "memory", "BATCH_PROVIDER": "fake",
           "WORKER_POLL_INTERVAL_SECONDS": "0.05", "READ_MAX_BYTES": "65536"}
    settings = load_worker_settings(env)
    store = FlakyStore()
    registry = CollectorRegistry()
    rt = build_runtime(settings, store=store, provider=ScriptedProvider(), registry=registry)
    return ThreadServer(create_app(settings, rt, registry)), store


@pytest.fixture
def worker() -> Iterator[tuple[str, FlakyStore]]:
    server, store = _server()
    with server:
        yield server.url, store


ACME = {"X-Tenant-Id": "acme"}


def test_unhandled_exception_is_a_generic_internal_error(worker: tuple[str, FlakyStore]) -> None:
    url, store = worker
    store.mode = "crash"
    status, resp = call(url, "GetJob", {"job_id": "x"}, ACME)
    assert (status, resp["code"], resp["message"]) == (500, "internal", "internal error")
    assert "hunter2" not in str(resp)
    store.mode = ""
    status, resp = call(url, "GetJob", {"job_id": "x"}, ACME)  # still serving
    assert (status, resp["code"]) == (404, "not_found")


def test_store_down_is_unavailable_and_nothing_is_stored(worker: tuple[str, FlakyStore]) -> None:
    url, store = worker
    store.mode = "down"
    status, resp = call(url, "SubmitJob", {"image_uri": "busybox"}, ACME)
    assert (status, resp["code"]) == (503, "unavailable")
    store.mode = ""
    assert store.list_jobs("acme", JobFilter(), 50, "").jobs == []
    status, _ = call(url, "SubmitJob", {"image_uri": "busybox"}, ACME)
    assert status == 200  # recovers by itself


def test_oversized_request_is_refused(worker: tuple[str, FlakyStore]) -> None:
    url, _ = worker
    status, resp = call(url, "SubmitJob", {"image_uri": "busybox",
                                           "commands": ["x" * 100_000]}, ACME)
    assert (status, resp["code"]) == (429, "resource_exhausted")
    assert "larger than configured max 65536" in resp["message"]


def test_malformed_json_is_invalid_argument(worker: tuple[str, FlakyStore]) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{worker[0]}/jennah.v1.DeploymentService/SubmitJob", data=b"{not json",
        headers={"Content-Type": "application/json", **ACME}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    with err.value:
        assert err.value.code == 400


def test_token_required_outside_dev_mode() -> None:
    server, _ = _server(token="s3cret", dev=False)
    with server:
        status, resp = call(server.url, "ListJobs", {}, ACME)
        assert (status, resp["code"]) == (401, "unauthenticated")
        status, resp = call(server.url, "ListJobs", {},
                            {**ACME, "X-Jennah-Worker-Token": "wrong"})
        assert (status, resp["code"]) == (401, "unauthenticated")
        status, resp = call(server.url, "GetCurrentTenant", {},
                            {**ACME, "X-Jennah-Worker-Token": "s3cret"})
        assert status == 200 and resp == {"tenantId": "acme", "authMethod": "worker-token"}
