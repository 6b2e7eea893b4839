"""Jobs of 10,000 tasks through the whole stack (docs/design.md §16).

A gateway and one worker on SQLite with the ``dry`` provider (real processes, loopback).
Each run submits one job of ``--tasks`` tasks through the gateway with the Python client
and measures

* **accept**: the SubmitJob call, from send to answer (the job is stored and submitted);
* **complete**: from send until GetJob reports COMPLETED with every task succeeded
  (the worker polled the provider, stored 10,000 task states and the terminal event).

Goals: accept under 1 s, complete under 10 s. The floor beside them is a plain job of
one task through the same stack, so the ratio shows what the tasks themselves cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.submit import stack
from jennah.client import JennahClient
from jennah.v1 import deployment_pb2 as pb

ACCEPT_GOAL_SECONDS = 1.0
COMPLETE_GOAL_SECONDS = 10.0


def one_job(client: JennahClient, tasks: int, timeout: float = 60.0) -> tuple[float, float]:
    """(accept seconds, complete seconds) of one job of ``tasks`` tasks."""
    req = pb.SubmitJobRequest(image_uri="busybox", commands=["true"], task_count=tasks)
    started = time.perf_counter()
    job_id = client.submit_job(req).job_id
    accepted = time.perf_counter() - started
    while True:
        job = client.get_job(job_id)
        if job.status == pb.JOB_STATUS_COMPLETED:
            break
        if job.status in (pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED):
            raise SystemExit(f"job {job_id} ended {pb.JobStatus.Name(job.status)}")
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"job {job_id} not complete after {timeout} s")
        time.sleep(0.02)
    completed = time.perf_counter() - started
    if tasks > 1 and job.task_counts.succeeded != tasks:
        raise SystemExit(f"job {job_id}: {job.task_counts.succeeded} of {tasks} succeeded")
    return accepted, completed


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        db = {"DB_PROVIDER": "sqlite", "DB_PATH": str(Path(tmp) / "bench.db"),
              "WORKER_POLL_INTERVAL_SECONDS": "0.05"}  # fmt: skip
        with stack(Path(tmp), db, gateway=True) as (_, gateway):
            client = JennahClient(gateway, tenant="bench", timeout=60)
            one_job(client, args.tasks)  # warm-up: connections, code paths, the cache
            big = [one_job(client, args.tasks) for _ in range(args.runs)]
            plain = [one_job(client, 1) for _ in range(args.runs)]
            client.close()
    accept = [a for a, _ in big]
    complete = [c for _, c in big]
    ok = max(accept) < ACCEPT_GOAL_SECONDS and max(complete) < COMPLETE_GOAL_SECONDS
    rows = [
        ("accept (SubmitJob answered)", accept, [a for a, _ in plain], ACCEPT_GOAL_SECONDS),
        ("complete (GetJob: COMPLETED)", complete, [c for _, c in plain],
         COMPLETE_GOAL_SECONDS),
    ]
    lines = [
        f"One job of {args.tasks:,} tasks through the gateway, a worker on SQLite and the "
        f"`dry` provider; {args.runs} runs after a warm-up. Floor: a job of one task through "
        "the same stack.",
        "",
        f"| step | {args.tasks:,} tasks: median (min–max) | 1 task: median | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for name, values, floor, goal in rows:
        med, fmed = statistics.median(values), statistics.median(floor)
        verdict = "met" if max(values) < goal else "**missed**"
        lines.append(f"| {name} | {med * 1000:,.0f} ms ({min(values) * 1000:,.0f}–"
                     f"{max(values) * 1000:,.0f}) | {fmed * 1000:,.0f} ms | "
                     f"{med / fmed:,.1f}× | < {goal:g} s: {verdict} |")
    out = "\n".join(lines)
    print(out)
    if not ok:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
