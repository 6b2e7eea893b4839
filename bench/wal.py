"""WAL benchmarks (DESIGN §10): every rate against a floor measured in the same run.

* **floor**: ``os.write`` + ``os.fsync`` of 256-byte records on a raw fd (also with
  ``os.fdatasync``, which our log uses).
* **fsync per append**: ``WalFile.append`` of 256-byte records, one appender
  (goal ≥ 0.9 × floor).
* **group commit**: 32 asyncio tasks appending 256-byte records to one log through
  ``AsyncCommit``, the path ``WalEventLog.emit`` takes (goal ≥ 10 × one appender). Also
  32 threads on ``WalFile.append``, and the whole emit path (``JobLog.append_async``:
  protobuf, CRC, metrics) with 1 and 32 tasks, for information.
* **recovery**: opening a log of 100,000 records: scan, CRC check (goal < 1 s); also the
  event-level open, which decodes every unacknowledged event.
* **archive**: zstd reduction of a realistic job's log (goal ≥ 85 %): a training job's
  stdout polled about once a second into OUTPUT events, with SUBMITTED, SCHEDULED,
  RUNNING, COMPLETED, checkpoints, protobuf payloads and CRCs, written through ``JobLog``.

Each run measures the floors and our rates back to back; figures are medians over
``--runs`` runs. Run: ``.venv/bin/python -m bench.wal`` (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from jennah.models import EventKind, Job, JobSpec, JobStatus
from worker.wal.archive import archive_file
from worker.wal.format import RECORD_OVERHEAD, crc_uses_c_extension, encode_record
from worker.wal.joblog import JobLog
from worker.wal.log import AsyncCommit, WalFile
from worker.wal.metrics import wal_metrics

RECORD = 256
PAYLOAD = b"x" * (RECORD - RECORD_OVERHEAD)


def _timed(seconds: float, step: Callable[[], None]) -> float:
    """Operations per second of ``step`` run for about ``seconds``."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        step()
        n += 1
        if n % 16 == 0 and time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


def floor_rate(d: Path, seconds: float, sync: Callable[[int], None]) -> float:
    path = d / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    rec = os.urandom(RECORD)

    def step() -> None:
        os.write(fd, rec)
        sync(fd)

    try:
        return _timed(seconds, step)
    finally:
        os.close(fd)
        path.unlink()


def single_rate(d: Path, seconds: float) -> float:
    path = d / "single.wal"
    wal = WalFile.create(path)
    seq = iter(range(1, 1 << 62))

    def step() -> None:
        wal.append(encode_record(next(seq), 11, 0, PAYLOAD))

    try:
        return _timed(seconds, step)
    finally:
        wal.close()
        path.unlink()


