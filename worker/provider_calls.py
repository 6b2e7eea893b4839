"""How the worker calls its provider: in the IO lane, unless the provider never blocks.

Every provider call of the worker (JobService, the poller, the output reader) goes
through :func:`call_provider`, so "may this call block the event loop?" is decided in one
place, by the provider's own ``Capabilities.blocking``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from jennah.blocking import blocking
from providers.base import BatchProvider

P = ParamSpec("P")
R = TypeVar("R")


async def call_provider(
    provider: BatchProvider, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """``fn(*args, **kwargs)``, a call of ``provider``: on the event loop when the
    provider says its calls never block (dry, fake), else in the IO lane."""
    if not provider.capabilities.blocking:
        return fn(*args, **kwargs)
    return await blocking(fn, *args, **kwargs)
