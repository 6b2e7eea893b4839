"""LeaseKeeper (docs/design.md §5) with an injected clock and an injected sleep: no real waiting.

The store is the in-memory one on the test's clock; the provider is scripted and counts
executions, so "exactly once" is checked directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from jennah.errors import ProviderUnavailable
from jennah.models import EventKind, JobStatus
from providers.base import provider_job_id
from tests.worker.test_worker_jobs import SPEC, Env
from worker.auth import CallerAuth
from worker.leases import LeaseKeeper
from worker.nudge import NUDGE_PATH, nudge_handler

TTL = 30.0
CLAIM_EVERY = 5.0


@pytest.fixture
def env() -> Env:
    return Env()


def keeper(env: Env, worker_id: str, **kwargs: Any) -> LeaseKeeper:
    return LeaseKeeper(env.store, worker_id, TTL, CLAIM_EVERY, **kwargs)


def test_renewal_keeps_a_lease_past_its_first_ttl(env: Env) -> None:
    async def go() -> None:
        w1, w2 = keeper(env, "w1"), keeper(env, "w2")
        job = await env.jobs.submit("acme", SPEC, "")
        for _ in range(6):  # 6 × TTL/3 = 2 TTLs, renewed every TTL/3
            env.clock.tick(TTL / 3)
            assert await w1.renew_once() == {job.job_id}
            assert await w2.claim_once() == []
        assert w1.held == 1
        assert env.store.get_job("acme", job.job_id).lease_version == 1

    asyncio.run(go())


def test_an_expired_lease_is_claimed_once_with_a_new_version_and_the_old_owner_lets_go(
    env: Env,
) -> None:
    async def go() -> None:
        w1, w2, w3 = keeper(env, "w1"), keeper(env, "w2"), keeper(env, "w3")
        job = await env.jobs.submit("acme", SPEC, "")
        assert await w1.renew_once() == {job.job_id}  # then w1 stalls for a whole TTL
        env.clock.tick(TTL - 0.001)
        assert await w2.claim_once() == []  # not yet expired
        env.clock.tick(0.002)
        claimed = await w2.claim_once()
        assert [(j.job_id, j.owner_worker_id, j.lease_version) for j in claimed] == [
            (job.job_id, "w2", 2)]
        assert await w3.claim_once() == []  # won by exactly one
        assert await w1.renew_once() == set()  # the old owner finds it lost …
        assert w1.lost_total == 1 and w1.held == 0
        kinds = [e.kind for e in env.store.list_events("acme", job.job_id, 0, 100)]
        # LEASE_CLAIMED is in the stream; the loss is a log line and a metric only.
        assert kinds == [EventKind.SUBMITTED, EventKind.SCHEDULED, EventKind.LEASE_CLAIMED]
        assert await w2.renew_once() == {job.job_id}  # … and the new one keeps it

    asyncio.run(go())


def test_a_claimed_job_without_a_resource_path_is_submitted_exactly_once(env: Env) -> None:
    async def go() -> None:
        env.provider.submit_errors.append(ProviderUnavailable("throttled"))
        job = await env.jobs.submit("acme", SPEC, "")
        assert job.status is JobStatus.PENDING and not job.cloud_resource_path
        env.clock.tick(TTL + 1)  # w1 died before its poller could retry
        w2 = keeper(env, "w2")
        assert [j.job_id for j in await w2.claim_once()] == [job.job_id]
        await env.owner("w2").poller.cycle()
        after = env.store.get_job("acme", job.job_id)
        assert after.status is JobStatus.SCHEDULED and after.owner_worker_id == "w2"
        pid = provider_job_id(job.job_id, 0)  # the same deterministic id as w1 used
        assert after.provider_job_id == pid
        assert env.provider.executions == {pid: 1}

    asyncio.run(go())


def test_a_claimed_job_that_reached_the_provider_is_not_submitted_again(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        assert job.cloud_resource_path
        env.clock.tick(TTL + 1)
        w2 = keeper(env, "w2")
        await w2.claim_once()
        poller = env.owner("w2").poller
        for _ in range(3):
            await poller.cycle()
        assert env.provider.executions == {job.provider_job_id: 1}
        assert env.store.get_job("acme", job.job_id).owner_worker_id == "w2"

    asyncio.run(go())


def test_released_leases_are_claimable_without_any_time_passing(env: Env) -> None:
    async def go() -> None:
        w1, w2 = keeper(env, "w1"), keeper(env, "w2")
        jobs = [await env.jobs.submit(f"t{i}", SPEC, "") for i in range(3)]
        assert await w1.release_all() == 3
        claimed = await w2.claim_once()
        assert sorted(j.job_id for j in claimed) == sorted(j.job_id for j in jobs)
        assert await w1.release_all() == 0  # nothing left to release: all fenced away

    asyncio.run(go())


class ManualSleep:
    """An injected ``sleep``: records each requested delay, advances the test clock by it,
    and returns only when the test lets it (``step``)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.requested: list[float] = []
        self._gate = asyncio.Semaphore(0)

    async def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)
        await self._gate.acquire()
        self.env.clock.tick(seconds)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self._gate.release()


