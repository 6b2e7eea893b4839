"""The retry loop of the cloud providers' calls: capped exponential backoff with full
jitter (``jennah.backoff``).

Cloud batch APIs throttle (HTTP 429, gRPC RESOURCE_EXHAUSTED, AWS ``Throttling*``) and
have brief 5xx blips. Each adapter first translates its vendor error into a
``ProviderError``; this module retries the ones marked ``retryable`` a bounded number of
times, so that a throttled poll or submit usually succeeds without the worker noticing,
and a real outage still surfaces quickly as ``ProviderUnavailable``.

The SDKs' own retry layers are switched off by the adapters (one place decides how long
we wait). Sleep and randomness are injected so that tests run in microseconds.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from jennah.backoff import Backoff
from jennah.errors import ProviderError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How many times, and how patiently, a retryable provider call is repeated."""

    attempts: int = 5
    base_seconds: float = 0.2
    cap_seconds: float = 5.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    random: Callable[[], float] = field(default=random.random, compare=False)
    _backoff: Backoff = field(init=False, repr=False, compare=False)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; on a retryable ``ProviderError`` wait and try again, at most
        ``attempts`` times in all, then re-raise the last error."""
        for attempt in range(self.attempts):
            try:
                return fn()
            except ProviderError as exc:
                if not exc.retryable or attempt + 1 >= self.attempts:
                    raise
                delay = self._backoff.delay(attempt)
                log.info("%s: %s; retry %d in %.2fs", what, exc, attempt + 1, delay)
                self.sleep(delay)
        raise AssertionError("unreachable: attempts must be at least 1")

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        object.__setattr__(self, "_backoff",
                           Backoff(self.base_seconds, self.cap_seconds, self.random))
