"""Retry-After and X-RateLimit-Reset are honest: a client that waits that long is allowed, and a refused request is
not counted, so retrying while refused does not stretch the wait. Both for the Redis limiter and for the
in-memory one used while Redis is down, which must decide alike. The clock is passed in (`now=`)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from typing import Any

import pytest

from core.ratelimit import Decision, Limit, LocalCounts, LocalLimiter, RateLimiter, Tally, subject_tag
from tests.conftest import LimiterClock

T0 = 1_800_000_000 - (1_800_000_000 % 3600)  # the start of a window of every length used here
PER_MINUTE = Limit("t:minute", 10)


def _client(rt: Any, which: str) -> Any:
    """The runtime's redis-py client, or its multiplexed one (core.redis_mux: Runtime.hot_redis, which the API's
    and callbacks' limits and the SMS worker's use): the same limiter on either must decide alike."""
    if which == "mux":
        if rt.redis_mux is None:
            pytest.skip("no multiplexed Redis connection for this REDIS_URL (a TCP redis:// server is needed)")
        return rt.redis_mux
    return rt.redis


@pytest.fixture(params=["redis", "mux", "local"])
def limiter(request: pytest.FixtureRequest) -> RateLimiter | LocalLimiter:
    if request.param in ("redis", "mux"):
        return RateLimiter(_client(request.getfixturevalue("rt"), request.param))
    return LocalLimiter(LocalCounts())


clients = pytest.mark.parametrize("which", ["redis", "mux"])


async def _fill(limiter: Any, limit: Limit, subject: str, now: float) -> Decision:
    """Hit at `now` until refused; the refusal."""
    for _ in range(limit.count + 1):
        decision = await limiter.hit(limit, subject, now=now)
        if not decision.allowed:
            return decision
    raise AssertionError("never refused")


async def test_a_client_that_waits_retry_after_is_allowed(limiter: Any) -> None:
    # The reviewer's case: ten requests 8 s before the minute's end. At the turn, the full minute still weighs
    # in whole (10 of 10), so the end of the window is not enough; a quarter of a second later it is.
    refused = await _fill(limiter, PER_MINUTE, "u", T0 + 52.25)
    assert (refused.retry_after, refused.reset) == (8, T0 + 61)
    assert not (await limiter.hit(PER_MINUTE, "u", now=T0 + 52.25 + 7)).allowed
    assert (await limiter.hit(PER_MINUTE, "u", now=T0 + 52.25 + 8)).allowed


async def test_a_client_that_waits_until_reset_is_allowed(limiter: Any) -> None:
    refused = await _fill(limiter, PER_MINUTE, "u", T0 + 52.25)
    assert not (await limiter.hit(PER_MINUTE, "u", now=refused.reset - 1)).allowed
    assert (await limiter.hit(PER_MINUTE, "u", now=refused.reset)).allowed


async def test_the_previous_window_counts_in_the_wait(limiter: Any) -> None:
    await _fill(limiter, PER_MINUTE, "u", T0 + 30)
    # 1 s into the next minute, 59/60 of the ten still count (9): one more fits, then 1 + 9 is the limit,
    # until 9/10 of the minute no longer counts (10 x 0.9 = 9 is not below it), just after T0 + 66.
    refused = await _fill(limiter, PER_MINUTE, "u", T0 + 61)
    assert (refused.retry_after, refused.reset) == (6, T0 + 67)
    assert not (await limiter.hit(PER_MINUTE, "u", now=T0 + 66)).allowed
    assert (await limiter.hit(PER_MINUTE, "u", now=T0 + 67)).allowed


async def test_a_fixed_window_waits_for_its_end(limiter: Any) -> None:
    fixed = Limit("t:fixed", 3, window=10, sliding=False)
    refused = await _fill(limiter, fixed, "u", T0 + 2.5)
    assert (refused.retry_after, refused.reset) == (8, T0 + 10)
    assert not (await limiter.hit(fixed, "u", now=T0 + 9.99)).allowed
    assert (await limiter.hit(fixed, "u", now=T0 + 10)).allowed


async def test_refused_requests_do_not_extend_the_wait(limiter: Any) -> None:
    first = await _fill(limiter, PER_MINUTE, "u", T0 + 52.25)
    for step in range(1, 16):  # retrying every half second while refused
        again = await limiter.hit(PER_MINUTE, "u", now=T0 + 52.25 + step / 2)
        assert not again.allowed and again.reset == first.reset
        assert again.retry_after == math.ceil(first.retry_after - step / 2) or again.retry_after == 1
    assert (await limiter.hit(PER_MINUTE, "u", now=T0 + 52.25 + first.retry_after)).allowed


@clients
async def test_refusals_are_not_stored(rt: Any, which: str) -> None:
    limiter = RateLimiter(_client(rt, which))
    await _fill(limiter, PER_MINUTE, "u", T0 + 5)
    for _ in range(5):
        assert not (await limiter.hit(PER_MINUTE, "u", now=T0 + 6)).allowed
    decision, (value,) = await limiter.hit_then(PER_MINUTE, "u", lambda pipe: pipe.get("other"), now=T0 + 7)
    assert not decision.allowed and value is None  # the pipelined form too
    assert await rt.redis.get(f"rl:{{u}}:t:minute:{T0}") == b"10"


async def test_decision_fields_behind_the_headers(limiter: Any) -> None:
    now = T0 + 52.25
    allowed = [await limiter.hit(PER_MINUTE, "u", now=now) for _ in range(10)]
    assert [d.remaining for d in allowed] == list(range(9, -1, -1))
    # While some remain, the next request is allowed at once: Reset is now (rounded up), no Retry-After.
    assert all(d.allowed and d.reset == T0 + 53 and d.retry_after == 0 for d in allowed[:-1])
    # The last one that fits already says when the next will: the same as the refusal that follows.
    refused = await limiter.hit(PER_MINUTE, "u", now=now)
    assert allowed[-1].reset == refused.reset == T0 + 61
    assert (refused.allowed, refused.limit, refused.remaining, refused.retry_after) == (False, 10, 0, 8)
    assert refused.used == 10


async def test_peek_agrees_with_hit(limiter: Any) -> None:
    await _fill(limiter, PER_MINUTE, "u", T0 + 52.25)
    looked = await limiter.peek(PER_MINUTE, "u", now=T0 + 55)
    assert not looked.allowed and (looked.reset, looked.retry_after) == (T0 + 61, 6)
    assert (await limiter.peek(PER_MINUTE, "u", now=T0 + 60.25)).allowed


async def _random_walk(limiter: Any, seed: int) -> list[Decision]:
    """Hits at random moments over a few windows of several limits; at every refusal, check the wait it gives:
    a second less is refused (peek), the wait itself and Reset are allowed (peek, then a hit at the wait)."""
    rng = random.Random(seed)
    subject = f"walk-{seed}"
    limits = [Limit("w:a", 4, window=60), Limit("w:b", 7, window=10), Limit("w:c", 3, window=5, sliding=False)]
    decisions = []
    for limit in limits:
        now = T0 + rng.random() * limit.window
        while now < T0 + 6 * limit.window:
            decision = await limiter.hit(limit, subject, now=now)
            decisions.append(decision)
            if decision.allowed:
                now += rng.expovariate(3 * limit.count / limit.window)
                continue
            wait = decision.retry_after
            assert wait >= 1 and decision.reset > now and decision.remaining == 0
            if wait > 1:
                assert not (await limiter.peek(limit, subject, now=now + wait - 1)).allowed
            if decision.reset - 1 >= now:
                assert not (await limiter.peek(limit, subject, now=decision.reset - 1)).allowed
            assert (await limiter.peek(limit, subject, now=decision.reset)).allowed
            now += wait
            assert (await limiter.hit(limit, subject, now=now)).allowed
            now += rng.random()
    return decisions


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_wait_given_is_exactly_enough(limiter: Any, seed: int) -> None:
    decisions = await _random_walk(limiter, seed)
    assert sum(not d.allowed for d in decisions) > 10  # the walk did get refused


@clients
async def test_the_fallback_decides_as_redis_does(rt: Any, which: str) -> None:
    for seed in (4, 5):
        assert (await _random_walk(RateLimiter(_client(rt, which)), seed)
                == await _random_walk(LocalLimiter(LocalCounts()), seed))


@clients
async def test_uncount_takes_back_one_in_the_window_it_was_counted_in(rt: Any, which: str) -> None:
    """An idempotent replay counted and then taken back (admin_api.routing): the window it was counted in loses
    one; a window with nothing in it (expired) is left absent, never -1."""
    limiter = RateLimiter(_client(rt, which))
    limit = Limit("replay:test", 3)
    start = 1_800_000_000 - 1_800_000_000 % 60
    for _ in range(3):
        assert (await limiter.hit(limit, "user:u1", now=start + 5)).allowed
    assert not (await limiter.hit(limit, "user:u1", now=start + 6)).allowed
    await limiter.uncount(limit, "user:u1", now=start + 5)
    assert await rt.redis.get("rl:{user:u1}:replay:test:" + str(start)) == b"2"
    assert (await limiter.hit(limit, "user:u1", now=start + 7)).allowed
    await limiter.uncount(limit, "user:u1", now=start + 7)
    assert await rt.redis.get("rl:{user:u1}:replay:test:" + str(start)) == b"2"
    await limiter.uncount(limit, "user:u1", now=start + 600)
    assert await rt.redis.get("rl:{user:u1}:replay:test:" + str(start + 600)) is None


@clients
async def test_uncount_once_takes_back_a_count_once_in_each_limit(rt: Any, which: str) -> None:
    """A reply to STOP or START not sent after all gives its count back (channels.sms.routes.give_back_reply) in each
    limit it was counted in, once for that reply: its job run again, or two runs at once, take nothing more. Never
    below 0."""
    limiter = RateLimiter(_client(rt, which))
    short, day = Limit("back:short", 2, window=600), Limit("back:day", 5, window=86_400)
    now = T0 + 5
    for _ in range(2):
        assert (await limiter.hit(short, "u", now=now)).allowed and (await limiter.hit(day, "u", now=now)).allowed
    assert not (await limiter.hit(short, "u", now=now + 1)).allowed
    tries = [limiter.uncount_once((short, day), "u", "inbound:at-1", now=now) for _ in range(3)]
    assert sorted(await asyncio.gather(*tries)) == [False, False, True]
    assert [(await limiter.peek(limit, "u", now=now + 2)).used for limit in (short, day)] == [1, 1]
    assert await limiter.uncount_once((short, day), "u", "inbound:at-2", now=now)
    assert await limiter.uncount_once((short, day), "u", "inbound:at-3", now=now)
    assert [(await limiter.peek(limit, "u", now=now + 2)).used for limit in (short, day)] == [0, 0]


@clients
async def test_hit_all_counts_in_every_limit_or_in_none(rt: Any, which: str) -> None:
    """A keyword's reply is counted in its 10-minute and daily limits in one command (channels.sms.routes
    ._reply_allowed): one the daily limit refuses is counted in neither, so it uses none of the 10 minutes' room."""
    limiter = RateLimiter(_client(rt, which))
    short, day = Limit("all:short", 3, window=600), Limit("all:day", 2, window=86_400)
    now = T0 + 5
    decided = [await limiter.hit_all((short, day), "u", now=now) for _ in range(4)]
    assert [[decision.allowed for decision in decisions] for decisions in decided] == [
        [True, True], [True, True], [True, False], [True, False]]
    assert [decision.used for decision in decided[-1]] == [2, 2]
    assert [(await limiter.peek(limit, "u", now=now)).used for limit in (short, day)] == [2, 2]


