"""Failover takeover time: from a worker's death until every job it owned is claimed.

Real processes: a gateway and 3 workers on PostgreSQL (a private server) with the local
provider, jobs that sleep a few seconds, and short leases (TTL 3 s, claims every 1 s),
as in ``tests/test_failover.py``. Mid-stream, the worker owning the most active jobs is
sent ``kill -9`` or SIGTERM, and the job store is watched (every 10 ms) until a peer owns
every active job the victim owned. Each scenario runs ``--runs`` times; we report the
median and the range, against the goal of each:

* ``kill -9``: the lease must expire first, so the bound is TTL + one claim interval;
* SIGTERM: the worker releases its leases and nudges its peers, so the goal is < 1 s
  (no dependence on the TTL at all).

Each run also checks the outcome: every job terminal, each run by the provider exactly
once. Run: ``.venv/bin/python -m bench.failover [--runs 3] [--jobs 120]``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
from pathlib import Path

from bench._postgres import private_postgres
from jennah.settings import StoreSettings
from tests.cluster import Cluster

TTL = 3.0
CLAIM = 1.0


def one_run(pg_url: str, dbname: str, sig: int, jobs: int, tenants: int) -> dict[str, float]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db = pg_url.rsplit("/", 1)[0] + "/" + dbname
    with tempfile.TemporaryDirectory() as d:
        cluster = Cluster(Path(d), {"DB_PROVIDER": "postgres", "DATABASE_URL": db},
                          StoreSettings(kind="postgres", env={"DATABASE_URL": db}),
                          lease_ttl=TTL, claim_interval=CLAIM)  # fmt: skip
        try:
            cluster.start()
            items, _, timing = cluster.submit_with_a_death(jobs, tenants, sig, jobs // 2)
            final = cluster.wait_terminal(items, timeout=90)
            runs = cluster.executions()
            timing["lost"] = float(len({i.job_id for i in items} - set(runs)))
            timing["duplicated"] = float(sum(1 for v in runs.values() if v > 1))
            timing["not_completed"] = float(sum(1 for s in final.values()
                                                if s != "JOB_STATUS_COMPLETED"))  # fmt: skip
        finally:
            cluster.close()
    return timing


def summarize(name: str, runs: list[dict[str, float]], goal: float) -> str:
    def stat(key: str) -> str:
        vals = [r[key] for r in runs]
        return f"{statistics.median(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"

    med_all = statistics.median(r["all"] for r in runs)
    faults = sum(r["lost"] + r["duplicated"] + r["not_completed"] for r in runs)
    return (f"| {name} | {len(runs)} | {stat('orphans')} | {stat('first')} | {stat('all')} "
            f"| {goal:.2f} | {med_all / goal:.2f}× | {'met' if med_all <= goal else 'MISSED'} "
            f"| {int(faults)} |")  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--postgres-url", default="")
    args = parser.parse_args(argv)
    cluster = None
    pg = args.postgres_url
    if not pg:
        cluster = private_postgres("bench.failover", required=True)
        assert cluster is not None
        pg = cluster.url
    lines = [
        f"Failover: gateway + 3 workers on PostgreSQL, local provider, {args.jobs} jobs of 2 s "
        f"over {args.tenants} tenants, TTL {TTL:g} s, claim interval {CLAIM:g} s. Seconds, "
        "median (min–max); ratio = median time to all claimed / goal.",
        "",
        "| scenario | runs | orphaned jobs | first claimed (s) | all claimed (s) | goal (s) "
        "| ratio | goal | lost+duplicated+failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        for name, sig, goal in (("kill -9", signal.SIGKILL, TTL + CLAIM),
                                ("SIGTERM", signal.SIGTERM, 1.0)):  # fmt: skip
            runs = [one_run(pg, f"bench_failover_{name[:4].strip()}_{i}".replace(" ", ""),
                            sig, args.jobs, args.tenants) for i in range(args.runs)]  # fmt: skip
            lines.append(summarize(name, runs, goal))
    finally:
        if cluster is not None:
            cluster.stop()
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
