"""Races against what ends an account's sessions, and against the sign-in limits.

A password change (or reset, or deactivation) takes turns with a sign-in, a refresh and an API key being made for
the same account: whichever way they meet, no token or key from the stolen session outlives the change. A burst of
concurrent wrong passwords gets the documented 10 a minute per account and address, not one more.

The interleavings are forced: a step of one request waits for the other request, up to WAIT seconds (it either
finishes meanwhile, as it did before the fix, or waits on the account's row, as it does now, and then goes on).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from core import auth
from core.models import ApiKey
from tests.admin_api.conftest import Caller, login
from tests.admin_api.test_signin_limits import redis_down  # noqa: F401  (a fixture)

CLERK, CLERK_PASSWORD, NEW_PASSWORD = "clerk@kh.rw", "clerk-password-1", "owner-new-pass-9"
WAIT = 1.0
CHANGE = {"currentPassword": CLERK_PASSWORD, "newPassword": NEW_PASSWORD}


async def _clerk(admin: Caller) -> dict[str, Any]:
    return await admin.json("POST", "/v1/users", 201,
                            json={"username": CLERK, "password": CLERK_PASSWORD, "role": "COOP_ADMIN"})


def _caller(client: Any, tokens: dict[str, Any]) -> Caller:
    return Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})


async def _meanwhile(started: list[asyncio.Future[Any]], start: Any) -> None:
    """Start the other request (once) and give it WAIT seconds to finish."""
    if not started:
        started.append(asyncio.ensure_future(start()))
        await asyncio.wait(started, timeout=WAIT)


async def _refresh(client: Any, tokens: dict[str, Any]) -> Any:
    return await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})


# --- a refresh while the password is being changed ----------------------------------------------------------


async def test_a_refresh_during_a_password_change_gets_no_token_that_outlives_it(rt, client, admin, demo,
                                                                                monkeypatch):
    """The change is written (new password, audit row) but not committed when the stolen refresh token comes
    in. It used to be answered at once, with a pair dated after the change's audit row: the access token died
    with the mark written after the commit, the refresh token lived on for its week."""
    await _clerk(admin)
    stolen = await login(client, CLERK, CLERK_PASSWORD)
    owner = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    real_revoke, racing = auth.revoke_tokens, []

    async def refresh_then_mark(*args: Any, **kwargs: Any) -> None:
        await _meanwhile(racing, lambda: _refresh(client, stolen))  # the first mark: before the commit
        await real_revoke(*args, **kwargs)

    monkeypatch.setattr(auth, "revoke_tokens", refresh_then_mark)
    new_pair = await owner.json("POST", "/v1/auth/password", 200, json=CHANGE)
    answer = await racing[0]
    body = await answer.json()
    if answer.status == 200:  # the unfixed outcome: what it got must not work now
        assert (await _refresh(client, body)).status == 401, "a refresh token from the race outlived the change"
    # It waited for the change and was then refused, as every refresh token from before the new password is.
    assert (answer.status, body["message"]) == (401, "token has been revoked")
    assert (await _refresh(client, new_pair)).status == 200  # the owner's pair from the change works


async def test_a_password_change_during_a_refresh_ends_the_pair_the_refresh_hands_out(rt, client, admin, demo,
                                                                                    monkeypatch):
    """The other way round: the refresh holds the account when the owner changes the password. The change waits
    for it; the pair it handed out is dated before the change and so ends with it."""
    await _clerk(admin)
    stolen = await login(client, CLERK, CLERK_PASSWORD)
    owner = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    real_issue, changing = auth.issue_tokens, []

    def issue(*args: Any, **kwargs: Any) -> auth.TokenPair:
        if not changing:
            changing.append(asyncio.ensure_future(owner.req("POST", "/v1/auth/password", json=CHANGE)))
        return real_issue(*args, **kwargs)

    monkeypatch.setattr(auth, "issue_tokens", issue)
    answer = await _refresh(client, stolen)
    assert answer.status == 200
    monkeypatch.setattr(auth, "issue_tokens", real_issue)
    assert (await changing[0]).status == 200
    got = await answer.json()
    assert (await _caller(client, got).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert (await _refresh(client, got)).status == 401


# --- a sign-in with the old password while the password is being changed --------------------------------------


def _sign_in(client: Any, password: str = CLERK_PASSWORD) -> Any:
    return client.post("/v1/auth/token", json={"username": CLERK, "password": password})


async def _change(how: str, client: Any, admin: Caller, superadmin: Caller, clerk_id: str) -> None:
    """End the clerk's sessions `how`."""
    if how == "change":
        owner = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
        await owner.json("POST", "/v1/auth/password", 200, json=CHANGE)
    elif how == "reset":
        await superadmin.json("PATCH", f"/v1/users/{clerk_id}", 200, json={"password": NEW_PASSWORD})
    else:
        await admin.json("PATCH", f"/v1/users/{clerk_id}", 200, json={"isActive": False})


