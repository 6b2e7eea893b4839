"""WAL benchmarks (docs/design.md §10): one WAL per worker, every rate against a floor measured in
the same run.

* **floor**: ``os.write`` + ``os.fdatasync`` (what the WAL uses) of 256-byte records on a
  raw fd, and the same with ``os.fsync``.
* **fsync per append**: ``WalFile.append`` of 256-byte records, one appender (goal
  ≥ 0.9 × the fdatasync floor): the file layer adds nothing to the fsync.
* **one appender**: ``WalExecutionLog.append`` of one output event (about 256 bytes on
  disk) at a time, the whole production path (protobuf, CRC, group commit, metrics, the
  sender delivering to a sink that accepts at once and writing checkpoints).
* **group commit**: 32 asyncio appenders for 256 jobs through the same path (goal
  ≥ 10 × one appender), with the fsyncs per event it took (one segment for every job:
  the fsyncs are shared whatever the number of jobs).
* **recovery**: a segment of 100,000 event records: scan and CRC check (goal < 1 s), and
  ``WorkerWal.open`` (lock, scan, decode every event after the checkpoint).
* **archive**: zstd reduction of realistic output segments (goal ≥ 85 %): 8 training
  jobs' stdout polled about once a second into OUTPUT events, interleaved in one WAL with
  status details and the checkpoints a sender writes, cut into 1 MiB segments.

Each run measures the floors and our rates back to back; figures are medians over
``--runs`` runs. Run: ``.venv/bin/python -m bench.wal`` (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from database._common import output_dedup_key
from jennah.models import EventKind, JobEvent, JobStatus, Placed
from worker.wal import WalExecutionLog
from worker.wal.archive import archive_file
from worker.wal.codec import kind_byte, wal_payload
from worker.wal.format import (
    KIND_CHECKPOINT,
    RECORD_OVERHEAD,
    crc_uses_c_extension,
    encode_header,
    encode_record,
    scan,
)
from worker.wal.log import WalFile
from worker.wal.segments import WorkerWal, list_segments, segment_name

RECORD = 256
PAYLOAD = b"x" * (RECORD - RECORD_OVERHEAD)
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
GROUP_TASKS = 32
GROUP_JOBS = 256


class NullSink:
    """A store that accepts everything at once (the bench measures the WAL, not a store)."""

    async def deliver(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        return [(Placed.STORED, e) for e in events]


def _event(job: str, offset: int, text: str) -> JobEvent:
    return JobEvent(job_id=job, tenant_id="acme", seq=0, kind=EventKind.OUTPUT,
                    status=JobStatus.RUNNING, message="stdout", output=text, created_at=T0,
                    worker_id="bench", offset=offset, end=offset + len(text.encode()),
                    dedup_key=output_dedup_key(0, 0, "stdout", offset))  # fmt: skip


# About 256 bytes on disk, like the raw records of the floors.
_LINE = "step 1200/20000 loss=0.4127 acc=0.8512 lr=3.0e-04 " * 3
_LINE = _LINE[: max(1, len(_LINE) - (len(wal_payload(_event("job-000", 0, _LINE)))
                                     + RECORD_OVERHEAD - RECORD))]  # fmt: skip


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


def walfile_rate(d: Path, seconds: float) -> float:
    path = d / "single.wal"
    wal = WalFile.create(path)
    lsn = iter(range(1, 1 << 62))

    def step() -> None:
        wal.append(encode_record(next(lsn), 11, 0, PAYLOAD))

    try:
        return _timed(seconds, step)
    finally:
        wal.close()
        path.unlink()


def log_rate(d: Path, seconds: float, tasks: int, jobs: int) -> tuple[float, float]:
    """(events/s, fsyncs per event) of ``tasks`` asyncio appenders appending one output
    event at a time for ``jobs`` jobs through ``WalExecutionLog.append``."""
    base = d / f"log-{tasks}"
    count = 0

    async def main() -> tuple[float, int]:
        nonlocal count
        log = WalExecutionLog(base / "wal", base / "archive", "bench", NullSink(),
                              registry=CollectorRegistry())  # fmt: skip
        await log.start()
        fsyncs0 = log.wal.fsyncs
        offsets = [0] * jobs

        async def appender(i: int, deadline: float) -> None:
            nonlocal count
            n = i
            while time.perf_counter() < deadline:
                job = n % jobs
                ev = _event(f"job-{job:03d}", offsets[job], _LINE)
                offsets[job] = ev.end
                await log.append([ev])
                count += 1
                n += tasks

        start = time.perf_counter()
        await asyncio.gather(*(appender(i, start + seconds) for i in range(tasks)))
        elapsed = time.perf_counter() - start
        fsyncs = log.wal.fsyncs - fsyncs0
        await log.flush(10)
        await log.close()
        return elapsed, fsyncs

    elapsed, fsyncs = asyncio.run(main())
    shutil.rmtree(base)
    return count / elapsed, fsyncs / max(1, count)


def recovery_seconds(d: Path, records: int) -> tuple[float, float]:
    """(scan seconds, ``WorkerWal.open`` seconds) of one segment of ``records`` event
    records (real payloads, all after the checkpoint, so all decoded)."""
    wal_dir = d / "recovery" / "w1"
    wal_dir.mkdir(parents=True)
    path = wal_dir / segment_name(1)
    payloads = [wal_payload(_event(f"job-{j:03d}", 0, _LINE)) for j in range(64)]
    kind = kind_byte(EventKind.OUTPUT)
    with open(path, "wb") as f:
        chunk = bytearray(encode_header() + encode_record(0, KIND_CHECKPOINT, 0, b""))
        for lsn in range(1, records + 1):
            chunk += encode_record(lsn, kind, lsn, payloads[lsn % 64])
            if len(chunk) > 1 << 20:
                f.write(chunk)
                chunk.clear()
        f.write(chunk)
    start = time.perf_counter()
    result = scan(path.read_bytes())
    scan_s = time.perf_counter() - start
    assert len(result.records) == records + 1 and not result.error
    wal = WorkerWal(wal_dir, segment_bytes=1 << 40)
    start = time.perf_counter()
    report = wal.open()
    open_s = time.perf_counter() - start
    assert report.pending == records and not report.damaged and not report.truncated
    wal.close()
    path.unlink()
    return scan_s, open_s


class _TrainingJob:
    """Stdout of a plausible training job: setup lines, then per-step metrics that drift
    smoothly with noise, periodic eval and checkpoint lines and an occasional warning.
    Each logging call site has a fixed ``file:line``, as in a real program."""

    def __init__(self, rng: random.Random, t: datetime, run_id: str) -> None:
        self.rng = rng
        self.t = t
        self.run_id = run_id
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
                    "checkpoint.py:88",
                    f"saved checkpoint gs://acme-ml/runs/{self.run_id}/ckpt-{s:06d}.pt"))
            if rng.random() < 0.01:
                lines.append(self._line(
                    "dataloader.py:131", f"WARNING slow shard read (shard {rng.randint(0, 63)}, "
                    f"{rng.uniform(2, 9):.1f}s)"))
        return "\n".join(lines) + "\n"


def archive_reduction(d: Path, outputs: int, jobs: int = 8) -> tuple[float, int, int, int]:
    """(reduction, original bytes, compressed bytes, segments) of the segments a worker
    writes for ``jobs`` training jobs' ``outputs`` polled outputs in all."""
    rng = random.Random(7)
    wal_dir = d / "archive-src" / "w1"

    async def write() -> None:
        wal = WorkerWal(wal_dir, segment_bytes=1 << 20, fsync=lambda fd: None)
        wal.open()
        runs = [_TrainingJob(rng, T0, f"{rng.getrandbits(32):08x}") for _ in range(jobs)]
        ends = [0] * jobs
        for n in range(outputs):
            j = n % jobs
            job_id = f"9f1c{j:04d}-5b2e-4c1a-8d3f-{j:012d}"
            text = runs[j].chunk()
            ev = _event(job_id, ends[j], text)
            ends[j] = ev.end
            evs = [ev]
            if rng.random() < 0.02:
                evs.append(JobEvent(
                    job_id=job_id, tenant_id="acme", seq=0, kind=EventKind.STATUS_DETAIL,
                    status=JobStatus.RUNNING, worker_id="bench", created_at=T0,
                    message="provider state RUNNING -> RUNNING: VM preempted, rescheduling",
                    dedup_key=f"detail:0:{n}"))  # fmt: skip
            await wal.append(evs)
            if n % 4 == 3:  # the sender acknowledges a batch now and then
                wal.ack(wal.durable(1000, 1 << 30)[-1].lsn)
        wal.close()

    asyncio.run(write())
    original = compressed = 0
    segments = list_segments(wal_dir)
    for _, path in segments:
        original += path.stat().st_size
        out = archive_file(path, d / "archive-out")
        compressed += out.stat().st_size
        out.unlink()
    return 1 - compressed / original, original, compressed, len(segments)


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
            r["walfile_append_ops"] = walfile_rate(d, seconds)
            r["single_append_ops"], r["single_fsyncs_per_event"] = log_rate(
                d, seconds, 1, 1)
            r["group32_ops"], r["group32_fsyncs_per_event"] = log_rate(
                d, seconds, GROUP_TASKS, GROUP_JOBS)
            r["walfile_vs_floor"] = r["walfile_append_ops"] / r["floor_fdatasync_ops"]
            r["single_vs_floor"] = r["single_append_ops"] / r["floor_fdatasync_ops"]
            r["group32_vs_single"] = r["group32_ops"] / r["single_append_ops"]
            r["group32_events_per_fsync"] = 1 / r["group32_fsyncs_per_event"]
            r["recovery_scan_seconds"], r["recovery_open_seconds"] = recovery_seconds(
                d / f"r{len(rows)}", recovery_records)
            rows.append(r)
        reduction, original, compressed, segments = archive_reduction(d, archive_outputs)
    figures = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    figures.update(
        recovery_records=float(recovery_records),
        archive_original_bytes=float(original),
        archive_compressed_bytes=float(compressed),
        archive_segments=float(segments),
        archive_reduction=reduction,
    )
    return figures


