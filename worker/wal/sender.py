"""The async sender: durable, unacknowledged WAL events → an idempotent sink.

At least once: a batch is acknowledged (a CHECKPOINT record) only after the sink took it,
so a crash in between resends it and the sink's ``(job_id, seq)`` key drops the copy.
While the sink is down the sender retries forever, with capped exponential backoff and
full jitter. Stopping the process cancels the sender and nothing else: unsent events are
never marked failed; they stay in the WAL and go out at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.to_thread

from database.base import JobStore
from jennah.models import JobEvent
from worker.wal.joblog import JobLog, Pending
from worker.wal.metrics import WalMetrics

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where events end up. ``deliver`` raises on failure; it must be idempotent on
    ``(job_id, seq)`` because delivery is at least once."""

    async def deliver(self, events: Sequence[JobEvent]) -> None: ...


class StoreSink:
    """Delivers to the store's event table (``JobStore.append_events`` is idempotent)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def deliver(self, events: Sequence[JobEvent]) -> None:
        # Abandoned on cancel: a hung store must not hold up shutdown; unacknowledged
        # events are simply sent again at the next start.
        await anyio.to_thread.run_sync(
            self._store.append_events, list(events), abandon_on_cancel=True
        )


@dataclass(frozen=True)
class SenderConfig:
    max_batch_events: int = 500
    max_batch_bytes: int = 1 << 20
    backoff_base: float = 0.05
    backoff_cap: float = 5.0


DEFAULT_CONFIG = SenderConfig()


def backoff_delay(attempt: int, base: float, cap: float, rnd: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return float(rnd() * min(cap, base * (2 ** min(attempt, 40))))


class Sender:
    """Moves events from the open logs to the sink, one batch at a time."""

    def __init__(
        self,
        sink: EventSink,
        logs: Callable[[], Iterable[JobLog]],
        metrics: WalMetrics,
        config: SenderConfig = DEFAULT_CONFIG,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        random: Callable[[], float] = _random.random,
        on_acked: Callable[[list[JobLog]], Awaitable[None]] | None = None,
    ) -> None:
        self._sink = sink
        self._logs = logs
        self._metrics = metrics
        self._config = config
        self._sleep = sleep
        self._random = random
        self._on_acked = on_acked
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._rotate = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever (until cancelled)."""
        errors = 0
        while True:
            try:
                await self._step()
                errors = 0
            except Exception:
                # A bug or an I/O error outside delivery: never let the sender die of it.
                log.exception("WAL sender step failed")
                self._metrics.failures.labels("sender").inc()
                await self._sleep(backoff_delay(
                    errors, self._config.backoff_base, self._config.backoff_cap, self._random))
                errors += 1

    async def _step(self) -> None:
        batch = self._collect()
        if not batch:
            self._wake.clear()
            batch = self._collect()
            if not batch:
                await self._wake.wait()
                return
        await self._deliver([p.event for _, p in batch])
        await self._acknowledge(batch)

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """The flush barrier: True once ``done()`` holds, False after ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            while not done():
                progress = self._progress
                self._wake.set()
                await progress.wait()
        return done()

    def _collect(self) -> list[tuple[JobLog, Pending]]:
        cfg = self._config
        logs = list(self._logs())
        if not logs:
            return []
        self._rotate = (self._rotate + 1) % len(logs)
        batch: list[tuple[JobLog, Pending]] = []
        size = 0
        for jl in logs[self._rotate :] + logs[: self._rotate]:
            room = cfg.max_batch_events - len(batch)
            if room <= 0 or (batch and size >= cfg.max_batch_bytes):
                break
            for p in jl.durable_pending(room, cfg.max_batch_bytes - size, not batch):
                batch.append((jl, p))
                size += p.size
        return batch

    async def _deliver(self, events: list[JobEvent]) -> None:
        attempt = 0
        while True:
            try:
                await self._sink.deliver(events)
                return
            except Exception as e:
                self._metrics.failures.labels("deliver").inc()
                delay = backoff_delay(
                    attempt, self._config.backoff_base, self._config.backoff_cap, self._random
                )
                log.warning("WAL delivery of %d events failed (%s); retry in %.3fs",
                            len(events), e, delay)
                attempt += 1
                self._metrics.retries.inc()
                await self._sleep(delay)

    async def _acknowledge(self, batch: list[tuple[JobLog, Pending]]) -> None:
        upto: dict[JobLog, int] = {}
        for jl, p in batch:
            upto[jl] = max(upto.get(jl, 0), p.seq)
        for jl, seq in upto.items():
            try:
                await jl.checkpoint_async(seq)
            except Exception as e:
                # Delivered anyway; a lost checkpoint only means a resend after a restart.
                self._metrics.failures.labels("checkpoint").inc()
                log.warning("WAL checkpoint of %s failed: %s", jl.path, e)
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()
        if self._on_acked is not None:
            await self._on_acked(list(upto))
