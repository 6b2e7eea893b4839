"""The one backoff of Jennah: capped exponential, full jitter.

Every retry loop (the client, the providers, the stores, the event sender) waits
``backoff.delay(attempt)`` between tries, where ``attempt`` counts the failures so far
from 0. Full jitter (uniform in ``[0, min(cap, base * 2**attempt))``) spreads the retries
of many callers that failed together. The randomness is injected (``random``), and so is
the sleep, by whoever sleeps, so that tests run in microseconds and deterministically.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field

# 2**40 is far above any cap; bounding the exponent keeps the float finite.
_MAX_EXPONENT = 40


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter (module docstring)."""

    base: float
    cap: float
    random: Callable[[], float] = field(default=_random.random, compare=False)

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"Backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay ``delay(attempt)`` can return."""
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failure number ``attempt`` (0 for the first)."""
        return float(self.random() * self.ceiling(attempt))
