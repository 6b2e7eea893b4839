"""Recovery under random damage (DESIGN §6, §10): truncations, bit flips, overwrites and
garbage applied to a real log. Recovery never raises (except refusing a damaged header),
never yields a corrupt record, and keeps exactly the records before the first damage."""

from __future__ import annotations

import functools
import struct
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from jennah.models import EventKind, Job, JobSpec, JobStatus
from worker.wal.format import (
    HEADER_SIZE,
    KIND_CHECKPOINT,
    KIND_META,
    Record,
    WalFormatError,
    crc64,
    scan,
)
from worker.wal.joblog import JobLog
from worker.wal.metrics import wal_metrics


@functools.cache
def original_log() -> tuple[bytes, tuple[Record, ...]]:
    """A real log written through JobLog: META, events of varied sizes, checkpoints."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job-h.0.wal"
        job = Job(job_id="job-h", tenant_id="acme", spec=JobSpec(image_uri="busybox"),
                  lease_version=1)
        jl = JobLog.create(path, job, "w1", wal_metrics(CollectorRegistry()),
                           fsync=lambda fd: None)
        t = datetime(2025, 5, 1, tzinfo=UTC)
        jl.append(1, EventKind.SUBMITTED, JobStatus.PENDING, "submitted", "", t, "w1")
        for i in range(24):
            t += timedelta(seconds=1)
            jl.append(1, EventKind.OUTPUT, None, "", "line\n" * (i * 7 % 40), t, "w1")
            if i % 8 == 7:
                jl.checkpoint(jl.last_seq - 2)
        jl.append(1, EventKind.COMPLETED, JobStatus.COMPLETED, "exit 0", "", t, "w1")
        jl.close()
        data = path.read_bytes()
    result = scan(data)
    assert not result.error and result.end == len(data)
    return data, tuple(result.records)


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data, _ = original_log()
    buf = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "garbage", "mixed"]))
    if kind in ("flip", "mixed"):
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    if kind == "overwrite":
        start = draw(st.integers(0, len(buf) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        buf[start : start + len(junk)] = junk
    if kind == "garbage":
        buf += draw(st.binary(min_size=1, max_size=200))
    if kind in ("truncate", "mixed"):
        del buf[draw(st.integers(0, len(buf))) :]
    return bytes(buf)


def _write(tmp: str, content: bytes) -> Path:
    path = Path(tmp) / "job-h.0.wal"
    path.write_bytes(content)
    return path


@settings(max_examples=200, deadline=None)
@given(damaged())
def test_recovery_keeps_exactly_the_valid_prefix(content: bytes) -> None:
    data, records = original_log()
    # Header bytes 12..15 are reserved and ignored: damage there does not count.
    first_bad = HEADER_SIZE + _first_difference(data[HEADER_SIZE:], content[HEADER_SIZE:])
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, content)
        header_ok = (
            len(content) >= HEADER_SIZE and content[:12] == data[:12]
        )  # bytes 12..15 are reserved and ignored
        if not header_ok:
            try:
                JobLog.open(path, wal_metrics(CollectorRegistry()))
            except WalFormatError:
                assert path.read_bytes() == content  # refused, never truncated
                return
            raise AssertionError("a damaged header was accepted")

        kept = [r for r in records if r.offset + r.size <= first_bad]
        jl = JobLog.open(path, wal_metrics(CollectorRegistry()))
        jl.close()
        after = path.read_bytes()
        result = scan(after)
        assert result.error == ""
        assert [(r.offset, r.seq, r.kind, r.payload) for r in result.records] == [
            (r.offset, r.seq, r.kind, r.payload) for r in kept
        ]
        assert len(after) == (kept[-1].offset + kept[-1].size if kept else HEADER_SIZE)

        # The event view: everything above the last kept checkpoint is unacknowledged.
        watermark = max((r.seq for r in kept if r.kind == KIND_CHECKPOINT), default=0)
        events = [r.seq for r in kept if r.kind not in (KIND_META, KIND_CHECKPOINT)]
        reopened = JobLog.open(path, wal_metrics(CollectorRegistry()))
        pending = [p.seq for p in reopened.durable_pending(10_000, 1 << 30)]
        reopened.close()
        assert pending == [s for s in events if s > watermark]
        assert path.read_bytes() == after  # a second recovery changes nothing


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=64))
def test_scan_never_raises_and_never_returns_a_corrupt_record(tail: bytes, head: bytes) -> None:
    data, _ = original_log()
    cases = [(head + tail, 0), (data[:HEADER_SIZE] + tail, HEADER_SIZE),
             (data[: len(data) // 2] + tail, HEADER_SIZE)]
    for blob, start in cases:
        result = scan(blob, start)
        for r in result.records:
            raw = blob[r.offset : r.offset + r.size]
            assert struct.unpack_from("<I", raw)[0] == r.size
            assert crc64(raw[4:-8]) == struct.unpack_from("<Q", raw, r.size - 8)[0] == r.crc
        assert result.end <= len(blob)
