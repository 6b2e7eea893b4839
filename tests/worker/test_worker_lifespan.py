"""The worker's start and stop order (worker/lifespan.py, docs/design.md §5): each step is
recorded by a stand-in, and the two stop phases must run their steps in the documented
order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from database.memory import MemoryStore
from jennah.models import JobEvent
from providers.base import BatchProvider
from worker import lifespan as lifespan_module
from worker.commit import GroupCommitter
from worker.leases import LeaseKeeper
from worker.lifespan import HandOver, Lifespan


class Steps:
    def __init__(self) -> None:
        self.done: list[str] = []

    def __call__(self, step: str) -> None:
        self.done.append(step)


class RecordingStore(MemoryStore):
    def __init__(self, steps: Steps) -> None:
        super().__init__()
        self.steps = steps

    def migrate(self) -> list[str]:
        self.steps("migrate store")
        return super().migrate()

    def close(self) -> None:
        self.steps("close store")


class RecordingLog:
    """An ExecutionLog that records start, flush and close."""

    ready = True

    def __init__(self, steps: Steps) -> None:
        self.steps = steps

    async def start(self) -> None:
        self.steps("start execution log")

    async def append(self, events: Sequence[JobEvent]) -> None:
        return None

    def pending_ends(self, job_id: str) -> dict[Any, int]:
        return {}

    def take_resync(self) -> set[str]:
        return set()

    async def flush_job(self, job_id: str, timeout: float) -> bool:
        return True

    async def flush(self, timeout: float) -> bool:
        self.steps("flush execution log")
        return True

    async def health(self) -> tuple[bool, str]:
        return True, "recording"

    async def close(self) -> None:
        self.steps("close execution log")


class Closes:
    """A provider or a committer: only ``close`` is used at shutdown."""

    def __init__(self, steps: Steps, what: str) -> None:
        self.steps, self.what = steps, what

    def close(self) -> None:
        self.steps(f"close {self.what}")


class AsyncCloses(Closes):
    async def close(self) -> None:  # type: ignore[override]
        self.steps(f"close {self.what}")


LEASE_LOOP_STOPPED = "lease loop stopped"


def build(steps: Steps, monkeypatch: pytest.MonkeyPatch) -> Lifespan:
    store = RecordingStore(steps)

    async def sleep(seconds: float) -> None:  # the lease loops wait here until cancelled
        try:
            await asyncio.Event().wait()
        finally:
            steps(LEASE_LOOP_STOPPED)

    leases = LeaseKeeper(store, "w1", 30.0, 5.0, sleep=sleep)
    released = iter([2, 0, 1, 0])  # the first pass hands over 2 jobs, the second 1

    async def release() -> int:
        steps("release leases")
        return next(released)

    async def nudge(peers: Sequence[str], token: str) -> int:
        steps("nudge peers")
        return 0

    monkeypatch.setattr(lifespan_module, "nudge_peers", nudge)

    async def poller() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            steps("poller stopped")

    async def drain(timeout: float) -> bool:
        steps("wait for detached submits")
        return True

    return Lifespan(
        store=store, provider=cast(BatchProvider, Closes(steps, "provider")),
        committer=cast(GroupCommitter, AsyncCloses(steps, "committer")),
        events=RecordingLog(steps), leases=leases, loops=[poller],
        hand_over=HandOver(release, store, worker_id="w1", self_url="http://w1", token="",
                           max_age_seconds=15),
        stop_accepting=lambda: steps("stop taking jobs"), drain_detached=drain,
        grace_seconds=1.0,
    )  # fmt: skip


def ordered(steps: Steps) -> list[str]:
    """The steps in order, without the lease loops' own ends (they stop concurrently)."""
    return [s for s in steps.done if s != LEASE_LOOP_STOPPED]


def test_the_stop_signal_hands_over_first_and_the_lifespan_end_then_flushes_and_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = Steps()
    lifespan = build(steps, monkeypatch)

    async def go() -> None:
        await lifespan.start()
        assert steps.done == ["migrate store", "start execution log"]
        await asyncio.sleep(0.05)  # the loops run
        steps.done.clear()
        lifespan.on_stop_signal()  # phase 1: before the server drains
        for _ in range(100):
            await asyncio.sleep(0.01)
            if steps.done.count("nudge peers") == 1:
                break
        # The renew and claim loops are stopped; the poller is not (it still finishes jobs).
        assert steps.done.count(LEASE_LOOP_STOPPED) == 2
        assert ordered(steps) == ["stop taking jobs", "release leases", "nudge peers",
                                  "release leases"]  # fmt: skip
        steps.done.clear()
        await lifespan.stop()  # phase 2: the lifespan ends

    asyncio.run(go())
    assert ordered(steps) == [
        "stop taking jobs", "poller stopped", "release leases", "nudge peers",
        "release leases", "flush execution log", "wait for detached submits",
        "close execution log", "close committer", "close provider", "close store",
    ]
