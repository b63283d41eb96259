"""Attacks on /v1: tampered JWTs, hostile credentials, SQL injection in every query parameter and path id,
oversized bodies on every write route, and id enumeration that must look exactly like a missing id."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

import jwt
import pytest

from admin_api import all_routes
from admin_api.routing import JSON_BODY_LIMIT
from app import MAX_BODY
from tests.admin_api.conftest import Caller, complete_payment, idem, login, make_payment
from tests.security.conftest import snapshot

INJECTIONS = [
    "' OR '1'='1", "1; DROP TABLE payments; --", "PENDING' OR 1=1 --", "\") OR (\"1\"=\"1",
    "' UNION SELECT id, password_hash FROM admin_users --", "%27%20OR%201%3D1", "1' AND pg_sleep(5) --",
    "*", "%", "_", "\\", "0", "-1", "99999999999999999999", "2026-01-01' OR '1'='1",
    "00000000-0000-0000-0000-000000000000' OR '1'='1", "x" * 5000, "\u0000", "\ud800", "null", "[]", "{}",
]


@pytest.fixture(autouse=True)
def _generous_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of probes must reach the handlers, not the rate limiter (read when the app is built)."""
    monkeypatch.setenv("RATE_LIMIT_MULTIPLIER", "1000")


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _unb64(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


async def _status(client: Any, headers: dict[str, str], path: str = "/v1/payments") -> tuple[int, Any]:
    resp = await client.get(path, headers=headers)
    text = await resp.text()
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    return resp.status, body


# --- JWT and credentials ----------------------------------------------------------------------------


async def test_tampered_claims_with_the_original_signature_are_refused(client: Any, demo: Any,
                                                                        coop_b: Any) -> None:
    tokens = await login(client, *demo["admin"])
    header, payload, signature = tokens["accessToken"].split(".")
    claims = _unb64(payload)
    assert claims["role"] == "COOP_ADMIN"
    for change in ({"role": "SUPER_ADMIN", "coop": None}, {"role": "SUPER_ADMIN"},
                   {"coop": coop_b["cooperative_id"]}, {"exp": claims["exp"] + 86_400}, {"typ": "refresh"}):
        forged = f"{header}.{_b64({**claims, **change})}.{signature}"
        status, body = await _status(client, {"Authorization": f"Bearer {forged}"})
        assert status == 401 and body["message"] == "invalid token", change
    # A header naming another algorithm over the same payload and signature.
    for alg in ("none", "None", "NONE", "HS512", "RS256", "ES256"):
        forged = f"{_b64({'alg': alg, 'typ': 'JWT'})}.{payload}.{signature}"
        assert (await _status(client, {"Authorization": f"Bearer {forged}"}))[0] == 401, alg
        unsigned = f"{_b64({'alg': alg, 'typ': 'JWT'})}.{_b64({**claims, 'role': 'SUPER_ADMIN'})}."
        assert (await _status(client, {"Authorization": f"Bearer {unsigned}"}))[0] == 401, alg
    # The untampered token still works: the refusals above were about the tampering.
    assert (await _status(client, {"Authorization": f"Bearer {tokens['accessToken']}"}))[0] == 200


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_tokens_signed_with_other_keys_are_refused(client: Any, rt: Any, demo: Any) -> None:
    tokens = await login(client, *demo["admin"])
    claims = jwt.decode(tokens["accessToken"], options={"verify_signature": False})
    for key in ("s", "secret", "dev-jwt_secret-not-for-production-use-0123456789x",
                rt.settings.jwt_secret.get() + "x", rt.settings.jwt_secret.get()[:-1]):
        forged = jwt.encode({**claims, "role": "SUPER_ADMIN", "coop": None}, key, algorithm="HS256")
        assert (await _status(client, {"Authorization": f"Bearer {forged}"}))[0] == 401, key
    # The key confusion trick: a token "signed" with the secret under a header claiming a public-key alg.
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": "../../../../dev/null", "jku": "http://127.0.0.1:9/k"})
    forged = jwt.encode(claims, "k", algorithm="HS256").split(".")
    assert (await _status(client, {"Authorization": f"Bearer {header}.{forged[1]}.{forged[2]}"}))[0] == 401


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer " + "A" * 8_000},
    {"Authorization": "Bearer a.b.c"},
    {"Authorization": "Bearer ..."},
    {"Authorization": "Bearer eyJ.eyJ.sig"},
    {"Authorization": "Bearer " + _b64({"alg": "HS256"}) + "." + "!!!" + ".x"},
    {"Authorization": "bearer"},
    {"Authorization": "Bearer  \t "},
    {"Authorization": "Token abc"},
    {"Authorization": "Bearer a b c"},
    {"Authorization": "Bearer \u00e9\u00e8"},
    {"X-API-Key": ""},
    {"X-API-Key": "cpk_" + "a" * 500},
    {"X-API-Key": "' OR '1'='1"},
    {"X-API-Key": "cpk_\u00e9"},
    {"X-API-Key": "cpk_x", "Authorization": "Bearer whatever"},
])
async def test_garbage_credentials_are_401_never_500(client: Any, demo: Any, headers: dict[str, str]) -> None:
    status, body = await _status(client, headers)
    assert status == 401, (headers, status, body)
    assert body["statusCode"] == 401 and body["error"] == "Unauthorized"


