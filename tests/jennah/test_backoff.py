"""``jennah.backoff.Backoff``: capped exponential waits with full jitter, randomness
injected."""

from __future__ import annotations

import math
import random

import pytest

from jennah.backoff import Backoff


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    b = Backoff(0.1, 1.0)
    assert [b.ceiling(n) for n in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    # random() = 1 is the ceiling itself, 0 no wait at all.
    assert [Backoff(0.1, 1.0, lambda: 1.0).delay(n) for n in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert Backoff(0.1, 1.0, lambda: 0.0).delay(5) == 0.0


def test_delays_are_full_jitter_below_the_ceiling() -> None:
    rng = random.Random(7)
    b = Backoff(0.05, 5.0, rng.random)
    for attempt in range(12):
        top = b.ceiling(attempt)
        delays = [b.delay(attempt) for _ in range(400)]
        assert all(0.0 <= d < top for d in delays)
        # Spread over the whole range, from near 0 to near the ceiling.
        assert min(delays) < 0.05 * top and max(delays) > 0.95 * top
    assert Backoff(0.2, 5.0, lambda: 0.5).delay(3) == pytest.approx(0.8)


def test_a_huge_attempt_stays_at_the_cap() -> None:
    b = Backoff(0.2, 5.0, lambda: 0.999)
    for attempt in (64, 1100, 10**6):
        assert b.ceiling(attempt) == 5.0
        assert b.delay(attempt) == pytest.approx(4.995)
        assert math.isfinite(b.delay(attempt))
    assert b.ceiling(-3) == 0.2  # before the first failure: the base


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_base_outside_0_to_cap_is_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base, cap)
