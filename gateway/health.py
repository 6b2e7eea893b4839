"""The gateway's view of which workers exist and which answer (docs/design.md §1).

Two sources feed it:

* **Active checks**: a background task sends ``GET <url>/health`` to every worker every
  ``interval`` seconds (each with a ``timeout``). A failure marks the worker down at once;
  the next success marks it up again. There is no hysteresis on purpose: a worker that
  answers ``/health`` gets traffic back within one interval, and a forwarding failure
  takes it out again immediately (below).
* **Passive failures**: the forwarder calls :meth:`HealthView.mark_down` when a call to
  a worker fails at the transport level, so the next calls skip it without waiting for
  the next check.

A worker never checked is assumed up, so a fresh gateway forwards at once.

Membership is the static ``WORKER_ENDPOINTS`` list plus, when a ``discover`` callback is
given, whatever it returns (the store's worker membership rows). A failing discovery
keeps the previous list. Listeners are told about every membership change, so the ring
and the per-worker clients follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from pyqwest import Client

from database.base import JobStore
from jennah.blocking import blocking

log = logging.getLogger("jennah.gateway.health")

Discover = Callable[[], Awaitable[list[str]]]
MembershipListener = Callable[[tuple[str, ...]], None]


class HealthView:
    """Up/down state per worker URL, kept fresh by a background task."""

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        interval: float,
        timeout: float = 1.0,
        client: Client | None = None,
        discover: Discover | None = None,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self._client = client or Client()
        self._discover = discover
        self._static = tuple(dict.fromkeys(endpoints))
        self._members: tuple[str, ...] = self._static
        self._up: dict[str, bool] = {}
        self._listeners: list[MembershipListener] = []
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    @property
    def members(self) -> tuple[str, ...]:
        return self._members

    def subscribe(self, listener: MembershipListener) -> None:
        """Call ``listener(members)`` now and after every membership change."""
        self._listeners.append(listener)
        listener(self._members)

    def healthy(self, url: str) -> bool:
        """False only if the last check or forward to ``url`` failed."""
        return self._up.get(url, True)

    def known_state(self, url: str) -> bool | None:
        """The last observation (None: never checked)."""
        return self._up.get(url)

    def healthy_count(self) -> int:
        return sum(1 for url in self._members if self.healthy(url))

    def mark_down(self, url: str) -> None:
        if self._up.get(url, True):
            log.warning("worker %s marked down", url)
        self._up[url] = False

    def mark_up(self, url: str) -> None:
        if self._up.get(url) is False:
            log.info("worker %s is back up", url)
        self._up[url] = True

    def set_members(self, urls: Sequence[str]) -> None:
        members = tuple(dict.fromkeys((*self._static, *urls)))
        if members == self._members:
            return
        log.info("worker membership: %s", ", ".join(members) or "(none)")
        self._members = members
        for gone in set(self._up) - set(members):
            del self._up[gone]
        for listener in self._listeners:
            listener(members)

    async def probe(self, url: str) -> bool:
        """One ``GET <url>/health``: True for HTTP 200 within the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self._client.get(f"{url}/health")
        except Exception as exc:  # refused, reset, timeout, protocol error: all mean down
            log.debug("health check of %s failed: %s", url, exc)
            return False
        return resp.status == 200

    async def check_once(self) -> None:
        """Refresh membership (if discovering), then probe every member concurrently."""
        if self._discover is not None:
            try:
                self.set_members(await self._discover())
            except Exception as exc:  # the store may be down: keep the last list
                log.warning("worker discovery failed, keeping %d members: %s",
                            len(self._members), exc)
        members = self._members
        results = await asyncio.gather(*(self.probe(url) for url in members))
        for url, ok in zip(members, results, strict=True):
            if ok:
                self.mark_up(url)
            else:
                self.mark_down(url)
        self.rounds += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_once()

    async def start(self) -> None:
        """First round inline (so readiness is real from the start), then the loop."""
        await self.check_once()
        self._task = asyncio.create_task(self.run(), name="gateway-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def store_discovery(store: JobStore, max_age_seconds: float) -> Discover:
    """A ``discover`` callback listing the endpoints of workers that heartbeat recently."""

    async def discover() -> list[str]:
        workers = await blocking(store.list_workers, max_age_seconds)
        return sorted({w.endpoint.rstrip("/") for w in workers if w.endpoint})

    return discover
