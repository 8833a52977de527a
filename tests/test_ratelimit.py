"""Token buckets and the strike count, with time passed in explicitly."""

from __future__ import annotations

import pytest

from musicsync.ratelimit import (
    ABUSE_STRIKES,
    CONTROL_BURST,
    CONTROL_RATE_PER_SECOND,
    PING_BURST,
    PING_RATE_PER_SECOND,
    RateLimiter,
    TokenBucket,
    Verdict,
)

T = 1000.0  # an arbitrary monotonic origin, in seconds


def test_documented_limits() -> None:
    assert CONTROL_RATE_PER_SECOND == 10.0
    assert CONTROL_BURST == 20.0
    assert PING_RATE_PER_SECOND == 30.0
    assert PING_BURST == 60.0
    assert ABUSE_STRIKES == 40


def test_bucket_starts_full() -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0)
    assert bucket.tokens == 20.0
    assert bucket.updated is None


def test_bucket_with_explicit_tokens_keeps_them() -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0, tokens=0.0)
    assert bucket.tokens == 0.0
    assert bucket.try_take(T) is False


def test_control_burst_of_20_passes_then_limited() -> None:
    limiter = RateLimiter.for_control()
    verdicts = [limiter.check(T) for _ in range(25)]
    assert verdicts[:20] == [Verdict.ALLOW] * 20
    assert verdicts[20:] == [Verdict.LIMITED] * 5
    assert limiter.strikes == 5


def test_ping_burst_of_60_passes_then_limited() -> None:
    limiter = RateLimiter.for_ping()
    verdicts = [limiter.check(T) for _ in range(61)]
    assert verdicts.count(Verdict.ALLOW) == 60
    assert verdicts[-1] is Verdict.LIMITED


def test_control_refills_at_10_per_second() -> None:
    limiter = RateLimiter.for_control()
    for _ in range(20):
        assert limiter.check(T) is Verdict.ALLOW
    assert limiter.check(T) is Verdict.LIMITED
    # Half a second later exactly five more tokens have accrued.
    later = T + 0.5
    assert [limiter.check(later) for _ in range(6)] == [Verdict.ALLOW] * 5 + [Verdict.LIMITED]
    # A quarter second: 2.5 tokens -> two messages.
    later += 0.25
    assert [limiter.check(later) for _ in range(3)] == [Verdict.ALLOW] * 2 + [Verdict.LIMITED]
    # The half token left over plus another 0.125 s (1.25 tokens) -> one more.
    later += 0.125
    assert limiter.check(later) is Verdict.ALLOW
    assert limiter.check(later) is Verdict.LIMITED
    assert limiter.bucket.tokens == 0.75


def test_sustained_rate_of_10_per_second_is_allowed() -> None:
    limiter = RateLimiter.for_control()
    for _ in range(20):
        limiter.check(T)
    for i in range(1, 101):
        assert limiter.check(T + i * 0.125) is Verdict.ALLOW  # 8/s < 10/s


def test_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0)
    for _ in range(20):
        assert bucket.try_take(T)
    assert not bucket.try_take(T)
    assert bucket.try_take(T + 3600.0)
    assert bucket.tokens == 19.0
    taken = sum(bucket.try_take(T + 3600.0) for _ in range(50))
    assert taken == 19


def test_time_going_backwards_grants_nothing_and_loses_nothing() -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0)
    for _ in range(20):
        bucket.try_take(T)
    assert bucket.try_take(T - 100.0) is False
    assert bucket.updated == T
    # Refill is measured from the latest time seen, not from the stale one.
    assert bucket.try_take(T + 0.1) is True
    assert bucket.tokens == pytest.approx(0.0)


def test_cost_above_one() -> None:
    bucket = TokenBucket(rate=1.0, burst=5.0)
    assert bucket.try_take(T, cost=5.0) is True
    assert bucket.try_take(T + 2.0, cost=3.0) is False
    assert bucket.tokens == 2.0
    assert bucket.try_take(T + 3.0, cost=3.0) is True


def test_strikes_reach_abusive_after_consecutive_refusals() -> None:
    limiter = RateLimiter.for_control()
    for _ in range(20):
        assert limiter.check(T) is Verdict.ALLOW
    for i in range(1, ABUSE_STRIKES):
        assert limiter.check(T) is Verdict.LIMITED, i
        assert limiter.strikes == i
    assert limiter.check(T) is Verdict.ABUSIVE
    assert limiter.strikes == ABUSE_STRIKES
    assert limiter.check(T) is Verdict.ABUSIVE  # stays abusive while flooding


def test_an_allowed_message_resets_the_strikes() -> None:
    limiter = RateLimiter.for_control()
    for _ in range(20):
        limiter.check(T)
    for _ in range(ABUSE_STRIKES - 1):
        assert limiter.check(T) is Verdict.LIMITED
    assert limiter.strikes == ABUSE_STRIKES - 1
    assert limiter.check(T + 0.1) is Verdict.ALLOW  # one token refilled
    assert limiter.strikes == 0
    for _ in range(ABUSE_STRIKES - 1):
        assert limiter.check(T + 0.1) is Verdict.LIMITED
    assert limiter.check(T + 0.1) is Verdict.ABUSIVE


def test_custom_strike_threshold() -> None:
    limiter = RateLimiter(TokenBucket(rate=1.0, burst=1.0), strikes_to_abuse=2)
    assert limiter.check(T) is Verdict.ALLOW
    assert limiter.check(T) is Verdict.LIMITED
    assert limiter.check(T) is Verdict.ABUSIVE


def test_limiters_are_independent() -> None:
    control = RateLimiter.for_control()
    pings = RateLimiter.for_ping()
    for _ in range(20):
        control.check(T)
    assert control.check(T) is Verdict.LIMITED
    assert pings.check(T) is Verdict.ALLOW
    assert RateLimiter.for_control().check(T) is Verdict.ALLOW
