"""Stop hooks: what a process runs the moment it is asked to stop.

The serving layer calls :func:`run_stop_hooks` from its SIGTERM/SIGINT handler, *before*
the server drains its in-flight calls; a worker registers a hook that hands its leases
over at once instead of after the drain (docs/design.md §4). Hooks run in the signal
handler, so they must only schedule work (``loop.call_soon_threadsafe``). This module
sits in the shared kernel so that the roles and the serving entry point meet here
without importing each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("jennah.lifecycle")

_STOP_HOOKS: list[Callable[[], None]] = []
_stop_hooks_ran = False


def on_stop_signal(hook: Callable[[], None]) -> None:
    """Run ``hook`` (once) when the process is asked to stop (uvicorn and hypercorn; under
    pyvoy the app lives in Envoy, which hears of the stop only after the drain)."""
    _STOP_HOOKS.append(hook)


def run_stop_hooks() -> None:
    """Run every registered hook, once per process; a failing hook never stops the rest."""
    global _stop_hooks_ran
    if _stop_hooks_ran:
        return
    _stop_hooks_ran = True
    for hook in list(_STOP_HOOKS):
        try:
            hook()
        except Exception:
            log.exception("stop hook failed")
