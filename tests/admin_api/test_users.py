"""Sign-in accounts: who may create whom, tenant logins tied to members, deactivation."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from sqlalchemy import select

from core import auth
from core.models import AdminUser
from tests.admin_api.conftest import Caller, bearer, check_shape, login, redis_fallbacks, redis_unreachable


async def test_super_admin_creates_a_cooperative_admin_who_can_sign_in(client, superadmin, coop_b, monkeypatch):
    import threading

    from core import crypto

    hashed_on: list[str] = []
    real_hash = crypto.hash_password

    def hash_password(password: str) -> str:
        hashed_on.append(threading.current_thread().name)
        return real_hash(password)

    monkeypatch.setattr(auth, "hash_password", hash_password)
    made = await superadmin.json(
        "POST",
        "/v1/users",
        201,
        json={
            "username": "boss@b.rw",
            "password": "a-long-password-1",
            "role": "COOP_ADMIN",
            "cooperativeId": coop_b["cooperative_id"],
        },
    )
    assert made["cooperativeId"] == coop_b["cooperative_id"] and "password" not in made
    # scrypt (tens of ms of CPU) ran off the event loop's thread: other requests were not held up by it.
    assert len(hashed_on) == 1 and hashed_on[0] != threading.main_thread().name
    boss = await bearer(client, "boss@b.rw", "a-long-password-1")
    coops = await boss.json("GET", "/v1/cooperatives", 200)
    assert [c["id"] for c in coops["data"]] == [coop_b["cooperative_id"]]
    await superadmin.json(
        "POST",
        "/v1/users",
        409,
        json={
            "username": "boss@b.rw",
            "password": "a-long-password-1",
            "role": "COOP_ADMIN",
            "cooperativeId": coop_b["cooperative_id"],
        },
    )
    await superadmin.json(
        "POST",
        "/v1/users",
        404,
        json={
            "username": "ghost@x.rw",
            "password": "a-long-password-1",
            "role": "COOP_ADMIN",
            "cooperativeId": "00000000-0000-0000-0000-000000000000",
        },
    )


async def test_admin_creates_tenant_login_for_own_member_only(client, admin, demo, coop_b):
    bosco = demo["members"]["+250788000002"]
    made = await admin.json(
        "POST",
        "/v1/users",
        201,
        json={"username": "bosco@kh.rw", "password": "bosco-password-1", "role": "TENANT", "memberId": bosco},
    )
    assert made["memberId"] == bosco
    tenant = await bearer(client, "bosco@kh.rw", "bosco-password-1")
    await tenant.json("GET", f"/v1/members/{bosco}", 200)
    await admin.json(
        "POST",
        "/v1/users",
        404,
        json={
            "username": "spy@kh.rw",
            "password": "spy-password-12",
            "role": "TENANT",
            "memberId": coop_b["member_id"],
        },
    )
    missing = await admin.json(
        "POST",
        "/v1/users",
        400,
        json={"username": "t@kh.rw", "password": "tenant-password", "role": "TENANT"},
    )
    assert missing["message"] == ["memberId is required for a TENANT"]
    await admin.json(
        "POST",
        "/v1/users",
        403,
        json={"username": "root@kh.rw", "password": "root-password-1", "role": "SUPER_ADMIN"},
    )
    short = await admin.json(
        "POST", "/v1/users", 400, json={"username": "x", "password": "short", "role": "X"}
    )
    assert len(short["message"]) == 3


async def test_deactivated_user_cannot_sign_in(client, admin, demo):
    made = await admin.json(
        "POST",
        "/v1/users",
        201,
        json={"username": "temp@kh.rw", "password": "temp-password-1", "role": "COOP_ADMIN"},
    )
    listed = await admin.json("GET", "/v1/users?role=COOP_ADMIN", 200)
    assert {u["username"] for u in listed["data"]} == {"temp@kh.rw", demo["admin"][0]}
    gone = await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    assert gone["isActive"] is False
    resp = await client.post("/v1/auth/token", json={"username": "temp@kh.rw", "password": "temp-password-1"})
    assert resp.status == 401
    me = next(u for u in listed["data"] if u["username"] == demo["admin"][0])
    await admin.json("DELETE", f"/v1/users/{me['id']}", 409)


async def _new_admin(admin, username):
    return await admin.json(
        "POST", "/v1/users", 201, json={"username": username, "password": "leaving-password-1", "role": "COOP_ADMIN"}
    )


async def _temp_login(admin, client):
    made = await _new_admin(admin, "leaving@kh.rw")
    tokens = await login(client, "leaving@kh.rw", "leaving-password-1")
    return made, tokens, Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})


async def test_a_deactivated_users_tokens_stop_working_at_once(rt, client, admin, demo):
    made, tokens, leaving = await _temp_login(admin, client)
    await leaving.json("GET", "/v1/payments", 200)
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    refused = await leaving.json("GET", "/v1/payments", 401)
    assert refused["message"] == "token has been revoked"
    # A super-admin-only route answers 401 too, not 403: the token is refused before its role is read.
    await leaving.json("POST", "/v1/cooperatives", 401, json={})
    again = await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
    assert again.status == 401
    await admin.json("GET", "/v1/payments", 200)  # the others' tokens are untouched
    mark_ttl = await rt.redis.ttl(auth.revoked_key(made["id"]))
    assert 0 < mark_ttl <= rt.settings.jwt_ttl_seconds + auth.LEEWAY + 60


async def test_a_redis_that_lost_its_data_gets_the_revocation_marks_back(rt, client, admin, demo):
    import asyncio
    import time

    made, _tokens, leaving = await _temp_login(admin, client)
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    assert (await leaving.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    ttl = rt.settings.jwt_ttl_seconds
    await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=ttl)  # the marks are all there
    assert await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=ttl) is None

    await rt.redis.flushdb()  # Redis restarted without its data: the token would work again until it expires
    await leaving.json("GET", "/v1/payments", 200)
    # Long after a token's lifetime, the deactivation needs no mark.
    later = time.time() + ttl + auth.LEEWAY + 120
    assert await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=ttl, now=later) == 0
    assert await rt.redis.get(auth.revoked_key(made["id"])) is None
    await rt.redis.flushdb()

    # What each serve process runs: within its check interval the mark is back, from the audit log.
    guard = asyncio.create_task(auth.guard_revocations(rt.redis, rt.sessionmaker, ttl_seconds=ttl, every=0.05))
    try:
        for _ in range(100):
            if await rt.redis.get(auth.revoked_key(made["id"])) is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        guard.cancel()
    assert (await leaving.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert 0 < await rt.redis.ttl(auth.revoked_key(made["id"])) <= ttl + auth.LEEWAY + 60
    await admin.json("GET", "/v1/payments", 200)  # the others' tokens are untouched
    assert await rt.redis.exists(auth.MARKS_RESTORED)


async def test_revocation_marks_evicted_for_memory_come_back(rt, client, admin, demo, caplog):
    """A Redis at its memory limit under a volatile-* policy evicts keys with an expiry: the marks, never the
    marker (no expiry). The guard sees the eviction count grow and writes the marks back."""
    import asyncio
    import logging

    if rt.settings.redis_url == "embedded":
        pytest.skip("needs a Redis server whose memory limit the test may change")
    made, _tokens, leaving = await _temp_login(admin, client)
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    ttl = rt.settings.jwt_ttl_seconds
    await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=ttl)
    mark = auth.revoked_key(made["id"])
    assert await auth.eviction_policy(rt.redis) is None  # the test server: no limit
    saved = await rt.redis.config_get("maxmemory*")
    evicted_before = await auth.evicted_keys(rt.redis)
    assert evicted_before is not None
    try:
        used = (await rt.redis.info("memory"))["used_memory"]
        await rt.redis.config_set("maxmemory", used + 2_000_000)
        await rt.redis.config_set("maxmemory-policy", "volatile-ttl")  # the shortest expiry goes first
        assert await auth.eviction_policy(rt.redis) == "volatile-ttl"
        for i in range(3_000):  # up to 30 MB of longer-lived keys, until the mark has been evicted
            await rt.redis.set(f"filler:{i}", b"x" * 10_000, ex=86_400)
            if i % 50 == 0 and not await rt.redis.exists(mark):
                break
        assert not await rt.redis.exists(mark)
        assert await rt.redis.exists(auth.MARKS_RESTORED)  # no expiry: kept, so it alone would not tell
        await leaving.json("GET", "/v1/payments", 200)  # the deactivated account's token works again
    finally:
        await rt.redis.config_set("maxmemory", saved["maxmemory"])
        await rt.redis.config_set("maxmemory-policy", saved["maxmemory-policy"])
    assert (await auth.evicted_keys(rt.redis) or 0) > evicted_before

    caplog.set_level(logging.WARNING, logger="core.auth")
    guard = asyncio.create_task(auth.guard_revocations(rt.redis, rt.sessionmaker, ttl_seconds=ttl, every=0.05))
    try:
        for _ in range(100):
            if await rt.redis.exists(mark):
                break
            await asyncio.sleep(0.05)
    finally:
        guard.cancel()
    assert (await leaving.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert any(r.getMessage().startswith("Redis evicted keys") and r.accounts == 1 for r in caplog.records)


async def test_an_evicting_redis_is_reported_at_start(rt, caplog):
    import asyncio
    import logging

    if rt.settings.redis_url == "embedded":
        pytest.skip("needs a Redis server whose memory limit the test may change")
    saved = await rt.redis.config_get("maxmemory*")
    caplog.set_level(logging.ERROR, logger="core.auth")
    try:
        await rt.redis.config_set("maxmemory", 512 * 1024 * 1024)
        await rt.redis.config_set("maxmemory-policy", "allkeys-lru")
        guard = asyncio.create_task(auth.guard_revocations(rt.redis, rt.sessionmaker,
                                                           ttl_seconds=rt.settings.jwt_ttl_seconds, every=0.05))
        for _ in range(1000):  # the guard's first check (Redis and the database): 20 s at most
            if caplog.records:
                break
            await asyncio.sleep(0.02)
        guard.cancel()
    finally:
        await rt.redis.config_set("maxmemory", saved["maxmemory"])
        await rt.redis.config_set("maxmemory-policy", saved["maxmemory-policy"])
    [reported] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "maxmemory-policy noeviction" in reported.getMessage() and reported.policy == "allkeys-lru"


async def test_revocation_is_checked_with_rate_limits_off(rt, aiohttp_client, demo):
    from app import create_app

    limits_off = replace(rt.settings, extra={**rt.settings.extra, "rate_limit_multiplier": 0.0})
    client = await aiohttp_client(create_app(limits_off, runtime=rt))
    admin = await bearer(client, *demo["admin"])
    made, _tokens, leaving = await _temp_login(admin, client)
    await leaving.json("GET", "/v1/payments", 200)
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    assert (await leaving.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"


async def test_with_redis_down_a_token_is_checked_against_its_account(rt, client, admin, demo, caplog):
    made, _tokens, leaving = await _temp_login(admin, client)
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    async with redis_unreachable(rt):
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            # No mark can be read: the account row answers. Deactivated: refused; active: served.
            assert (await leaving.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
            await admin.json("GET", "/v1/payments", 200)
            assert len(redis_fallbacks(caplog)) == 2  # judged on the rows, not on a mark a live client read
            # Deactivating needs the mark: refused whole, the account stays active.
            other = await _new_admin(admin, "staying@kh.rw")
            resp = await admin.req("DELETE", f"/v1/users/{other['id']}")
            refused = await resp.json()
            assert resp.status == 503 and "nothing was changed" in refused["message"]
            check_shape("DELETE", f"/v1/users/{other['id']}", 503, refused)
            # As every 503 of the API (README "API errors"; the document's 503 says so): when to send it again.
            assert resp.headers.get("Retry-After") == "1", dict(resp.headers)
    async with rt.sessionmaker() as s:
        assert (await s.get(AdminUser, other["id"])).is_active is True
        assert (await s.get(AdminUser, made["id"])).is_active is False


async def test_a_suspended_cooperatives_accounts_stop_working_until_it_is_active_again(
        rt, client, admin, tenant, superadmin, demo):
    """Its API keys were refused; its admins' and tenants' tokens, sign-ins and refreshes are now too."""
    coop = demo["cooperative_id"]
    refresh_token = (await login(client, *demo["admin"]))["refreshToken"]
    await admin.json("GET", "/v1/payments", 200)
    await superadmin.json("DELETE", f"/v1/cooperatives/{coop}", 200)

    for caller in (admin, tenant):
        assert (await caller.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    for username, password in (demo["admin"], demo["tenant"]):
        signin = await client.post("/v1/auth/token", json={"username": username, "password": password})
        assert signin.status == 401
    assert (await client.post("/v1/auth/refresh", json={"refreshToken": refresh_token})).status == 401
    await superadmin.json("GET", "/v1/cooperatives", 200)  # the super admin is no cooperative's account

    # Redis unable to answer: the rows say the same.
    async with rt.sessionmaker() as session:
        admin_id = (await session.execute(select(AdminUser.id).where(AdminUser.username == demo["admin"][0])
                                          )).scalar_one()
        with pytest.raises(auth.Unauthorized):
            await auth.check_still_active(session, admin_id)
    # Redis lost its data: the marks come back from the rows.
    await rt.redis.flushdb()
    assert await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds) == 2
    assert (await admin.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"

    await superadmin.json("PATCH", f"/v1/cooperatives/{coop}", 200, json={"status": "ACTIVE"})
    await asyncio.sleep(1.1)  # a token of the same second as the mark counts as revoked
    again = await bearer(client, *demo["admin"])
    await again.json("GET", "/v1/payments", 200)
    async with rt.sessionmaker() as session:
        await auth.check_still_active(session, admin_id)


async def test_the_operations_data_refuses_a_revoked_token(rt, client, admin, demo):
    made, _tokens, leaving = await _temp_login(admin, client)
    assert (await leaving.req("GET", "/ops/data")).status == 200
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    refused = await leaving.req("GET", "/ops/data")
    assert refused.status == 401 and (await refused.json())["message"] == "token has been revoked"
    assert (await admin.req("GET", "/ops/data")).status == 200


async def test_a_suspended_members_tenant_login_stops_working(client, admin, tenant, demo):
    aline = demo["members"]["+250788000001"]  # the demo tenant's member
    await tenant.json("GET", "/v1/payments", 200)
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    assert (await tenant.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    signin = await client.post("/v1/auth/token", json={"username": demo["tenant"][0], "password": demo["tenant"][1]})
    assert signin.status == 401
    await admin.json("GET", "/v1/payments", 200)  # the admin is untouched
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"status": "ACTIVE"})
    await asyncio.sleep(1.1)  # a token of the same second as the mark counts as revoked
    again = await bearer(client, *demo["tenant"])
    await again.json("GET", "/v1/payments", 200)
