"""Polling cost of the cloud providers for a large fleet of active jobs.

For each provider, a wire-level fake (``tests/fakes``) is filled directly with N active
jobs (10,000 by default; submitting them through the SDKs would only slow the benchmark
down) and served from a **child process**, so that the CPU time measured here is the
provider's own: building requests, the SDK, parsing, mapping. One "status cycle" is what
the worker's poller does each interval: ``status()`` over every path, split into batches
of ``capabilities.max_status_batch``.

Reported per provider and strategy: provider calls per cycle (counted by the fake), the
client's CPU time per cycle (``time.process_time``) and the wall time on loopback.

Run: ``.venv/bin/python -m bench.providers_poll [--jobs 10000]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from providers.base import BatchProvider
from providers.retry import RetryPolicy


def _serve_fake(kind: str, n: int, state: str, conn: Connection) -> None:
    """Child process: fill a fake with ``n`` jobs in ``state``, serve it, report calls."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        if kind == "gcp":
            from google.cloud import batch_v1

            from tests.fakes.gcp_batch import FakeGcpBatch, serve

            gfake = FakeGcpBatch()
            paths = [gfake.add_job(f"j-bench-{i}-0", getattr(batch_v1.JobStatus.State, state))
                     for i in range(n)]
            address, calls = stack.enter_context(serve(gfake)), gfake.calls
        else:
            from tests.fakes import serve_http

            if kind == "aws":
                from tests.fakes.aws_batch import FakeAwsBatch

                afake = FakeAwsBatch()
                paths = [afake.add_job(f"j-bench-{i}-0", state) for i in range(n)]
                address, calls = stack.enter_context(serve_http(afake.handle)), afake.calls
            else:
                from tests.fakes.azure_batch import FakeAzureBatch

                zfake = FakeAzureBatch()
                for i in range(n):
                    zfake.add_job(f"j-bench-{i}-0", f"j-bench-{i}-0-task", state)
                address = stack.enter_context(serve_http(zfake.handle))
                paths = [f"{address}/jobs/j-bench-{i}-0/tasks/j-bench-{i}-0-task"
                         for i in range(n)]
                calls = zfake.calls
        conn.send((address, paths))
        while (msg := conn.recv()) != "stop":
            if msg == "reset":
                calls.clear()
            conn.send(sum(calls.values()))


def _provider(kind: str, address: str, **kwargs: Any) -> BatchProvider:
    retry = RetryPolicy(attempts=1)
    if kind == "gcp":
        from providers.gcp import GcpBatchProvider
        from tests.fakes.gcp_batch import FakeGcpBatch, client_for

        gcp_client, _channel = client_for(address)
        fake = FakeGcpBatch()
        return GcpBatchProvider(gcp_client, project=fake.project, region=fake.region,
                                retry=retry, **kwargs)
    if kind == "aws":
        from providers.aws import AwsBatchProvider, make_client
        from tests.fakes.aws_batch import DEFINITION, QUEUE, REGION

        aws_client = make_client(REGION, address, aws_access_key_id="x",
                                 aws_secret_access_key="x")
        return AwsBatchProvider(aws_client, job_queue=QUEUE, job_definition=DEFINITION,
                                retry=retry)
    from azure.batch import BatchClient
    from azure.core.credentials import AzureNamedKeyCredential

    from providers.azure import AzureBatchProvider
    from tests.fakes.azure_batch import ACCOUNT, POOL

    client = BatchClient(address, AzureNamedKeyCredential(ACCOUNT, "a2V5"), retry_total=0)
    return AzureBatchProvider(client, endpoint=address, pool_id=POOL, retry=retry, **kwargs)


@dataclass(frozen=True)
class Case:
    label: str
    kind: str
    state: str
    options: dict[str, Any]


CASES = (
    Case("GCP, list per active state (default)", "gcp", "RUNNING", {}),
    Case("GCP, get_job per job (filter refused)", "gcp", "RUNNING",
         {"list_threshold": 10**9}),
    Case("AWS, describe_jobs by 100", "aws", "RUNNING", {}),
    Case("Azure, running tasks (get_task)", "azure", "running", {}),
    Case("Azure, queued tasks (get_task + get_job)", "azure", "active", {}),
)


