"""The one backoff: the bounds of its full jitter, its cap, and its reset after a stable period.

Expected figures are written out here (worked by hand from "base doubling to a cap"), not read
from the module."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.backoff import Backoff, Retries


class Highest(random.Random):
    """A generator that always draws the top of the range: the wait is then the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_ceilings_double_from_the_base_up_to_the_cap() -> None:
    hub = Backoff(base_s=0.5, cap_s=60.0)
    assert [hub.ceiling(n) for n in range(10)] == [0, 0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert Backoff(base_s=1.0, cap_s=30.0).ceiling(10_000) == 30.0  # a long outage: no overflow


def test_the_wait_is_drawn_between_zero_and_the_ceiling() -> None:
    seen: list[tuple[float, float]] = []

    class Recording(random.Random):
        def uniform(self, a: float, b: float) -> float:
            seen.append((a, b))
            return a

    policy = Backoff(base_s=0.2, cap_s=30.0)
    assert policy.delay(3, Recording()) == 0.0
    assert policy.delay(3, Highest()) == 0.8
    assert seen == [(0.0, 0.8)]


@given(st.integers(1, 40), st.integers(0, 2**32))
def test_full_jitter_stays_within_its_bounds(failures: int, seed: int) -> None:
    policy = Backoff(base_s=0.5, cap_s=30.0)
    top = min(30.0, 0.5 * 2 ** (failures - 1))
    assert 0.0 <= policy.delay(failures, random.Random(seed)) <= top


def test_full_jitter_spreads_over_the_whole_range() -> None:
    # A fleet that failed together must not come back together: draws cover 0 to the ceiling.
    rng = random.Random(7)
    waits = [Backoff(base_s=1.0, cap_s=8.0).delay(4, rng) for _ in range(2000)]
    assert min(waits) < 0.1 * 8
    assert max(waits) > 0.9 * 8
    assert sum(waits) / len(waits) == pytest.approx(4.0, rel=0.1)


def test_without_an_rng_the_shared_generator_draws() -> None:
    random.seed(3)
    first = Backoff(base_s=1.0, cap_s=8.0).delay(4)
    random.seed(3)
    assert Backoff(base_s=1.0, cap_s=8.0).delay(4) == first
    assert 0.0 <= first <= 8.0


def test_retries_count_consecutive_failures() -> None:
    retries = Retries(Backoff(base_s=0.5, cap_s=4.0), Highest())
    assert [retries.failed(float(t)) for t in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert retries.failures == 6


def test_a_connection_that_stayed_up_long_enough_starts_the_count_over() -> None:
    retries = Retries(Backoff(base_s=1.0, cap_s=60.0, stable_s=30.0), Highest())
    assert [retries.failed(0.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    retries.succeeded(100.0)
    assert retries.failed(130.0) == 1.0  # up for 30 s: stable
    assert retries.failures == 1


def test_a_connection_that_drops_at_once_keeps_backing_off() -> None:
    retries = Retries(Backoff(base_s=1.0, cap_s=60.0, stable_s=30.0), Highest())
    assert [retries.failed(0.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    retries.succeeded(100.0)
    assert retries.failed(129.9) == 8.0  # up for less than 30 s: a flap, not a recovery
    retries.succeeded(200.0)
    assert retries.failed(210.0) == 16.0
    # A failure without a connection in between does not count as "up since" the last one.
    assert retries.failed(1000.0) == 32.0


def test_stable_is_measured_from_the_last_success() -> None:
    policy = Backoff(base_s=1.0, cap_s=60.0, stable_s=10.0)
    assert not policy.stable(9.99)
    assert policy.stable(10.0)
