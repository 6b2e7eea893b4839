"""A store outage with real processes (bad input and faults).

A worker and a gateway run on a private PostgreSQL server, which the test stops and
starts again. While it is down, SubmitJob fails fast with ``unavailable`` and stores
nothing; the processes keep serving (``/health`` answers, ``/ready`` says why not);
when the server returns, the worker recovers by itself, without a restart.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.postgres import _Cluster
from tests.helpers import call, free_port, start_jennah, stop, wait_http, wait_until

pytestmark = pytest.mark.e2e

ACME = {"X-Tenant-Id": "acme"}
BODY = {"image_uri": "busybox", "commands": ["true"]}
OUTAGE_SECONDS = 9.0


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.fixture
def stack(tmp_path: Path, private_postgres: _Cluster) -> Iterator[tuple[str, str]]:
    env = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path), "BATCH_PROVIDER": "dry",
           "DB_PROVIDER": "postgres", "DATABASE_URL": private_postgres.url,
           "WORKER_ID": "w1", "WORKER_CLAIM_INTERVAL_SECONDS": "0.5"}  # fmt: skip
    wport, gport = free_port(), free_port()
    worker = start_jennah("worker", dict(env, WORKER_PORT=str(wport)), tmp_path / "w1.log")
    gateway = None
    try:
        wait_http(f"http://127.0.0.1:{wport}/health", proc=worker)
        gateway = start_jennah("gateway", dict(env, GATEWAY_PORT=str(gport),
                               WORKER_ENDPOINTS=f"http://127.0.0.1:{wport}"),
                               tmp_path / "gw.log")  # fmt: skip
        wait_http(f"http://127.0.0.1:{gport}/ready", proc=gateway)
        yield f"http://127.0.0.1:{wport}", f"http://127.0.0.1:{gport}"
    finally:
        for proc in (gateway, worker):
            if proc is not None:
                stop(proc)


def submit(gw: str, request_id: str) -> tuple[int, dict[str, object], float]:
    start = time.monotonic()
    status, resp = call(gw, "SubmitJob", dict(BODY, request_id=request_id), ACME, timeout=30)
    return status, resp, time.monotonic() - start


def job_ids(gw: str) -> set[str]:
    status, resp = call(gw, "ListJobs", {"page_size": 500}, ACME)
    assert status == 200, resp
    return {str(j["jobId"]) for j in resp.get("jobs", [])}  # type: ignore[attr-defined]


def test_submit_fails_fast_while_the_store_is_down_and_recovers_after(
    stack: tuple[str, str], private_postgres: _Cluster
) -> None:
    worker, gw = stack
    before = {str(submit(gw, f"before-{i}")[1]["jobId"]) for i in range(3)}
    assert job_ids(gw) == before

    private_postgres.halt()
    halted = time.monotonic()
    try:
        for i in range(3):
            status, resp, took = submit(gw, f"during-{i}")
            assert status == 503 and resp["code"] == "unavailable", resp
            assert took < 5.0, f"SubmitJob took {took:.1f} s to fail"
            assert "Traceback" not in str(resp) and "psycopg" not in str(resp)
        status, resp = call(gw, "GetJob", {"job_id": next(iter(before))}, ACME)
        assert status == 503 and resp["code"] == "unavailable"
        assert http_status(f"{worker}/health") == 200  # the process keeps serving
        assert http_status(f"{worker}/ready") == 503
        # Stay down long enough that an uncapped reconnect backoff (1, 2, 4, 8 s ...)
        # would leave the pool empty for seconds after the server is back.
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - halted)))
    finally:
        private_postgres.resume()
    back = time.monotonic()

    # No restart: the pool reconnects by itself, retrying at least every second.
    wait_until(lambda: http_status(f"{worker}/ready") == 200, timeout=20)
    status, resp, _ = submit(gw, "after-0")
    assert status == 200, resp
    assert time.monotonic() - back < 4.0, "the store took too long to come back"
    # Nothing half-written: the refused submits left no job, and the retry of one of them
    # with its request id now makes exactly one.
    assert job_ids(gw) == before | {str(resp["jobId"])}
    status, again, _ = submit(gw, "during-0")
    assert status == 200
    assert job_ids(gw) == before | {str(resp["jobId"]), str(again["jobId"])}