@dataclass(frozen=True)
class Row:
    case: Case
    jobs: int
    calls: int
    cpu: float
    wall: float
    mapped: int


def measure(case: Case, n: int) -> Row:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_fake, args=(case.kind, n, case.state, child), daemon=True)
    proc.start()
    try:
        address, paths = parent.recv()
        provider = _provider(case.kind, address, **case.options)
        try:
            batch = provider.capabilities.max_status_batch
            cycle: Callable[[], int] = lambda: sum(  # noqa: E731
                1 for i in range(0, len(paths), batch)
                for st in provider.status(paths[i:i + batch]).values() if st.state is not None)
            cycle()  # warm connections and caches once
            parent.send("reset")
            parent.recv()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            mapped = cycle()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            parent.send("count")
            calls = int(parent.recv())
        finally:
            provider.close()
        return Row(case, n, calls, cpu, wall, mapped)
    finally:
        parent.send("stop")
        proc.join(10)


def table(rows: Sequence[Row]) -> str:
    out = ["| provider, strategy | active jobs | calls per cycle | client CPU per cycle "
           "| CPU per job | wall per cycle |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.case.label} | {r.jobs:,} | {r.calls:,} | {r.cpu * 1000:,.0f} ms "
                   f"| {r.cpu / r.jobs * 1e6:,.0f} µs | {r.wall:,.2f} s |")
    return "\n".join(out)


def _read_cycle(parent: Connection, pool: Any, provider: Any, paths: Sequence[str],
                offsets: dict[str, tuple[int, int]]) -> tuple[list[Any], int, float, float]:
    """One output cycle over ``paths``, as the poller runs it (16 reads at a time): the
    chunks, the fake's calls (counted by the child process), CPU and wall seconds."""
    parent.send("reset")
    parent.recv()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    chunks = list(pool.map(provider.read_output, paths, [offsets[p] for p in paths]))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    parent.send("count")
    return chunks, int(parent.recv()), cpu, wall


def _serve_azure_output(n: int, conn: Connection) -> None:
    """Child process: the Azure fake with ``n`` running tasks that have printed two lines
    to stdout and one to stderr; serves it and reports its call count, like ``_serve_fake``."""
    from tests.fakes import serve_http
    from tests.fakes.azure_batch import FakeAzureBatch

    fake = FakeAzureBatch()
    for i in range(n):
        fake.add_job(f"j-bench-{i}-0", f"j-bench-{i}-0-task", "running")
        fake.write(f"j-bench-{i}-0", "stdout.txt", b"line one\nline two\n")
        fake.write(f"j-bench-{i}-0", "stderr.txt", b"a warning\n")
    with serve_http(fake.handle) as address:
        conn.send((address, [f"{address}/jobs/j-bench-{i}-0/tasks/j-bench-{i}-0-task"
                             for i in range(n)]))
        while (msg := conn.recv()) != "stop":
            if msg == "reset":
                fake.calls.clear()
            conn.send(sum(fake.calls.values()))


def measure_azure_output(n: int) -> list[Row]:
    """Azure ``read_output`` for ``n`` running jobs, 16 at a time as the poller does
    (``APPLY_CONCURRENCY``): the first cycle (each job has new output: one
    ``list_task_files`` plus one ranged read per file) and the next one (nothing new:
    ``list_task_files`` alone)."""
    from concurrent.futures import ThreadPoolExecutor

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_azure_output, args=(n, child), daemon=True)
    proc.start()
    rows = []
    try:
        address, paths = parent.recv()
        provider: Any = _provider("azure", address)
        offsets = dict.fromkeys(paths, (0, 0))
        try:
            with ThreadPoolExecutor(16) as pool:
                for label, new_output in (("Azure output, new lines (read_output)", True),
                                          ("Azure output, nothing new (read_output)", False)):
                    chunks, calls, cpu, wall = _read_cycle(parent, pool, provider, paths,
                                                           offsets)
                    right = sum(1 for c in chunks if bool(c.stdout and c.stderr) == new_output)
                    offsets = {p: c.offsets for p, c in zip(paths, chunks, strict=True)}
                    rows.append(Row(Case(label, "azure", "running", {}), n, calls, cpu, wall,
                                    right))
        finally:
            provider.close()
    finally:
        parent.send("stop")
        proc.join(10)
    if any(r.mapped != n for r in rows):
        raise SystemExit(f"Azure output: {[r.mapped for r in rows]} of {n} jobs read right")
    return rows