async def test_a_header_over_the_servers_line_limit_is_a_400(client: Any, demo: Any) -> None:
    status, _ = await _status(client, {"X-Padding": "A" * 20_000})
    assert status == 400  # refused by the HTTP parser before any handler runs


async def test_an_oversized_authorization_header_is_not_logged(client: Any, demo: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from core.logs import JsonFormatter

    token = "eyJ" + "SeCrEtToKeN" * 2000
    with caplog.at_level(logging.DEBUG):
        status, _ = await _status(client, {"Authorization": f"Bearer {token}"})
    assert status == 400
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any("malformed HTTP request refused" in line for line in lines), lines
    assert not any("SeCrEtToKeN" in line for line in lines)


async def test_api_key_revoked_or_of_a_suspended_cooperative_stops_working(client: Any, admin: Any,
                                                                           superadmin: Any, demo: Any) -> None:
    created = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP", "scopes": ["payments:read"]})
    key = Caller(client, {"X-API-Key": created["key"]})
    await key.json("GET", "/v1/payments", 200)
    # A key with a trailing space or in another case is a different key.
    for variant in (created["key"].upper(), created["key"][:-1], created["key"] + "x"):
        await Caller(client, {"X-API-Key": variant}).json("GET", "/v1/payments", 401)
    await admin.json("DELETE", f"/v1/api-keys/{created['id']}", 200)
    body = await key.json("GET", "/v1/payments", 401)
    assert body["message"] == "invalid or inactive API key"


# --- SQL injection ------------------------------------------------------------------------------------


def _list_routes() -> list[Any]:
    return [r for r in all_routes() if r.method == "GET" and "{" not in r.path and r.scope is not None]


async def _no_rows_of(other_coop: str, body: Any) -> None:
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        assert all(item.get("cooperativeId") != other_coop for item in body["data"] if isinstance(item, dict))


async def test_sql_injection_in_every_query_parameter(client: Any, rt: Any, admin: Any, superadmin: Any,
                                                      demo: Any, coop_b: Any) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    payment = await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000)
    await make_payment(admin, rent)
    before = await snapshot(rt)
    checked = 0
    for route in _list_routes():
        for name in route.query:
            for value in INJECTIONS:
                for caller in (admin, superadmin):
                    resp = await caller.req("GET", f"/v1{route.path}", params={name: value})
                    text = await resp.text()
                    assert resp.status in (200, 400), (route.path, name, value[:40], resp.status, text[:300])
                    if resp.status == 200 and caller is admin and resp.content_type == "application/json":
                        await _no_rows_of(coop_b["cooperative_id"], json.loads(text))
                    checked += 1
    assert checked > 500
    after = await snapshot(rt)
    # Reading writes nothing but rate-limit and last-used bookkeeping: every table has the same rows.
    assert {k: v for k, v in after.items() if k != "audit_events"} == \
        {k: v for k, v in before.items() if k != "audit_events"}
    # B's payment is still there and still B's.
    assert (await coop_b["admin"].json("GET", f"/v1/payments/{payment['id']}", 200))["id"] == payment["id"]


async def test_sql_injection_in_path_ids_is_404_or_400(client: Any, rt: Any, admin: Any, demo: Any) -> None:
    await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    before = await snapshot(rt)
    for route in all_routes():
        if "{id}" not in route.path or route.method != "GET":
            continue
        for value in INJECTIONS[:15]:
            resp = await admin.req("GET", "/v1" + route.path.replace("{id}", value.replace("/", "%2F")))
            assert resp.status in (400, 404), (route.path, value, resp.status, await resp.text())
    assert await snapshot(rt) == before


# --- oversized bodies -----------------------------------------------------------------------------------