@pytest.mark.parametrize("how", ["change", "reset", "deactivation"])
async def test_a_sign_in_during_a_change_that_ends_the_sessions_gets_no_token_that_outlives_it(
        rt, client, admin, superadmin, demo, monkeypatch, how):
    """The new password (or the deactivation) is written but not committed when someone signs in with the old
    password. The sign-in read the account as it was and was answered at once, with a pair dated after the
    change's audit row: the mark after the commit ended its access token, its refresh token lived on for its
    week (after a deactivation, once the account was turned on again). Now it waits for the change, reads the
    account again and is refused as a wrong password is."""
    made = await _clerk(admin)
    real_revoke, racing = auth.revoke_tokens, []

    async def sign_in_then_mark(*args: Any, **kwargs: Any) -> None:
        await _meanwhile(racing, lambda: _sign_in(client))  # the first mark: before the commit
        await real_revoke(*args, **kwargs)

    monkeypatch.setattr(auth, "revoke_tokens", sign_in_then_mark)
    await _change(how, client, admin, superadmin, made["id"])
    monkeypatch.setattr(auth, "revoke_tokens", real_revoke)
    answer = await racing[0]
    body = await answer.json()
    if how == "deactivation":  # turned on again: what the deactivation ended stays ended
        await admin.json("PATCH", f"/v1/users/{made['id']}", 200, json={"isActive": True})
    if answer.status == 200:  # the unfixed outcome: what it got must not work now
        assert (await _refresh(client, body)).status == 401, "a refresh token from the race outlived the change"
    assert (answer.status, body.get("message")) == (401, "invalid username or password")
    # Signed in now, with the password the account has, the pair works and refreshes.
    password = CLERK_PASSWORD if how == "deactivation" else NEW_PASSWORD
    assert (await _refresh(client, await login(client, CLERK, password))).status == 200
    if how != "deactivation":
        assert (await _sign_in(client)).status == 401  # the old password


