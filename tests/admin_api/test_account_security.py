"""Taking an account back: a new password (set by an admin or by its owner) revokes the API keys the account
created, as a deactivation does; with Redis down, a token from before a reset or deactivation stays refused;
the pair handed out with a new password is not dated ahead of time, so a reset right after it ends it; who may
undo a super admin's deactivation or set another admin's password; and the bound on current-password guesses."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import pytest
from sqlalchemy import select

from core import auth
from core.models import AuditEvent
from tests.admin_api.conftest import Caller, login, redis_fallbacks, redis_unreachable
from tests.conftest import behind_a_lock, sql_sent

CLERK, CLERK_PASSWORD = "clerk@kh.rw", "clerk-password-1"


async def _clerk(admin: Caller) -> dict[str, Any]:
    return await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})


def _caller(client: Any, tokens: dict[str, Any]) -> Caller:
    return Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})




def _iat(token: str) -> float:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["iat"]


async def _key_status(client: Any, key: dict[str, Any]) -> int:
    return (await client.get("/v1/members", headers={"X-API-Key": key["key"]})).status


async def _audit(rt: Any, entity_id: str, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == entity_id, AuditEvent.action == action))).scalars())


# --- F1: a new password revokes the API keys the account created ------------------------------------------


async def test_a_password_reset_revokes_the_api_keys_the_account_created(rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    taker = _caller(client, await login(client, CLERK, CLERK_PASSWORD))  # a stolen session
    key = await taker.json("POST", "/v1/api-keys", 201, json={"name": "persist", "scopes": ["admin"]})
    ours = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ours", "scopes": ["admin"]})

    answer = await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "recovered-pass-2"})
    assert answer["apiKeysRevoked"] == [key["id"]]
    assert await _key_status(client, key) == 401
    assert await _key_status(client, ours) == 200  # another account's key is untouched
    [revoked] = await _audit(rt, key["id"], "api_key.revoked")
    assert revoked.after == {"reason": "creator's password reset"} and revoked.actor.startswith("admin:")
    [reset] = await _audit(rt, made["id"], "user.password_reset")
    assert reset.after == {"sessionsEnded": True, "apiKeysRevoked": [key["id"]]}
    assert "recovered-pass-2" not in json.dumps(reset.after) and "scrypt$" not in json.dumps(reset.after)
    # Once more: nothing left to revoke.
    again = await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "recovered-pass-3"})
    assert again["apiKeysRevoked"] == []


async def test_changing_ones_own_password_revokes_the_api_keys_one_created(rt, client, admin, demo):
    await _clerk(admin)
    me = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    key = await me.json("POST", "/v1/api-keys", 201, json={"name": "persist", "scopes": ["admin"]})
    pair = await me.json("POST", "/v1/auth/password", 200,
                         json={"currentPassword": CLERK_PASSWORD, "newPassword": "owner-new-pass-3"})
    assert pair["apiKeysRevoked"] == [key["id"]]
    assert await _key_status(client, key) == 401
    [revoked] = await _audit(rt, key["id"], "api_key.revoked")
    assert revoked.after == {"reason": "creator's password changed"}
    await _caller(client, pair).json("GET", "/v1/payments", 200)


# --- F3: with Redis down, the rows refuse what the mark would ----------------------------------------------


async def test_with_redis_down_a_token_from_before_a_reset_or_a_deactivation_undone_is_refused(
        rt, client, admin, superadmin, demo, caplog):
    made = await _clerk(admin)
    before_reset = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "recovered-pass-2"})
    after_reset = _caller(client, await login(client, CLERK, "recovered-pass-2"))
    # Turned off and on again within a token's life: the account is active, its old token is not.
    await after_reset.json("GET", "/v1/payments", 200)
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    fresh = _caller(client, await login(client, CLERK, "recovered-pass-2"))

    async with redis_unreachable(rt):
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            for old in (before_reset, after_reset):
                assert (await old.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
            await fresh.json("GET", "/v1/payments", 200)
            await admin.json("GET", "/v1/payments", 200)
    # Each judged on the rows: no mark could be read (not the live server's, by a client left up).
    assert len(redis_fallbacks(caplog)) == 4


async def test_the_fallback_reads_the_account_and_its_sessions_end_in_one_query(
        rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    old = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "recovered-pass-2"})
    async with redis_unreachable(rt):
        with sql_sent(rt) as sent:
            assert (await old.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    [check] = [q for q in sent if "admin_users" in q]
    assert "audit_events" in check, sent


# --- F5: the pair from a new password is not dated ahead; revocation is compared to the microsecond ------------


async def test_the_pair_from_a_new_password_is_not_future_dated_and_a_reset_right_after_ends_it(
        rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    pair = await _caller(client, await login(client, CLERK, CLERK_PASSWORD)).json(
        "POST", "/v1/auth/password", 200, json={"currentPassword": CLERK_PASSWORD, "newPassword": "taker-pass-99"})
    assert _iat(pair["accessToken"]) <= time.time() and _iat(pair["refreshToken"]) <= time.time()
    await _caller(client, pair).json("GET", "/v1/payments", 200)  # it works at once
    refreshed = await client.post("/v1/auth/refresh", json={"refreshToken": pair["refreshToken"]})
    assert refreshed.status == 200
    chained = await refreshed.json()
    assert _iat(chained["accessToken"]) <= time.time()  # not carried forward either

    # The owner's admin resets the password at once (the same second): the pair and its refresh chain end.
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "owner-recovers-7"})
    for tokens in (pair, chained):
        assert (await _caller(client, tokens).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert (await client.post("/v1/auth/refresh", json={"refreshToken": chained["refreshToken"]})).status == 401


async def test_the_pair_from_a_new_password_ends_with_a_deactivation_right_after(rt, client, admin, demo):
    made = await _clerk(admin)
    pair = await _caller(client, await login(client, CLERK, CLERK_PASSWORD)).json(
        "POST", "/v1/auth/password", 200, json={"currentPassword": CLERK_PASSWORD, "newPassword": "taker-pass-99"})
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    assert (await _caller(client, pair).json("GET", "/v1/members", 401))["message"] == "token has been revoked"
    # Redis lost its data: the mark restored from the audit log refuses it too.
    await rt.redis.flushdb()
    await auth.restore_revocations(rt.redis, rt.sessionmaker, ttl_seconds=rt.settings.jwt_ttl_seconds)
    assert (await _caller(client, pair).json("GET", "/v1/members", 401))["message"] == "token has been revoked"


def test_revocation_is_compared_to_the_microsecond_and_whole_seconds_stay_on_the_safe_side():
    mark = b"1700000000.5"
    auth.check_not_revoked({"iat": 1700000000.500001}, mark)  # issued after the mark: works
    for iat in (1700000000.5, 1700000000.2, 1700000000, 1699999999):  # at or before it, or of older code's
        try:                                                        # whole second that may be before it
            auth.check_not_revoked({"iat": iat}, mark)
            raise AssertionError(f"iat {iat} accepted")
        except auth.Unauthorized:
            pass
    auth.check_not_revoked({"iat": 1700000001}, mark)  # older code's token from the next second
    # A mark of older code (whole seconds) covers its whole second, as it did.
    for iat in (1700000000.999, 1700000000):
        try:
            auth.check_not_revoked({"iat": iat}, b"1700000000")
            raise AssertionError(f"iat {iat} accepted")
        except auth.Unauthorized:
            pass
    auth.check_not_revoked({"iat": 1700000001.0}, b"1700000000")


# --- F6: what a cooperative admin may not do ---------------------------------------------------------------


async def test_only_a_super_admin_turns_on_again_an_account_a_super_admin_turned_off(
        rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    refused = await admin.json("PATCH", f"/v1/users/{made['id']}", 403, json={"isActive": True})
    assert refused["message"] == "only a super admin can turn this account on again: a super admin turned it off"
    assert await _audit(rt, made["id"], "user.reactivated") == []
    assert (await client.post("/v1/auth/token", json={"username": CLERK, "password": CLERK_PASSWORD})).status == 401
    # One a cooperative admin turned off, they may turn on again; a super admin, any.
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    assert (await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True}))["isActive"] is True


async def test_an_account_turned_off_by_no_administrator_is_turned_on_again_by_a_super_admin_only(
        rt, client, admin, superadmin, demo):
    """Turned off by no administrator's hand (the operator in the database: no user.deactivated row; or by an API
    key): the platform's decision until a super admin says otherwise, not the cooperative admin's to undo."""
    from sqlalchemy import update

    from core.audit import Actor, record
    from core.models import AdminUser

    made = await _clerk(admin)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(AdminUser).where(AdminUser.id == made["id"]).values(is_active=False))
    refused = await admin.json("PATCH", f"/v1/users/{made['id']}", 403, json={"isActive": True})
    assert refused["message"] == "only a super admin can turn this account on again: a super admin turned it off"
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(AdminUser).where(AdminUser.id == made["id"]).values(is_active=False))
        await record(s, actor=Actor("apikey:k1", "api"), action="user.deactivated", entity_type="user",
                     entity_id=made["id"], after={"apiKeysRevoked": []}, cooperative_id=demo["cooperative_id"])
    await admin.json("PATCH", f"/v1/users/{made['id']}", 403, json={"isActive": True})
    assert len(await _audit(rt, made["id"], "user.reactivated")) == 1
    assert (await client.post("/v1/auth/token", json={"username": CLERK, "password": CLERK_PASSWORD})).status == 401


async def test_a_coop_admin_sets_a_tenants_password_but_not_a_fellow_admins(rt, client, admin, superadmin, demo):
    made = await _clerk(admin)
    refused = await admin.json("PATCH", f"/v1/users/{made['id']}", 403, json={"password": "i-now-own-this-1"})
    assert refused["message"].startswith("only a super admin can set another administrator's password")
    assert await _audit(rt, made["id"], "user.password_reset") == []
    assert (await client.post("/v1/auth/token", json={"username": CLERK, "password": "i-now-own-this-1"})).status == 401
    # Turned off together with a new password: refused whole, the account stays on.
    await admin.json("PATCH", f"/v1/users/{made['id']}", 403, json={"isActive": False, "password": "i-now-own-this-1"})
    clerk = next(u for u in (await admin.json("GET", "/v1/users?role=COOP_ADMIN", 200))["data"]
                 if u["id"] == made["id"])
    assert clerk["isActive"] is True

    tenant_id = next(u["id"] for u in (await admin.json("GET", "/v1/users?role=TENANT", 200))["data"]
                     if u["username"] == demo["tenant"][0])
    await admin.json("PATCH", f"/v1/users/{tenant_id}", 200, json={"password": "tenant-reset-pass-1"})
    assert (await client.post("/v1/auth/token", json={"username": demo["tenant"][0],
                                                      "password": "tenant-reset-pass-1"})).status == 200
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "set-by-the-super-1"})


# --- F7: a burst of current-password guesses -----------------------------------------------------------------


@pytest.mark.usefixtures("limiter_clock")
async def test_a_burst_of_current_password_guesses_gets_no_more_than_sign_in_allows(client, demo):
    username, password = demo["admin"]
    me = _caller(client, await login(client, username, password))
    body = {"currentPassword": "guess-guess", "newPassword": "my-new-password-9"}
    answers = await asyncio.gather(*(me.req("POST", "/v1/auth/password", json=body) for _ in range(25)))
    codes = [r.status for r in answers]
    assert codes.count(400) <= 10 and set(codes) <= {400, 429}


# --- A sign-in racing a reset or a deactivation: it is answered on the account as it is once it holds it ------


async def test_a_sign_in_whose_password_check_ran_across_a_reset_gets_no_pair_that_outlives_it(
        rt, client, admin, superadmin, demo, monkeypatch):
    """The old password was read before the reset; the KDF (tens of milliseconds) finished after it. The sign-in
    used to be answered on the password it read (200, with a pair dated before the reset, which the reset ended);
    it now reads the account again once it holds it, and the password it checked is no longer the account's."""
    import threading

    made = await _clerk(admin)
    entered, release = threading.Event(), threading.Event()
    real_verify = auth.verify_password

    def slow_verify(password: str, stored: str) -> bool:
        entered.set()
        release.wait(10)
        return real_verify(password, stored)

    monkeypatch.setattr(auth, "verify_password", slow_verify)
    signing_in = asyncio.ensure_future(client.post("/v1/auth/token", json={"username": CLERK,
                                                                          "password": CLERK_PASSWORD}))
    assert await asyncio.to_thread(entered.wait, 10)  # the row is read, the KDF runs
    monkeypatch.setattr(auth, "verify_password", real_verify)
    await superadmin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"password": "recovered-pass-2"})
    release.set()
    answer = await signing_in
    body = await answer.json()
    if answer.status == 200:  # answered on the password it read: the reset must have ended what it got
        assert (await _caller(client, body).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
        assert (await client.post("/v1/auth/refresh", json={"refreshToken": body["refreshToken"]})).status == 401
    assert (answer.status, body.get("message")) == (401, "invalid username or password")
    await _caller(client, await login(client, CLERK, "recovered-pass-2")).json("GET", "/v1/payments", 200)


async def test_a_sign_in_between_the_mark_and_the_commit_of_a_deactivation_gets_no_pair_that_outlives_it(
        rt, client, admin, demo, monkeypatch):
    """The deactivation is marked in Redis, then committed: a sign-in in between used to read the account still
    active (the change not yet visible) and get a pair dated after that mark, which only the mark written again
    after the commit ended. It now waits for the commit (the deactivation holds the account) and is refused."""
    made = await _clerk(admin)
    real_revoke = auth.revoke_tokens
    sneaked: list[asyncio.Future[Any]] = []

    async def revoke_then_sign_in(*args: Any, **kwargs: Any) -> None:
        await real_revoke(*args, **kwargs)
        if not sneaked:  # the first mark, before the commit: the sign-in comes to the account (or finishes)
            sneaked.append(asyncio.ensure_future(client.post("/v1/auth/token", json={"username": CLERK,
                                                                                     "password": CLERK_PASSWORD})))
            # On PostgreSQL until it waits for the account's row (or, without that turn, has ended): after a fixed
            # second, a loaded host's sign-in had not read the account yet, read it after the commit, and the test
            # passed whatever the sign-in holds. SQLite: a second, as before.
            await behind_a_lock(rt, sneaked[0], sqlite=1.0)

    monkeypatch.setattr(auth, "revoke_tokens", revoke_then_sign_in)
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    answer = await sneaked[0]
    body = await answer.json()
    if answer.status == 200:  # it read the account before the commit: what it got must not work now
        assert (await _caller(client, body).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
        assert (await client.post("/v1/auth/refresh", json={"refreshToken": body["refreshToken"]})).status == 401
    assert (answer.status, body.get("message")) == (401, "invalid username or password")


async def test_with_redis_failing_after_the_commit_the_change_stands(rt, client, admin, demo, monkeypatch, caplog):
    made = await _clerk(admin)
    old = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    real_revoke = auth.revoke_tokens
    calls: list[int] = []

    async def second_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("Redis went away")
        await real_revoke(*args, **kwargs)

    monkeypatch.setattr(auth, "revoke_tokens", second_fails)
    await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": False})
    assert len(calls) == 2
    assert (await old.json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert (await _audit(rt, made["id"], "user.deactivated"))
    assert any("the mark after it could not be written" in r.getMessage() for r in caplog.records)
