"""Sign-in, refresh, JWT checks (alg none, wrong key, expired), API keys with scopes, role checks."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import jwt
import pytest
from sqlalchemy import select

from core.crypto import hash_api_key
from core.db import utcnow
from core.models import ApiKey
from tests.admin_api.conftest import Caller, login, payment_body


async def test_token_returns_pair_with_role_and_cooperative(client, demo):
    body = await login(client, *demo["admin"])
    assert body["tokenType"] == "Bearer"
    assert body["role"] == "COOP_ADMIN"
    assert body["cooperativeId"] == demo["cooperative_id"]
    assert body["expiresIn"] == 900
    caller = Caller(client, {"Authorization": f"Bearer {body['accessToken']}"})
    await caller.json("GET", "/v1/payments", 200)


async def test_wrong_password_and_unknown_user_get_the_same_401(client, demo):
    for username, password in ((demo["admin"][0], "wrong-password"), ("nobody@example.com", "whatever")):
        resp = await client.post("/v1/auth/token", json={"username": username, "password": password})
        body = await resp.json()
        assert resp.status == 401
        assert body["message"] == "invalid username or password"
        assert set(body) == {"statusCode", "message", "error", "code", "timestamp", "path"}
        assert body["path"] == "/v1/auth/token" and body["error"] == "Unauthorized" and body["code"] == "UNAUTHORIZED"


async def test_a_call_without_credentials_is_told_what_to_send(client, demo):
    """The README's calls send `Authorization: Bearer $TOKEN`, $TOKEN read from the sign-in: a sign-in that failed
    leaves it empty ("Bearer "). The 401 says what is missing and where it comes from, not a bare "Unauthorized"."""
    told = ("no credentials: send Authorization: Bearer <accessToken> (from POST /v1/auth/token) or an API key in "
            "X-API-Key")
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": ""}, {"X-API-Key": ""}):
        resp = await client.get("/v1/payments?status=COMPLETED", headers=headers)
        body = await resp.json()
        assert resp.status == 401, headers
        assert body["message"] == told and body["code"] == "UNAUTHORIZED", headers


async def test_credentials_under_another_scheme_are_not_told_they_are_missing(client, demo):
    """A token sent without `Bearer ` (Authorization: <token>), or under another scheme (Basic, Token), was
    answered "no credentials": it was sent, in the wrong form. The 401 says the form; a key so sent, where keys go."""
    token = (await login(client, *demo["admin"]))["accessToken"]
    told = "Authorization takes Bearer <accessToken> (from POST /v1/auth/token); an API key goes in X-API-Key"
    for value in (token, f"Token {token}", f"JWT {token}", "Basic YWRtaW46cHc="):
        resp = await client.get("/v1/payments", headers={"Authorization": value})
        body = await resp.json()
        assert (resp.status, body["message"], body["code"]) == (401, told, "UNAUTHORIZED"), value
    for value in ("cpk_abcdefgh", "Token cpk_abcdefgh"):
        resp = await client.get("/v1/payments", headers={"Authorization": value})
        body = await resp.json()
        assert (resp.status, body["message"]) == (401, "an API key goes in the X-API-Key header, not "
                                                       "Authorization: Bearer"), value
    resp = await client.get("/v1/payments", headers={"Authorization": f"bearer {token}"})
    assert resp.status == 200  # the scheme in any case, as before


async def test_token_request_validation_lists_every_field(client, demo):
    resp = await client.post("/v1/auth/token", json={"user": "x"})
    body = await resp.json()
    assert resp.status == 400
    assert "username is required" in body["message"]
    assert "password is required" in body["message"]
    assert "property user should not exist" in body["message"]


async def test_refresh_rotates_and_refuses_reuse(client, demo):
    tokens = await login(client, *demo["admin"])
    resp = await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
    fresh = await resp.json()
    assert resp.status == 200, fresh
    assert fresh["accessToken"] != tokens["accessToken"]
    again = await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
    assert again.status == 401
    assert (await again.json())["message"] == "refresh token already used"
    # A refresh token is not an access token, and the other way round.
    resp = await client.get("/v1/payments", headers={"Authorization": f"Bearer {fresh['refreshToken']}"})
    assert resp.status == 401
    resp = await client.post("/v1/auth/refresh", json={"refreshToken": fresh["accessToken"]})
    assert resp.status == 401


def _claims(rt, demo, **over):
    now = utcnow()
    claims = {
        "sub": "x",
        "role": "SUPER_ADMIN",
        "coop": None,
        "mid": None,
        "iss": "coop-gateway",
        "aud": "coop-gateway-api",
        "iat": now,
        "exp": now + timedelta(minutes=5),
        "typ": "access",
        "jti": "abc",
    }
    claims.update(over)
    return claims


async def _status_with(client, token):
    resp = await client.get("/v1/payments", headers={"Authorization": f"Bearer {token}"})
    body = await resp.json()
    return resp.status, body


async def test_alg_none_is_refused(client, rt, demo):
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {k: (int(v.timestamp()) if hasattr(v, "timestamp") else v) for k, v in _claims(rt, demo).items()}
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    status, body = await _status_with(client, token)
    assert status == 401 and body["message"] == "invalid token"


# The server's own secret under HS512 (a forger's choice of algorithm): PyJWT warns the key is short for it.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_wrong_key_and_other_algorithms_are_refused(client, rt, demo):
    forged = jwt.encode(_claims(rt, demo), "not-the-server-secret-but-long-enough-32b", algorithm="HS256")
    assert (await _status_with(client, forged))[0] == 401
    other_alg = jwt.encode(_claims(rt, demo), rt.settings.jwt_secret.get(), algorithm="HS512")
    assert (await _status_with(client, other_alg))[0] == 401


async def test_expired_token_is_refused(client, rt, demo):
    past = utcnow() - timedelta(hours=1)
    token = jwt.encode(
        _claims(rt, demo, iat=past, exp=past + timedelta(minutes=5)),
        rt.settings.jwt_secret.get(),
        algorithm="HS256",
    )
    status, body = await _status_with(client, token)
    assert status == 401 and body["message"] == "token has expired"


async def test_well_signed_token_is_accepted_and_bad_claims_are_not(client, rt, demo):
    good = jwt.encode(_claims(rt, demo), rt.settings.jwt_secret.get(), algorithm="HS256")
    assert (await _status_with(client, good))[0] == 200
    for over in (
        {"role": "GOD"},
        {"aud": "elsewhere"},
        {"iss": "elsewhere"},
        {"role": "COOP_ADMIN", "coop": None},
        {"role": "TENANT", "coop": demo["cooperative_id"]},
    ):
        token = jwt.encode(_claims(rt, demo, **over), rt.settings.jwt_secret.get(), algorithm="HS256")
        assert (await _status_with(client, token))[0] == 401, over


async def test_missing_or_malformed_authorization(client, demo):
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not.a.jwt"},
    ):
        resp = await client.get("/v1/payments", headers=headers)
        assert resp.status == 401, headers
        assert (await resp.json())["statusCode"] == 401


async def test_api_key_shown_once_stored_hashed_scoped_and_revocable(client, rt, admin, demo):
    created = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP", "scopes": ["payments:read"]})
    clear = created["key"]
    assert clear.startswith("cpk_") and created["prefix"] == clear[:12]
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(ApiKey).where(ApiKey.id == created["id"]))).scalar_one()
    assert row.key_hash == hash_api_key(clear) and clear not in row.key_hash
    listed = await admin.json("GET", "/v1/api-keys", 200)
    assert all("key" not in k for k in listed["data"])

    key = Caller(client, {"X-API-Key": clear})
    await key.json("GET", "/v1/payments", 200)
    rent = demo["payment_types"]["Monthly Rent"]
    denied = await key.json("POST", "/v1/payments", 403, json=payment_body(rent))
    assert denied["message"] == "Forbidden resource: this API key lacks the payments:write scope"
    await key.json("GET", "/v1/members", 403)  # needs the admin scope
    await key.json("POST", "/v1/api-keys", 403, json={"name": "x", "scopes": ["admin"]})

    await admin.json("DELETE", f"/v1/api-keys/{created['id']}", 200)
    revoked = await key.json("GET", "/v1/payments", 401)
    assert revoked["message"] == "invalid or inactive API key"
    await Caller(client, {"X-API-Key": "cpk_made_up"}).json("GET", "/v1/payments", 401)


async def test_api_key_with_write_scope_creates_payments(client, admin, demo):
    created = await admin.json(
        "POST", "/v1/api-keys", 201, json={"name": "POS", "scopes": ["payments:write", "payments:read"]}
    )
    key = Caller(client, {"X-API-Key": created["key"]})
    rent = demo["payment_types"]["Monthly Rent"]
    payment = await key.json("POST", "/v1/payments", 201, json=payment_body(rent))
    assert payment["cooperativeId"] == demo["cooperative_id"]


async def test_api_key_scopes_validated(admin):
    body = await admin.json("POST", "/v1/api-keys", 400, json={"name": "x", "scopes": ["root"]})
    assert any("scopes.0 must be one of" in m for m in body["message"])
    await admin.json("POST", "/v1/api-keys", 400, json={"name": "x", "scopes": []})


async def test_an_api_key_named_only_with_spaces_is_refused(admin, rt):
    """The name is stored trimmed: one of spaces alone was a key named "" in every list."""
    body = await admin.json("POST", "/v1/api-keys", 400, json={"name": "   ", "scopes": ["admin"]})
    assert body["field"] == "name" and "name" in body["message"][0]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(ApiKey))).scalars().all() == []


async def test_api_keys_of_another_cooperative_are_not_found(admin, coop_b):
    created = await coop_b["admin"].json("POST", "/v1/api-keys", 201, json={"name": "B", "scopes": ["admin"]})
    await admin.json("DELETE", f"/v1/api-keys/{created['id']}", 404)
    listed = await admin.json("GET", "/v1/api-keys", 200)
    assert created["id"] not in [k["id"] for k in listed["data"]]


async def test_tenant_cannot_reach_admin_routes(tenant):
    for method, path in (
        ("GET", "/v1/members"),
        ("POST", "/v1/api-keys"),
        ("GET", "/v1/audit-events"),
        ("GET", "/v1/reports/reconciliation"),
        ("GET", "/v1/refunds"),
        ("POST", "/v1/cooperatives"),
    ):
        resp = await tenant.req(method, path, json={} if method == "POST" else None)
        assert resp.status == 403, (method, path)


async def test_coop_admin_cannot_reach_super_admin_routes(admin):
    await admin.json("POST", "/v1/cooperatives", 403, json={"name": "X", "shortCode": "XX", "country": "RW"})


@pytest.mark.usefixtures("limiter_clock")
async def test_sign_in_attempts_are_limited_per_username(client, demo):
    for _ in range(10):
        resp = await client.post("/v1/auth/token", json={"username": demo["admin"][0], "password": "guess"})
        assert resp.status == 401
    resp = await client.post(
        "/v1/auth/token", json={"username": demo["admin"][0], "password": demo["admin"][1]}
    )
    body = await resp.json()
    assert (
        resp.status == 429 and body["error"] == "Too Many Requests" and int(resp.headers["Retry-After"]) >= 1
    )
    # Other users are not locked out by it.
    ok = await client.post(
        "/v1/auth/token", json={"username": demo["tenant"][0], "password": demo["tenant"][1]}
    )
    assert ok.status == 200


async def test_credentials_that_are_not_utf8_are_refused_not_an_error(client):
    """A bearer token or an API key holding bytes that are not UTF-8 (a latin-1 é; aiohttp reads it as a lone
    surrogate): 401 as any bad credential. It was a 500, its traceback logged, from the JWT or key hash's encode."""
    import asyncio

    async def status(path: bytes, header: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer.split(b"\r\n")[0]

    for path, header in ((b"/v1/payments", b"Authorization: Bearer caf\xe9"),
                         (b"/v1/payments", b"X-API-Key: cpk_caf\xe9"),
                         (b"/ops/data", b"Authorization: Bearer caf\xe9")):
        assert await status(path, header) == b"HTTP/1.1 401 Unauthorized", (path, header)
