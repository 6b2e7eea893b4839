"""Recovery of a worker's WAL under random damage (docs/design.md §6, §10): truncations, bit flips,
overwrites and garbage, applied to the last segment or to an older one of a real WAL.

Recovery never raises; it never serves a record that is not byte for byte one that was
written; it truncates only the last segment (at the first bad record), never an older
one, whose damage it reports as ``corrupt at offset N``; everything before the damage is
kept and everything above the highest surviving checkpoint is pending again.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.worker.wal.test_wal_support import Stream, detail
from worker.wal.codec import wal_event
from worker.wal.format import HEADER_SIZE, KIND_CHECKPOINT, Record, crc64, scan
from worker.wal.segments import WorkerWal, list_segments


@functools.cache
def original_wal() -> tuple[tuple[str, bytes, tuple[Record, ...]], ...]:
    """A real WAL of 4 segments written through WorkerWal: output of varied sizes and
    details, with acknowledgements (checkpoints) along the way."""

    async def write(d: Path) -> None:
        wal = WorkerWal(d, segment_bytes=1500, fsync=lambda fd: None)
        wal.open()
        out = Stream("job-h")
        for i in range(40):
            ev = out.next("line\n" * (i * 7 % 23 + 1)) if i % 5 else detail("job-h", str(i))
            await wal.append([ev])
            if i % 6 == 5:
                wal.ack(wal.durable(100, 1 << 30)[-3].lsn)
        wal.close()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "w1"
        asyncio.run(write(d))
        segs = []
        for _, path in list_segments(d):
            data = path.read_bytes()
            result = scan(data)
            assert not result.error and result.end == len(data)
            segs.append((path.name, data, tuple(result.records)))
    assert len(segs) >= 4
    return tuple(segs)


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@st.composite
def damage(draw: st.DrawFn) -> tuple[int, bytes]:
    """(index of the damaged segment, its new content). Positions are drawn uniformly
    over the records (hypothesis would otherwise favour the first bytes, the header)."""
    segs = original_wal()
    which = draw(st.sampled_from([len(segs) - 1, len(segs) - 1, 0, 1, len(segs) - 2]))
    buf = bytearray(segs[which][1])
    anywhere = st.sampled_from(range(HEADER_SIZE, len(buf)))
    kind = draw(st.sampled_from(["truncate", "truncate", "flip", "flip", "overwrite",
                                 "garbage", "mixed", "header"]))  # fmt: skip
    if kind in ("flip", "mixed", "header"):
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, HEADER_SIZE - 1) if kind == "header" else anywhere)
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    if kind == "overwrite":
        start = draw(anywhere)
        junk = draw(st.binary(min_size=1, max_size=64))
        buf[start : start + len(junk)] = junk
    if kind == "garbage":
        buf += draw(st.binary(min_size=1, max_size=200))
    if kind in ("truncate", "mixed"):
        into_header = draw(st.integers(0, 9)) == 0  # now and then, even the header
        del buf[draw(st.integers(0, HEADER_SIZE) if into_header else anywhere) :]
    return which, bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damage())
def test_recovery_keeps_the_valid_prefix_and_cuts_only_the_last_segment(
    case: tuple[int, bytes],
) -> None:
    which, content = case
    segs = original_wal()
    last = which == len(segs) - 1
    name, data, records = segs[which]
    header_ok = len(content) >= HEADER_SIZE and content[:12] == data[:12]  # 12..15 reserved
    first_bad = HEADER_SIZE + _first_difference(data[HEADER_SIZE:], content[HEADER_SIZE:])
    kept_here = [r for r in records if r.offset + r.size <= first_bad] if header_ok else []
    end = kept_here[-1].offset + kept_here[-1].size if kept_here else HEADER_SIZE
    if header_ok:  # the records kept are exactly those before the first changed byte
        assert scan(content).end == end
    bad_record = header_ok and bool(scan(content).error)
    event(f"{'last' if last else 'older'} segment: "
          f"{'bad header' if not header_ok else 'bad record' if bad_record else 'scans clean'}")
    surviving = [r for i, (_, _, recs) in enumerate(segs)
                 for r in (kept_here if i == which else recs)]  # fmt: skip
    checkpoint = max(r.lsn for r in surviving if r.kind == KIND_CHECKPOINT)
    want = [(r.lsn, r.payload) for r in surviving
            if r.kind != KIND_CHECKPOINT and r.lsn > checkpoint]  # fmt: skip
    originals = {r.lsn: r.payload for _, _, recs in segs for r in recs
                 if r.kind != KIND_CHECKPOINT}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "w1"
        d.mkdir()
        for i, (n, b, _) in enumerate(segs):
            (d / n).write_bytes(content if i == which else b)
        wal = WorkerWal(d, fsync=lambda fd: None)
        report = wal.open()  # never raises
        try:
            got = [(p.lsn, p.event) for p in wal.pending_events()]
            assert wal.acked == checkpoint
        finally:
            wal.close()
        # Older segments are never changed; the last one only cut at a record boundary.
        for i, (n, b, _) in enumerate(segs):
            if i != which:
                assert (d / n).read_bytes() == b
        after = (d / name).read_bytes()
        if last and header_ok:  # a torn append: cut off, not reported as damage
            assert after == content[:end]
            assert bool(report.truncated) == bad_record
            assert report.damaged == []
        else:  # damage: reported, the file left exactly as it is
            assert after == content
            assert report.truncated == []
            if not header_ok:
                assert [line for line in report.damaged if str(d / name) in line]
            elif bad_record:
                assert report.damaged == [f"{d / name}: corrupt at offset {end} "
                                          f"({scan(content).error})"]
            else:
                assert report.damaged == []
        # Exactly the surviving events above the checkpoint, each one as it was written.
        assert [lsn for lsn, _ in got] == [lsn for lsn, _ in want]
        for lsn, ev in got:
            assert ev == wal_event(originals[lsn])

        # A second recovery changes nothing.
        again = WorkerWal(d, fsync=lambda fd: None)
        report2 = again.open()
        try:
            assert [p.lsn for p in again.pending_events()] == [lsn for lsn, _ in got]
            assert report2.truncated == []
        finally:
            again.close()
        assert (d / name).read_bytes() == after


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=64))
def test_scan_never_raises_and_never_returns_a_corrupt_record(tail: bytes, head: bytes) -> None:
    data = original_wal()[0][1]
    cases = [(head + tail, 0), (data[:HEADER_SIZE] + tail, HEADER_SIZE),
             (data[: len(data) // 2] + tail, HEADER_SIZE)]
    for blob, start in cases:
        result = scan(blob, start)
        for r in result.records:
            raw = blob[r.offset : r.offset + r.size]
            assert struct.unpack_from("<I", raw)[0] == r.size
            assert crc64(raw[4:-8]) == struct.unpack_from("<Q", raw, r.size - 8)[0] == r.crc
        assert result.end <= len(blob)