async def test_a_change_during_a_sign_in_ends_the_pair_the_sign_in_hands_out(rt, client, admin, superadmin, demo,
                                                                           monkeypatch):
    """The other way round: the sign-in holds the account when the admin resets the password. The reset waits
    for it; the pair it handed out is dated before the reset and so ends with it."""
    made = await _clerk(admin)
    real_issue, resetting = auth.issue_tokens, []

    def issue(*args: Any, **kwargs: Any) -> auth.TokenPair:
        if not resetting:
            resetting.append(asyncio.ensure_future(superadmin.req("PATCH", f"/v1/users/{made['id']}",
                                                                  json={"password": NEW_PASSWORD})))
        return real_issue(*args, **kwargs)

    monkeypatch.setattr(auth, "issue_tokens", issue)
    got = await login(client, CLERK, CLERK_PASSWORD)
    monkeypatch.setattr(auth, "issue_tokens", real_issue)
    assert (await resetting[0]).status == 200
    assert (await _caller(client, got).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert (await _refresh(client, got)).status == 401


# --- a sign-in while the cooperative or the member is being suspended ------------------------------------------


async def _suspend(how: str, admin: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    if how == "cooperative":
        await superadmin.json("DELETE", f"/v1/cooperatives/{demo['cooperative_id']}", 200)
    else:
        await admin.json("DELETE", f"/v1/members/{demo['members']['+250788000001']}", 200)


async def _reactivate(how: str, admin: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    if how == "cooperative":
        await superadmin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 200, json={"status": "ACTIVE"})
    else:
        await admin.json("PATCH", f"/v1/members/{demo['members']['+250788000001']}", 200, json={"status": "ACTIVE"})


_SUSPENDED = {"cooperative": ("admin", "revoke_cooperative_tokens"), "member": ("tenant", "revoke_member_tokens")}


@pytest.mark.parametrize("how", ["cooperative", "member"])
async def test_a_sign_in_during_a_suspension_gets_no_token_that_outlives_it(rt, client, admin, superadmin, demo,
                                                                           monkeypatch, how):
    """The suspension is written (status, user.sessions_ended rows) but not committed when its admin (or the
    member's tenant login) signs in. The sign-in read the cooperative as still ACTIVE and was answered at once,
    with a pair dated after the sessions_ended row: the mark after the commit ended its access token, but once the
    cooperative was made active again its refresh token worked for the rest of its week. Now the suspension holds
    the accounts it ends: the sign-in waits for it, and is then refused as the suspended account's is."""
    login_of, mark_name = _SUSPENDED[how]
    username, password = demo[login_of]
    real_mark, racing = getattr(auth, mark_name), []

    async def sign_in_then_mark(*args: Any, **kwargs: Any) -> int:
        await _meanwhile(racing, lambda: client.post("/v1/auth/token",
                                                     json={"username": username, "password": password}))
        return await real_mark(*args, **kwargs)  # the first mark: before the commit

    monkeypatch.setattr(auth, mark_name, sign_in_then_mark)
    await _suspend(how, admin, superadmin, demo)
    monkeypatch.setattr(auth, mark_name, real_mark)
    answer = await racing[0]
    body = await answer.json()
    await _reactivate(how, admin, superadmin, demo)
    if answer.status == 200:  # the unfixed outcome: what it got must not work now
        assert (await _refresh(client, body)).status == 401, "a refresh token from the race outlived the suspension"
    assert (answer.status, body.get("message")) == (401, "invalid username or password")
    assert (await _refresh(client, await login(client, username, password))).status == 200  # signed in anew


@pytest.mark.parametrize("how", ["cooperative", "member"])
async def test_a_suspension_during_a_sign_in_ends_the_pair_the_sign_in_hands_out(rt, client, admin, superadmin,
                                                                                demo, monkeypatch, how):
    """The other way round: the sign-in has read the account when the suspension comes. The suspension waits for
    it; the pair it handed out is dated before the suspension's sessions_ended row and ends with it, also once
    active again."""
    login_of, _ = _SUSPENDED[how]
    real_issue, suspending = auth.issue_tokens, []

    def issue(*args: Any, **kwargs: Any) -> auth.TokenPair:
        if not suspending:
            suspending.append(asyncio.ensure_future(_suspend(how, admin, superadmin, demo)))
        return real_issue(*args, **kwargs)

    monkeypatch.setattr(auth, "issue_tokens", issue)
    got = await login(client, *demo[login_of])
    monkeypatch.setattr(auth, "issue_tokens", real_issue)
    await suspending[0]
    await _reactivate(how, admin, superadmin, demo)
    assert (await _caller(client, got).json("GET", "/v1/payments", 401))["message"] == "token has been revoked"
    assert (await _refresh(client, got)).status == 401


# --- an API key made while the password is being changed ---------------------------------------------------


async def _live_keys(rt: Any, user_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(ApiKey.id).where(
            ApiKey.created_by == user_id, ApiKey.revoked_at.is_(None)))).scalars())


async def test_an_api_key_being_made_when_the_password_changes_is_revoked_with_it(rt, client, admin, demo,
                                                                                monkeypatch):
    """The key's row is written, not committed, when the owner changes the password: the change used to read the
    account's keys without it, and the key made with the stolen session kept admin access for good."""
    made = await _clerk(admin)
    taker = _caller(client, await login(client, CLERK, CLERK_PASSWORD))  # a stolen session
    owner = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    real_create, changing = auth.create_api_key, []

    async def create_then_wait(*args: Any, **kwargs: Any) -> Any:
        out = await real_create(*args, **kwargs)  # the row is written, its transaction open
        await _meanwhile(changing, lambda: owner.req("POST", "/v1/auth/password", json=CHANGE))
        return out

    monkeypatch.setattr(auth, "create_api_key", create_then_wait)
    key = await taker.json("POST", "/v1/api-keys", 201, json={"name": "persist", "scopes": ["admin"]})
    changed = await changing[0]
    body = await changed.json()
    assert changed.status == 200, body
    assert (await client.get("/v1/members", headers={"X-API-Key": key["key"]})).status == 401
    assert body["apiKeysRevoked"] == [key["id"]]
    assert await _live_keys(rt, made["id"]) == []


