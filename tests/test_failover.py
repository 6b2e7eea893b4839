"""Failover with real processes: a gateway, 3 workers and PostgreSQL.

200 jobs over 20 tenants go in through the gateway; mid-stream one worker dies. Every job
must reach a terminal state, none may be lost, and the local provider must have run each
exactly once (the jobs count their own executions). Leases are short (TTL 3 s, claims
every 1 s) so a ``kill -9`` is recovered within about 4 s; a SIGTERM hands over at once
(release + nudge), and the takeover must start in under 1 s.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from jennah.settings import StoreSettings
from tests.cluster import Cluster, Submitted

pytestmark = pytest.mark.e2e

JOBS = 200
TENANTS = 20
KILL_AFTER = 100


@pytest.fixture
def cluster(tmp_path: Path, postgres_db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_db_url},
                StoreSettings(kind="postgres", env={"DATABASE_URL": postgres_db_url}))  # fmt: skip
    try:
        yield c.start()
    finally:
        c.close()


def check_exactly_once(cluster: Cluster, items: list[Submitted], n: int = JOBS) -> None:
    job_ids = [i.job_id for i in items]
    assert len(set(job_ids)) == n, "a retried submit made a second job"
    final = cluster.wait_terminal(items, timeout=60)
    assert set(final.values()) == {"JOB_STATUS_COMPLETED"}, final
    runs = cluster.executions()
    assert set(runs) == set(job_ids), "a job was lost, or something else ran"
    assert max(runs.values()) == 1, {k: v for k, v in runs.items() if v > 1}


def test_kill_9_of_a_worker_mid_stream_loses_nothing_and_runs_nothing_twice(
    cluster: Cluster,
) -> None:
    items, victim, timing = cluster.submit_with_a_death(JOBS, TENANTS, signal.SIGKILL, KILL_AFTER)
    assert cluster.wait_exit(victim) == -signal.SIGKILL
    assert timing["orphans"] > 0, "the victim owned no active job: the test proved nothing"
    # Expired after at most one TTL, then claimed at a peer's next tick (plus slack for
    # a loaded 2-core machine).
    assert timing["all"] <= cluster.lease_ttl + cluster.claim_interval + 2.0, timing
    print(f"kill -9 takeover: {timing}")
    check_exactly_once(cluster, items)
    survivors = [w for w in cluster.workers if w is not victim]
    claimed = sum(cluster.info(w)["leases_claimed_total"] for w in survivors)
    assert claimed >= timing["orphans"]


def test_sigterm_hands_over_in_under_a_second(cluster: Cluster) -> None:
    items, victim, timing = cluster.submit_with_a_death(JOBS, TENANTS, signal.SIGTERM, KILL_AFTER)
    # uvicorn re-raises SIGTERM once its graceful shutdown is over, hence -15, not 0.
    assert cluster.wait_exit(victim) in (0, -signal.SIGTERM)
    assert "released" in victim.log.read_text()
    assert timing["orphans"] > 0, "the victim owned no active job: the test proved nothing"
    # The goal (under a second) is measured by bench.failover on a quiet machine (0.37 s
    # median); here, beside the rest of the suite on 2 cores, half a second of slack.
    assert timing["first"] < 1.5, timing
    print(f"SIGTERM takeover: {timing}")
    check_exactly_once(cluster, items)
    survivors = [w for w in cluster.workers if w is not victim]
    assert sum(cluster.info(w)["nudges_received"] for w in survivors) >= 1


def test_a_restarted_worker_resumes_its_own_jobs_without_a_takeover(
    tmp_path: Path, postgres_db_url: str
) -> None:
    """A worker back before its leases expire (same WORKER_ID) carries on: it renews and
    polls its jobs to the end; nobody claims them, and nothing runs twice."""
    c = Cluster(tmp_path, {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_db_url},
                StoreSettings(kind="postgres", env={"DATABASE_URL": postgres_db_url}),
                n_workers=1, lease_ttl=30.0, job_seconds=2.0)  # fmt: skip
    try:
        c.start()
        items = c.submit_many(10, 2)
        [w] = c.workers
        held = {j.job_id for j in c.owned(w.name)}
        assert held, "no active job at the kill"
        c.kill(w, signal.SIGKILL)
        c.wait_exit(w)
        c.restart(w)
        check_exactly_once(c, items, 10)
        for item in items:
            job = c.store.get_job(item.tenant, item.job_id)
            assert job.lease_version == 1 and job.owner_worker_id == "w1"
        assert c.info(w)["leases_claimed_total"] == 0
    finally:
        c.close()