@clients
async def test_hit_all_once_counts_a_token_once_whatever_arrives_at_once(rt: Any, which: str) -> None:
    """A text's reply is counted once for the text (channels.sms.routes._reply_allowed): its tries at once (an
    aggregator's retry while the first is at work) count it once, and every try gets the first's verdict, a refusal
    as much as a consent, with when it was counted. The verdict is a key of the subject's tag, kept `ttl` seconds."""
    redis = _client(rt, which)
    limiter = RateLimiter(redis)
    short, day = Limit("once:short", 2, window=600), Limit("once:day", 5, window=86_400)
    now = T0 + 5
    tries = await asyncio.gather(*(limiter.hit_all_once((short, day), "u", "in-1", ttl=900, now=now + i / 10)
                                   for i in range(4)))
    first = [verdict for verdict in tries if verdict.decisions]
    assert len(first) == 1 and [decision.allowed for decision in first[0].decisions] == [True, True]
    assert {(verdict.allowed, verdict.at) for verdict in tries} == {(True, first[0].at)}
    assert [(await limiter.peek(limit, "u", now=now + 1)).used for limit in (short, day)] == [1, 1]
    assert (await limiter.hit_all_once((short, day), "u", "in-2", ttl=900, now=now + 1)).allowed
    refused = await limiter.hit_all_once((short, day), "u", "in-3", ttl=900, now=now + 2)
    assert (refused.allowed, refused.at, [d.allowed for d in refused.decisions]) == (False, None, [False, True])
    again = await limiter.hit_all_once((short, day), "u", "in-3", ttl=900, now=now + 3)
    assert (again.allowed, again.at, again.decisions) == (False, None, ())
    assert [(await limiter.peek(limit, "u", now=now + 3)).used for limit in (short, day)] == [2, 2]
    [mark] = [key for key in await rt.redis.keys("rl:*once*") if key.endswith(
        hashlib.sha256(b"in-1").hexdigest()[:32].encode())]
    assert mark.startswith(f"rl:{subject_tag('u')}:".encode()) and 0 < await rt.redis.ttl(mark) <= 900


