"""Delivery through ``WalExecutionLog`` (the ``ExecutionLog`` of ``worker/events.py``) to a
real store: append → durable → delivered → acknowledged → checkpoint; restarts resend
only what was not acknowledged; outages lose and double nothing; output the store
refuses; the flush barriers; one open file whatever the number of jobs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from database.memory import MemoryStore
from jennah.models import EventKind
from tests.worker.wal.test_wal_support import (
    RecordingSink,
    Stream,
    detail,
    key_of,
    metric,
    new_log,
    open_fds_under,
    output,
    running_job,
    segment_paths,
    stored,
    wait_for,
)
from worker.events import ExecutionLog
from worker.wal import SenderConfig
from worker.wal.codec import wal_payload
from worker.wal.format import KIND_CHECKPOINT, RECORD_OVERHEAD, scan
from worker.wal.metrics import wal_metrics


def test_append_is_durable_then_delivered_acknowledged_and_checkpointed(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    running_job(store, "job-1")
    sink = RecordingSink(store)
    registry = CollectorRegistry()
    out = Stream("job-1")
    evs = [out.next(f"line {i}\n") for i in range(5)] + [detail("job-1", "a")]

    async def main() -> None:
        log: ExecutionLog = new_log(tmp_path, sink, registry=registry)
        await log.start()
        await log.append(evs[:3])
        await log.append(evs[3:])
        assert await log.flush(5)
        assert metric(registry, "wal_pending_events") == 0
        await log.close()

    asyncio.run(main())
    assert [key_of(e) for e in stored(store, "job-1")] == [key_of(e) for e in evs]
    assert "".join(e.output for e in stored(store, "job-1")) == "".join(
        f"line {i}\n" for i in range(5))
    assert max(sink.sent.values()) == 1
    assert metric(registry, "wal_appends_total") == 6
    assert metric(registry, "wal_append_duration_seconds_count") == 2
    [segment] = segment_paths(tmp_path / "wal" / "w1")
    recs = scan(segment.read_bytes()).records
    events = [r.lsn for r in recs if r.kind != KIND_CHECKPOINT]
    assert events == [1, 2, 3, 4, 5, 6]
    checkpoints = [r.lsn for r in recs if r.kind == KIND_CHECKPOINT]
    assert checkpoints[0] == 0 and max(checkpoints) == 6  # acknowledged, durably


def test_restart_resends_exactly_what_was_not_acknowledged(tmp_path: Path) -> None:
    store = MemoryStore()
    for j in ("a", "b", "c"):
        running_job(store, j)
    streams = {j: Stream(j) for j in ("a", "b", "c")}
    first = RecordingSink(store)
    early = [streams["abc"[i % 3]].next(f"early {i}\n") for i in range(40)]
    late = [streams["abc"[i % 3]].next(f"late {i}\n") for i in range(15)]

    async def before_restart() -> None:
        log = new_log(tmp_path, first, close_timeout=0.05)
        for ev in early:
            await log.append([ev])
        assert await log.flush(5)
        first.down = True
        for ev in late:
            await log.append([ev])
        await log.close()  # the store is down: these 15 stay in the WAL, never failed

    second = RecordingSink(store)

    async def after_restart() -> None:
        log = new_log(tmp_path, second)
        await log.start()
        assert await log.flush(5)
        await log.close()

    asyncio.run(before_restart())
    assert set(first.sent) == {key_of(e) for e in early}
    asyncio.run(after_restart())
    assert [key_of(e) for e in second.sent_events] == [key_of(e) for e in late]
    for j in ("a", "b", "c"):
        got = stored(store, j)
        assert len({e.dedup_key for e in got}) == len(got)  # each event once
        assert "".join(e.output for e in got) == "".join(
            e.output for e in early + late if e.job_id == j)


def test_the_store_down_for_a_while_loses_and_doubles_nothing(tmp_path: Path) -> None:
    store = MemoryStore()
    jobs = [f"job-{i}" for i in range(3)]
    for j in jobs:
        running_job(store, j)
    sink = RecordingSink(store)
    sink.down = True
    registry = CollectorRegistry()
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    cfg = SenderConfig(max_batch_events=50, backoff_base=0.01, backoff_cap=0.08)

    async def main() -> None:
        log = new_log(tmp_path, sink, registry=registry, sleep=fake_sleep,
                      random=lambda: 1.0, sender_config=cfg)
        await log.start()
        streams = [Stream(j) for j in jobs]

        async def producer(s: Stream) -> None:
            for n in range(100):
                await log.append([s.next(f"{s.job_id} line {n}\n")])

        await asyncio.gather(*(producer(s) for s in streams))
        # Appends never wait for the store: all 300 are durable while it is down.
        assert metric(registry, "wal_pending_events") == 300
        assert not await log.flush(0.01)
        await wait_for(lambda: sink.failures >= 10)
        sink.down = False  # the store is back
        assert await log.flush(10)
        await log.close()

    asyncio.run(main())
    for j in jobs:
        got = stored(store, j)
        assert [e.output for e in got] == [f"{j} line {n}\n" for n in range(100)]
    assert max(sink.sent.values()) == 1, "an event was delivered twice"
    assert len(sink.sent) == 300
    assert sink.failures >= 10
    assert metric(registry, "wal_retries_total") == sink.failures
    assert metric(registry, "wal_failures_total", {"op": "deliver"}) == sink.failures
    assert metric(registry, "wal_pending_events") == 0
    # Backoff: exponential from the base, never above the cap (random() = 1.0 here).
    assert delays[:5] == [0.01, 0.02, 0.04, 0.08, 0.08]
    assert max(delays) == 0.08


def test_batches_respect_count_and_byte_caps(tmp_path: Path) -> None:
    store = MemoryStore()
    for j in range(3):
        running_job(store, f"job-{j}")
    sink = RecordingSink(store)
    cfg = SenderConfig(max_batch_events=7, max_batch_bytes=2000, backoff_base=0.01)
    streams = [Stream(f"job-{j}") for j in range(3)]

    async def main() -> None:
        sink.gate = asyncio.Event()
        log = new_log(tmp_path, sink, sender_config=cfg)
        for n in range(60):
            await log.append([streams[n % 3].next("x" * (n * 7 + 1))])
        sink.gate.set()
        assert await log.flush(5)
        await log.close()

    asyncio.run(main())
    assert sum(len(b) for b in sink.batches) == 60
    for batch in sink.batches:
        assert len(batch) <= 7
        size = sum(RECORD_OVERHEAD + len(wal_payload(e)) for e in batch)
        assert len(batch) == 1 or size <= 2000
    for s in streams:
        assert [e.end for e in stored(store, s.job_id)][-1] == s.end


def test_output_the_store_refuses_is_resynced_and_the_rest_skipped(tmp_path: Path) -> None:
    """Another producer stored bytes 0..15 of job x cut differently. Our WAL holds
    0..10 (a duplicate), 10..20 (refused: out of order) and 20..30 (read on the same
    wrong offsets): x must show up in take_resync, 20..30 must be acknowledged without
    being sent, and other jobs' events and x's non-output events still go in."""
    store = MemoryStore()
    running_job(store, "x")
    running_job(store, "y")
    store.append_execution_events([output("x", 0, "A" * 15)])
    sink = RecordingSink(store)
    cfg = SenderConfig(max_batch_events=1, backoff_base=0.001, backoff_cap=0.01)
    x = [output("x", 0, "a" * 10), output("x", 10, "b" * 10), output("x", 20, "c" * 10)]

    async def main() -> None:
        sink.gate = asyncio.Event()
        log = new_log(tmp_path, sink, sender_config=cfg)
        await log.start()
        await log.append([x[0], detail("y", "1"), x[1], x[2], detail("x", "2")])
        assert log.pending_ends("x") == {(0, 0, "stdout"): 30}
        sink.gate.set()
        assert await log.flush(5)
        assert not await log.flush_job("x", 0.01)  # refused output is not in the store
        assert log.pending_ends("x") == {}
        assert log.take_resync() == {"x"}
        assert log.take_resync() == set()
        # The poller reads again from the store's offsets, and the job flushes.
        offsets = store.output_offsets("x")
        assert offsets == {(0, 0, "stdout"): 15}
        await log.append([output("x", 15, "d" * 15)])
        assert await log.flush_job("x", 5)
        await log.close()

    asyncio.run(main())
    sent = {e.dedup_key for e in sink.sent_events}
    assert x[2].dedup_key not in sent  # acknowledged without being sent
    assert {x[0].dedup_key, x[1].dedup_key, "detail:1", "detail:2"} <= sent
    assert "".join(e.output for e in stored(store, "x")) == "A" * 15 + "d" * 15
    assert [e.dedup_key for e in stored(store, "y")] == ["detail:1"]
    assert [e.dedup_key for e in stored(store, "x") if e.kind is EventKind.STATUS_DETAIL] == [
        "detail:2"]


def test_flush_job_waits_for_the_job_and_pending_ends_shows_what_is_on_its_way(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    running_job(store, "x")
    running_job(store, "y")
    sink = RecordingSink(store)

    async def main() -> None:
        sink.gate = asyncio.Event()
        log = new_log(tmp_path, sink)
        assert await log.flush_job("x", 0.01)  # nothing appended: flushed
        await log.append([output("x", 0, "0123456789"), output("x", 0, "err", "stderr")])
        await log.append([output("x", 10, "x" * 15), detail("y", "1")])
        assert log.pending_ends("x") == {(0, 0, "stdout"): 25, (0, 0, "stderr"): 3}
        assert log.pending_ends("y") == {}
        assert not await log.flush_job("x", 0.02)
        assert stored(store, "x") == []
        sink.gate.set()
        assert await log.flush_job("x", 5)
        # True means in the store, now.
        assert store.output_offsets("x") == {(0, 0, "stdout"): 25, (0, 0, "stderr"): 3}
        assert log.pending_ends("x") == {}
        await log.close()

    asyncio.run(main())


def test_flush_job_after_a_restart_waits_for_the_recovered_events(tmp_path: Path) -> None:
    store = MemoryStore()
    running_job(store, "x")
    down = RecordingSink(store)
    down.down = True

    async def before() -> None:
        log = new_log(tmp_path, down, close_timeout=0.01)
        await log.append([output("x", 0, "before the restart\n")])
        await log.close()

    asyncio.run(before())
    sink = RecordingSink(store)

    async def after() -> None:
        sink.gate = asyncio.Event()
        log = new_log(tmp_path, sink)
        await log.start()
        assert log.pending_ends("x") == {(0, 0, "stdout"): 19}
        assert not await log.flush_job("x", 0.02), "the recovered output is not stored yet"
        sink.gate.set()
        assert await log.flush_job("x", 5)
        assert store.output_offsets("x") == {(0, 0, "stdout"): 19}
        await log.close()

    asyncio.run(after())


def test_one_open_file_however_many_jobs_append(tmp_path: Path) -> None:
    store = MemoryStore()
    jobs = [f"job-{i}" for i in range(60)]
    for j in jobs:
        running_job(store, j)
    sink = RecordingSink(store)
    wal_dir = tmp_path / "wal" / "w1"
    seen: list[int] = []

    async def main() -> None:
        log = new_log(tmp_path, sink, segment_bytes=8192)
        await log.start()
        streams = [Stream(j) for j in jobs]
        for wave in range(4):
            await asyncio.gather(*(log.append([s.next(f"wave {wave} {s.job_id}\n" * 3)])
                                   for s in streams))
            seen.append(len(open_fds_under(wal_dir, writable=True)))
        assert await log.flush(5)
        await wait_for(lambda: not log.wal.done_segments())  # archived, deleted
        seen.append(len(open_fds_under(wal_dir)))
        await log.close()

    asyncio.run(main())
    assert seen == [1] * 5
    assert open_fds_under(wal_dir) == []
    assert len(list((tmp_path / "archive" / "w1").glob("*.wal.zst"))) >= 2  # it rolled
    for s in jobs:
        assert len(stored(store, s)) == 4


@pytest.mark.parametrize("stop_during", ["deliver", "backoff"])
def test_stopping_never_marks_events_failed(tmp_path: Path, stop_during: str) -> None:
    store = MemoryStore()
    running_job(store, "x")
    sink = RecordingSink(store)
    sink.down = stop_during == "backoff"
    evs = [detail("x", str(n)) for n in range(5)]

    async def stop() -> None:
        if stop_during == "deliver":
            sink.gate = asyncio.Event()  # the delivery hangs until cancelled
        log = new_log(tmp_path, sink, close_timeout=0.01)
        await log.append(evs)
        await wait_for(lambda: sink.calls > 0)
        await log.close()

    asyncio.run(stop())
    assert stored(store, "x") == []
    fresh = RecordingSink(store)

    async def restart() -> None:
        log = new_log(tmp_path, fresh)
        await log.start()
        assert await log.flush(5)
        await log.close()

    asyncio.run(restart())
    assert [key_of(e) for e in fresh.sent_events] == [key_of(e) for e in evs]
    assert [e.dedup_key for e in stored(store, "x")] == [e.dedup_key for e in evs]


def test_metric_names_are_the_contract(tmp_path: Path) -> None:
    assert wal_metrics() is wal_metrics()  # the process registry is registered once
    registry = CollectorRegistry()
    store = MemoryStore()
    running_job(store, "x")

    async def main() -> None:
        log = new_log(tmp_path, RecordingSink(store), registry=registry, segment_bytes=4096)
        for i in range(60):
            await log.append([output("x", i * 100, "z" * 100)])
        assert await log.flush(5)
        await wait_for(lambda: not log.wal.done_segments())
        await log.close()

    asyncio.run(main())
    text = generate_latest(registry).decode()
    for name in ("wal_appends_total 60.0", "wal_append_duration_seconds_bucket",
                 "wal_append_duration_seconds_count 60.0", "wal_pending_events 0.0",
                 "wal_retries_total 0.0", "wal_write_errors_total 0.0",
                 "wal_archive_size_bytes"):
        assert name in text, name
    assert "# TYPE wal_failures_total counter" in text
    assert metric(registry, "wal_archive_size_bytes") > 0
    counts = Counter(line.split("{")[0].split(" ")[0] for line in text.splitlines()
                     if line.startswith("wal_"))
    assert counts["wal_pending_events"] == 1


def test_nothing_is_delivered_before_it_is_durable(tmp_path: Path) -> None:
    store = MemoryStore()
    running_job(store, "x")
    sink = RecordingSink(store)
    syncing, release = threading.Event(), threading.Event()
    hold = threading.Event()

    def fsync(fd: int) -> None:
        if hold.is_set():
            syncing.set()
            assert release.wait(10)
        os.fdatasync(fd)

    async def main() -> None:
        log = new_log(tmp_path, sink, fsync=fsync)
        await log.start()
        hold.set()
        task = asyncio.create_task(log.append([detail("x", "slow")]))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, syncing.wait, 10)
        assert log.wal.pending == 1  # written, not yet durable
        for _ in range(20):  # the sender is told to look, and looks
            log._sender.wake()
            await asyncio.sleep(0)
        assert sink.calls == 0 and not task.done()
        hold.clear()
        release.set()
        await task
        assert await log.flush(5)
        await log.close()

    asyncio.run(main())
    assert [e.dedup_key for e in stored(store, "x")] == ["detail:slow"]


def test_segments_with_undelivered_events_stay_across_restarts(tmp_path: Path) -> None:
    """Only segments whose events are all acknowledged are archived and deleted: with
    the store down over two runs, every segment stays, and the third run delivers it all."""
    store = MemoryStore()
    running_job(store, "x")
    out = Stream("x")
    evs = [out.next(f"line {i}\n" * 4) for i in range(80)]
    down = RecordingSink(store)
    down.down = True

    async def run(sink: RecordingSink, append: bool) -> None:
        log = new_log(tmp_path, sink, segment_bytes=2048, close_timeout=0.01)
        await log.start()
        if append:
            for ev in evs:
                await log.append([ev])
        else:
            assert log.recovery is not None and log.recovery.pending == len(evs)
            if not sink.down:
                assert await log.flush(5)
        await log.close()

    asyncio.run(run(down, append=True))
    segments = segment_paths(tmp_path / "wal" / "w1")
    assert len(segments) >= 4
    asyncio.run(run(down, append=False))
    assert all(p.exists() for p in segments)
    assert not (tmp_path / "archive" / "w1").exists()
    up = RecordingSink(store)
    asyncio.run(run(up, append=False))
    assert "".join(e.output for e in stored(store, "x")) == "".join(e.output for e in evs)
    assert len(up.sent) == len(evs) and max(up.sent.values()) == 1