async def test_oversized_bodies_are_413_on_every_write_route(client: Any, rt: Any, superadmin: Any,
                                                             demo: Any) -> None:
    before = await snapshot(rt)
    some_id = str(uuid.uuid4())
    for route in all_routes():
        if route.method not in ("POST", "PUT", "PATCH") or (route.scope is None and route.body is None):
            continue
        path = "/v1" + route.path.replace("{id}", some_id)
        limit = max(route.body_limit, JSON_BODY_LIMIT)
        for size in (limit + 1, MAX_BODY + 1, 8 * MAX_BODY):
            if size <= limit:
                continue
            body = b'{"name": "' + b"x" * size + b'"}'
            ctype = route.raw_body or "application/json"
            resp = await superadmin.req(route.method, path, data=body, headers={"Content-Type": ctype})
            text = await resp.text()
            # 413 before anything else: the body is read and measured before the caller, the route's rights or the
            # id are looked at (admin_api.routing._read_raw_body); a 404 or 403 is a route that never measured it.
            assert (resp.status, resp.content_type) == (413, "application/json"), \
                (route.method, route.path, size, resp.status, text[:200])
            assert (json.loads(text)["statusCode"], json.loads(text)["code"]) == (413, "BODY_TOO_LARGE"), text[:200]
    # A chunked upload (no Content-Length) over the limit is cut off the same way.
    async def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65_536

    resp = await superadmin.req("POST", "/v1/payments", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413, await resp.text()
    assert await snapshot(rt) == before


async def test_public_sign_in_refuses_oversized_and_odd_bodies(client: Any, demo: Any) -> None:
    for data, ctype, expected in (
        (b'{"username": "' + b"a" * (2 * MAX_BODY) + b'"}', "application/json", 413),
        (b"\xff\xfe\x00", "application/json", 400),
        (b"[]", "application/json", 400),
        (b'{"username": "a", "password": "b"}', "text/plain", 415),
        (b'{"username": {"$ne": null}, "password": {"$ne": null}}', "application/json", 400),
        (b'{"username": "admin@kigali-heights.rw\' --", "password": "x"}', "application/json", 401),
    ):
        resp = await client.post("/v1/auth/token", data=data, headers={"Content-Type": ctype})
        assert resp.status == expected, (data[:60], resp.status, await resp.text())


# --- enumeration ---------------------------------------------------------------------------------------


def _comparable(status: int, body: Any) -> Any:
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("timestamp", "path")}
    return status, body


async def test_other_cooperatives_ids_answer_exactly_like_missing_ids(client: Any, rt: Any, admin: Any,
                                                                      superadmin: Any, demo: Any,
                                                                      coop_b: Any) -> None:
    """B's admin probing A's ids learns nothing: the answer for A's real id is the answer for an id that
    does not exist, for every route that takes an id."""
    from tests.admin_api.test_cross_cooperative import BODIES, SUPER_ONLY, _resources_of_a

    ids = await _resources_of_a(admin, superadmin, rt, demo)
    b = coop_b["admin"]
    compared = 0
    for route in all_routes():
        if "{id}" not in route.path or (route.method, route.path) in SUPER_ONLY:
            continue
        kw = {"json": BODIES[(route.method, route.path)]} if (route.method, route.path) in BODIES else {}
        answers = []
        for target in (ids[route.path], str(uuid.uuid4()), str(uuid.UUID(int=1)), "1"):
            resp = await b.req(route.method, "/v1" + route.path.replace("{id}", target), **kw)
            text = await resp.text()
            answers.append(_comparable(resp.status, json.loads(text) if text.startswith("{") else text))
        real, missing, low, sequential = answers
        assert real == missing == low, (route.method, route.path, answers)
        assert real[0] == 404, (route.method, route.path, real)
        # A non-uuid id ("1", as if ids were sequential) is refused without looking anything up.
        assert sequential[0] in (400, 404), (route.method, route.path, sequential)
        compared += 1
    assert compared >= 15


async def test_tenant_cannot_enumerate_other_members_payments(client: Any, rt: Any, admin: Any, tenant: Any,
                                                              demo: Any) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    others = await make_payment(admin, rent, memberId=demo["members"]["+250788000002"],
                                paymentAccount="+250788000002", idempotencyKey=idem())
    await complete_payment(rt, others["id"])
    answers = []
    for target in (others["id"], str(uuid.uuid4())):
        resp = await tenant.req("GET", f"/v1/payments/{target}")
        answers.append(_comparable(resp.status, await resp.json()))
    assert answers[0] == answers[1] and answers[0][0] == 404
    listed = await tenant.json("GET", "/v1/payments", 200)
    assert others["id"] not in [p["id"] for p in listed["data"]]
