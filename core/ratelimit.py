"""Rate limits in Redis: fixed or sliding windows, hash-tagged keys, one round trip per check."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

# Check, then count, in one command: the current window's count and the previous window's, and only when the
# request fits under the limit the INCR (and its expiry renewed). A refused request is not counted: a client
# retrying while refused must not keep its own count up and so stretch the wait it was told (Retry-After).
# ARGV[2] is the previous window's weight, worked out in Python (`_previous_weight`) and sent as its exact
# repr, so the script floors the very same double the Python `_decide` floors: both reach the same verdict.
# It returns the count before this request; `_decide` adds this one back when it was allowed. A pipeline of
# GET, INCR, EXPIRE and GET cost about twice the client CPU (a reply, and a read with its own timeout, per
# command). Both keys share the hash tag, so a cluster runs it on one node. EVAL (not EVALSHA) so that a
# restarted Redis, which forgot its scripts, needs nothing reloaded.
# KEYS[3], when given, is one more key of the same subject read in the same command (a token's
# revocation mark): its value comes back third.
_COUNT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local weight = tonumber(ARGV[2])
local previous = false
if weight > 0 then previous = redis.call('GET', KEYS[2]) end
if n + math.floor(tonumber(previous or '0') * weight) < tonumber(ARGV[3]) then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
local also = false
if KEYS[3] then also = redis.call('GET', KEYS[3]) end
return {n, previous, also}
"""
# Several limits of one subject checked, then counted, in one command (`hit_all`): counted in each only when every
# one has room for the request, else in none, so a request one limit refuses uses none of the others (a keyword
# reply allowed by its 10-minute limit and refused by its daily one kept its 10-minute count: her next replies were
# refused though none went). KEYS: each limit's current and previous window, all of the subject's tag (one node).
# ARGV: each limit's expiry, previous-window weight (repr, as for _COUNT) and effective count. Returns each limit's
# count before this request, current and previous window (the previous one 0 when it does not weigh in).
# Once per token (`hit_all_once`), an odd number of KEYS: KEYS[1], of the subject's tag too, keeps the token's
# verdict (when it was counted, ARGV[2], or "-" for refused; ARGV[1] its expiry), written in the same command as
# the counts, so two requests of one token at once (an aggregator's retry of a text while its first try is still
# at work) count it once: the second finds the first's verdict and counts nothing. The windows and their three
# arguments each follow. Then it returns the verdict kept before (false when none: this one decided), then the
# counts as above (none when a verdict was kept).
_COUNT_ALL = """
local k = #KEYS % 2
local a = 2 * k
local out = {}
if k == 1 then
  local kept = redis.call('GET', KEYS[1])
  if kept then return {kept} end
  out[1] = false
end
local room = true
for i = k + 1, #KEYS, 2 do
  local j = a + (i - k - 1) / 2 * 3
  local n = tonumber(redis.call('GET', KEYS[i]) or '0')
  local weight = tonumber(ARGV[j + 2])
  local previous = 0
  if weight > 0 then previous = tonumber(redis.call('GET', KEYS[i + 1]) or '0') end
  if n + math.floor(previous * weight) >= tonumber(ARGV[j + 3]) then room = false end
  out[#out + 1] = n
  out[#out + 1] = previous
end
if room then
  for i = k + 1, #KEYS, 2 do
    redis.call('INCR', KEYS[i])
    redis.call('EXPIRE', KEYS[i], ARGV[a + (i - k - 1) / 2 * 3 + 1])
  end
end
if k == 1 then
  local verdict = '-'
  if room then verdict = ARGV[2] end
  redis.call('SET', KEYS[1], verdict, 'EX', ARGV[1])
end
return out
"""
# A counted request taken back (`uncount`): the window it was counted in loses one, never below 0 (a key that
# expired meanwhile stays absent: a DECR would create it at -1, without an expiry). DECR keeps the expiry.
_UNCOUNT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return n
"""
# Requests taken back once (`uncount_once`): KEYS[1] marks what was taken back, set only where it is not yet; then
# each window it was counted in (KEYS[2], ...) loses one, as in _UNCOUNT. A second taking back of the same thing
# finds the mark and takes nothing. ARGV[1]: the mark's expiry. Returns whether this one took it back.
_UNCOUNT_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #KEYS do
  local n = tonumber(redis.call('GET', KEYS[i]) or '0')
  if n > 0 then redis.call('DECR', KEYS[i]) end
end
return 1
"""
# A request whose outcome decides whether it counts (a sign-in: only a wrong password does) joins its subject's
# requests in flight, a sorted set of one member per request scored by when its lease ends, if the first
# limit (the gate) has room for it besides the confirmed count and those in flight; the confirmed counts of
# every limit come back (current and previous window), after the number in flight before it and whether it
# joined. Leases that ended are dropped first: a process that died mid-check holds its place until then.
# KEYS: the set, then each limit's current and previous window. ARGV: now, the lease's end, the member, the
# set's expiry, then each limit's previous-window weight (repr, as for _COUNT) and effective count.
_BEGIN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local flying = redis.call('ZCARD', KEYS[1])
local out = {flying, 0}
local room = true
for i = 2, #KEYS, 2 do
  local weight = tonumber(ARGV[i + 3])
  local n = tonumber(redis.call('GET', KEYS[i]) or '0')
  local previous = 0
  if weight > 0 then previous = tonumber(redis.call('GET', KEYS[i + 1]) or '0') end
  if i == 2 and n + math.floor(previous * weight) + flying >= tonumber(ARGV[i + 4]) then room = false end
  out[#out + 1] = n
  out[#out + 1] = previous
end
if room then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  out[2] = 1
end
return out
"""
# How long a request stays in flight at most: a sign-in checks its password (tens of milliseconds of scrypt)
# and may wait for a password change to commit; one whose process died stops counting after this.
LEASE = 30
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
    remaining: int  # requests still allowed after this one, at once
    # Epoch seconds (rounded up) from which the next request is allowed if the client sends nothing more: now
    # while `remaining` is above 0, else when the weighted count drops below the limit (not the end of the
    # current window: the previous window still weighs in then).
    reset: int
    retry_after: int  # refused: whole seconds to wait, at least 1, that get the next request allowed; else 0
    used: int = 0  # the (weighted) count the decision was made on, this request included when counted


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `hit_all_once` decided for a token: by this request (`decisions`: its own, as `hit_all`'s), or by an
    earlier request of the same token (`decisions` empty), which this one follows without counting."""

    allowed: bool  # counted in every limit (by this request, or the token's first)
    at: float | None  # when it was counted (the `now` it was counted at); None when refused
    decisions: tuple[Decision, ...]


@dataclass(frozen=True, slots=True)
class Tally:
    """Limits of one subject that count an outcome known only after the request is handled (a failed sign-in),
    and that subject's requests in flight (begun, outcome not known yet). Counting a request before its outcome
    wrongly refused requests that turned out not to count (right passwords, all at once); counting it only
    after let a burst all past the check before any was counted. So both are kept, apart: the first limit
    (the gate) lets a request begin only while its confirmed count plus those in flight is under it (a
    request that does not fit may wait for them to end); the other limits are only read."""

    subject: str
    limits: tuple[Limit, ...]


@dataclass(frozen=True, slots=True)
class Flight:
    """A request's view of a tally as it began (`begin`), and whether it joined those in flight. `end` it once
    its outcome is known, counted or not."""

    tally: Tally
    confirmed: tuple[Decision, ...]  # per limit, on the confirmed counts alone (`peek`): allowed = room for one
    in_flight: int  # the subject's requests in flight besides this one
    joined: bool  # in flight now: the gate had room for it besides the confirmed count and those in flight
    key: Any  # the subject's requests in flight (a Redis key, or a LocalCounts key) ...
    member: str  # ... and this one among them


def _flight_member() -> str:
    return secrets.token_hex(8)


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

    async def begin(self, tallies: Sequence[Tally], *, now: float | None = None) -> list[Flight]:
        """A request begins in each tally, all in one round trip: see `Tally`. End each flight (`end`), whether
        it joined or not, once the outcome is known or the request gives up."""
        now = time.time() if now is None else now
        pipe = self._redis.pipeline(transaction=False)
        prepared = []
        for tally in tallies:
            key, member, keys, args = self._flight_args(tally, now)
            pipe.eval(_BEGIN, len(keys), *keys, *args)
            prepared.append((tally, key, member))
        results = await pipe.execute() if tallies else []
        flights = []
        for (tally, key, member), result in zip(prepared, results, strict=True):
            counts = [int(n or 0) for n in result[2:]]
            confirmed = tuple(_decide(limit, self.effective(limit), now, counts[2 * i], counts[2 * i + 1],
                                      counted=False) for i, limit in enumerate(tally.limits))
            flights.append(Flight(tally, confirmed, int(result[0]), bool(result[1]), key, member))
        return flights

    async def end(self, flights: Iterable[Flight], *, count: bool, now: float | None = None) -> None:
        """The requests' outcomes are known: `count` (as `hit`: not past a full limit) in each limit of their
        tallies, then leave those in flight, in one round trip. Counted first: a request beginning in between
        sees it twice (and at worst waits), never in neither place."""
        now = time.time() if now is None else now
        pipe = self._redis.pipeline(transaction=False)
        queued = False
        for flight in flights:
            if count:
                for limit in flight.tally.limits:
                    keys, args, _ = self._script_args(limit, flight.tally.subject, None, now)
                    pipe.eval(_COUNT, len(keys), *args)
                    queued = True
            if flight.joined:
                pipe.zrem(flight.key, flight.member)
                queued = True
        if queued:
            await pipe.execute()

    def _flight_args(self, tally: Tally, now: float) -> tuple[str, str, list[str], list[str | int]]:
        """The in-flight set's key, this request's member, and the keys and arguments of one _BEGIN."""
        gate = tally.limits[0]
        key = f"{self._prefix}:{subject_tag(tally.subject)}:{gate.name}:in-flight"
        member = _flight_member()
        keys = [key]
        args: list[str | int] = [repr(now), repr(now + LEASE), member, LEASE]
        for limit in tally.limits:
            window_keys, window_args, allowed_count = self._script_args(limit, tally.subject, None, now)
            keys.extend(window_keys)
            args.extend((window_args[3], allowed_count))  # the weight's repr, the effective count
        return key, member, keys, args

    def _script_args(self, limit: Limit, subject: str, read: str | None,
                     now: float) -> tuple[list[str], tuple[str | int, ...], int]:
        """The keys and arguments of one _COUNT (the current window's key first), and the effective count."""
        allowed_count = self.effective(limit)
        window = limit.window
        start = _window_start(limit, now)
        base = f"{self._prefix}:{subject_tag(subject)}:{limit.name}"
        keys = [f"{base}:{start}", f"{base}:{start - window}"]
        if read is not None:
            keys.append(read)
        # repr: the shortest text that reads back as the same double, so the script floors what `_decide` does.
        args: tuple[str | int, ...] = (*keys, window * 2, repr(_previous_weight(limit, now, start)), allowed_count)
        return keys, args, allowed_count

    async def _count(self, limit: Limit, subject: str, read: str | None, then: Callable[[Pipeline], Any] | None,
                     now: float | None) -> tuple[Decision, Any, list[Any]]:
        now = time.time() if now is None else now
        keys, args, allowed_count = self._script_args(limit, subject, read, now)
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

    async def hit_all(self, limits: Sequence[Limit], subject: str, *, now: float | None = None
                      ) -> tuple[Decision, ...]:
        """`hit` in each of `limits` at once (one command): counted in every one when each has room for it, else
        in none. The decisions in `limits`' order: all allowed, it was counted; else the refused ones refused it,
        and the others only say there was room (as `peek`)."""
        now = time.time() if now is None else now
        keys, args, counts = self._all_args(limits, subject, now)
        results = await self._redis.eval(_COUNT_ALL, len(keys), *keys, *args)
        return _decide_all(limits, counts, now, results)

    async def hit_all_once(self, limits: Sequence[Limit], subject: str, token: str, *, ttl: int,
                           now: float | None = None) -> Verdict:
        """`hit_all` for the first request of `token` (what is counted: a text, by its inbound id) in `ttl` seconds;
        a later one, or one at the same time, counts nothing and gets that first request's verdict (whether it was
        counted, and when). The verdict is kept by the same command that counts, under a key of the subject's tag
        (one node), so no interleaving of two requests of a token counts it twice, and none waits for another:
        nothing is held between the count and the verdict, so a request whose process dies leaves both or neither.
        The verdict expires after `ttl` seconds: a request of the token after that is counted again."""
        now = time.time() if now is None else now
        mark = self._mark(limits, subject, token, "once")
        keys, args, counts = self._all_args(limits, subject, now)
        results = await self._redis.eval(_COUNT_ALL, len(keys) + 1, mark, *keys, ttl, repr(now), *args)
        kept = results[0]
        if kept is not None:
            at = None if kept in (b"-", "-") else float(kept)
            return Verdict(at is not None, at, ())
        decisions = _decide_all(limits, counts, now, results[1:])
        allowed = all(decision.allowed for decision in decisions)
        return Verdict(allowed, now if allowed else None, decisions)

    def _all_args(self, limits: Sequence[Limit], subject: str,
                  now: float) -> tuple[list[str], list[str | int], list[int]]:
        """The keys and arguments of one _COUNT_ALL (each limit's current and previous window; its expiry, previous
        window's weight and effective count), and each limit's effective count."""
        keys: list[str] = []
        args: list[str | int] = []
        counts: list[int] = []
        for limit in limits:
            window_keys, window_args, allowed_count = self._script_args(limit, subject, None, now)
            keys.extend(window_keys)
            args.extend(window_args[len(window_keys):])  # the expiry, the previous window's weight, the count
            counts.append(allowed_count)
        return keys, args, counts

    async def uncount(self, limit: Limit, subject: str, *, now: float) -> None:
        """Take back one request `hit` counted at `now` (the same `now`: the window it was counted in, even if
        another has begun since), once it turned out not to count: an idempotent replay answered with what its
        key made (admin_api.routing)."""
        base = f"{self._prefix}:{subject_tag(subject)}:{limit.name}"
        await self._redis.eval(_UNCOUNT, 1, f"{base}:{_window_start(limit, now)}")

    async def uncount_once(self, limits: Sequence[Limit], subject: str, token: str, *, now: float) -> bool:
        """`uncount` in each of `limits`, the first time only for `token` (what was counted: a text's reply), in one
        command: taking it back again (a job run again, two runs at once) takes nothing more. Whether this one took
        it back. The mark, tagged as the subject's windows (one node), lasts as long as the longest window counts."""
        tag = subject_tag(subject)
        keys = [self._mark(limits, subject, token, "back")]
        keys.extend(f"{self._prefix}:{tag}:{limit.name}:{_window_start(limit, now)}" for limit in limits)
        ttl = 2 * max(limit.window for limit in limits)
        return bool(await self._redis.eval(_UNCOUNT_ONCE, len(keys), *keys, ttl))

    def _mark(self, limits: Sequence[Limit], subject: str, token: str, kind: str) -> str:
        """The key that marks `token` done once among `limits` of `subject` (`kind`: "once", hit_all_once's verdict;
        "back", uncount_once's), tagged as the subject's windows (one node), the token by its digest."""
        digest = hashlib.sha256(token.encode()).hexdigest()[:32]
        return f"{self._prefix}:{subject_tag(subject)}:{limits[0].name}:{kind}:{digest}"

    async def peek(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        """Whether one more would be allowed, counting nothing (MGET of the two windows: one tag, one node).
        For limits that count only some outcomes (failed sign-ins): look first, `hit` once the outcome is known."""
        now = time.time() if now is None else now
        start = _window_start(limit, now)
        base = f"{self._prefix}:{subject_tag(subject)}:{limit.name}"
        current, previous = await self._redis.mget([f"{base}:{start}", f"{base}:{start - limit.window}"])
        return _decide(limit, self.effective(limit), now, int(current or 0), int(previous or 0), counted=False)


def clock() -> float:
    """Now, as the limiter reads it: a caller that will take a request back (`uncount`) counts it at this.
    This module reads the time only as `time.time()` of its `time` global, here and where a method is given no
    `now`: the tests hold the limiters' clock still by replacing that global (tests/conftest.py: limiter_clock)."""
    return time.time()


def effective_count(limit: Limit, multiplier: float) -> int:
    """A limit's count scaled by RATE_LIMIT_MULTIPLIER, never under one."""
    return max(1, int(limit.count * multiplier))


def _window_start(limit: Limit, now: float) -> int:
    return int(now // limit.window) * limit.window


def _previous_weight(limit: Limit, now: float, start: int) -> float:
    """How much the previous window still counts at `now`: the part of it still inside the sliding window
    (none for a fixed window). The Lua script gets this very value, so keep it the one place it is worked out."""
    return 1.0 - (now - start) / limit.window if limit.sliding else 0.0


def _weighted(limit: Limit, start: int, current: int, previous: int, when: float) -> int:
    """The count a request at `when` (not before `start`) would be judged on, if nothing more is counted after
    `current` (the window at `start`) and `previous` (the one before): later windows start empty."""
    if when >= start + limit.window:  # the current window has become the previous one
        start, current, previous = start + limit.window, 0, current
        if when >= start + limit.window:
            return 0
    return current + int(previous * _previous_weight(limit, when, start))


def _clears_after(limit: Limit, allowed_count: int, start: int, current: int, previous: int) -> float | None:
    """Roughly when the weighted count drops below the limit, nothing more being counted: it does just after
    the moment returned (None: it is below it already). From the counts and the window: while `current` fits,
    the previous window's share shrinks until it fits too; else the current window must become the previous
    one and slide out far enough."""
    window = limit.window
    if current < allowed_count:
        if not limit.sliding or previous == 0:
            return None
        return start + window * (1 - (allowed_count - current) / previous)
    if not limit.sliding:
        return float(start + window)
    return start + 2 * window - window * allowed_count / current


def _first_allowed(limit: Limit, allowed_count: int, start: int, current: int, previous: int, origin: float,
                   least: int) -> int:
    """The fewest whole seconds after `origin`, at least `least`, at which the next request is allowed if
    nothing more is counted. `_clears_after` gives where to look: floating point can put it a hair off, so
    start a second or two early and step with `_weighted`, the very check the limiter makes, so that a client
    that waits this long is allowed (the weighted count never rises while nothing is counted)."""
    clears = _clears_after(limit, allowed_count, start, current, previous)
    seconds = least if clears is None else max(least, math.floor(clears - origin) - 1)
    while _weighted(limit, start, current, previous, origin + seconds) >= allowed_count:
        seconds += 1
    return seconds


def _decide_all(limits: Sequence[Limit], counts: Sequence[int], now: float,
                results: Sequence[Any]) -> tuple[Decision, ...]:
    """The decisions of one _COUNT_ALL from its counts (each limit's current and previous window, before it): counted
    in every limit when each had room, else in none."""
    pairs = [(int(results[2 * i]), int(results[2 * i + 1])) for i in range(len(limits))]
    counted = all(_decide(limit, allowed_count, now, current, previous, counted=False).allowed
                  for limit, allowed_count, (current, previous) in zip(limits, counts, pairs, strict=True))
    return tuple(_decide(limit, allowed_count, now, current, previous, counted=counted)
                 for limit, allowed_count, (current, previous) in zip(limits, counts, pairs, strict=True))


def _decide(limit: Limit, allowed_count: int, now: float, current: int, previous: int, *,
            counted: bool) -> Decision:
    """The decision on one more request from the counts before it. `counted`: it is counted when allowed
    (`hit`, as the Lua script does); else it is only looked at (`peek`). Refused, it is never counted."""
    start = _window_start(limit, now)
    # Sliding-window counter: the previous window weighs in for the part still inside the window.
    before = _weighted(limit, start, current, previous, now)
    allowed = before < allowed_count
    if counted and allowed:
        current += 1
    return Decision(
        allowed=allowed,
        limit=allowed_count,
        remaining=max(0, allowed_count - before - 1),
        reset=_first_allowed(limit, allowed_count, start, current, previous, 0.0, math.ceil(now)),
        retry_after=0 if allowed else _first_allowed(limit, allowed_count, start, current, previous, now, 1),
        used=before + 1 if counted and allowed else before,
    )


class LocalCounts:
    """The same windows counted in this process's memory: the fallback for a limit that must not lapse when
    Redis cannot answer (sign-in failures), so guessing is still slowed, per process, instead of the
    limit failing every request (503) or being skipped; and the requests in flight (see `Tally`). Bounded:
    windows that can no longer weigh in and ended leases are dropped, and past `max_keys` the oldest go first."""

    def __init__(self, max_keys: int = 50_000) -> None:
        self._counts: dict[Any, tuple[int, float]] = {}  # key -> (count, when it stops mattering)
        self._flying: dict[Any, dict[str, float]] = {}  # key -> {request in flight: when its lease ends}
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

    def in_flight(self, key: Any, now: float) -> int:
        """How many requests are in flight under `key` (leases that ended dropped)."""
        flying = self._flying.get(key)
        if flying is None:
            return 0
        for member in [m for m, until in flying.items() if until <= now]:
            del flying[member]
        if not flying:
            del self._flying[key]
        return len(flying)

    def fly(self, key: Any, member: str, now: float) -> None:
        """`member` in flight under `key` until its lease ends."""
        if len(self._flying) >= self._max_keys:  # bounded as the counts: ended leases go first, then the oldest
            for k in list(self._flying):
                self.in_flight(k, now)
            while len(self._flying) >= self._max_keys:
                del self._flying[next(iter(self._flying))]
        self._flying.setdefault(key, {})[member] = now + LEASE

    def land(self, key: Any, member: str) -> None:
        flying = self._flying.get(key)
        if flying is not None:
            flying.pop(member, None)
            if not flying:
                del self._flying[key]

    def clear(self) -> None:
        self._counts.clear()
        self._flying.clear()


class LocalLimiter:
    """`RateLimiter`'s `hit`, `begin`, `end` and `peek` on a `LocalCounts`, for when Redis is down."""

    def __init__(self, counts: LocalCounts, *, multiplier: float = 1.0) -> None:
        self._counts = counts
        self._multiplier = multiplier

    def _keys(self, limit: Limit, subject: str, now: float) -> tuple[Any, Any]:
        start = _window_start(limit, now)
        return (subject, limit.name, start), (subject, limit.name, start - limit.window)

    async def hit(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        key, previous = self._keys(limit, subject, now)
        allowed_count = effective_count(limit, self._multiplier)
        decision = _decide(limit, allowed_count, now, self._counts.get(key, now), self._counts.get(previous, now),
                           counted=True)
        if decision.allowed:  # as the Lua script: a refused request is not counted
            self._counts.incr(key, now, limit.window * 2)
        return decision

    async def begin(self, tallies: Sequence[Tally], *, now: float | None = None) -> list[Flight]:
        now = time.time() if now is None else now
        flights = []
        for tally in tallies:  # nothing awaited from the check to the join: no other request runs in between
            key = (tally.subject, tally.limits[0].name, "in-flight")
            flying = self._counts.in_flight(key, now)
            confirmed = tuple(self._peek(limit, tally.subject, now) for limit in tally.limits)
            gate = confirmed[0]
            joined = gate.used + flying < gate.limit
            member = _flight_member()
            if joined:
                self._counts.fly(key, member, now)
            flights.append(Flight(tally, confirmed, flying, joined, key, member))
        return flights

    async def end(self, flights: Iterable[Flight], *, count: bool, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for flight in flights:
            if count:
                for limit in flight.tally.limits:
                    await self.hit(limit, flight.tally.subject, now=now)
            if flight.joined:
                self._counts.land(flight.key, flight.member)

    async def peek(self, limit: Limit, subject: str, *, now: float | None = None) -> Decision:
        return self._peek(limit, subject, time.time() if now is None else now)

    def _peek(self, limit: Limit, subject: str, now: float) -> Decision:
        key, previous = self._keys(limit, subject, now)
        allowed_count = effective_count(limit, self._multiplier)
        return _decide(limit, allowed_count, now, self._counts.get(key, now), self._counts.get(previous, now),
                       counted=False)
