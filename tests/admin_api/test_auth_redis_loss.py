"""Sessions that stay ended when Redis loses writes: revocation marks after a failover to a lagging replica, and the
single use of a refresh token after a flush (recorded in the database, the system of record)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import jwt
from sqlalchemy import select

from core import auth
from core.models import AuditEvent, UsedRefreshToken
from tests.admin_api.conftest import Caller, login, redis_unreachable

CLERK, CLERK_PASSWORD = "clerk@kh.rw", "clerk-password-1"


def _caller(client: Any, tokens: dict[str, Any]) -> Caller:
    return Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})


async def _clerk(admin: Caller) -> dict[str, Any]:
    return await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})


async def _guard_until(rt: Any, done: Callable[[], Awaitable[bool]], *, cycles: int = 3) -> None:
    """What each serve process runs (every 0.05 s here), until `done` or `cycles` checks have passed."""
    stop = asyncio.Event()
    guard = asyncio.create_task(auth.guard_revocations(rt.redis, rt.sessionmaker,
                                                       ttl_seconds=rt.settings.jwt_ttl_seconds, every=0.05, stop=stop))
    try:
        for _ in range(cycles * 4):
            await asyncio.sleep(0.05)
            if await done():
                break
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(guard, 5)


async def _ended_at(rt: Any, user_id: str, action: str) -> float:
    async with rt.sessionmaker() as s:
        at = (await s.execute(select(AuditEvent.at).where(AuditEvent.entity_id == user_id,
                                                           AuditEvent.action == action))).scalar_one()
    return at.timestamp()


# --- revocation marks -----------------------------------------------------------------------------------------


async def test_a_failover_to_a_replica_without_the_newest_mark_does_not_revive_the_token(rt, client, admin, demo):
    """Redis failed over to a replica that missed the last writes: the marker key (written long ago) is there, the
    mark written a moment before is not. The guard checks the marks themselves, so it comes back in a cycle."""
    made = await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    await _guard_until(rt, lambda: rt.redis.exists(auth.MARKS_RESTORED))  # the guard has run: the marker is there
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    assert (await _caller(client, pair).json("GET", "/v1/members", 401))["message"] == "token has been revoked"

    mark = auth.revoked_key(made["id"])
    await rt.redis.delete(mark)  # the promoted replica: marker kept, newest mark lost
    assert await rt.redis.exists(auth.MARKS_RESTORED)
    await _caller(client, pair).json("GET", "/v1/members", 200)  # the deactivated account's token works again
    await _guard_until(rt, lambda: rt.redis.exists(mark))

    assert (await _caller(client, pair).json("GET", "/v1/members", 401))["message"] == "token has been revoked"
    deactivated = await _ended_at(rt, made["id"], "user.deactivated")
    assert auth.revoked_at(await rt.redis.get(mark)) == deactivated  # stamped with the audit row's instant
    assert 0 < await rt.redis.ttl(mark) <= rt.settings.jwt_ttl_seconds + auth.LEEWAY + 60
    await admin.json("GET", "/v1/members", 200)  # the others' tokens are untouched


async def test_an_older_mark_kept_by_a_lagging_replica_is_moved_to_the_last_end_of_sessions(rt, client, admin,
                                                                                            superadmin, demo):
    """Deactivated, turned on again, signed in, then given a new password: the replica promoted has the first mark
    and not the second. Kept as it was (a mark there is not written again), the pair signed in between worked."""
    made = await _clerk(admin)
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    mark = auth.revoked_key(made["id"])
    first = await rt.redis.get(mark)
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    pair = await login(client, CLERK, CLERK_PASSWORD)
    await _caller(client, pair).json("GET", "/v1/members", 200)
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "new-clerk-pass-2"})
    assert (await _caller(client, pair).json("GET", "/v1/members", 401))["message"] == "token has been revoked"

    await rt.redis.set(mark, first, ex=600)  # the replica's copy: the deactivation's mark, not the reset's
    await _caller(client, pair).json("GET", "/v1/members", 200)
    reset = await _ended_at(rt, made["id"], "user.password_reset")
    await _guard_until(rt, lambda: _mark_is(rt, mark, reset))

    assert auth.revoked_at(await rt.redis.get(mark)) == reset
    assert (await _caller(client, pair).json("GET", "/v1/members", 401))["message"] == "token has been revoked"
    await _caller(client, await login(client, CLERK, "new-clerk-pass-2")).json("GET", "/v1/members", 200)


async def _mark_is(rt: Any, mark: str, instant: float) -> bool:
    stamp = await rt.redis.get(mark)
    return stamp is not None and auth.revoked_at(stamp) == instant


async def test_a_suspended_cooperatives_lost_marks_come_back_while_the_marker_stays(rt, client, admin, tenant,
                                                                                   superadmin, demo):
    await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds)
    await superadmin.json("DELETE", f"/v1/cooperatives/{demo['cooperative_id']}", 200)
    for key in [k async for k in rt.redis.scan_iter("auth:*:revoked")]:
        await rt.redis.delete(key)  # the shards holding the marks lost them; the marker's did not
    assert await rt.redis.exists(auth.MARKS_RESTORED)
    await admin.json("GET", "/v1/payments", 200)

    marks = await auth.ensure_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds)
    assert (marks.accounts, marks.written) == (2, 2)  # the cooperative's admin and tenant logins
    for caller in (admin, tenant):
        assert (await caller.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    again = await auth.ensure_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds)
    assert (again.accounts, again.written) == (2, 0)  # all there: nothing written, nothing re-stamped


async def test_the_guard_checks_the_marks_in_two_round_trips_and_writes_nothing_when_all_are_there(
        rt, client, admin, demo, monkeypatch):
    """Every cycle of every serve process reads the marks: its Redis cost stays one pipeline of GETs, and one of
    writes (the marker alone when nothing was lost), whatever the number of accounts."""
    for n in range(3):
        made = await admin.json("POST", "/v1/users", 201, json={
            "username": f"c{n}@kh.rw", "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})
        await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    sent: list[list[str]] = []
    pipeline = rt.redis.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def run(*a: Any, **kw: Any) -> Any:
            sent.append([str(command[0][0]) for command in pipe.command_stack])
            return await execute(*a, **kw)

        pipe.execute = run
        return pipe

    monkeypatch.setattr(rt.redis, "pipeline", counting)
    marks = await auth.ensure_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds)
    assert (marks.accounts, marks.written) == (3, 0)
    assert sent == [["GET", "GET", "GET"], ["SET"]]


# --- refresh tokens -------------------------------------------------------------------------------------------


async def test_a_spent_refresh_token_stays_spent_after_redis_loses_its_data(rt, client, admin, demo):
    await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    first = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert first.status == 200
    claims = jwt.decode(pair["refreshToken"], options={"verify_signature": False})
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(UsedRefreshToken))).scalar_one()
    assert row.id == claims["jti"] and row.expires_at == datetime.fromtimestamp(claims["exp"], UTC)

    await rt.redis.flushdb()  # Redis restarted without persistence, or failed over to an empty replica
    await auth.ensure_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds)
    replay = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert replay.status == 401 and (await replay.json())["message"] == "refresh token already used"
    # The pair the first refresh handed out renews once, as any.
    renewed = await client.post("/v1/auth/refresh", json={"refreshToken": (await first.json())["refreshToken"]})
    assert renewed.status == 200


async def test_two_refreshes_with_one_token_at_once_exactly_one_wins(rt, client, admin, demo):
    await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    answers = await asyncio.gather(*(client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
                                     for _ in range(2)))
    assert sorted(a.status for a in answers) == [200, 401]
    [refused] = [a for a in answers if a.status == 401]
    assert (await refused.json())["message"] == "refresh token already used"
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(UsedRefreshToken))).scalars().all()) == 1


async def test_a_refresh_refused_after_its_use_was_recorded_does_not_spend_the_token(rt, client, admin, demo):
    """The use is written in the request's transaction: a refresh refused after it (account deactivated) leaves
    no row, and the token is refused again for the same reason, not as used."""
    made = await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    for _ in range(2):
        refused = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
        assert refused.status == 401 and (await refused.json())["message"] == "invalid token"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(UsedRefreshToken))).first() is None


async def test_refresh_needs_no_redis_and_stays_single_use_without_it(rt, client, admin, demo):
    await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    async with redis_unreachable(rt):
        first = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
        again = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert first.status == 200 and again.status == 401
    assert (await again.json())["message"] == "refresh token already used"
    replay = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert replay.status == 401  # Redis back: still spent


# --- a rolling deploy: the previous release (before 0015) kept the single use in Redis alone -------------------


def _previous_release_key(refresh_token: str) -> str:
    """The key the previous release's refresh SETs NX and checks (cc79f48), spelled as it spelled it."""
    jti = jwt.decode(refresh_token, options={"verify_signature": False})["jti"]
    return f"auth:{{refresh:{jti}}}:used"