async def settle(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the loop under test run until ``predicate`` holds. Store calls run in worker
    threads, so this yields real (tiny) time; the lease clock itself never moves here."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def test_the_renewal_loop_runs_every_third_of_the_ttl(env: Env) -> None:
    async def go() -> None:
        sleep = ManualSleep(env)
        w1 = keeper(env, "w1", sleep=sleep)
        job = await env.jobs.submit("acme", SPEC, "")
        task = asyncio.create_task(w1.run_renewals())
        await settle(lambda: len(sleep.requested) == 1)
        sleep.step(9)  # three TTLs of simulated time
        await settle(lambda: len(sleep.requested) == 10)
        task.cancel()
        assert sleep.requested == [TTL / 3] * 10
        assert env.store.get_job("acme", job.job_id).lease_version == 1
        assert await keeper(env, "w2").claim_once() == []  # still held after 3 TTLs

    asyncio.run(go())


def test_wake_runs_the_claim_loop_before_its_tick(env: Env) -> None:
    async def go() -> None:
        sleep = ManualSleep(env)
        w2 = keeper(env, "w2", sleep=sleep)
        task = asyncio.create_task(w2.run_claims())
        await settle(lambda: len(sleep.requested) == 1)  # first claim ran, now waiting
        job = await env.jobs.submit("acme", SPEC, "")
        await keeper(env, "w1").release_all()
        w2.wake()  # no sleep.step(): only the nudge can make it claim now
        await settle(lambda: w2.claimed_total == 1 and len(sleep.requested) == 2)
        task.cancel()
        assert env.store.get_job("acme", job.job_id).owner_worker_id == "w2"
        assert sleep.requested == [CLAIM_EVERY, CLAIM_EVERY]

    asyncio.run(go())


Handler = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def asgi_post(handler: Handler, headers: list[tuple[bytes, bytes]],
                    method: str = "POST") -> int:  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": NUDGE_PATH, "headers": headers}
    await handler(scope, receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.parametrize(
    ("dev_mode", "headers", "method", "status", "woken"),
    [
        (False, [], "POST", 401, 0),
        (False, [(b"x-jennah-worker-token", b"wrong")], "POST", 401, 0),
        (False, [(b"X-Jennah-Worker-Token", b"s3cret")], "POST", 204, 1),
        (False, [(b"x-jennah-worker-token", b"s3cret")], "GET", 405, 0),
        (True, [], "POST", 204, 1),
    ],
)
def test_the_nudge_endpoint_needs_the_worker_token(
    env: Env, dev_mode: bool, headers: list[tuple[bytes, bytes]], method: str, status: int,
    woken: int,
) -> None:
    w = keeper(env, "w1")
    handler = nudge_handler(w.wake, CallerAuth(dev_mode=dev_mode, worker_token="s3cret"))
    assert asyncio.run(asgi_post(handler, headers, method)) == status
    assert w.nudges_received == woken
