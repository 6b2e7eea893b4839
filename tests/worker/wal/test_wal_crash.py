"""``kill -9`` of a real writer mid-append, then recovery (docs/design.md §10).

The writer is a subprocess running a ``WalExecutionLog`` (small segments, so it rolls and
archives as it goes) that delivers to a SQLite store through the worker's group
committer. 8 asyncio producers append output and details for 8 running jobs in a loop and
print each event's key once ``append`` has returned (it is durable). The parent kills it
at a random moment, then recovers the same WAL directory into the same store: every event
the writer was told is durable must be in the store, exactly once (output contiguous, no
key twice), and the recovering sender must send nothing twice.
"""

from __future__ import annotations

import asyncio
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

from database.sqlite import SQLiteStore
from jennah.models import EventKind
from tests.worker.wal.test_wal_support import RecordingSink, new_log, running_job, stored
from worker.wal.segments import list_segments

REPO = Path(__file__).resolve().parents[3]
JOBS = 8
SEGMENT_BYTES = 8192

WRITER = """
import asyncio, os, sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from database.sqlite import SQLiteStore
from tests.worker.wal.test_wal_support import Stream, detail, FAST
from worker.commit import GroupCommitter
from worker.wal import WalExecutionLog

base = Path(sys.argv[1])

async def main():
    store = SQLiteStore(base / "jennah.db")
    log = WalExecutionLog(base / "wal", base / "archive", "w1", GroupCommitter(store),
                          registry=CollectorRegistry(), segment_bytes=int(sys.argv[3]),
                          sender_config=FAST)
    await log.start()

    async def producer(j):
        s = Stream(f"job-{j}")
        n = 0
        while True:
            n += 1
            if n % 4:
                ev = s.next(f"job-{j} line {n}\\n" * (n % 5 + 1))
            else:
                ev = detail(f"job-{j}", str(n))
            await log.append([ev])
            os.write(1, f"{ev.job_id} {ev.dedup_key}\\n".encode())

    await asyncio.gather(*(producer(j) for j in range(int(sys.argv[2]))))

asyncio.run(main())
"""


def expected_output(job: str, upto: int) -> str:
    return "".join(f"{job} line {n}\n" * (n % 5 + 1) for n in range(1, upto + 1) if n % 4)


def run_and_kill(base: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Start the writer, let it append for a random while, SIGKILL it; return the (job,
    key) of every append it reported as returned."""
    err_path = base / "writer.stderr"
    chunks: list[bytes] = []
    with open(err_path, "wb") as err, subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(base), str(JOBS),
         str(SEGMENT_BYTES)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=err,
    ) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()

        def reader() -> None:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        target = rng.randint(300, 1500)  # kill after this many acknowledged appends
        deadline = time.monotonic() + 30
        while b"".join(chunks).count(b"\n") < target:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"the writer stopped early: {err_path.read_text()[-2000:]}")
            time.sleep(0.002)  # polls the writer's progress, not a blind wait
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    text = b"".join(chunks)
    complete = text[: text.rfind(b"\n") + 1]  # a line cut by the kill is not an ack
    acked = [tuple(line.split(" ", 1)) for line in complete.decode().splitlines()]
    return [(job, key) for job, key in acked]


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_mid_append_then_recovery_delivers_every_durable_event_once(
    tmp_path: Path, seed: int
) -> None:
    store = SQLiteStore(tmp_path / "jennah.db")
    store.migrate()
    for j in range(JOBS):
        running_job(store, f"job-{j}")
    store.close()

    acked = run_and_kill(tmp_path, random.Random(seed))
    assert len(acked) >= 300 and len(set(acked)) == len(acked)
    assert len(list_segments(tmp_path / "wal" / "w1")) >= 1

    store = SQLiteStore(tmp_path / "jennah.db")
    sink = RecordingSink(store)

    async def recover() -> None:
        log = new_log(tmp_path, sink, segment_bytes=SEGMENT_BYTES)
        await log.start()
        assert log.recovery is not None and log.recovery.damaged == []
        assert await log.flush(20)
        await log.close()

    try:
        asyncio.run(recover())
        assert max(sink.sent.values(), default=1) == 1, "the recovery sent an event twice"
        for j in range(JOBS):
            job = f"job-{j}"
            got = stored(store, job)
            keys = [e.dedup_key for e in got]
            assert len(set(keys)) == len(keys), f"{job}: an event is in the store twice"
            mine = {key for jb, key in acked if jb == job}
            missing = mine - set(keys)
            assert not missing, f"{job}: acknowledged events lost: {sorted(missing)[:5]}"
            text = "".join(e.output for e in got if e.kind is EventKind.OUTPUT)
            # One event per step n: the stored output is a prefix of what the job printed,
            # with no gap and nothing twice.
            assert expected_output(job, 2 * len(got) + 10).startswith(text), (
                f"{job}: output broken")
    finally:
        store.close()
