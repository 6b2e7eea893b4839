"""The async sender: durable, unacknowledged WAL events → the store, in LSN order.

At least once on the wire, exactly once in the stream: a batch is acknowledged (a
CHECKPOINT record) only after the store placed it, so a crash in between resends it, and
the store recognises the copy by its dedup key (or, for output, by its byte range).
While the store is down the sender retries forever, with capped exponential backoff and
full jitter (``jennah.backoff``). Stopping the process cancels the sender and nothing
else: unsent events are never marked failed; they stay in the WAL and go out at the next
start.

What the store did with each event goes to ``on_placed``; events ``skip`` names are
acknowledged without being sent (output the store already refused for being out of
order: the producer reads it again from the store's offsets).
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio

from jennah.backoff import Backoff
from jennah.models import JobEvent, Placed
from worker.wal.metrics import WalMetrics
from worker.wal.segments import Pending, Segment, WorkerWal

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where events end up: ``deliver`` places each event (``JobStore``
    ``append_execution_events`` semantics) and returns what it did, in order; it raises
    when the store cannot be reached. Delivery is at least once."""

    async def deliver(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]: ...


@dataclass(frozen=True)
class SenderConfig:
    max_batch_events: int = 500
    max_batch_bytes: int = 1 << 20
    backoff_base: float = 0.05
    backoff_cap: float = 5.0


DEFAULT_CONFIG = SenderConfig()


class Sender:
    """Moves events from the WAL to the sink, one batch at a time."""

    def __init__(
        self,
        sink: EventSink,
        wal: WorkerWal,
        metrics: WalMetrics,
        config: SenderConfig = DEFAULT_CONFIG,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        random: Callable[[], float] = _random.random,
        skip: Callable[[Pending], bool] = lambda p: False,
        on_placed: Callable[[list[tuple[Placed, JobEvent]]], None] | None = None,
        on_acked: Callable[[list[Segment]], Awaitable[None]] | None = None,
    ) -> None:
        self._sink = sink
        self._wal = wal
        self._metrics = metrics
        self._config = config
        self._sleep = sleep
        self._backoff = Backoff(config.backoff_base, config.backoff_cap, random)
        self._skip = skip
        self._on_placed = on_placed
        self._on_acked = on_acked
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def recheck(self) -> None:
        """Let ``wait_until`` callers test their condition again (the queue changed
        without a delivery: events whose append failed were dropped from it)."""
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

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
                await self._sleep(self._backoff.delay(errors))
                errors += 1

    async def _step(self) -> None:
        cfg = self._config
        batch = self._wal.durable(cfg.max_batch_events, cfg.max_batch_bytes)
        if not batch:
            self._wake.clear()
            batch = self._wal.durable(cfg.max_batch_events, cfg.max_batch_bytes)
            if not batch:
                await self._wake.wait()
                return
        send = [p.event for p in batch if not self._skip(p)]
        placed = await self._deliver(send) if send else []
        if self._on_placed is not None and placed:
            self._on_placed(placed)
        done = self._wal.ack(batch[-1].lsn)
        self._metrics.pending.set(self._wal.pending)
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()
        if self._on_acked is not None and done:
            await self._on_acked(done)

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """The flush barrier: True once ``done()`` holds, False after ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            while not done():
                progress = self._progress
                self._wake.set()
                await progress.wait()
        return done()

    async def _deliver(self, events: list[JobEvent]) -> list[tuple[Placed, JobEvent]]:
        attempt = 0
        while True:
            try:
                return await self._sink.deliver(events)
            except Exception as e:
                self._metrics.failures.labels("deliver").inc()
                delay = self._backoff.delay(attempt)
                log.warning("WAL delivery of %d events failed (%s); retry in %.3fs",
                            len(events), e, delay)
                attempt += 1
                self._metrics.retries.inc()
                await self._sleep(delay)