async def test_a_refresh_token_spent_on_a_previous_release_process_is_refused(rt, client, admin, demo):
    """During the deploy a process not yet restarted traded the token (its Redis key, no row): not once more here."""
    await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    await rt.redis.set(_previous_release_key(pair["refreshToken"]), b"1", nx=True, ex=auth.REFRESH_TTL_SECONDS + 60)
    replay = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert replay.status == 401 and (await replay.json())["message"] == "refresh token already used"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(UsedRefreshToken))).first() is None  # refused: its row rolled back


async def test_a_refresh_token_spent_here_is_spent_for_a_previous_release_process_too(rt, client, admin, demo):
    """The previous release checks its Redis key only: during the deploy, or after a rollback, it must find it."""
    await _clerk(admin)
    pair = await login(client, CLERK, CLERK_PASSWORD)
    key = _previous_release_key(pair["refreshToken"])
    assert not await rt.redis.exists(key)
    assert (await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})).status == 200
    assert await rt.redis.get(key) == b"1"
    assert auth.REFRESH_TTL_SECONDS < await rt.redis.ttl(key) <= auth.REFRESH_TTL_SECONDS + 60
    # What the previous release's refresh then does with the token: SET NX finds the key and refuses.
    assert await rt.redis.set(key, b"1", nx=True, ex=auth.REFRESH_TTL_SECONDS + 60) is None


