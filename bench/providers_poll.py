"""Polling cost of the cloud providers for a large fleet of active jobs (issue 5).

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
    print(f"Polling cost for {args.jobs:,} active jobs (fakes served from a child process; "
          "CPU is the client's own)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
