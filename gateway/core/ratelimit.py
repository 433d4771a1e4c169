"""Token buckets keyed by peer or device, with a bounded number of keys.

Pure: the caller passes `now` (seconds, any monotonic origin). A bucket holds at most `burst`
tokens and gains `rate` tokens per second; a request takes one. When a key has no token the
answer is how long until it will have one, which the CoAP layer sends as Max-Age with 4.29
(RFC 8516).

The table of buckets is bounded: past `max_keys`, the bucket idle the longest is forgotten.
Forgetting is safe because an idle bucket has refilled; a forgotten key starts full, which is
exactly what it would have been.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        # A clock that steps backwards must not mint tokens; keep the later time.
        self.updated = max(self.updated, now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 if allowed (a token is taken), else the seconds until `cost` tokens exist."""
        self.refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per key; `rate <= 0` or `burst <= 0` disables limiting."""

    def __init__(self, *, rate: float, burst: float, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.limited = 0
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, now: float) -> float:
        """0.0 if `key` may proceed now; else seconds to wait (Max-Age), and it is counted."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket.full(self.rate, self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            self._buckets.move_to_end(key)
        wait = bucket.take(now)
        if wait > 0:
            self.limited += 1
        return wait


def max_age_for(wait: float, *, cap: int = 3600) -> int:
    """Max-Age (whole seconds, at least 1) for a wait of `wait` seconds."""
    if wait <= 0:
        return 0
    if math.isinf(wait):
        return cap
    return max(1, min(cap, math.ceil(wait)))
