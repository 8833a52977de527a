"""Token buckets that decide whether a client's message may pass (sans-IO)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

CONTROL_RATE_PER_SECOND = 10.0
CONTROL_BURST = 20.0
PING_RATE_PER_SECOND = 30.0
PING_BURST = 60.0
# After this many refusals in a row (no accepted message between them) the
# client is treated as abusive and disconnected with close code 1008.
ABUSE_STRIKES = 40


class Verdict(enum.Enum):
    ALLOW = "allow"
    LIMITED = "limited"
    ABUSIVE = "abusive"


@dataclass
class TokenBucket:
    """A classic token bucket. Time is passed in, in seconds, by the caller."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def try_take(self, now: float, cost: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


@dataclass
class RateLimiter:
    """A bucket plus a strike count that turns sustained flooding into ABUSIVE."""

    bucket: TokenBucket
    strikes_to_abuse: int = ABUSE_STRIKES
    strikes: int = 0

    @classmethod
    def for_control(cls) -> RateLimiter:
        return cls(TokenBucket(CONTROL_RATE_PER_SECOND, CONTROL_BURST))

    @classmethod
    def for_ping(cls) -> RateLimiter:
        return cls(TokenBucket(PING_RATE_PER_SECOND, PING_BURST))

    def check(self, now: float) -> Verdict:
        if self.bucket.try_take(now):
            self.strikes = 0
            return Verdict.ALLOW
        self.strikes += 1
        if self.strikes >= self.strikes_to_abuse:
            return Verdict.ABUSIVE
        return Verdict.LIMITED