@clients
async def test_a_full_window_still_weighs_in_through_the_next_one(rt: Any, which: str) -> None:
    """On the real clock (the keys' expiry is Redis's): a window's count is kept while it still weighs in, the
    whole of the next window, so a client that used its whole limit at the start of one window gets only what
    the sliding share leaves in the next, not the full limit again (a count expired one window after it was made)."""
    limiter = RateLimiter(_client(rt, which))
    limit = Limit("t:short", 3, window=3)
    # The limiter's times given (the windows' turn and the previous window's share do not depend on when the host
    # runs this: read from time.time(), a stall of 0.4 s past the sleep's end let all 3 through); Redis's expiry,
    # on its own clock, is what is tested: past one window since the last count, well inside two.
    assert not (await _fill(limiter, limit, "u", T0 + 0.1)).allowed  # 3 at the start of a window
    await asyncio.sleep(limit.window + 0.6)
    # Half-way into the next window: half of the 3 still counts (1).
    assert [(await limiter.hit(limit, "u", now=T0 + 4.5)).allowed for _ in range(3)] == [True, True, False]


async def _every_method(limiter: RateLimiter, redis: Any, prefix: str) -> list[Any]:
    """Each of RateLimiter's methods from the same starting state (the keys under `prefix`): what each gave (a
    Flight without its key and random member), then every key it left, with its value and whether it expires."""
    gave: list[Any] = []
    limit, other = Limit("all:a", 3), Limit("all:b", 2, window=10, sliding=False)
    subject = "user:u7"
    mark = f"{prefix}:{subject_tag(subject)}:revoked"
    for now in (T0 + 30.5, T0 + 31, T0 + 32.25, T0 + 33, T0 + 61.5):
        gave.append(await limiter.hit(limit, subject, now=now))
    gave.append(await limiter.hit_and_read(other, subject, mark, now=T0 + 62))
    await redis.set(mark, b"1800000000.5")
    gave.append(await limiter.hit_and_read(other, subject, mark, now=T0 + 62.5))
    gave.append(await limiter.hit_and_read(other, subject, mark, now=T0 + 63))
    await limiter.uncount(other, subject, now=T0 + 62)
    gave.append(await limiter.peek(other, subject, now=T0 + 63))
    gave.append(await limiter.peek(limit, subject, now=T0 + 90))

    def then(pipe: Any) -> None:
        pipe.set(f"{prefix}:kept", b"answer", ex=60)
        pipe.set(f"{prefix}:kept", b"again", ex=60, nx=True)
        pipe.get(f"{prefix}:kept")
        pipe.mget(f"{prefix}:kept", f"{prefix}:none")
        pipe.exists(f"{prefix}:kept", f"{prefix}:none")
        pipe.delete(f"{prefix}:none")

    gave.append(await limiter.hit_then(limit, subject, then, now=T0 + 91))
    tallies = (Tally(subject, (limit, other)), Tally("ip:1.2.3.4", (other,)))
    flights = await limiter.begin(tallies, now=T0 + 92)
    again = await limiter.begin(tallies[1:], now=T0 + 92.5)
    gave.extend((f.tally, f.confirmed, f.in_flight, f.joined) for f in [*flights, *again])
    gave.append(await _keys_left(redis, prefix))
    await limiter.end(flights, count=True, now=T0 + 93)
    await limiter.end(again, count=False, now=T0 + 93)
    gave.append(await limiter.peek(other, "ip:1.2.3.4", now=T0 + 93))
    gave.append(await _keys_left(redis, prefix))
    return gave


