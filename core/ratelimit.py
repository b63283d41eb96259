"""Rate limits in Redis: fixed or sliding windows, hash-tagged keys, one round trip per check."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

# The count of the current window (INCR, and its expiry renewed) and the previous window's count, in one
# command: a pipeline of INCR, EXPIRE and GET cost about twice the client CPU (a reply, and a read with its
# own timeout, per command). Both keys share the hash tag, so a cluster runs it on one node. EVAL (not
# EVALSHA) so that a restarted Redis, which forgot its scripts, needs nothing reloaded.
# KEYS[3], when given, is one more key of the same subject read in the same command (a token's
# revocation mark): its value comes back third.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
local previous = false
if ARGV[2] == '1' then previous = redis.call('GET', KEYS[2]) end
local also = false
if KEYS[3] then also = redis.call('GET', KEYS[3]) end
return {n, previous, also}
"""
_UNSAFE_TAG = re.compile(r"[{}]")


def subject_tag(subject: str) -> str:
    """The hash tag of a subject's keys: `{subject}`, or a digest of it when it holds a brace."""
    if _UNSAFE_TAG.search(subject):
        subject = hashlib.sha256(subject.encode()).hexdigest()[:32]
    return f"{{{subject}}}"


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
    """Counts requests per (bucket, subject). A subject's keys share its hash tag (`rl:{user:42}:bucket:t`),
    so a cluster keeps them, and any other key of that subject (see `hit_and_read`), on one node."""

    def __init__(self, redis: Redis, *, prefix: str = "rl", multiplier: float = 1.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._multiplier = multiplier

    def effective(self, limit: Limit) -> int:
        return max(1, int(limit.count * self._multiplier))

    async def hit(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        return (await self._count(limit, subject, None, None, now))[0]

    async def hit_and_read(self, limit: Limit, subject: str, key: str, *,
                           now: float | None = None) -> tuple[Decision, bytes | None]:
        """`hit`, and the value of `key` read in the same command; `key` must carry the subject's tag."""
        if subject_tag(subject) not in key:
            raise ValueError(f"{key!r} is not tagged {subject_tag(subject)}: a cluster could not read it here")
        decision, also, _ = await self._count(limit, subject, key, None, now)
        return decision, also

    async def hit_then(
        self, limit: Limit, subject: str, then: Callable[[Pipeline], Any], *, now: float | None = None
    ) -> tuple[Decision, list[Any]]:
        """`hit`, with the commands `then` queues (any keys) sent in the same round trip; their results."""
        decision, _, extra = await self._count(limit, subject, None, then, now)
        return decision, extra

    async def _count(self, limit: Limit, subject: str, read: str | None, then: Callable[[Pipeline], Any] | None,
                     now: float | None) -> tuple[Decision, Any, list[Any]]:
        now = time.time() if now is None else now
        allowed_count = self.effective(limit)
        window = limit.window
        start = int(now // window) * window
        base = f"{self._prefix}:{subject_tag(subject)}:{limit.name}"
        keys = [f"{base}:{start}", f"{base}:{start - window}"]
        if read is not None:
            keys.append(read)
        args = (*keys, window * 2, "1" if limit.sliding else "0")
        extra: list[Any] = []
        if then is None:
            results = await self._redis.eval(_COUNT, len(keys), *args)
        else:
            pipe = self._redis.pipeline(transaction=False)
            pipe.eval(_COUNT, len(keys), *args)
            then(pipe)
            results, *extra = await pipe.execute()
        current = int(results[0])
        used = current
        if limit.sliding:
            # Sliding-window counter: the previous window weighs in for the part still inside the window.
            previous = int(results[1] or 0)
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
        return decision, results[2], extra
