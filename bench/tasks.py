"""Jobs of 10,000 tasks through the whole stack (docs/design.md §16).

A gateway and one worker on SQLite with the ``dry`` provider (real processes, loopback).
Each run submits one job of ``--tasks`` tasks through the gateway with the Python client
and measures

* **accept**: the SubmitJob call, from send to answer (the job is stored and submitted);
* **complete**: from send until GetJob reports COMPLETED with every task succeeded
  (the worker polled the provider, stored 10,000 task states and the terminal event).

Goals: accept under 1 s, complete under 10 s. The floor beside them is a plain job of
one task through the same stack, so the ratio shows what the tasks themselves cost.

Then the same through the **local provider** (``--local-tasks``, 10,000 by default; 0
skips it): one job of tasks that each print one line, from SubmitJob to COMPLETED, with
every task's output event checked in the store, against the floor of starting the same
number of processes directly (``bench.tasks_local.run_floor``, as many at a time as the
local provider runs by default).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.submit import stack
from bench.tasks_local import run_floor
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


def local_job(tmp: Path, tasks: int) -> float:
    """Seconds from SubmitJob to COMPLETED of one job of ``tasks`` one-line tasks on the
    local provider (a gateway and a worker on SQLite); every task's output is checked."""
    env = {"DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "local.db"),
           "BATCH_PROVIDER": "local", "LOCAL_BATCH_DIR": str(tmp / "local"),
           "WORKER_POLL_INTERVAL_SECONDS": "0.5"}  # fmt: skip
    with stack(tmp, env, gateway=True) as (_, gateway):
        client = JennahClient(gateway, tenant="bench", timeout=60)
        req = pb.SubmitJobRequest(image_uri="busybox", task_count=tasks,
                                  commands=["sh", "-c", "echo task $JENNAH_TASK_INDEX"])
        started = time.perf_counter()
        job_id = client.submit_job(req).job_id
        while client.get_job(job_id).status != pb.JOB_STATUS_COMPLETED:
            if time.perf_counter() - started > 600:
                raise SystemExit(f"local job {job_id} not complete after 600 s")
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        seen: set[int] = set()
        after = 0
        while page := client.list_job_events(job_id, after):
            seen.update(e.task_index for e in page if e.kind == pb.EVENT_KIND_OUTPUT)
            after = page[-1].seq
        client.close()
    if seen != set(range(tasks)):
        raise SystemExit(f"local job {job_id}: output of {tasks - len(seen)} tasks missing")
    return seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--local-tasks", type=int, default=10_000)
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
    if args.local_tasks:
        from providers.local import DEFAULT_TASK_PARALLELISM

        with tempfile.TemporaryDirectory(prefix="bench-tasks-local-") as tmp:
            local = local_job(Path(tmp), args.local_tasks)
        floor = run_floor(args.local_tasks, DEFAULT_TASK_PARALLELISM).seconds
        n = args.local_tasks
        lines += [
            "",
            f"One job of {n:,} one-line tasks on the local provider through the same stack "
            f"({DEFAULT_TASK_PARALLELISM} at a time), SubmitJob to COMPLETED with every "
            "task's output event stored; floor: the same number of processes started "
            "directly with subprocess.Popen, as many at a time.",
            "",
            "| side | seconds | tasks/s | ratio to floor |",
            "|---|---|---|---|",
            f"| Jennah, local provider | {local:,.1f} | {n / local:,.0f} | "
            f"{floor / local:.2f}× |",
            f"| floor: Popen | {floor:,.1f} | {n / floor:,.0f} | 1 |",
        ]
    out = "\n".join(lines)
    print(out)
    if not ok:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
