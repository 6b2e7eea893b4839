"""One worker's poll cycle with many active jobs.

A ``JobService`` + ``Poller`` is assembled in-process as the worker does
(``worker/app.py``), on ``providers.memory.FakeProvider`` (which counts its calls). The
store is filled **directly through the store API** (``create_job`` then a fenced
``update_job`` that records the provider path and SCHEDULED; no RPC, no provider submit
path), with N active jobs (10,000 by default) owned by the benchmark's worker, and the fake
provider is given the same N executions. Filling SQLite runs with ``synchronous = OFF`` on
the filling thread's connection only; the poller's threads use the store's own (FULL).

Then one warm-up cycle (not counted: it fills the poller's raw-state map and the thread
pool), ``--cycles`` **steady** cycles (no job changes state: the cycle is pure overhead)
and ``--cycles`` **churn** cycles (before each, a fresh ``--churn`` fraction of the jobs,
1 % by default, is moved at the provider: half to RUNNING, half to COMPLETED, so each
churned job costs one fenced update with its transition row and one event; completed jobs
leave the active set).

Configurations, each on its own fresh store and provider:

* **floor**: the in-memory store (lifecycle events are written with each transition, in
  memory) and a null execution-event log. Every ratio is to this floor, measured in the
  same run and the same mode, i.e. the figure says what a real store and a real WAL add
  to the same cycle.
* **sqlite + store events**: SQLite in a temp dir, execution events written straight to
  the store (``worker.store_events.StoreExecutionLog``).
* **sqlite + WAL events**: the production worker's execution-event log (``worker.wal``:
  one fsync'd WAL per worker, delivered to the store by a background sender).

Per cycle: provider ``status`` calls (``FakeProvider.calls``), store calls (every
``JobStore`` method call, counted by a wrapper), CPU seconds (``time.process_time``,
the whole process: the store and provider run in worker threads) and wall seconds;
reported as median and min-max over the cycles. A last row times the bare
``provider.status()`` over all paths in ``max_status_batch`` batches, for reference.

Run: ``.venv/bin/python -m bench.poller [--jobs 10000] [--cycles 5] [--churn 0.01]``
(about 30 s).

What the cycle costs: one ``list_owned_jobs`` per cycle (no per-job round trip) plus
one ``status`` call per provider batch; ``list_owned_jobs`` re-reads and decodes every
owned row, spec included, which is most of a steady cycle on SQLite. In churn, the
changed jobs' fenced updates (each with its transition and lifecycle event) go through
the group committer, so up to ``APPLY_CONCURRENCY`` of them share one transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry

from database.base import JobStore, OutputOffsets
from database.memory import MemoryStore
from database.sqlite import SQLiteStore
from jennah.models import Job, JobEvent, JobPatch, JobSpec, JobStatus
from providers.base import ProviderTask, provider_job_id
from providers.memory import FakeProvider
from worker.commit import GroupCommitter
from worker.events import ExecutionLog
from worker.jobs import JobService, utcnow
from worker.output import OutputReader
from worker.poller import Poller
from worker.store_events import StoreExecutionLog

WORKER = "bench-poller-1"
TENANTS = ("acme", "globex", "initech", "umbrella")
SPEC = JobSpec(image_uri="busybox", commands=("sleep", "3600"))
LEASE_TTL = 24 * 3600.0  # no lease may expire while the benchmark runs


class CountingStore:
    """A ``JobStore`` proxy counting every method call (the store round trips)."""

    def __init__(self, inner: JobStore) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if not callable(target):
            return target

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[attr] += 1
            return target(*args, **kwargs)

        return counted

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())


class NullExecutionLog:
    """An ``ExecutionLog`` that keeps nothing: the floor's."""

    ready = True

    async def start(self) -> None:
        return None

    async def append(self, events: Sequence[JobEvent]) -> None:
        return None

    def pending_ends(self, job_id: str) -> OutputOffsets:
        return {}

    def take_resync(self) -> set[str]:
        return set()

    async def flush_job(self, job_id: str, timeout: float) -> bool:
        return True

    async def flush(self, timeout: float) -> bool:
        return True

    async def health(self) -> tuple[bool, str]:
        return True, "null"

    async def close(self) -> None:
        return None