async def test_redis_out_of_reach_is_logged_once_per_outage_not_every_cycle(rt, monkeypatch, caplog):
    """Each serve checks the marks every 5 s: with Redis down for an hour it logged the same WARNING 720 times
    (a worker says it once). Now once when the checks start failing, an INFO line when they work again."""
    import logging

    from tests.admin_api.conftest import unreachable_redis

    class Switchable:  # the client the guard holds; what it talks to changes under it, as a Redis outage does
        def __init__(self, target: Any) -> None:
            self.target = target

        def __getattr__(self, name: str) -> Any:
            return getattr(self.target, name)

    cycles = 0
    check = auth.RedisWatch.check

    async def counted(self: Any, redis: Any) -> Any:
        nonlocal cycles
        cycles += 1
        return await check(self, redis)

    monkeypatch.setattr(auth.RedisWatch, "check", counted)
    caplog.set_level(logging.INFO, logger="gateway.auth")
    down = unreachable_redis()
    redis = Switchable(down)

    def said(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.auth" and r.getMessage().startswith(text)]

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(600):  # generous: the machine is shared
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("condition not reached")

    stop = asyncio.Event()
    guard = asyncio.create_task(auth.guard_revocations(redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds,
                                                       every=0.01, stop=stop))
    try:
        await until(lambda: cycles >= 6)
        assert [r.levelno for r in said("could not check the token revocation marks")] == [logging.WARNING]
        redis.target = rt.redis  # Redis is back
        await until(lambda: bool(said("checking the token revocation marks works again")))
        redis.target = down  # and gone again: a new outage is said again, once
        seen = cycles
        await until(lambda: cycles >= seen + 6)
    finally:
        stop.set()
        await asyncio.wait_for(guard, 30)
        await down.aclose()
    assert len(said("could not check the token revocation marks")) == 2
    assert [r.levelno for r in said("checking the token revocation marks works again")] == [logging.INFO]
