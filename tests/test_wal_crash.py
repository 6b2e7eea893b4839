"""``kill -9`` of a writer mid-append, then recovery (DESIGN §10).

The writer is a real subprocess that prints each event's seq once ``append`` (or ``emit``)
has returned; the parent kills it at a random moment. Every acknowledged event must be in
the recovered log, in order, and the log must recover to a clean, contiguous prefix.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from worker.wal.format import scan
from worker.wal.joblog import JobLog
from worker.wal.metrics import wal_metrics

REPO = Path(__file__).resolve().parent.parent

_PRELUDE = """
import sys, threading, asyncio
from datetime import datetime, UTC
from pathlib import Path
from prometheus_client import CollectorRegistry
from jennah.models import EventKind, Job, JobSpec
from worker.wal.joblog import JobLog
from worker.wal.metrics import wal_metrics
wal_dir = Path(sys.argv[1])
job = Job(job_id="crash-job", tenant_id="acme", spec=JobSpec(image_uri="busybox"),
          lease_version=1)
out = threading.Lock()
def ack(seq):
    with out:
        sys.stdout.write(f"{seq}\\n")
        sys.stdout.flush()
"""

THREADS = _PRELUDE + """
(wal_dir / "w1").mkdir(parents=True)
jl = JobLog.create(wal_dir / "w1" / "crash-job.0.wal", job, "w1",
                   wal_metrics(CollectorRegistry()))
def run(i):
    n = 0
    while True:
        n += 1
        ev = jl.append(1, EventKind.OUTPUT, None, "", f"thread {i} line {n}\\n" * (n % 7),
                       datetime.now(UTC), "w1")
        ack(ev.seq)
threads = [threading.Thread(target=run, args=(i,)) for i in range(int(sys.argv[2]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

EMIT = _PRELUDE + """
from worker.wal import WalEventLog
class Sink:
    async def deliver(self, events):
        pass
async def main():
    log = WalEventLog(wal_dir, wal_dir / "archive", "w1", Sink(), registry=CollectorRegistry())
    await log.start()
    async def task(i):
        n = 0
        while True:
            n += 1
            ev = await log.emit(job, EventKind.OUTPUT, None, output=f"task {i} line {n}\\n")
            ack(ev.seq)
    await asyncio.gather(*(task(i) for i in range(16)))
asyncio.run(main())
"""


def _run_and_kill(tmp: Path, code: str, *args: str, rng: random.Random) -> list[int]:
    tmp.mkdir(parents=True)
    err_path = tmp / "stderr.txt"
    chunks: list[bytes] = []
    with open(err_path, "wb") as err, subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=err,
    ) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()

        def reader() -> None:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while b"".join(chunks).count(b"\n") < 50:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"writer did not start: {err_path.read_text()[-2000:]}")
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    text = b"".join(chunks)
    complete = text[: text.rfind(b"\n") + 1]  # a line cut by the kill is not an ack
    return [int(line) for line in complete.split()]


def _check_recovered(path: Path, acked: list[int]) -> None:
    jl = JobLog.open(path, wal_metrics(CollectorRegistry()))
    jl.close()
    result = scan(path.read_bytes())
    assert result.error == ""
    events = [r.seq for r in result.records if r.kind < 0x80]
    assert events == list(range(1, len(events) + 1)), "recovered events are not in order"
    missing = set(acked) - set(events)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    assert len(set(acked)) == len(acked)


@pytest.mark.parametrize("threads", [1, 8])
def test_kill_9_mid_append_threads(tmp_path: Path, threads: int) -> None:
    rng = random.Random(threads)
    for round_ in range(2):
        d = tmp_path / f"r{round_}"
        acked = _run_and_kill(d, THREADS, str(threads), rng=rng)
        assert len(acked) >= 50
        _check_recovered(d / "w1" / "crash-job.0.wal", acked)


def test_kill_9_mid_emit_asyncio(tmp_path: Path) -> None:
    rng = random.Random(99)
    for round_ in range(2):
        d = tmp_path / f"r{round_}"
        acked = _run_and_kill(d, EMIT, rng=rng)
        _check_recovered(d / "w1" / "crash-job.0.wal", acked)