@dataclass
class Cycle:
    active: int
    status_calls: int
    store_calls: int
    cpu: float
    wall: float


@dataclass
class Result:
    name: str
    mode: str
    jobs: int
    cycles: list[Cycle] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(c, attr) for c in self.cycles))

    def span(self, attr: str) -> tuple[float, float]:
        values = [getattr(c, attr) for c in self.cycles]
        return min(values), max(values)


@contextmanager
def _unsynced(store: JobStore) -> Iterator[None]:
    """Let the filling thread's SQLite connection skip fsync (fill speed only)."""
    if not isinstance(store, SQLiteStore):
        yield
        return
    conn = store._conn()  # this thread's connection; the poller's threads have their own
    conn.execute("PRAGMA synchronous = OFF")
    try:
        yield
    finally:
        conn.execute("PRAGMA synchronous = FULL")


def _job_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def fill_provider(provider: FakeProvider, n: int) -> list[str]:
    """The provider's N executions (one per job), in job order; their paths."""
    return [provider.submit(ProviderTask(provider_job_id(_job_id(i), 0), _job_id(i),
                                         TENANTS[i % len(TENANTS)], 0, SPEC))
            for i in range(n)]


def fill(store: JobStore, paths: Sequence[str], provider_name: str) -> None:
    """One active SCHEDULED job per path, owned by WORKER, through the store API."""
    with _unsynced(store):
        for i, path in enumerate(paths):
            job_id = _job_id(i)
            stored, _ = store.create_job(
                Job(job_id=job_id, tenant_id=TENANTS[i % len(TENANTS)], spec=SPEC,
                    provider=provider_name, owner_worker_id=WORKER), LEASE_TTL)
            store.update_job(job_id, stored.lease, JobPatch(
                status=JobStatus.SCHEDULED, provider_job_id=provider_job_id(job_id, 0),
                cloud_resource_path=path, scheduled_at=stored.created_at), "bench fill")


def sqlite_template(tmp: Path, jobs: int) -> Path:
    """Fill one SQLite file once; each SQLite configuration starts from a copy of it."""
    path = tmp / "template.db"
    store = SQLiteStore(path)
    store.migrate()
    fill(store, fill_provider(FakeProvider(), jobs), FakeProvider.name)
    store.close()  # the last connection to close checkpoints the -wal file into the db
    return path


async def _measure(poller: Poller, provider: FakeProvider, store: CountingStore,
                   before: Callable[[int], None], cycles: int) -> list[Cycle]:
    out: list[Cycle] = []
    for k in range(cycles):
        before(k)
        calls0, store0 = provider.calls.get("status", 0), store.total()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await poller.cycle()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        out.append(Cycle(sum(poller.owned_by_status.values()),
                         provider.calls.get("status", 0) - calls0, store.total() - store0,
                         cpu, wall))
    return out


