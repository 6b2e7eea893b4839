"""Wake-ups for watchers: "the tenant has new events" (docs/design.md §6 "Watching").

A worker's own commits call :meth:`Notifier.notify`, so its watchers see their events at
once. Events committed by other workers raise no signal here; a watcher finds them with
its cursor query when :meth:`Notifier.wait` times out (at most ``WATCH_POLL_SECONDS``).
Only tenants somebody is waiting for are tracked, so an idle worker keeps nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


class Notifier:
    """One asyncio event per watched tenant, replaced each time it fires."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}

    def notify(self, tenants: Iterable[str]) -> None:
        for tenant in tenants:
            event = self._events.pop(tenant, None)
            if event is not None:
                event.set()

    async def wait(self, tenant: str, timeout: float) -> bool:
        """Return True when the tenant has new events, False after ``timeout``."""
        event = self._events.get(tenant)
        if event is None:
            event = self._events[tenant] = asyncio.Event()
        self._waiters[tenant] = self._waiters.get(tenant, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
            return event.is_set()
        finally:
            left = self._waiters[tenant] - 1
            if left:
                self._waiters[tenant] = left
            else:
                del self._waiters[tenant]
                if self._events.get(tenant) is event:
                    del self._events[tenant]

    @property
    def watched(self) -> int:
        """How many tenants have a waiter now."""
        return len(self._waiters)
