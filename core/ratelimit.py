"""Rate limits in Redis: fixed or sliding windows, hash-tagged keys, one round trip per check."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # the bucket, e.g. "payments:create"
    count: int  # requests allowed per window
    window: int = 60  # seconds
    sliding: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # epoch seconds when the current window ends
    retry_after: int


class RateLimiter:
    """Counts requests per (bucket, subject). Keys share one hash tag so a cluster keeps them together."""

    def __init__(self, redis: Redis, *, prefix: str = "rl", multiplier: float = 1.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._multiplier = multiplier

    def effective(self, limit: Limit) -> int:
        return max(1, int(limit.count * self._multiplier))

    async def hit(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        return (await self.hit_then(limit, subject, None, now=now))[0]

    async def hit_then(
        self, limit: Limit, subject: str, then: Callable[[Pipeline], Any] | None, *, now: float | None = None
    ) -> tuple[Decision, list[Any]]:
        """`hit`, with the commands `then` queues on the same pipeline sent in its round trip; their results."""
        now = time.time() if now is None else now
        allowed_count = self.effective(limit)
        window = limit.window
        start = int(now // window) * window
        tag = f"{self._prefix}:{{{limit.name}:{subject}}}"
        current_key = f"{tag}:{start}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(current_key)
        pipe.expire(current_key, window * 2)
        if limit.sliding:
            pipe.get(f"{tag}:{start - window}")
        ours = len(pipe)  # the commands above; `then`'s follow
        if then is not None:
            then(pipe)
        results = await pipe.execute()
        current = int(results[0])
        used = current
        if limit.sliding:
            # Sliding-window counter: the previous window weighs in for the part still inside the window.
            previous = int(results[2] or 0)
            weight = 1.0 - (now - start) / window
            used = current + int(previous * weight)
        reset = start + window
        allowed = used <= allowed_count
        decision = Decision(
            allowed=allowed,
            limit=allowed_count,
            remaining=max(0, allowed_count - used),
            reset=reset,
            retry_after=0 if allowed else max(1, int(reset - now + 0.999)),
        )
        return decision, results[ours:]