def run_config(name: str, jobs: int, cycles: int, churn: float, tmp: Path,
               template: Path | None = None) -> list[Result]:
    """A fresh filled store (SQLite: a copy of ``template``), then warm-up, steady and
    churn cycles on it."""
    provider = FakeProvider()
    paths = fill_provider(provider, jobs)
    if name == "floor":
        inner: JobStore = MemoryStore()
        fill(inner, paths, provider.name)
    else:
        db = tmp / f"{name.replace(' ', '-')}.db"
        shutil.copyfile(template or sqlite_template(tmp, jobs), db)
        inner = SQLiteStore(db)
        inner.migrate()
    store = CountingStore(inner)
    js = cast(JobStore, store)

    async def go() -> list[Result]:
        committer = GroupCommitter(js)
        events: ExecutionLog
        if name == "floor":
            events = NullExecutionLog()
        elif "WAL" in name:
            from worker.wal import WalExecutionLog

            events = WalExecutionLog(tmp / "wal", tmp / "archive", WORKER, committer,
                                     registry=CollectorRegistry())
        else:
            events = StoreExecutionLog(committer)
        await events.start()
        output = OutputReader(js, provider, events, worker_id=WORKER, clock=utcnow)
        service = JobService(js, provider, worker_id=WORKER, lease_ttl=LEASE_TTL,
                             committer=committer, before_end=output.settle)
        poller = Poller(js, provider, events, output, service, worker_id=WORKER, clock=utcnow,
                        interval=0.0)
        await poller.cycle()  # warm-up, not counted
        steady = await _measure(poller, provider, store, lambda k: None, cycles)
        per_cycle = max(2, round(jobs * churn))

        def move(k: int) -> None:
            for j, path in enumerate(paths[k * per_cycle:(k + 1) * per_cycle]):
                provider.set_state(path, JobStatus.RUNNING if j % 2 else JobStatus.COMPLETED,
                                   exit_code=None if j % 2 else 0)

        churned = await _measure(poller, provider, store, move, cycles)
        await events.close()
        return [Result(name, "steady", jobs, steady),
                Result(name, f"churn {churn:.0%}", jobs, churned)]

    try:
        return asyncio.run(go())
    finally:
        inner.close()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def provider_only(jobs: int, cycles: int) -> Result:
    """The bare ``status()`` over every path in ``max_status_batch`` batches."""
    provider = FakeProvider()
    paths = fill_provider(provider, jobs)
    batch = provider.capabilities.max_status_batch
    result = Result("provider.status() only", "steady", jobs)
    for _ in range(cycles):
        calls0 = provider.calls.get("status", 0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(0, len(paths), batch):
            provider.status(paths[i:i + batch])
        result.cycles.append(Cycle(jobs, provider.calls.get("status", 0) - calls0, 0,
                                   time.process_time() - cpu0, time.perf_counter() - wall0))
    return result


def _fmt(result: Result, attr: str) -> str:
    lo, hi = result.span(attr)
    return f"{result.median(attr):.3f} ({lo:.3f}-{hi:.3f})"


def _ratio(result: Result, floor: Result | None, attr: str) -> str:
    return f"{result.median(attr) / floor.median(attr):.1f}" if floor else "-"


def table(results: Sequence[Result]) -> str:
    floors = {r.mode: r for r in results if r.name == "floor"}
    lines = [
        "| configuration | mode | active jobs | provider calls / cycle | store calls / cycle "
        "| CPU s / cycle, median (min-max) | wall s / cycle, median (min-max) "
        "| CPU × floor | wall × floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        floor = floors.get(r.mode)
        active = f"{r.cycles[0].active}" + (f"→{r.cycles[-1].active}"
                                            if r.cycles[-1].active != r.cycles[0].active else "")
        lines.append(
            f"| {r.name} | {r.mode} | {active} | {r.median('status_calls'):.0f} "
            f"| {r.median('store_calls'):.0f} | {_fmt(r, 'cpu')} | {_fmt(r, 'wall')} "
            f"| {_ratio(r, floor, 'cpu')} | {_ratio(r, floor, 'wall')} |"
        )
    return "\n".join(lines)


def measure(jobs: int, cycles: int, churn: float,
            configs: Sequence[str] = ("floor", "sqlite + store events", "sqlite + WAL events"),
            ) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-poller-") as tmp:
        template = sqlite_template(Path(tmp), jobs) if any(
            c != "floor" for c in configs) else None
        for name in configs:
            results += run_config(name, jobs, cycles, churn, Path(tmp), template)
    results.append(provider_only(jobs, cycles))
    return results


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.poller", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--churn", type=float, default=0.01,
                        help="fraction of jobs changing state before each churn cycle")
    args = parser.parse_args([] if argv is None else argv)  # bench/__main__ calls main()
    started = time.monotonic()
    results = measure(args.jobs, args.cycles, args.churn)
    batch = FakeProvider().capabilities.max_status_batch
    out = "\n".join([
        f"Poll cycle of one worker: {args.jobs} active jobs, FakeProvider "
        f"(max_status_batch {batch}, so ceil(jobs / batch) = {math.ceil(args.jobs / batch)} "
        f"status calls), {args.cycles} cycles per mode after one warm-up cycle; floor = "
        "in-memory store + null execution-event log, same run, same mode.",
        "",
        table(results),
        "",
        f"(total {time.monotonic() - started:.1f} s)",
    ])
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
