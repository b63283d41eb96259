"""JWT_SECRET rotated without signing everyone out: JWT_PREVIOUS_SECRETS keeps the tokens the old secret signed
working (API calls, the ops page, a refresh, which answers a pair signed with the new secret), each token names its
key in a `kid` header, and a token of an unknown or removed key is refused as any bad token is.

Each "restart" is a new app over the same database and Redis, with the settings load_settings reads from the
variables an operator would set."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import jwt
import pytest

from core import auth, metrics
from core.config import Settings
from core.db import utcnow
from tests.admin_api.conftest import login
from tests.conftest import make_settings
from tests.web.conftest import page_client

OLD = "old-jwt-secret-0123456789abcdef-before"
NEW = "new-jwt-secret-fedcba9876543210-after"
OTHER = "never-configured-secret-0123456789abcdef"


@pytest.fixture
def settings(migrated_database: str) -> Settings:
    """The service before the rotation: JWT_SECRET is the old secret."""
    return make_settings(JWT_SECRET=OLD)


async def _restart(aiohttp_client: Any, rt: Any, **env: str) -> Any:
    """The service started again with `env`: every process of the rotation reads the same variables."""
    rt.settings = make_settings(**env)
    return await page_client(aiohttp_client, rt, rt.settings)


def _used() -> float:
    return metrics.REGISTRY.get_sample_value("gateway_previous_secret_used_total", {"name": "jwt"}) or 0.0


async def _answer(client: Any, token: str, path: str = "/v1/payments") -> tuple[int, dict[str, Any]]:
    resp = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    return resp.status, await resp.json()


def _claims(**over: Any) -> dict[str, Any]:
    now = utcnow()
    return {"sub": "x", "role": "SUPER_ADMIN", "coop": None, "mid": None, "iss": auth.ISSUER, "aud": auth.AUDIENCE,
            "iat": now, "exp": now + timedelta(minutes=5), "typ": "access", "jti": "rotation-test", **over}


def _refused_like_a_bad_token(status: int, body: dict[str, Any]) -> None:
    assert status == 401
    assert {k: v for k, v in body.items() if k != "timestamp"} == {
        "statusCode": 401, "message": "invalid token", "error": "Unauthorized", "code": "TOKEN_INVALID",
        "path": "/v1/payments"}


async def test_a_pair_issued_before_the_rotation_works_and_refreshes_to_the_new_secret(
        client: Any, rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    before = await login(client, *demo["admin"])
    for token in (before["accessToken"], before["refreshToken"]):
        assert jwt.get_unverified_header(token)["kid"] == auth.key_id(OLD)
    assert auth.key_id(OLD) != auth.key_id(NEW) and len(auth.key_id(NEW)) == 8

    rotated = await _restart(aiohttp_client, rt, JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=OLD)
    used = _used()
    assert (await _answer(rotated, before["accessToken"]))[0] == 200
    assert (await _answer(rotated, before["accessToken"], "/ops/data"))[0] == 200  # admin_api.pages decodes too
    assert _used() == used + 2  # each use counted, the second a cached verification

    resp = await rotated.post("/v1/auth/refresh", json={"refreshToken": before["refreshToken"]})
    after = await resp.json()
    assert resp.status == 200, after
    assert _used() == used + 3
    for token in (after["accessToken"], after["refreshToken"]):
        assert jwt.get_unverified_header(token)["kid"] == auth.key_id(NEW)
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token, OLD, algorithms=["HS256"], audience=auth.AUDIENCE)
        assert jwt.decode(token, NEW, algorithms=["HS256"], audience=auth.AUDIENCE)["sub"]
    assert (await _answer(rotated, after["accessToken"]))[0] == 200
    assert _used() == used + 3  # the new pair is not the old secret's
    # Still one use per refresh token, whichever secret signed it.
    again = await rotated.post("/v1/auth/refresh", json={"refreshToken": before["refreshToken"]})
    assert again.status == 401 and (await again.json())["message"] == "refresh token already used"
    fresh = await rotated.post("/v1/auth/refresh", json={"refreshToken": after["refreshToken"]})
    assert fresh.status == 200

    # Sign-in after the rotation: the new secret only.
    signed_in = await login(rotated, *demo["admin"])
    assert jwt.get_unverified_header(signed_in["accessToken"])["kid"] == auth.key_id(NEW)


async def test_once_the_previous_secret_is_removed_its_tokens_are_refused(
        client: Any, rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    before = await login(client, *demo["admin"])
    rotated = await _restart(aiohttp_client, rt, JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=OLD)
    assert (await _answer(rotated, before["accessToken"]))[0] == 200  # verified (and cached) while it was kept

    done = await _restart(aiohttp_client, rt, JWT_SECRET=NEW)
    _refused_like_a_bad_token(*await _answer(done, before["accessToken"]))
    assert (await _answer(done, before["accessToken"], "/ops/data"))[0] == 401
    resp = await done.post("/v1/auth/refresh", json={"refreshToken": before["refreshToken"]})
    assert resp.status == 401 and (await resp.json())["message"] == "invalid token"
    # A token of before kids were written, signed with the removed secret: refused too.
    _refused_like_a_bad_token(*await _answer(done, jwt.encode(_claims(), OLD, algorithm="HS256")))


async def test_a_kid_no_configured_secret_has_is_refused_like_any_bad_token(
        rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    rotated = await _restart(aiohttp_client, rt, JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=OLD)
    assert (await _answer(rotated, jwt.encode(_claims(), NEW, algorithm="HS256",
                                              headers={"kid": auth.key_id(NEW)})))[0] == 200
    forged = await _answer(rotated, jwt.encode(_claims(), OTHER, algorithm="HS256"))
    _refused_like_a_bad_token(*forged)
    for kid in ("00000000", auth.key_id(OTHER), "", "x" * 500):
        # Signed with the current secret, but naming another key: the kid picks the key, and it has none.
        _refused_like_a_bad_token(*await _answer(rotated, jwt.encode(_claims(), NEW, algorithm="HS256",
                                                                    headers={"kid": kid})))
    # A key that exists, with another secret's signature; a previous key's kid on a current-secret signature.
    _refused_like_a_bad_token(*await _answer(rotated, jwt.encode(_claims(), OTHER, algorithm="HS256",
                                                                headers={"kid": auth.key_id(NEW)})))
    _refused_like_a_bad_token(*await _answer(rotated, jwt.encode(_claims(), NEW, algorithm="HS256",
                                                                headers={"kid": auth.key_id(OLD)})))


async def test_tokens_without_a_kid_are_tried_against_the_current_then_the_previous_secrets(
        rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    rotated = await _restart(aiohttp_client, rt, JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=f"{OTHER},{OLD}")
    used = _used()
    assert (await _answer(rotated, jwt.encode(_claims(jti="no-kid-new"), NEW, algorithm="HS256")))[0] == 200
    assert _used() == used
    assert (await _answer(rotated, jwt.encode(_claims(jti="no-kid-old"), OLD, algorithm="HS256")))[0] == 200
    assert _used() == used + 1


# An attacker's HS512 with the server's own secret: PyJWT warns the key is short for it.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_a_kid_changes_nothing_of_the_other_checks(rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    rotated = await _restart(aiohttp_client, rt, JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=OLD)
    for secret in (NEW, OLD):
        kid = {"kid": auth.key_id(secret)}
        past = utcnow() - timedelta(hours=1)
        expired = jwt.encode(_claims(iat=past, exp=past + timedelta(minutes=5)), secret, algorithm="HS256",
                             headers=kid)
        status, body = await _answer(rotated, expired)
        assert status == 401 and body["message"] == "token has expired"
        for token in (jwt.encode(_claims(), None, algorithm="none", headers=kid),
                      jwt.encode(_claims(), secret, algorithm="HS512", headers=kid),
                      jwt.encode(_claims(typ="refresh"), secret, algorithm="HS256", headers=kid),
                      jwt.encode(_claims(aud="elsewhere"), secret, algorithm="HS256", headers=kid)):
            _refused_like_a_bad_token(*await _answer(rotated, token))


async def test_the_first_use_of_a_previous_secret_is_logged_once(
        client: Any, rt: Any, demo: dict[str, Any], aiohttp_client: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_PREVIOUS_LOGGED", set())
    tokens = [(await login(client, *demo["admin"]))["accessToken"] for _ in range(2)]
    rotated = await _restart(aiohttp_client, rt, JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=OLD)
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        for token in (*tokens, *tokens):
            assert (await _answer(rotated, token))[0] == 200
    [line] = [r for r in caplog.records if r.name == "gateway.auth" and "previous secret" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert (line.__dict__["secret_for"], line.__dict__["variable"]) == ("jwt", "JWT_PREVIOUS_SECRETS")
    assert OLD not in caplog.text and NEW not in caplog.text
    scrape = await (await rotated.get("/metrics")).text()
    assert 'gateway_previous_secret_used_total{name="jwt"}' in scrape


async def test_a_rolling_restart_refuses_no_token_when_the_new_secret_is_first_accepted_everywhere(
        client: Any, rt: Any, demo: dict[str, Any], aiohttp_client: Any) -> None:
    """Processes restart one by one: a token one already signs with the new secret reaches others still running.
    With the new secret first added as a previous one everywhere (a restart of every process), then made current
    (a second), each process at either step takes the other's tokens."""
    from app import create_app

    staged = make_settings(JWT_SECRET=OLD, JWT_PREVIOUS_SECRETS=NEW)  # step 1: the new secret accepted only
    swapped = make_settings(JWT_SECRET=NEW, JWT_PREVIOUS_SECRETS=OLD)  # step 2: the new secret signs
    not_yet = await aiohttp_client(create_app(staged, runtime=rt))
    restarted = await aiohttp_client(create_app(swapped, runtime=rt))
    rt.settings = swapped  # the API reads the runtime's settings: each app is checked with its own below
    from_restarted = (await login(restarted, *demo["admin"]))["accessToken"]
    assert jwt.get_unverified_header(from_restarted)["kid"] == auth.key_id(NEW)
    rt.settings = staged
    from_not_yet = (await login(not_yet, *demo["admin"]))["accessToken"]
    assert jwt.get_unverified_header(from_not_yet)["kid"] == auth.key_id(OLD)
    for token in (from_restarted, from_not_yet):
        rt.settings = staged
        assert (await _answer(not_yet, token))[0] == 200
        rt.settings = swapped
        assert (await _answer(restarted, token))[0] == 200
    # Made current in one step instead, a process not yet restarted refuses what a restarted one signs.
    rt.settings = make_settings(JWT_SECRET=OLD)
    _refused_like_a_bad_token(*await _answer(client, from_restarted))
