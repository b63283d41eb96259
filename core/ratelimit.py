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
    used: int = 0  # the (weighted) count the decision was made on


class RateLimiter:
    """Counts requests per (bucket, subject). A subject's keys share its hash tag (`rl:{user:42}:bucket:t`),
    so a cluster keeps them, and any other key of that subject (see `hit_and_read`), on one node."""

    def __init__(self, redis: Redis, *, prefix: str = "rl", multiplier: float = 1.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._multiplier = multiplier

    def effective(self, limit: Limit) -> int:
        return effective_count(limit, self._multiplier)

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
        decision = _decide(limit, allowed_count, now, int(results[0]), int(results[1] or 0), counted=True)
        return decision, results[2], extra

    async def peek(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        """Whether one more would be allowed, counting nothing (MGET of the two windows: one tag, one node).
        For limits that count only some outcomes (failed sign-ins): look first, `hit` once the outcome is known."""
        now = time.time() if now is None else now
        start = int(now // limit.window) * limit.window
        base = f"{self._prefix}:{subject_tag(subject)}:{limit.name}"
        current, previous = await self._redis.mget([f"{base}:{start}", f"{base}:{start - limit.window}"])
        return _decide(limit, self.effective(limit), now, int(current or 0), int(previous or 0), counted=False)


def effective_count(limit: Limit, multiplier: float) -> int:
    """A limit's count scaled by RATE_LIMIT_MULTIPLIER, never under one."""
    return max(1, int(limit.count * multiplier))


def _decide(limit: Limit, allowed_count: int, now: float, current: int, previous: int, *,
            counted: bool) -> Decision:
    """The decision from a window's count (`counted`: it includes this request; else this one would be next)."""
    start = int(now // limit.window) * limit.window
    used = current
    if limit.sliding:
        # Sliding-window counter: the previous window weighs in for the part still inside the window.
        weight = 1.0 - (now - start) / limit.window
        used = current + int(previous * weight)
    reset = start + limit.window
    allowed = used <= allowed_count if counted else used < allowed_count
    return Decision(
        allowed=allowed,
        limit=allowed_count,
        remaining=max(0, allowed_count - used - (0 if counted else 1)),
        reset=reset,
        retry_after=0 if allowed else max(1, int(reset - now + 0.999)),
        used=used,
    )


class LocalCounts:
    """The same windows counted in this process's memory: the fallback for a limit that must not lapse when
    Redis cannot answer (sign-in failures), so guessing is still slowed, per process, instead of the
    limit failing every request (503) or being skipped. Bounded: windows that can no longer weigh in are
    dropped, and past `max_keys` the oldest counts go first."""

    def __init__(self, max_keys: int = 50_000) -> None:
        self._counts: dict[Any, tuple[int, float]] = {}  # key -> (count, when it stops mattering)
        self._max_keys = max_keys

    def _prune(self, now: float) -> None:
        if len(self._counts) < self._max_keys:
            return
        for key in [k for k, (_, until) in self._counts.items() if until <= now]:
            del self._counts[key]
        while len(self._counts) >= self._max_keys:
            del self._counts[next(iter(self._counts))]  # the oldest inserted

    def get(self, key: Any, now: float) -> int:
        found = self._counts.get(key)
        return found[0] if found is not None and found[1] > now else 0

    def incr(self, key: Any, now: float, ttl: int) -> int:
        self._prune(now)
        n = self.get(key, now) + 1
        self._counts[key] = (n, now + ttl)
        return n

    def clear(self) -> None:
        self._counts.clear()


class LocalLimiter:
    """`RateLimiter`'s `hit` and `peek` on a `LocalCounts`, for when Redis is down."""

    def __init__(self, counts: LocalCounts, *, multiplier: float = 1.0) -> None:
        self._counts = counts
        self._multiplier = multiplier

    def _keys(self, limit: Limit, subject: str, now: float) -> tuple[Any, Any]:
        start = int(now // limit.window) * limit.window
        return (subject, limit.name, start), (subject, limit.name, start - limit.window)

    async def hit(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        key, previous = self._keys(limit, subject, now)
        current = self._counts.incr(key, now, limit.window * 2)
        allowed_count = effective_count(limit, self._multiplier)
        return _decide(limit, allowed_count, now, current, self._counts.get(previous, now), counted=True)

    async def peek(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        key, previous = self._keys(limit, subject, now)
        allowed_count = effective_count(limit, self._multiplier)
        return _decide(limit, allowed_count, now, self._counts.get(key, now), self._counts.get(previous, now),
                       counted=False)