def report(f: dict[str, float]) -> None:
    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    n = int(f["recovery_records"])
    print(f"## WAL (one WAL per worker; 256-byte records; crcmod C extension: "
          f"{crc_uses_c_extension()})")
    print()
    print("| measure | figure | goal | |")
    print("|---|---|---|---|")
    print(f"| floor: os.write + os.fdatasync | {f['floor_fdatasync_ops']:,.0f} ops/s | | |")
    print(f"| floor: os.write + os.fsync | {f['floor_fsync_ops']:,.0f} ops/s | | |")
    print(f"| WalFile.append, fsync per append | {f['walfile_append_ops']:,.0f} ops/s = "
          f"{f['walfile_vs_floor']:.2f} × fdatasync floor | ≥ 0.9 × | "
          f"{mark(f['walfile_vs_floor'] >= 0.9)} |")
    print(f"| WalExecutionLog.append, one appender | {f['single_append_ops']:,.0f} events/s "
          f"= {f['single_vs_floor']:.2f} × fdatasync floor "
          f"({f['single_fsyncs_per_event']:.2f} fsyncs per event) | | |")
    print(f"| group commit, {GROUP_TASKS} asyncio appenders, {GROUP_JOBS} jobs | "
          f"{f['group32_ops']:,.0f} events/s = {f['group32_vs_single']:.1f} × one appender "
          f"({f['group32_fsyncs_per_event']:.3f} fsyncs per event, "
          f"{f['group32_events_per_fsync']:.1f} events per fsync) | ≥ 10 × | "
          f"{mark(f['group32_vs_single'] >= 10)} |")
    print(f"| recovery scan, {n:,} records | {f['recovery_scan_seconds'] * 1000:.0f} ms "
          f"| < 1 s | {mark(f['recovery_scan_seconds'] < 1)} |")
    print(f"| WorkerWal.open: recover + decode {n:,} unsent events | "
          f"{f['recovery_open_seconds'] * 1000:.0f} ms | | |")
    print(f"| archive of realistic output segments ({f['archive_segments']:.0f}) | "
          f"{f['archive_original_bytes']:,.0f} → {f['archive_compressed_bytes']:,.0f} bytes "
          f"= {f['archive_reduction']:.1%} smaller | ≥ 85 % | "
          f"{mark(f['archive_reduction'] >= 0.85)} |")


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
