"""Accounts after they exist: an admin turns one off and on again or sets a forgotten password (its sessions end);
a signed-in user changes their own password (the current one required, wrong ones counted as at sign-in)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from core import auth
from core.crypto import verify_password
from core.models import AdminUser, ApiKey, AuditEvent
from tests.admin_api.conftest import Caller, bearer, login, redis_unreachable

CLERK, CLERK_PASSWORD = "clerk@kh.rw", "clerk-password-1"


async def _clerk(admin: Caller) -> dict:
    return await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})


def _caller(client, tokens) -> Caller:
    return Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})


async def _sign_in_status(client, username: str, password: str) -> int:
    return (await client.post("/v1/auth/token", json={"username": username, "password": password})).status


async def _refresh_status(client, tokens) -> int:
    return (await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})).status


async def _audit(rt, user_id: str, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == user_id, AuditEvent.action == action))).scalars())


async def _row(rt, user_id: str) -> AdminUser:
    async with rt.sessionmaker() as s:
        return await s.get(AdminUser, user_id)


def _no_secret_in(event: AuditEvent, *secrets: str) -> None:
    text = json.dumps([event.before, event.after])
    assert "scrypt$" not in text and not any(secret in text for secret in secrets)


async def test_an_admin_sets_a_new_password_and_the_old_sessions_and_password_stop_working(
        rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    tokens = await login(client, CLERK, CLERK_PASSWORD)
    clerk = _caller(client, tokens)
    await clerk.json("GET", "/v1/payments", 200)

    # A cooperative admin's password is set by a super admin (a fellow cooperative admin may not: 403).
    answer = await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "a-brand-new-pass-2"})
    assert answer["id"] == made["id"] and answer["isActive"] is True and answer["apiKeysRevoked"] == []

    row = await _row(rt, made["id"])
    assert verify_password("a-brand-new-pass-2", row.password_hash)
    assert not verify_password(CLERK_PASSWORD, row.password_hash)
    assert (await clerk.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert await _refresh_status(client, tokens) == 401
    assert await _sign_in_status(client, CLERK, CLERK_PASSWORD) == 401
    [event] = await _audit(rt, made["id"], "user.password_reset")
    users = (await superadmin.json("GET", "/v1/users?role=SUPER_ADMIN", 200))["data"]
    assert event.actor == f"admin:{next(u['id'] for u in users if u['username'] == demo['super_admin'][0])}"
    assert event.channel == "api" and event.after == {"sessionsEnded": True, "apiKeysRevoked": []}
    assert event.cooperative_id == demo["cooperative_id"]
    _no_secret_in(event, "a-brand-new-pass-2", CLERK_PASSWORD)

    # Signing in right after (the same second): revocation is compared to the microsecond, so it works.
    fresh = await login(client, CLERK, "a-brand-new-pass-2")
    await _caller(client, fresh).json("GET", "/v1/payments", 200)
    assert await _refresh_status(client, fresh) == 200
    await admin.json("GET", "/v1/payments", 200)  # the admin's own session is untouched


async def test_a_deactivated_account_is_turned_on_again_but_its_old_sessions_stay_ended(rt, client, admin, demo):
    made = await _clerk(admin)
    tokens = await login(client, CLERK, CLERK_PASSWORD)
    key = await _caller(client, tokens).json("POST", "/v1/api-keys", 201, json={"name": "clerk", "scopes": ["admin"]})

    off = await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    # As DELETE: off, its tokens refused, the key it made revoked.
    assert off["isActive"] is False and off["apiKeysRevoked"] == [key["id"]]
    assert (await _caller(client, tokens).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    async with rt.sessionmaker() as s:
        assert (await s.get(ApiKey, key["id"])).revoked_at is not None
    assert len(await _audit(rt, made["id"], "user.deactivated")) == 1

    # The username is kept by the account; creating it again says how to have it back.
    taken = await admin.json("POST", "/v1/users", 409,
                             json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})
    assert f"PATCH /v1/users/{made['id']}" in taken["message"]

    on = await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    assert on["isActive"] is True and on["apiKeysRevoked"] == []
    assert (await _row(rt, made["id"])).is_active is True
    [event] = await _audit(rt, made["id"], "user.reactivated")
    assert event.actor.startswith("admin:") and event.after is None
    # Turning it on brings back neither the sessions from before nor the key.
    assert await _refresh_status(client, tokens) == 401
    assert (await client.get("/v1/payments", headers={"X-API-Key": key["key"]})).status == 401
    again = await bearer(client, CLERK, CLERK_PASSWORD)
    await again.json("GET", "/v1/payments", 200)
    # Once more: no second audit row for what did not change.
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    assert len(await _audit(rt, made["id"], "user.reactivated")) == 1


async def test_who_may_change_an_account(rt, client, admin, superadmin, tenant, demo, coop_b):
    users = (await admin.json("GET", "/v1/users", 200))["data"]
    admin_row = next(u for u in users if u["username"] == demo["admin"][0])
    own = await admin.json("PATCH", f"/v1/users/{admin_row['id']}", 409, json={"isActive": False})
    assert own["message"] == "you cannot turn your own account off or on"
    own = await admin.json("PATCH", f"/v1/users/{admin_row['id']}", 409, json={"password": "self-set-password"})
    assert "POST /v1/auth/password" in own["message"]
    await admin.json("PATCH", f"/v1/users/{admin_row['id']}", 400, json={})
    await admin.json("PATCH", f"/v1/users/{admin_row['id']}", 400, json={"password": "short"})
    await admin.json("PATCH", f"/v1/users/{admin_row['id']}", 400, json={"role": "SUPER_ADMIN"})
    await tenant.json("PATCH", f"/v1/users/{admin_row['id']}", 403, json={"isActive": False})
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "robot", "scopes": ["admin"]})
    robot = Caller(client, {"X-API-Key": key["key"]})
    await robot.json("PATCH", f"/v1/users/{admin_row['id']}", 403, json={"isActive": False})
    # Another cooperative's admin does not see this account; a super admin does.
    await coop_b["admin"].json("PATCH", f"/v1/users/{admin_row['id']}", 404, json={"isActive": False})
    await superadmin.json("PATCH", f"/v1/users/{admin_row['id']}", 200, json={"password": "set-by-the-super-1"})
    assert (await _row(rt, admin_row["id"])).is_active is True
    assert await _sign_in_status(client, demo["admin"][0], "set-by-the-super-1") == 200


async def test_a_user_changes_their_own_password_and_their_other_sessions_end(rt, client, demo):
    username, password = demo["admin"]
    first, second = await login(client, username, password), await login(client, username, password)
    me = _caller(client, first)
    wrong = await me.json("POST", "/v1/auth/password", 400,
                          json={"currentPassword": "not-my-password", "newPassword": "my-new-password-9"})
    assert wrong["message"] == ["currentPassword is not your current password"]
    same = await me.json("POST", "/v1/auth/password", 400,
                         json={"currentPassword": password, "newPassword": password})
    assert same["message"] == ["newPassword must differ from the current password"]
    await me.json("POST", "/v1/auth/password", 400, json={"currentPassword": password, "newPassword": "short"})
    user_id = (await _row_by_name(rt, username)).id
    assert await _audit(rt, user_id, "user.password_changed") == []

    pair = await me.json("POST", "/v1/auth/password", 200,
                         json={"currentPassword": password, "newPassword": "my-new-password-9"})
    assert pair["role"] == "COOP_ADMIN"
    assert verify_password("my-new-password-9", (await _row_by_name(rt, username)).password_hash)
    # Every session from before ended, the caller's own too; the new pair works at once.
    for tokens in (first, second):
        assert (await _caller(client, tokens).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
        assert await _refresh_status(client, tokens) == 401
    await _caller(client, pair).json("GET", "/v1/payments", 200)
    assert await _sign_in_status(client, username, password) == 401
    [event] = await _audit(rt, user_id, "user.password_changed")
    assert event.actor == f"admin:{user_id}" and event.after == {"sessionsEnded": True, "apiKeysRevoked": []}
    _no_secret_in(event, password, "my-new-password-9")

    # Redis lost its data: the marks come back from the audit log, and the new pair still works.
    await rt.redis.flushdb()
    assert await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds) == 1
    assert (await _caller(client, second).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    await _caller(client, pair).json("GET", "/v1/payments", 200)
    refreshed = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert refreshed.status == 200
    await _caller(client, await refreshed.json()).json("GET", "/v1/payments", 200)


async def _row_by_name(rt, username: str) -> AdminUser:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(AdminUser).where(AdminUser.username == username))).scalar_one()


async def test_a_tenant_changes_their_own_password_but_an_api_key_has_none(client, admin, tenant, demo):
    username, password = demo["tenant"]
    pair = await tenant.json("POST", "/v1/auth/password", 200,
                             json={"currentPassword": password, "newPassword": "tenant-new-password"})
    assert pair["role"] == "TENANT"
    assert await _sign_in_status(client, username, "tenant-new-password") == 200
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "robot", "scopes": ["payments:read"]})
    robot = Caller(client, {"X-API-Key": key["key"]})
    await robot.json("POST", "/v1/auth/password", 403,
                     json={"currentPassword": "anything", "newPassword": "anything-long-1"})


@pytest.mark.usefixtures("limiter_clock")
async def test_wrong_current_passwords_are_counted_as_failed_sign_ins(client, demo):
    username, password = demo["admin"]
    me = _caller(client, await login(client, username, password))
    body = {"currentPassword": "guess-guess", "newPassword": "my-new-password-9"}
    for _ in range(10):
        await me.json("POST", "/v1/auth/password", 400, json=body)
    # The sign-in buckets of this username and address are full: the right password is refused too, here (by
    # the route's own limit, the same 10 a minute) and at sign-in.
    await me.json("POST", "/v1/auth/password", 429,
                  json={"currentPassword": password, "newPassword": "my-new-password-9"})
    refused = await client.post("/v1/auth/token", json={"username": username, "password": password})
    assert refused.status == 429
    assert (await refused.json())["message"].startswith("Too many failed sign-in attempts")


async def test_with_redis_down_a_new_password_is_refused_whole(rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    async with redis_unreachable(rt):
        refused = await superadmin.json("PATCH", f"/v1/users/{made['id']}", 503,
                                        json={"password": "not-stored-password"})
        assert "nothing was changed" in refused["message"]
    assert verify_password(CLERK_PASSWORD, (await _row(rt, made["id"])).password_hash)
    assert await _audit(rt, made["id"], "user.password_reset") == []


async def test_a_password_of_exactly_the_shortest_length_is_taken_and_one_shorter_is_not(rt, client, admin, superadmin):
    """PASSWORD_MIN (12) characters is a password the rules allow (the 400 says "at least 12 characters"): set by a
    super admin, or by the account's owner, it is stored and signs in; 11 is refused, nothing changed."""
    made = await _clerk(admin)
    eleven, twelve, other = "aa-pass-789", "bb-pass-7890", "cc-pass-7890"
    assert (len(eleven), len(twelve), len(other)) == (11, 12, 12)
    refused = await superadmin.json("PATCH", f"/v1/users/{made['id']}", 400, json={"password": eleven})
    assert refused["message"] == ["password must be at least 12 characters"]
    assert verify_password(CLERK_PASSWORD, (await _row(rt, made["id"])).password_hash)
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": twelve})
    assert verify_password(twelve, (await _row(rt, made["id"])).password_hash)
    me = _caller(client, await login(client, CLERK, twelve))
    await me.json("POST", "/v1/auth/password", 200, json={"currentPassword": twelve, "newPassword": other})
    assert await _sign_in_status(client, CLERK, other) == 200
    assert len(await _audit(rt, made["id"], "user.password_reset")) == 1
    assert len(await _audit(rt, made["id"], "user.password_changed")) == 1
