"""The event pipeline's own goals (docs/design.md §6): idle watchers, output throughput, and how
many events one tenant can commit.

1. **Idle tenant-wide watchers.** A SQLite store holds ``--history`` (100,000) past events
   of one tenant; a worker process (``dry`` provider) serves it. Its CPU (utime + stime
   from ``/proc``) is measured over ``--seconds`` with no watcher, then with ``--watchers``
   tenant-wide ``follow`` watches that have caught up (cursor at the last position). The
   difference, divided by the number of watchers, is one idle watcher's cost in % of a
   core. Goal: under 1 %.
2. **Output throughput.** One job of the ``local`` provider writes ``--output-mib`` MiB of
   100-byte lines to stdout at once; the figure is the bytes that reached the store
   divided by the time from the job's start (its RUNNING event) to its terminal event,
   which the worker records only after the last line is in the store. Goal: 10 MB/s.
3. **Events one tenant can commit.** Every event takes the next position from its
   tenant's counter, in the transaction that stores it, so a tenant's writers take turns
   on that counter. In process, STATUS_DETAIL events for one tenant are appended one per
   call from 1 and from 4 threads, and in batches of 32 (group commit), on SQLite and on
   PostgreSQL (a private server with ``fsync=off``: an upper bound for a durable one).

Run: ``.venv/bin/python -m bench.events [--history 100000] [--watchers 10] [--seconds 10]
[--output-mib 64]`` (about a minute).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench._postgres import private_postgres
from bench.submit import cpu_seconds
from database.base import AppendEvents, CreateJob, JobStore
from database.postgres import PostgresStore
from database.sqlite import SQLiteStore
from jennah.client import JennahClient
from jennah.models import EventKind, Job, JobEvent, JobSpec, JobStatus
from jennah.v1 import deployment_pb2 as pb
from tests.helpers import call, free_port, start_jennah, stop, wait_http, wait_until

TENANT = "bench"
SPEC = JobSpec(image_uri="busybox", commands=("true",))
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _detail(job_id: str, key: str) -> JobEvent:
    return JobEvent(job_id=job_id, tenant_id=TENANT, seq=0, kind=EventKind.STATUS_DETAIL,
                    status=JobStatus.PENDING, message=f"detail {key}", created_at=T0,
                    worker_id="bench", dedup_key=key)  # fmt: skip


def _job(i: int) -> Job:
    return Job(job_id=f"hist-{i:06d}", tenant_id=TENANT, spec=SPEC, owner_worker_id="gone")


def fill_history(store: JobStore, events: int, per_job: int = 100) -> int:
    """``events`` past events of TENANT (jobs of ``per_job`` events); return the last
    position."""
    jobs = max(1, events // per_job)
    for start in range(0, jobs, 100):
        store.write_batch([CreateJob(_job(i), 3600) for i in range(start, min(jobs, start + 100))])
    for i in range(jobs):
        store.write_batch([AppendEvents(tuple(_detail(_job(i).job_id, f"h{k}")
                                              for k in range(per_job - 1)))])  # fmt: skip
    last = store.list_tenant_events(TENANT, events - 10, 100)
    return last[-1].position if last else 0


def _worker(tmp: Path, env: dict[str, str], provider: str,
            ) -> tuple[str, subprocess.Popen[bytes]]:  # fmt: skip
    port = free_port()
    wenv = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp), "WORKER_ID": "bench-events",
            "WORKER_PORT": str(port), "BATCH_PROVIDER": provider,
            "LOCAL_BATCH_DIR": str(tmp / "local"), "TENANT_SUBMIT_RATE": "0",
            "TENANT_MAX_ACTIVE_JOBS": "0", "WORKER_POLL_INTERVAL_SECONDS": "0.2", **env}
    proc = start_jennah("worker", wenv, tmp / "worker.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", timeout=60, proc=proc)
    return url, proc


def idle_watchers(history: int, watchers: int, seconds: float) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-events-") as d:
        tmp = Path(d)
        db = tmp / "jennah.db"
        store = SQLiteStore(db)
        store.migrate()
        t0 = time.monotonic()
        last = fill_history(store, history)
        store.close()
        fill_s = time.monotonic() - t0
        url, proc = _worker(tmp, {"DB_PROVIDER": "sqlite", "DB_PATH": str(db)}, "dry")
        pid = proc.pid
        try:
            time.sleep(1.0)
            c0 = cpu_seconds(pid)
            time.sleep(seconds)
            base = (cpu_seconds(pid) - c0) / seconds
            clients = [JennahClient(url, tenant=TENANT) for _ in range(watchers)]
            received: list[int] = []

            def watch(client: JennahClient) -> None:
                req = pb.WatchJobEventsRequest(follow=True, after_position=last)
                try:
                    for _ in client.watch_job_events(req):
                        received.append(1)
                except Exception:  # the worker is stopped at the end
                    return

            threads = [threading.Thread(target=watch, args=(c,), daemon=True) for c in clients]
            for t in threads:
                t.start()
            time.sleep(1.0)
            c0 = cpu_seconds(pid)
            time.sleep(seconds)
            loaded = (cpu_seconds(pid) - c0) / seconds
        finally:
            stop(proc)
    per = max(0.0, loaded - base) / watchers
    verdict = "met" if per < 0.01 else "**MISSED**"
    return [
        f"Idle tenant-wide watchers: {history:,} past events of the tenant (filled in "
        f"{fill_s:.1f} s), {watchers} `follow` watches from the last position, worker CPU "
        f"over {seconds:g} s each.", "",
        "| worker | CPU, % of a core |", "|---|---:|",
        f"| idle, no watcher | {base * 100:.2f} |",
        f"| {watchers} idle watchers | {loaded * 100:.2f} |",
        f"| **one idle watcher** | **{per * 100:.3f}** (goal < 1 %: {verdict}) |", "",
        f"Events received by the watchers meanwhile: {len(received)} (none expected).",
    ]


def output_throughput(mib: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-output-") as d:
        tmp = Path(d)
        db = tmp / "jennah.db"
        url, proc = _worker(tmp, {"DB_PROVIDER": "sqlite", "DB_PATH": str(db)}, "local")
        try:
            line = "x" * 99
            script = f"yes {line} | head -c {mib << 20}"
            status, resp = call(url, "SubmitJob", {"image_uri": "busybox",
                                                   "commands": ["sh", "-c", script]},
                                {"X-Tenant-Id": TENANT})  # fmt: skip
            assert status == 200, resp
            job_id = resp["jobId"]

            def done() -> bool:
                _, r = call(url, "GetJob", {"job_id": job_id}, {"X-Tenant-Id": TENANT})
                return r["job"]["status"] in ("JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED")

            wait_until(done, timeout=600, interval=0.05)
        finally:
            stop(proc)
        conn = sqlite3.connect(db)
        try:
            rows = conn.execute("SELECT kind, created_at, length(CAST(output AS BLOB)) "
                                "FROM job_events WHERE job_id = ? ORDER BY seq",
                                (job_id,)).fetchall()  # fmt: skip
        finally:
            conn.close()
    out_bytes = sum(r[2] for r in rows if r[0] == "OUTPUT")
    chunks = sum(r[0] == "OUTPUT" for r in rows)
    started = next(r[1] for r in rows if r[0] == "RUNNING")
    ended = rows[-1][1]
    seconds = max(1e-6, (ended - started) / 1e6)
    rate = out_bytes / seconds / 1e6
    verdict = "met" if rate >= 10 else "**MISSED**"
    return [
        f"Output: one local job writing {mib} MiB of 100-byte lines at once; bytes in the "
        "store over the time from its RUNNING event to its terminal event.", "",
        "| bytes in the store | OUTPUT events | seconds | MB/s | goal |",
        "|---:|---:|---:|---:|---|",
        f"| {out_bytes:,} of {mib << 20:,} | {chunks} | {seconds:.2f} | {rate:.1f} | "
        f"≥ 10 MB/s {verdict} |",
    ]


def _rate(store: JobStore, threads: int, batch: int, seconds: float) -> float:
    """STATUS_DETAIL events of one tenant committed per second."""
    stop_at = time.monotonic() + seconds
    counts = [0] * threads
    store.write_batch([CreateJob(Job(job_id=f"rate-{t}-{batch}", tenant_id=TENANT, spec=SPEC,
                                     owner_worker_id="b"), 3600) for t in range(threads)])

    def run(t: int) -> None:
        n = 0
        job_id = f"rate-{t}-{batch}"
        while time.monotonic() < stop_at:
            evs = tuple(_detail(job_id, f"r{t}-{n + k}") for k in range(batch))
            store.write_batch([AppendEvents(evs)])
            n += batch
        counts[t] = n

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def tenant_rates(seconds: float, postgres: bool) -> list[str]:
    rows: list[str] = []
    stores: list[tuple[str, Callable[[], JobStore]]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-rate-")
    stores.append(("sqlite", lambda: SQLiteStore(Path(tmp.name) / "rate.db")))
    cluster = private_postgres("bench.events", required=False) if postgres else None
    if cluster is not None:
        stores.append(("postgres (fsync=off)", lambda: PostgresStore(cluster.url, max_size=8)))
    try:
        for name, make in stores:
            store = make()
            store.migrate()
            try:
                figures = [_rate(store, 1, 1, seconds), _rate(store, 4, 1, seconds),
                           _rate(store, 4, 32, seconds)]  # fmt: skip
            finally:
                store.close()
            rows.append(f"| {name} | {figures[0]:,.0f} | {figures[1]:,.0f} | "
                        f"{figures[2]:,.0f} |")
    finally:
        if cluster is not None:
            cluster.stop()
        tmp.cleanup()
    return [
        "Events one tenant commits per second (in process; each event takes the next "
        "position from the tenant's counter in its own transaction):", "",
        "| store | 1 thread, 1 event per commit | 4 threads, 1 per commit | "
        "4 threads, 32 per commit |", "|---|---:|---:|---:|", *rows,
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--watchers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--output-mib", type=int, default=64)
    parser.add_argument("--rate-seconds", type=float, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    lines = idle_watchers(args.history, args.watchers, args.seconds)
    lines += ["", *output_throughput(args.output_mib)]
    lines += ["", *tenant_rates(args.rate_seconds, not args.no_postgres)]
    lines += ["", f"(total {time.monotonic() - started:.0f} s)"]
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