async def _keys_left(redis: Any, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` (named without it): its type, value (a sorted set's size) and whether it expires."""
    left = {}
    for key in sorted(await redis.keys(f"{prefix}:*")):
        kind = await redis.type(key)
        value = await redis.get(key) if kind == b"string" else await redis.zcard(key)
        left[key.decode().removeprefix(prefix)] = (kind, value, await redis.ttl(key) > 0)
    return left


async def test_the_limiter_on_the_multiplexed_connection_gives_what_it_gives_on_redis_py(rt: Any) -> None:
    """Every method of RateLimiter (the EVALs of hit, hit_and_read and uncount, peek's MGET of a list, the
    pipelines of hit_then, begin and end, ZREM included) answers alike on Runtime.hot_redis's multiplexed
    client and on redis-py, and leaves the same keys behind."""
    mux = _client(rt, "mux")
    on_redis_py = await _every_method(RateLimiter(rt.redis, prefix="rl-py"), rt.redis, "rl-py")
    on_mux = await _every_method(RateLimiter(mux, prefix="rl-mux"), rt.redis, "rl-mux")
    assert on_mux == on_redis_py
    in_flight, ended = on_mux[-3], on_mux[-1]
    # The address's two requests joined its requests in flight (the user's gate was full); ended, ZREM took them
    # out (the set went with its last member) and the one ended with count=True was counted.
    assert in_flight[":{ip:1.2.3.4}:all:b:in-flight"] == (b"zset", 2, True)
    assert not [kind for kind, _, _ in ended.values() if kind == b"zset"]
    assert ended[f":{{ip:1.2.3.4}}:all:b:{T0 + 90}"] == (b"string", b"1", True)
    assert on_mux[-1][":kept"] == (b"string", b"answer", True)  # hit_then's SET NX did not overwrite it


async def test_every_reading_of_the_time_goes_through_the_clock_the_tests_hold(rt: Any,
                                                                               limiter_clock: LimiterClock) -> None:
    """tests/conftest.py's limiter_clock stands in for this module's `time`: a limiter that read the time another
    way (`from time import time`, a monotonic clock) would leave the tests that hold it still on the wall clock,
    passing or failing with a minute's turn. Every reading is checked here: the count's window, the flight's
    lease, the decision's reset, and the clock callers count at."""
    from core import ratelimit

    assert ratelimit.clock() == limiter_clock.now
    start = int(limiter_clock.now // 60 * 60)
    subject = "someone"
    for limiter in (RateLimiter(rt.redis), LocalLimiter(LocalCounts())):
        for check in (limiter.hit(PER_MINUTE, subject), limiter.peek(PER_MINUTE, subject)):
            assert (await check).reset == math.ceil(limiter_clock.now)
        (flight,) = await limiter.begin([Tally(subject, (PER_MINUTE,))])
        await limiter.end([flight], count=True)
        assert (await limiter.peek(PER_MINUTE, subject)).used == 2  # the hit and the flight's count, one window
    redis_limiter = RateLimiter(rt.redis)
    assert (await redis_limiter.hit_all([PER_MINUTE], subject))[0].used == 3
    assert (await redis_limiter.hit_all_once([PER_MINUTE], subject, "token", ttl=60)).at == limiter_clock.now
    tag = subject_tag(subject)
    assert await rt.redis.get(f"rl:{tag}:{PER_MINUTE.name}:{start}") == b"4"
    # The clock moved by the test: the next window, where the last one weighs in all but a second's share of it.
    limiter_clock.advance(60)
    assert (await redis_limiter.hit(PER_MINUTE, subject)).used == 1 + int(4 * 59 / 60)
    assert await rt.redis.get(f"rl:{tag}:{PER_MINUTE.name}:{start + 60}") == b"1"
    # Redis expires a count on its own real clock, which nothing holds: a count of the SMS sender's 1-s window
    # (EXPIRE 2 s) vanished while the held clock still read that window when the host stalled 2 s between two
    # sends, and the third send of "one second" went through. Held, a count outlasts any test.
    second = Limit("t:second", 2, window=1, sliding=False)
    await redis_limiter.hit(second, subject)
    await redis_limiter.hit_all([second], subject)
    (flight,) = await redis_limiter.begin([Tally(subject, (second,))])
    await redis_limiter.end([flight], count=True)
    key = f"rl:{tag}:{second.name}:{int(limiter_clock.now)}"
    assert await rt.redis.get(key) == b"2" and await rt.redis.ttl(key) >= 3600
    assert not (await redis_limiter.hit(second, subject)).allowed
