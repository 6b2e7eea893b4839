"""Local provider: how fast a job of many trivial tasks starts them (docs/design.md §16).

One job of N tasks (``true``; N = 2,000 by default; parallelism 0, so the provider's own
default, ``providers.local.DEFAULT_TASK_PARALLELISM`` at a time) is submitted to a
``LocalProvider`` in a temp directory and polled every 20 ms until it is COMPLETED. The
**floor** starts the same N ``true`` processes directly with ``subprocess.Popen`` from this
one Python process, at most the same number at a time (waiting for the oldest when full),
in the same run.

Reported per side, as median (min-max) over ``--runs`` runs:

* **tasks/s**: N over the wall time from the submit (floor: the first ``Popen``) to the
  job seen COMPLETED (floor: the last process reaped). The local side pays what the
  floor does not: its runner's interpreter start, two output files per task, the task
  log, the polls and the job's end (no process left);
* **starts/s**: N - 1 over the time from the first task's start to the last's (local:
  the task start times the runner recorded; floor: the first and last ``Popen``);
* the **ratio** local / floor of each.

The local runner starts each task with ``posix_spawn`` in its own session, with two
output files opened for it; process creation on this machine bounds both sides. Run:
``.venv/bin/python -m bench.tasks_local [--tasks 2000] [--parallelism 0] [--runs 3]
[--dir DIR]`` (about 10 s per run on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from jennah.models import JobSpec, JobStatus
from jennah.tasks import count
from providers.base import ProviderTask, provider_job_id
from providers.local import DEFAULT_TASK_PARALLELISM, LocalProvider

POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Side:
    """One side of one run: its wall time and its span of starts, in seconds."""

    seconds: float
    start_span: float

    def rate(self, n: int) -> float:
        return n / self.seconds

    def start_rate(self, n: int) -> float:
        return (n - 1) / self.start_span if self.start_span > 0 else float("inf")


@dataclass(frozen=True)
class Run:
    tasks: int
    at_a_time: int
    local: Side
    floor: Side

    @property
    def ratio(self) -> float:
        return self.local.rate(self.tasks) / self.floor.rate(self.tasks)

    @property
    def start_ratio(self) -> float:
        return self.local.start_rate(self.tasks) / self.floor.start_rate(self.tasks)


def run_local(n: int, parallelism: int, base_dir: Path, timeout: float = 600) -> Side:
    """Submit one job of ``n`` ``true`` tasks; wait until it is COMPLETED."""
    provider = LocalProvider(base_dir, container_engine=None)
    job_id = str(uuid.uuid4())
    spec = JobSpec("local", ("true",), task_count=n, parallelism=parallelism)
    task = ProviderTask(provider_job_id(job_id, 0), job_id, "bench", 0, spec)
    started = time.perf_counter()
    path = provider.submit(task)
    while True:
        st = provider.status([path])[path]
        if st.state is not None and st.state.terminal:
            break
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the job of {n} tasks did not end in {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    if st.state is not JobStatus.COMPLETED or count(n, st.tasks or ()).succeeded != n:
        raise RuntimeError(f"the job of {n} tasks ended {st.raw_state}: {st.message}")
    starts = [t.started_at for t in st.tasks or () if t.started_at is not None]
    return Side(seconds, (max(starts) - min(starts)).total_seconds())


def run_floor(n: int, at_a_time: int) -> Side:
    """Start ``n`` ``true`` processes with ``subprocess.Popen``, ``at_a_time`` at most."""
    running: deque[subprocess.Popen[bytes]] = deque()
    started = time.perf_counter()
    last_start = started
    for _ in range(n):
        if len(running) >= at_a_time:
            running.popleft().wait()
        running.append(subprocess.Popen(["true"]))
        last_start = time.perf_counter()
    while running:
        running.popleft().wait()
    return Side(time.perf_counter() - started, last_start - started)


def measure(n: int, parallelism: int = 0, runs: int = 3, base_dir: Path | None = None
            ) -> list[Run]:
    """``runs`` runs, each the local job then the floor at the same parallelism."""
    at_a_time = min(n, parallelism or DEFAULT_TASK_PARALLELISM)
    results = []
    with tempfile.TemporaryDirectory(prefix="jennah-bench-", dir=base_dir) as tmp:
        for i in range(runs):
            local = run_local(n, parallelism, Path(tmp) / f"run-{i}")
            results.append(Run(n, at_a_time, local, run_floor(n, at_a_time)))
    return results


def _spread(values: list[float], fmt: str = ",.0f") -> str:
    return (f"{statistics.median(values):{fmt}} "
            f"({min(values):{fmt}}–{max(values):{fmt}})")


def table(runs: list[Run]) -> str:
    n, at_a_time = runs[0].tasks, runs[0].at_a_time
    rows = [
        "| side | tasks | at a time | seconds | tasks/s | starts/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, side in (("floor: subprocess.Popen", "floor"), ("local provider", "local")):
        sides: list[Side] = [getattr(r, side) for r in runs]
        rows.append(
            f"| {name} | {n:,} | {at_a_time} | {_spread([s.seconds for s in sides], '.2f')} "
            f"| {_spread([s.rate(n) for s in sides])} "
            f"| {_spread([s.start_rate(n) for s in sides])} |")
    rows.append(f"| ratio local / floor | | | | {_spread([r.ratio for r in runs], '.2f')} "
                f"| {_spread([r.start_ratio for r in runs], '.2f')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks_local",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--parallelism", type=int, default=0,
                        help="the job's parallelism (0: the provider's default)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the job directories go (default: the system's temp dir)")
    args = parser.parse_args([] if argv is None else argv)  # bench/__main__ calls main()
    started = time.monotonic()
    runs = measure(args.tasks, args.parallelism, args.runs, args.dir)
    out = "\n".join([
        f"One local job of {args.tasks:,} `true` tasks, parallelism {args.parallelism} "
        f"({runs[0].at_a_time} at a time), against the same processes started with "
        f"subprocess.Popen from one Python process; median (min–max) of {args.runs} runs.",
        "",
        table(runs),
        "",
        f"(total {time.monotonic() - started:.1f} s)",
    ])
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