def group_rate(d: Path, seconds: float, threads: int = 32) -> tuple[float, float]:
    """(records/s, records per fsync) with ``threads`` concurrent appenders."""
    path = d / "group.wal"
    wal = WalFile.create(path)
    counts = [0] * threads
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)

    def appender(i: int) -> None:
        rec = encode_record(i, 11, 0, PAYLOAD)
        barrier.wait()
        while not stop.is_set():
            wal.append(rec)
            counts[i] += 1

    workers = [threading.Thread(target=appender, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    fsyncs0 = wal.fsyncs
    time.sleep(seconds)
    stop.set()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - start
    total = sum(counts)
    per_fsync = total / max(1, wal.fsyncs - fsyncs0)
    wal.close()
    path.unlink()
    return total / elapsed, per_fsync


def async_group_rate(d: Path, seconds: float, tasks: int = 32) -> tuple[float, float]:
    """(records/s, records per fsync) with ``tasks`` asyncio tasks appending 256-byte
    records through ``AsyncCommit``, the path ``WalEventLog.emit`` takes."""
    path = d / "agroup.wal"
    wal = WalFile.create(path)
    commit = AsyncCommit(wal)
    counts = [0] * tasks

    async def appender(i: int, deadline: float) -> None:
        rec = encode_record(i, 11, 0, PAYLOAD)
        while time.perf_counter() < deadline:
            await commit.wait(wal.write(rec))
            counts[i] += 1

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(appender(i, start + seconds) for i in range(tasks)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    total = sum(counts)
    per_fsync = total / max(1, wal.fsyncs)
    wal.close()
    path.unlink()
    return total / elapsed, per_fsync


def emit_rate(d: Path, seconds: float, tasks: int) -> float:
    """Events/s through ``JobLog.append_async`` (protobuf, CRC, metrics, fsync)."""
    path = d / f"emit{tasks}.0.wal"
    jl = JobLog.create(path, _job("emit"), "bench", wal_metrics(CollectorRegistry()))
    count = 0
    t = datetime(2025, 5, 1, tzinfo=UTC)

    async def appender(deadline: float) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await jl.append_async(1, EventKind.OUTPUT, None, "", "step 1 loss=0.1234\n", t, "w")
            count += 1

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(appender(start + seconds) for _ in range(tasks)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    jl.close()
    path.unlink()
    return count / elapsed


def _job(job_id: str) -> Job:
    return Job(job_id=job_id, tenant_id="acme", spec=JobSpec(image_uri="python:3.11"),
               lease_version=1)


def recovery_seconds(d: Path, records: int) -> tuple[float, float]:
    """(scan seconds, event-level open seconds) of a log of ``records`` 256-byte events."""
    path = d / f"recovery{records}.0.wal"
    jl = JobLog.create(path, _job("recovery"), "bench", wal_metrics(CollectorRegistry()),
                       fsync=lambda fd: None)
    jl.close()
    payload = b"y" * (RECORD - RECORD_OVERHEAD)
    with open(path, "ab") as f:
        chunk = bytearray()
        for seq in range(1, records + 1):
            chunk += encode_record(seq, 11, seq, payload)
            if len(chunk) > 1 << 20:
                f.write(chunk)
                chunk.clear()
        f.write(chunk)
    # Real event payloads (one output line each) for the event-level open.
    ev_path = d / f"events{records}.0.wal"
    ev_log = JobLog.create(ev_path, _job("events"), "bench", wal_metrics(CollectorRegistry()),
                           fsync=lambda fd: None)
    t = datetime(2025, 5, 1, tzinfo=UTC)
    for i in range(records):
        ev_log.append(1, EventKind.OUTPUT, None, "", f"step {i} loss=0.{i % 9973:04d}\n", t, "w")
    ev_log.close()
    start = time.perf_counter()
    wal, result = WalFile.open(path)
    scan_s = time.perf_counter() - start
    wal.close()
    assert len(result.records) == records + 1 and not result.error
    start = time.perf_counter()
    jl = JobLog.open(ev_path, wal_metrics(CollectorRegistry()))
    open_s = time.perf_counter() - start
    assert jl.unacked >= records
    jl.close()
    path.unlink()
    ev_path.unlink()
    return scan_s, open_s


class _TrainingJob:
    """Stdout of a plausible training job: setup lines, then per-step metrics that drift
    smoothly with noise, periodic eval and checkpoint lines and an occasional warning.
    Each logging call site has a fixed ``file:line``, as in a real program."""

    def __init__(self, rng: random.Random, t: datetime) -> None:
        self.rng = rng
        self.t = t
        self.step = 0
        self.setup = [
            "Collecting torch==2.3.1", "Collecting numpy>=1.24", "Collecting tqdm",
            "Downloading torch-2.3.1-cp311-cp311-manylinux1_x86_64.whl (779.1 MB)",
            "Installing collected packages: tqdm, numpy, torch",
            "Successfully installed numpy-1.26.4 torch-2.3.1 tqdm-4.66.4",
            "Loading dataset gs://acme-ml/datasets/reviews-v3 (shards: 64)",
        ]

    def _line(self, where: str, text: str) -> str:
        self.t += timedelta(milliseconds=self.rng.randint(40, 160))
        return f"{self.t.isoformat(timespec='milliseconds')} INFO {where}] {text}"

    def chunk(self) -> str:
        """About a second of output, as one poll reads it."""
        rng = self.rng
        if self.setup:
            return "\n".join(self.setup.pop(0) for _ in range(min(2, len(self.setup)))) + "\n"
        lines = []
        for _ in range(rng.randint(4, 10)):
            self.step += 1
            s = self.step
            loss = 2.3 * (0.9997**s) + 0.08 + rng.gauss(0, 0.01)
            acc = min(0.99, 0.5 + 0.45 * (1 - 0.9997**s) + rng.gauss(0, 0.004))
            lr = 3e-4 if s < 10_000 else 1.5e-4
            lines.append(self._line(
                "train.py:214",
                f"epoch {s // 1000} step {s}/20000 loss={loss:.4f} acc={acc:.4f} "
                f"lr={lr:.1e} throughput={1520 + rng.gauss(0, 12):.1f} samples/s",
            ))
            if s % 500 == 0:
                lines.append(self._line(
                    "train.py:251", f"eval step {s}: val_loss={loss + 0.05:.4f} "
                    f"val_acc={acc - 0.01:.4f}"))
                lines.append(self._line(
                    "checkpoint.py:88", f"saved checkpoint gs://acme-ml/runs/7f3a9c2e/ckpt-{s:06d}.pt"))
            if rng.random() < 0.01:
                lines.append(self._line(
                    "dataloader.py:131", f"WARNING slow shard read (shard {rng.randint(0, 63)}, "
                    f"{rng.uniform(2, 9):.1f}s)"))
        return "\n".join(lines) + "\n"


def _write_job_log(path: Path, outputs: int, rng: random.Random, checkpoint_every: int) -> None:
    """A real-looking execution log, written through ``JobLog`` (protobuf records, CRCs,
    a checkpoint per sender batch)."""
    jl = JobLog.create(path, _job("job-7f3a9c2e"), "worker-1", wal_metrics(CollectorRegistry()),
                       fsync=lambda fd: None)
    t = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)

    def emit(kind: EventKind, status: JobStatus | None, message: str = "", output: str = "",
             ) -> None:
        nonlocal t
        t += timedelta(milliseconds=rng.randint(200, 1500))
        ev = jl.append(1, kind, status, message, output, t, "worker-1")
        if checkpoint_every and ev.seq % checkpoint_every == 0:
            jl.checkpoint(ev.seq)

    emit(EventKind.SUBMITTED, JobStatus.PENDING, "submitted to gcp as jennah-job-7f3a9c2e-0")
    emit(EventKind.SCHEDULED, JobStatus.SCHEDULED, "QUEUED -> SCHEDULED")
    emit(EventKind.STATUS_DETAIL, JobStatus.SCHEDULED, "VM provisioning in us-central1-a")
    emit(EventKind.RUNNING, JobStatus.RUNNING, "SCHEDULED -> RUNNING")
    job = _TrainingJob(rng, t)
    for _ in range(outputs):
        emit(EventKind.OUTPUT, None, output=job.chunk())
    emit(EventKind.COMPLETED, JobStatus.COMPLETED, "exit code 0")
    jl.checkpoint(jl.last_seq)
    jl.close()


def archive_reduction(d: Path, outputs: int) -> tuple[float, int, int]:
    path = d / "job-7f3a9c2e.0.wal"
    _write_job_log(path, outputs, random.Random(7), checkpoint_every=50)
    original = path.stat().st_size
    out = archive_file(path, d / "archive")
    compressed = out.stat().st_size
    out.unlink()
    return 1 - compressed / original, original, compressed


def run(
    seconds: float = 1.0, runs: int = 3, recovery_records: int = 100_000,
    archive_outputs: int = 3000, directory: Path | None = None,
) -> dict[str, float]:
    """Measure everything and return the figures: medians over ``runs``. Each run measures
    the floor and our rates back to back, and ratios are taken within a run, because this
    disk's fsync rate drifts from one second to the next."""
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        d = Path(tmp)
        for _ in range(runs):
            r: dict[str, float] = {}
            r["floor_fsync_ops"] = floor_rate(d, seconds, os.fsync)
            r["floor_fdatasync_ops"] = floor_rate(d, seconds, os.fdatasync)
            r["single_append_ops"] = single_rate(d, seconds)
            r["async32_ops"], r["async32_records_per_fsync"] = async_group_rate(d, seconds)
            r["threads32_ops"], r["threads32_records_per_fsync"] = group_rate(d, seconds)
            r["emit1_ops"] = emit_rate(d, seconds / 2, 1)
            r["emit32_ops"] = emit_rate(d, seconds / 2, 32)
            r["single_vs_floor"] = r["single_append_ops"] / r["floor_fsync_ops"]
            r["single_vs_fdatasync_floor"] = r["single_append_ops"] / r["floor_fdatasync_ops"]
            r["async32_vs_single"] = r["async32_ops"] / r["single_append_ops"]
            r["threads32_vs_single"] = r["threads32_ops"] / r["single_append_ops"]
            r["emit32_vs_emit1"] = r["emit32_ops"] / r["emit1_ops"]
            r["recovery_scan_seconds"], r["recovery_open_events_seconds"] = recovery_seconds(
                d, recovery_records
            )
            rows.append(r)
        reduction, original, compressed = archive_reduction(d, archive_outputs)
    figures = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    figures.update(
        recovery_records=float(recovery_records),
        archive_original_bytes=float(original),
        archive_compressed_bytes=float(compressed),
        archive_reduction=reduction,
    )
    return figures


def report(f: dict[str, float]) -> None:
    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    n = int(f["recovery_records"])
    print(f"## WAL (256-byte records; crcmod C extension: {crc_uses_c_extension()})")
    print()
    print("| measure | figure | goal | |")
    print("|---|---|---|---|")
    print(f"| floor: os.write + os.fsync | {f['floor_fsync_ops']:,.0f} ops/s | | |")
    print(f"| floor: os.write + os.fdatasync | {f['floor_fdatasync_ops']:,.0f} ops/s | | |")
    print(f"| WalFile.append, fsync per append | {f['single_append_ops']:,.0f} ops/s = "
          f"{f['single_vs_floor']:.2f} × fsync floor ({f['single_vs_fdatasync_floor']:.2f} × "
          f"fdatasync floor) | ≥ 0.9 × | {mark(f['single_vs_floor'] >= 0.9)} |")
    print(f"| group commit, 32 asyncio appenders | {f['async32_ops']:,.0f} records/s = "
          f"{f['async32_vs_single']:.1f} × one appender "
          f"({f['async32_records_per_fsync']:.1f} records per fsync) | ≥ 10 × | "
          f"{mark(f['async32_vs_single'] >= 10)} |")
    print(f"| group commit, 32 threads | {f['threads32_ops']:,.0f} records/s = "
          f"{f['threads32_vs_single']:.1f} × one appender "
          f"({f['threads32_records_per_fsync']:.1f} records per fsync) | | |")
    print(f"| JobLog.append_async (whole emit path), 1 task → 32 tasks | "
          f"{f['emit1_ops']:,.0f} → {f['emit32_ops']:,.0f} events/s "
          f"({f['emit32_vs_emit1']:.1f} ×) | | |")
    print(f"| recovery scan, {n:,} records | {f['recovery_scan_seconds'] * 1000:.0f} ms "
          f"| < 1 s | {mark(f['recovery_scan_seconds'] < 1)} |")
    print(f"| open + decode {n:,} unsent events | "
          f"{f['recovery_open_events_seconds'] * 1000:.0f} ms | | |")
    print(f"| archive of a realistic job log | {f['archive_original_bytes']:,.0f} → "
          f"{f['archive_compressed_bytes']:,.0f} bytes = {f['archive_reduction']:.1%} smaller "
          f"| ≥ 85 % | {mark(f['archive_reduction'] >= 0.85)} |")



def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="bench.wal", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--recovery-records", type=int, default=100_000)
    parser.add_argument("--archive-outputs", type=int, default=3000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args(argv)
    figures = run(args.seconds, args.runs, args.recovery_records, args.archive_outputs, args.dir)
    report(figures)
    return figures


if __name__ == "__main__":
    main()
