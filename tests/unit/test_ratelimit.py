"""Token buckets over explicit times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.ratelimit import RateLimiter, TokenBucket, max_age_for


def test_burst_then_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.check("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a", 0.0) == 0.5
    assert limiter.check("a", 0.5) == 0.0
    assert limiter.check("a", 0.5) > 0
    assert limiter.limited == 2


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.check("flood", 0.0) == 0.0
    assert limiter.check("flood", 0.0) > 0
    assert limiter.check("quiet", 0.0) == 0.0


def test_table_is_bounded_and_forgets_the_longest_idle() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_keys=3)
    for index in range(100):
        limiter.check(f"peer{index}", float(index))
    assert len(limiter) == 3
    assert limiter.evicted == 97


def test_disabled_when_rate_is_zero() -> None:
    limiter = RateLimiter(rate=0, burst=0)
    assert all(limiter.check("a", 0.0) == 0.0 for _ in range(1000))


def test_clock_going_backwards_mints_nothing() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1.0, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) > 0
    assert bucket.take(10.5) > 0


def test_max_age() -> None:
    assert max_age_for(0.01) == 1
    assert max_age_for(2.2) == 3
    assert max_age_for(float("inf")) == 3600


@given(
    rate=st.floats(0.1, 100),
    burst=st.floats(1, 100),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        if limiter.check("k", now) == 0.0:
            allowed += 1
    assert allowed <= burst + rate * now + 1e-6