def _serve_aws_output(n: int, conn: Connection) -> None:
    """Child process: the AWS fake with ``n`` running jobs that have logged two lines to
    CloudWatch Logs; serves it and reports its call count, like ``_serve_fake``."""
    from tests.fakes import serve_http
    from tests.fakes.aws_batch import FakeAwsBatch

    fake = FakeAwsBatch()
    paths = [fake.add_job(f"j-bench-{i}-0", "RUNNING", ["line one", "line two"])
             for i in range(n)]
    with serve_http(fake.handle) as address:
        conn.send((address, paths))
        while (msg := conn.recv()) != "stop":
            if msg == "reset":
                fake.calls.clear()
            conn.send(sum(fake.calls.values()))


def measure_aws_output(n: int) -> list[Row]:
    """AWS ``read_output`` for ``n`` running jobs, 16 at a time as the poller does: the
    first cycle (stream unknown: ``DescribeJobs`` + ``GetLogEvents`` per job), the next
    (nothing new: one ``GetLogEvents`` per job), and a new owner's first cycle from the
    stored offsets (``DescribeJobs``, a seek and a read per job)."""
    from concurrent.futures import ThreadPoolExecutor

    from providers.aws import AwsBatchProvider, make_client
    from tests.fakes.aws_batch import DEFINITION, QUEUE, REGION

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_aws_output, args=(n, child), daemon=True)
    proc.start()
    rows = []
    try:
        address, paths = parent.recv()
        keys = {"aws_access_key_id": "x", "aws_secret_access_key": "x"}
        offsets = dict.fromkeys(paths, (0, 0))
        provider: Any = None
        for label, fresh in (("AWS output, new lines (read_output)", True),
                             ("AWS output, nothing new (read_output)", False),
                             ("AWS output, new owner, nothing new (read_output)", True)):
            if fresh:  # a worker that has not read these jobs yet
                if provider is not None:
                    provider.close()
                provider = AwsBatchProvider(
                    make_client(REGION, address, **keys), job_queue=QUEUE,
                    job_definition=DEFINITION, retry=RetryPolicy(attempts=1),
                    logs_client=make_client(REGION, address, "logs", **keys))
            with ThreadPoolExecutor(16) as pool:
                chunks, calls, cpu, wall = _read_cycle(parent, pool, provider, paths, offsets)
            offsets = {p: c.offsets for p, c in zip(paths, chunks, strict=True)}
            right = sum(1 for c in chunks if c.offsets == (2, 0))
            rows.append(Row(Case(label, "aws", "RUNNING", {}), n, calls, cpu, wall, right))
        provider.close()
    finally:
        parent.send("stop")
        proc.join(10)
    if any(r.mapped != n for r in rows):
        raise SystemExit(f"AWS output: {[r.mapped for r in rows]} of {n} jobs read right")
    return rows