async def test_an_api_key_asked_for_while_the_password_changes_is_refused(rt, client, admin, demo, monkeypatch):
    """The change is written, not committed, when the stolen session asks for a key: it waits for the change and
    is then refused as the session is (401), instead of making a key the change never saw."""
    made = await _clerk(admin)
    taker = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    owner = _caller(client, await login(client, CLERK, CLERK_PASSWORD))
    real_revoke, creating = auth.revoke_tokens, []

    async def create_then_mark(*args: Any, **kwargs: Any) -> None:
        await _meanwhile(creating, lambda: taker.req("POST", "/v1/api-keys",
                                                     json={"name": "persist", "scopes": ["admin"]}))
        await real_revoke(*args, **kwargs)

    monkeypatch.setattr(auth, "revoke_tokens", create_then_mark)
    changed = await owner.json("POST", "/v1/auth/password", 200, json=CHANGE)
    answer = await creating[0]
    body = await answer.json()
    if answer.status == 201:  # the unfixed outcome
        assert (await client.get("/v1/members", headers={"X-API-Key": body["key"]})).status == 401, \
            "an admin API key made with the stolen session outlived the password change"
    assert (answer.status, body["message"]) == (401, "token has been revoked")
    assert changed["apiKeysRevoked"] == [] and await _live_keys(rt, made["id"]) == []
    # The owner, signed in with the new password, still makes keys.
    mine = _caller(client, await login(client, CLERK, NEW_PASSWORD))
    await mine.json("POST", "/v1/api-keys", 201, json={"name": "mine", "scopes": ["admin"]})


# --- a burst of wrong passwords ----------------------------------------------------------------------------


async def _burst(client: Any, username: str, n: int) -> list[int]:
    answers = await asyncio.gather(*(client.post("/v1/auth/token", json={"username": username,
                                                                         "password": f"guess-{i:04d}"})
                                     for i in range(n)))
    return sorted(a.status for a in answers)


@pytest.mark.usefixtures("limiter_clock")
async def test_a_burst_of_wrong_passwords_gets_ten_guesses(client, demo):
    """Twenty wrong passwords at once from one address (the route's own limit lets 20 a minute in): each is
    counted before its password is checked, so ten are checked and ten refused; it used to check all twenty."""
    username, password = demo["admin"]
    assert await _burst(client, username, 20) == [401] * 10 + [429] * 10
    assert (await client.post("/v1/auth/token", json={"username": username, "password": password})).status == 429


@pytest.mark.usefixtures("limiter_clock")
async def test_right_passwords_at_once_give_their_count_back(client, demo):
    """The count taken before the check is given back when the password is right: sign-ins at once fill no
    bucket, and nine failures leave room for exactly one more."""
    username, password = demo["admin"]
    right = await asyncio.gather(*(client.post("/v1/auth/token", json={"username": username, "password": password})
                                   for _ in range(5)))
    assert [a.status for a in right] == [200] * 5
    assert await _burst(client, username, 9) == [401] * 9
    assert (await client.post("/v1/auth/token", json={"username": username, "password": password})).status == 200
    assert await _burst(client, username, 3) == [401, 429, 429]


@pytest.mark.usefixtures("limiter_clock")
async def test_with_redis_down_a_burst_of_wrong_passwords_gets_ten_guesses(client, demo, redis_down):  # noqa: F811
    username, password = demo["admin"]
    assert await _burst(client, username, 20) == [401] * 10 + [429] * 10  # counted in this process
    assert (await client.post("/v1/auth/token", json={"username": username, "password": password})).status == 429


async def test_an_api_key_made_while_its_cooperative_is_suspended_and_renamed_does_not_deadlock(
        rt, client, admin, superadmin, demo, monkeypatch):
    """A super admin suspends the cooperative and changes its short code in one PATCH (its row held FOR UPDATE:
    a unique column changes) while one of its admins makes an API key, holding her account. The suspension then
    waits for her account (record_sessions_ended holds them all); the key's insert, for the cooperative's row
    (its foreign key). Each waited for the other: the database broke the deadlock by failing one (500)."""
    real_check, suspending = auth.check_still_active, []

    async def check_then_suspend(*args: Any, **kwargs: Any) -> None:
        await real_check(*args, **kwargs)  # the account is held now
        await _meanwhile(suspending, lambda: superadmin.req(
            "PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", json={"status": "SUSPENDED", "shortCode": "KHNEW"}))

    monkeypatch.setattr(auth, "check_still_active", check_then_suspend)
    made = await admin.req("POST", "/v1/api-keys", json={"name": "during", "scopes": ["admin"]})
    monkeypatch.setattr(auth, "check_still_active", real_check)
    suspended = await suspending[0]
    assert (made.status, suspended.status) == (201, 200), (await made.text(), await suspended.text())
