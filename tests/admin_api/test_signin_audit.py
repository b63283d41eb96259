"""Sign-ins are in the audit log: who signed in and when (user.signed_in), and the lockout a run of wrong
passwords for a known account brings (user.locked_out), never the password tried, nor a username that names
no account."""

from __future__ import annotations

import json
import types
from typing import Any

import pytest
from sqlalchemy import select

from core import ratelimit
from core.models import AdminUser, AuditEvent
from tests.admin_api.conftest import Caller, login

CLERK, CLERK_PASSWORD = "clerk@kh.rw", "clerk-password-1"


async def _user_id(rt: Any, username: str) -> str:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(AdminUser.id).where(AdminUser.username == username))).scalar_one()


async def _all_rows(rt: Any) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).order_by(AuditEvent.id))).scalars())


async def test_a_sign_in_is_audited_as_the_account_itself(rt, client, admin: Caller, demo):
    admin_id = await _user_id(rt, demo["admin"][0])
    tenant_id = await _user_id(rt, demo["tenant"][0])
    await login(client, *demo["admin"])
    await login(client, *demo["tenant"])

    rows = (await admin.json("GET", "/v1/audit-events?action=user.signed_in", 200))["data"]
    by_user = {r["entityId"]: r for r in rows}
    # The admin fixture signed in once too: each sign-in is its own row.
    assert sum(1 for r in rows if r["entityId"] == admin_id) == 2
    signed = by_user[admin_id]
    assert (signed["actor"], signed["channel"], signed["entityType"], signed["cooperativeId"]) == (
        f"admin:{admin_id}", "api", "user", demo["cooperative_id"])
    # A tenant's login is the member herself, as her other acts through the API are.
    member_id = demo["members"]["+250788000001"]
    assert (by_user[tenant_id]["actor"], by_user[tenant_id]["channel"]) == (f"member:{member_id}", "api")
    assert demo["admin"][1] not in json.dumps(rows) and demo["tenant"][1] not in json.dumps(rows)


async def test_a_refused_sign_in_is_not_audited_as_a_sign_in(rt, client, demo):
    refused = await client.post("/v1/auth/token", json={"username": demo["admin"][0], "password": "nope-nope"})
    assert refused.status == 401
    assert [r for r in await _all_rows(rt) if r.action == "user.signed_in"] == []


@pytest.mark.usefixtures("limiter_clock")
async def test_a_lockout_of_a_known_account_is_audited_without_the_passwords(rt, client, admin: Caller, demo):
    made = await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})
    for n in range(10):
        answer = await client.post("/v1/auth/token", json={"username": CLERK, "password": f"guess-{n:04d}"})
        assert answer.status == 401
    locked = await client.post("/v1/auth/token", json={"username": CLERK, "password": CLERK_PASSWORD})
    assert locked.status == 429
    # Guessing at a username that names no account: refused the same way, audited nowhere.
    for n in range(5):  # (the route's own 20 a minute from this address is near)
        answer = await client.post("/v1/auth/token", json={"username": "nobody@kh.rw", "password": f"guess-{n:04d}"})
        assert answer.status == 401

    rows = (await admin.json("GET", "/v1/audit-events?action=user.locked_out", 200))["data"]
    assert len(rows) == 1, rows  # once, when the wrong passwords filled the bucket; not per refused attempt
    [row] = rows
    assert (row["entityType"], row["entityId"], row["cooperativeId"], row["channel"]) == (
        "user", made["id"], demo["cooperative_id"], "api")
    assert row["after"]["failedAttempts"] == 10
    stored = json.dumps([(r.actor, r.action, r.entity_id, r.before, r.after) for r in await _all_rows(rt)])
    assert "guess-" not in stored and CLERK_PASSWORD not in stored
    assert "nobody" not in stored


@pytest.mark.usefixtures("limiter_clock")
async def test_wrong_current_passwords_that_lock_the_account_out_are_audited(rt, client, admin: Caller, demo):
    """A stolen session guessing at the password (POST /auth/password) fills the sign-in buckets: the lockout is
    audited as at sign-in."""
    made = await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})
    clerk = Caller(client, {"Authorization": f"Bearer {(await login(client, CLERK, CLERK_PASSWORD))['accessToken']}"})
    for n in range(10):
        await clerk.json("POST", "/v1/auth/password", 400,
                         json={"currentPassword": f"guess-{n:04d}", "newPassword": "a-new-password-7"})
    rows = (await admin.json("GET", f"/v1/audit-events?action=user.locked_out&entityId={made['id']}", 200))["data"]
    assert [(r["actor"], r["after"]["per"], r["after"]["failedAttempts"]) for r in rows] == [("system", "address", 10)]
    assert "guess-" not in json.dumps([(r.before, r.after) for r in await _all_rows(rt)])


async def test_a_lockout_that_lasts_is_audited_once_not_at_each_further_wrong_password(
        rt, client, admin: Caller, demo, monkeypatch: pytest.MonkeyPatch):
    """The failed-sign-in buckets slide: once full, each few seconds one old failure weighs less and one more
    attempt fits, whose wrong password fills the bucket again. A guesser keeping at it is still the one lockout,
    not a user.locked_out row per guess."""
    made = await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})
    start = 1_800_000_000 - (1_800_000_000 % 3600)  # the start of an hour (and of a minute)
    clock = [start + 1.0]
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: clock[0]))

    async def guess(n: int) -> int:
        return (await client.post("/v1/auth/token", json={"username": CLERK, "password": f"guess-{n:04d}"})).status

    assert [await guess(n) for n in range(10)] == [401] * 10
    assert await guess(10) == 429
    # In the next minute, the last one's ten failures weigh 9.8, 9.7, ...: room for one more each time one
    # fewer counts.
    statuses = []
    for n, at in enumerate((61.0, 62.0, 67.0, 68.0, 73.0), start=11):
        clock[0] = start + at
        statuses.append(await guess(n))
    assert statuses == [401, 429, 401, 429, 401]

    rows = (await admin.json("GET", f"/v1/audit-events?action=user.locked_out&entityId={made['id']}", 200))["data"]
    assert [(r["after"]["per"], r["after"]["failedAttempts"]) for r in rows] == [("address", 10)]
