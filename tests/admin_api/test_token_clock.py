"""Tokens are dated and checked on one clock: PostgreSQL's (core.db.wall, this host's clock plus the offset
app.align_clock_once measured). They were dated on it but checked by PyJWT on the host's own clock: a serve whose
host ran 6 minutes behind refused every token it issued ("issued in the future"), one ahead cut their life short."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

import core.db
from core import auth
from tests.admin_api.conftest import bearer, login


@pytest.mark.parametrize("offset", [360.0, -360.0])
async def test_a_host_whose_clock_is_off_accepts_the_tokens_it_issues(client: Any, demo: Any, monkeypatch: Any,
                                                                     offset: float) -> None:
    monkeypatch.setattr(core.db, "_clock_offset", offset)  # as align_clock measures it on such a host
    caller = await bearer(client, *demo["admin"])
    assert (await caller.req("GET", "/v1/payments")).status == 200
    refreshed = await client.post("/v1/auth/refresh", json={"refreshToken": (await login(client, *demo["admin"]))[
        "refreshToken"]})
    assert refreshed.status == 200


async def test_expiry_and_issue_time_are_judged_on_the_databases_clock(client: Any, demo: Any, rt: Any,
                                                                       monkeypatch: Any) -> None:
    monkeypatch.setattr(core.db, "_clock_offset", -360.0)  # the host runs 6 minutes ahead
    token = (await login(client, *demo["admin"]))["accessToken"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert abs(claims["exp"] - claims["iat"] - rt.settings.jwt_ttl_seconds) < 1
    secret = rt.settings.jwt_secret.get()
    auth._VERIFIED.clear()
    monkeypatch.setattr(auth, "wall", lambda: claims["exp"] - 10)  # near the end of its life, by that clock
    assert auth.decode_token(token, secret=secret, expected_type="access")["sub"] == claims["sub"]
    auth._VERIFIED.clear()
    monkeypatch.setattr(auth, "wall", lambda: claims["exp"] + auth.LEEWAY + 1)
    with pytest.raises(auth.Unauthorized, match="expired"):
        auth.decode_token(token, secret=secret, expected_type="access")
    auth._VERIFIED.clear()
    monkeypatch.setattr(auth, "wall", lambda: claims["iat"] - auth.LEEWAY - 1)  # issued "in the future"
    with pytest.raises(auth.Unauthorized, match="invalid token"):
        auth.decode_token(token, secret=secret, expected_type="access")
    auth._VERIFIED.clear()


async def test_a_token_used_before_still_expires(client: Any, demo: Any, monkeypatch: Any) -> None:
    """An access token verified once (and kept verified for the next calls) is refused, 401 TOKEN_EXPIRED, once its
    life is over: used every minute, it did not live on."""
    token = (await login(client, *demo["admin"]))["accessToken"]
    claims = jwt.decode(token, options={"verify_signature": False})
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/v1/payments", headers=headers)).status == 200
    monkeypatch.setattr(auth, "wall", lambda: claims["exp"] + auth.LEEWAY + 1)
    late = await client.get("/v1/payments", headers=headers)
    assert late.status == 401
    body = await late.json()
    assert (body["code"], body["message"]) == ("TOKEN_EXPIRED", "token has expired")