def _serve_gcp_output(n: int, conn: Connection) -> None:
    """Child process: the GCP Batch fake with ``n`` running jobs and the Cloud Logging fake
    with two stdout lines and one stderr line for each; reports both fakes' calls."""
    from datetime import UTC, datetime, timedelta

    from google.cloud import batch_v1

    from tests.fakes import serve_http
    from tests.fakes.gcp_batch import FakeGcpBatch, serve
    from tests.fakes.gcp_logging import FakeCloudLogging

    batch = FakeGcpBatch()
    logs = FakeCloudLogging(project=batch.project, reads_per_minute=10**9)  # cost, not quota
    paths = [batch.add_job(f"j-bench-{i}-0", batch_v1.JobStatus.State.RUNNING)
             for i in range(n)]
    at = datetime.now(UTC) - timedelta(minutes=1)
    for path in paths:
        uid = batch.jobs[path].uid
        for text, stream in (("line one", "stdout"), ("line two", "stdout"),
                             ("a warning", "stderr")):
            logs.write(uid, text, stream=stream, at=at)
    with serve(batch) as address, serve_http(logs.handle) as logs_url:
        conn.send(((address, logs_url), paths))
        while (msg := conn.recv()) != "stop":
            if msg == "reset":
                batch.calls.clear()
                logs.calls.clear()
            conn.send(sum(batch.calls.values()) + sum(logs.calls.values()))


def measure_gcp_output(n: int) -> list[Row]:
    """GCP ``read_output`` for ``n`` running jobs, 16 at a time as the poller does, after
    a status cycle (which tells the provider each job's uid): the first cycle (one
    ``entries.list`` per job), the next (nothing new: one each), and a new owner's first
    cycle from the stored offsets (``get_job`` for the uid, then one ``entries.list``).
    Cloud Logging's read quota (60 ``entries.list`` a minute per project) is lifted in
    the fake and the provider's ration, to measure the cost per read; with the quota a
    cycle reads at most ``GCP_LOG_READS_PER_MINUTE x interval / 60`` jobs."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from providers.gcp import GcpBatchProvider
    from providers.gcp_output import RestLogReader
    from tests.fakes.gcp_batch import FakeGcpBatch, client_for

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_gcp_output, args=(n, child), daemon=True)
    proc.start()
    rows = []
    try:
        (address, logs_url), paths = parent.recv()
        fake = FakeGcpBatch()
        offsets = dict.fromkeys(paths, (0, 0))
        provider: Any = None
        for label, fresh in (("GCP output, new lines (read_output)", True),
                             ("GCP output, nothing new (read_output)", False),
                             ("GCP output, new owner, nothing new (read_output)", True)):
            if fresh:  # a worker that has not read these jobs yet
                if provider is not None:
                    provider.close()
                session = requests.Session()
                session.headers["Authorization"] = "Bearer bench"
                client, _channel = client_for(address)
                provider = GcpBatchProvider(
                    client, project=fake.project, region=fake.region,
                    retry=RetryPolicy(attempts=1), log_settle_seconds=0,
                    log_reads_per_minute=1e9,
                    logs=RestLogReader(session, project=fake.project, endpoint=logs_url))
                if label.startswith("GCP output, new lines"):
                    provider.status(paths)  # the poller's status cycle comes first
            with ThreadPoolExecutor(16) as pool:
                chunks, calls, cpu, wall = _read_cycle(parent, pool, provider, paths, offsets)
            offsets = {p: c.offsets for p, c in zip(paths, chunks, strict=True)}
            right = sum(1 for c in chunks if c.offsets == (2, 1))
            rows.append(Row(Case(label, "gcp", "RUNNING", {}), n, calls, cpu, wall, right))
        provider.close()
    finally:
        parent.send("stop")
        proc.join(10)
    if any(r.mapped != n for r in rows):
        raise SystemExit(f"GCP output: {[r.mapped for r in rows]} of {n} jobs read right")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args(argv)
    rows = []
    for case in CASES:
        row = measure(case, args.jobs)
        if row.mapped != args.jobs:
            raise SystemExit(f"{case.label}: only {row.mapped} of {args.jobs} jobs mapped")
        rows.append(row)
    rows.extend(measure_azure_output(args.jobs))
    rows.extend(measure_aws_output(args.jobs))
    rows.extend(measure_gcp_output(args.jobs))
    print(f"Polling cost for {args.jobs:,} active jobs (fakes served from a child process; "
          "CPU is the client's own)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
