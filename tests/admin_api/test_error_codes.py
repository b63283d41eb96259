"""Every error answer of the API carries `code`, a stable machine-readable reason, beside the seed's keys: an
integrating system branches on it, not on the English message (before: the several 409s on an idempotency key, a
refund over what is left, a payment in the wrong state differed only in their message)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import jwt
import pytest

from core import auth
from core.db import utcnow
from core.errors import CODES
from tests.admin_api.conftest import Caller, complete_payment, idem, login, payment_body, refund_raced
from tests.conftest import requires_pg

SEED_KEYS = {"statusCode", "message", "error", "timestamp", "path"}


async def _refused(resp: Any, status: int) -> dict[str, Any]:
    """An error answer: its status, the seed's keys and a documented code."""
    body = await resp.json()
    assert resp.status == status, body
    assert SEED_KEYS | {"code"} <= set(body) <= SEED_KEYS | {"code", "field"}, body
    assert body["code"] in CODES, body
    return body  # type: ignore[no-any-return]


async def test_each_idempotency_key_conflict_has_its_own_code(admin: Caller, client: Any, demo: dict[str, Any],
                                                              rt: Any, monkeypatch: Any) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    body = payment_body(rent)
    paid = await admin.json("POST", "/v1/payments", 201, json=body)
    reused = await admin.json("POST", "/v1/payments", 409, json={**body, "amount": 50001})
    assert (reused["code"], reused["field"]) == ("IDEMPOTENCY_KEY_REUSED", "idempotencyKey")

    # A payments:write key retrying a request another key made (a key rotated between the two tries).
    writer = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP v2", "scopes": ["payments:write"]})
    other = await Caller(client, {"X-API-Key": writer["key"]}).json("POST", "/v1/payments", 409, json=body)
    assert other["code"] == "IDEMPOTENCY_KEY_OTHER_CALLER"

    # The key's first request not committed yet when the second's insert finds the key taken.
    import core.payments

    async def unseen(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(core.payments, "find_by_key", unseen)
    flight = await admin.json("POST", "/v1/payments", 409, json=body)
    assert (flight["code"], flight["message"]) == ("IDEMPOTENCY_KEY_IN_FLIGHT",
                                                   "a request with this idempotency key is in flight")
    monkeypatch.undo()

    await complete_payment(rt, paid["id"])
    refunds = f"/v1/payments/{paid['id']}/refunds"
    key = idem()
    await admin.json("POST", refunds, 201, json={"amount": 1000, "idempotencyKey": key})
    again = await admin.json("POST", refunds, 409, json={"amount": 2000, "idempotencyKey": key})
    assert (again["code"], again["field"]) == ("IDEMPOTENCY_KEY_REUSED", "idempotencyKey")


async def test_refunds_and_states(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    pending = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    early = await admin.json("POST", f"/v1/payments/{pending['id']}/refunds", 422,
                             json={"amount": 1000, "idempotencyKey": idem()})
    assert early["code"] == "INVALID_STATE" and "PENDING" in early["message"]

    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    await complete_payment(rt, paid["id"])
    cancelled = await admin.json("POST", f"/v1/payments/{paid['id']}/cancel", 409, json={"note": "by mistake"})
    assert cancelled["code"] == "INVALID_STATE" and cancelled["message"].startswith("payment is COMPLETED")
    over = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422,
                            json={"amount": 50001, "idempotencyKey": idem()})
    assert (over["code"], over["field"]) == ("REFUND_EXCEEDS_REFUNDABLE", "amount")
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 200, json={"note": "asked twice"})
    withdrawn = await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 409, json={"note": "asked twice"})
    assert withdrawn["code"] == "INVALID_STATE" and withdrawn["message"].startswith(
        f"refund {refund['reference']} was withdrawn already")

    # Airtel refunds only the whole payment.
    airtel = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        rent, paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001"))
    await complete_payment(rt, airtel["id"])
    part = await admin.json("POST", f"/v1/payments/{airtel['id']}/refunds", 422,
                            json={"amount": 1000, "idempotencyKey": idem()})
    assert (part["code"], part["field"]) == ("PARTIAL_REFUND_UNSUPPORTED", "amount")


async def test_duplicate_reference(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    await complete_payment(rt, paid["id"])  # its provider transaction id: TX1
    recorded = {"paymentTypeId": rent, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
                "paymentAccount": "+250788000001", "providerTransactionId": "TX1",
                "completedAt": (utcnow() - timedelta(minutes=5)).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "note": "MTN statement", "idempotencyKey": idem()}
    held = await admin.json("POST", "/v1/payments/recorded", 409, json=recorded)
    assert (held["code"], held["field"]) == ("DUPLICATE_REFERENCE", "providerTransactionId")
    taken = await admin.json("POST", "/v1/payments/recorded", 409, json={
        **recorded, "providerTransactionId": "TX-OTHER", "reference": paid["reference"], "idempotencyKey": idem()})
    assert (taken["code"], taken["field"]) == ("DUPLICATE_REFERENCE", "reference")


async def test_members_methods_and_accounts(admin: Caller, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    unknown = await admin.json("POST", "/v1/payments", 404, json=payment_body(
        rent, memberId="00000000-0000-4000-8000-000000000000"))
    assert (unknown["code"], unknown["field"]) == ("MEMBER_NOT_FOUND", "memberId")
    # Any other missing thing is NOT_FOUND.
    no_type = await admin.json("POST", "/v1/payments", 404, json=payment_body("00000000-0000-4000-8000-000000000000"))
    assert no_type["code"] == "NOT_FOUND"
    member = demo["members"]["+250788000002"]
    await admin.json("DELETE", f"/v1/members/{member}", 200)
    suspended = await admin.json("POST", "/v1/payments", 422, json=payment_body(rent, memberId=member))
    assert suspended["code"] == "MEMBER_NOT_ACTIVE"
    approve = await admin.json("POST", f"/v1/members/{member}/approve", 409)
    assert approve["code"] == "INVALID_STATE"
    phone = await admin.json("POST", "/v1/members", 409, json={"name": "Twice", "phone": "+250788000001"})
    assert (phone["code"], phone["field"]) == ("MEMBER_PHONE_TAKEN", "phone")

    mpesa = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, paymentMethod="MPESA"))
    assert (mpesa["code"], mpesa["field"]) == ("PAYMENT_METHOD_NOT_AVAILABLE", "paymentMethod")
    foreign = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, paymentAccount="+256772123456"))
    assert (foreign["code"], foreign["field"]) == ("PAYMENT_ACCOUNT_NOT_ACCEPTED", "paymentAccount")
    operator = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, paymentAccount="+250733000001"))
    assert (operator["code"], operator["field"]) == ("PAYMENT_ACCOUNT_NOT_ACCEPTED", "paymentAccount")
    shape = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, amount=1))
    assert shape["code"] == "VALIDATION_FAILED"


async def test_webhook_url_taken(admin: Caller, superadmin: Caller) -> None:
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "erp.codes.rw"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    body = {"url": "https://erp.codes.rw/hooks", "events": ["payment.completed"]}
    await admin.json("POST", "/v1/webhook-endpoints", 201, json=body)
    taken = await admin.json("POST", "/v1/webhook-endpoints", 409, json=body)
    assert (taken["code"], taken["field"]) == ("WEBHOOK_URL_TAKEN", "url")


async def test_scope_missing_and_other_refusals(admin: Caller, tenant: Caller, client: Any) -> None:
    reader = await admin.json("POST", "/v1/api-keys", 201, json={"name": "BI", "scopes": ["payments:read"]})
    bi = Caller(client, {"X-API-Key": reader["key"]})
    assert (await bi.json("GET", "/v1/members", 403))["code"] == "SCOPE_MISSING"
    assert (await tenant.json("GET", "/v1/members", 403))["code"] == "FORBIDDEN"
    assert (await admin.json("POST", "/v1/cooperatives", 403, json={
        "name": "X", "shortCode": "XYZ", "country": "RW"}))["code"] == "FORBIDDEN"
    bad_key = await _refused(await client.get("/v1/payments", headers={"X-API-Key": "gw_not-a-key"}), 401)
    assert bad_key["code"] == "UNAUTHORIZED"
    assert (await _refused(await client.get("/v1/payments"), 401))["code"] == "UNAUTHORIZED"


def _token(rt: Any, **over: Any) -> str:
    now = utcnow()
    claims = {"sub": "x", "role": "SUPER_ADMIN", "coop": None, "mid": None, "iss": auth.ISSUER,
              "aud": auth.AUDIENCE, "iat": now, "exp": now + timedelta(minutes=5), "typ": "access", "jti": "abc",
              **over}
    return jwt.encode(claims, rt.settings.jwt_secret.get(), algorithm="HS256")


async def test_token_expired_and_invalid(client: Any, rt: Any, demo: dict[str, Any]) -> None:
    past = utcnow() - timedelta(hours=1)
    expired = await _refused(await client.get("/v1/payments", headers={
        "Authorization": f"Bearer {_token(rt, iat=past, exp=past + timedelta(minutes=5))}"}), 401)
    assert (expired["code"], expired["message"]) == ("TOKEN_EXPIRED", "token has expired")
    garbage = await _refused(await client.get("/v1/payments", headers={"Authorization": "Bearer not.a.jwt"}), 401)
    assert (garbage["code"], garbage["message"]) == ("TOKEN_INVALID", "invalid token")
    refresh = await _refused(await client.get("/v1/payments", headers={
        "Authorization": f"Bearer {_token(rt, typ='refresh')}"}), 401)
    assert refresh["code"] == "TOKEN_INVALID"
    tokens = await login(client, *demo["admin"])
    await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
    reused = await _refused(await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]}),
                            401)
    assert (reused["code"], reused["message"]) == ("TOKEN_INVALID", "refresh token already used")
    wrong = await _refused(await client.post("/v1/auth/token", json={
        "username": demo["admin"][0], "password": "wrong-password"}), 401)
    assert wrong["code"] == "UNAUTHORIZED"


@pytest.mark.usefixtures("limiter_clock")
async def test_account_locked(client: Any, demo: dict[str, Any]) -> None:
    username, password = demo["admin"]
    for _ in range(10):
        await _refused(await client.post("/v1/auth/token", json={"username": username, "password": "guess-guess"}),
                       401)
    locked = await _refused(await client.post("/v1/auth/token", json={"username": username, "password": password}),
                            429)
    assert locked["code"] == "ACCOUNT_LOCKED"


@pytest.mark.parametrize(("method", "path", "kw", "status", "code"), [
    ("GET", "/v1/no-such-thing", {}, 404, "NOT_FOUND"),
    ("PUT", "/v1/payments", {"json": {}}, 405, "METHOD_NOT_ALLOWED"),
    ("POST", "/v1/payments", {"data": b"{" + b" " * (70 * 1024) + b"}",
                              "headers": {"Content-Type": "application/json"}}, 413, "BODY_TOO_LARGE"),
    ("POST", "/v1/api-keys", {"data": b"name=x", "headers": {"Content-Type": "text/plain"}}, 415,
     "UNSUPPORTED_MEDIA_TYPE"),
    ("POST", "/v1/api-keys", {"json": ["not", "an", "object"]}, 400, "VALIDATION_FAILED"),
    ("GET", "/v1/payments/00000000-0000-4000-8000-000000000000", {}, 404, "NOT_FOUND"),
])
async def test_every_http_level_refusal_has_a_code(admin: Caller, method: str, path: str, kw: dict[str, Any],
                                                    status: int, code: str) -> None:
    body = await _refused(await admin.req(method, path, **kw), status)
    assert body["code"] == code


async def test_the_document_lists_the_codes(client: Any) -> None:
    doc = await (await client.get("/v1/openapi.json")).json()
    schema = doc["components"]["schemas"]["Error"]
    assert "code" in schema["required"] and set(schema["properties"]["code"]["enum"]) == set(CODES)
    assert "IDEMPOTENCY_KEY_REUSED" in schema["properties"]["code"]["description"]
    conflict = doc["paths"]["/v1/payments"]["post"]["responses"]["409"]["description"]
    assert "IDEMPOTENCY_KEY_REUSED" in conflict and "IDEMPOTENCY_KEY_IN_FLIGHT" in conflict


def test_the_readme_lists_every_code() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert [code for code in CODES if f"`{code}`" not in readme] == []


async def test_refresh_token_expired_and_revoked(client: Any, rt: Any, demo: dict[str, Any]) -> None:
    # An expired refresh token says so (the client signs in again), as an expired access token does.
    past = utcnow() - timedelta(days=30)
    old = _token(rt, typ="refresh", iat=past, exp=past + timedelta(days=7))
    expired = await _refused(await client.post("/v1/auth/refresh", json={"refreshToken": old}), 401)
    assert (expired["code"], expired["message"]) == ("TOKEN_EXPIRED", "token has expired")
    # A refresh token of a session a new password ended: revoked.
    username, password = demo["admin"]
    first = await login(client, username, password)
    second = await login(client, username, password)
    resp = await client.post("/v1/auth/password", json={"currentPassword": password,
                                                         "newPassword": "another-long-passphrase-9"},
                             headers={"Authorization": f"Bearer {second['accessToken']}"})
    assert resp.status == 200, await resp.text()
    revoked = await _refused(await client.post("/v1/auth/refresh", json={"refreshToken": first["refreshToken"]}),
                             401)
    assert (revoked["code"], revoked["message"]) == ("TOKEN_INVALID", "token has been revoked")


async def test_conflicts_an_integrator_tells_apart(admin: Caller, superadmin: Caller, rt: Any,
                                                   demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    await complete_payment(rt, paid["id"])
    opened = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    again = await admin.json("POST", "/v1/disputes", 409, json={"paymentId": paid["id"], "reason": "OTHER"})
    assert again["code"] == "DISPUTE_ALREADY_OPEN" and opened["reference"] in again["message"]

    # A name another of its kind has: the payment type's (created or renamed), the account's username.
    named = await admin.json("POST", "/v1/payment-types", 409, json={"name": "monthly rent", "amount": 5})
    assert (named["code"], named["field"]) == ("NAME_TAKEN", "name")
    water = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Water (codes)", "amount": 5})
    renamed = await admin.json("PATCH", f"/v1/payment-types/{water['id']}", 409, json={"name": "Monthly Rent"})
    assert (renamed["code"], renamed["field"]) == ("NAME_TAKEN", "name")
    user = {"username": "clerk.codes", "password": "a-long-clerk-passphrase-1", "role": "COOP_ADMIN"}
    await admin.json("POST", "/v1/users", 201, json=user)
    taken = await admin.json("POST", "/v1/users", 409, json={**user, "username": "Clerk.Codes"})
    assert (taken["code"], taken["field"]) == ("NAME_TAKEN", "username")
    coop = {"name": "Codes SACCO", "shortCode": "CDS", "country": "RW", "contactPhone": "0788123999"}
    await superadmin.json("POST", "/v1/cooperatives", 201, json=coop)
    code = await superadmin.json("POST", "/v1/cooperatives", 409, json={**coop, "shortCode": "cds"})
    assert (code["code"], code["field"]) == ("NAME_TAKEN", "shortCode")
    # A tenant account for a memberId that names no member: as a payment's.
    nobody = await admin.json("POST", "/v1/users", 404, json={
        "username": "tenant.codes", "password": "a-long-tenant-passphrase-1", "role": "TENANT",
        "memberId": "00000000-0000-4000-8000-000000000000"})
    assert (nobody["code"], nobody["field"]) == ("MEMBER_NOT_FOUND", "memberId")


async def test_state_refusals_say_invalid_state(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    from core.outbox import enqueue

    # A job that is not PARKED (queued, or replayed already) is not replayed.
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "no.such.kind", {"n": 1}, dedupe_key="codes-test", cooperative_id=demo["cooperative_id"])
    async with rt.sessionmaker() as s:
        from sqlalchemy import select

        from core.models import OutboxJob
        job_id = (await s.execute(select(OutboxJob.id).where(OutboxJob.dedupe_key == "codes-test"))).scalar_one()
    queued = await admin.json("POST", f"/v1/jobs/{job_id}/replay", 409)
    assert queued["code"] == "INVALID_STATE" and "PARKED" in queued["message"]

    # A member with a payment still open is not erased yet.
    rent = demo["payment_types"]["Monthly Rent"]
    member = demo["members"]["+250788000001"]
    await admin.json("POST", "/v1/payments", 201, json=payment_body(rent, memberId=member))
    await admin.json("DELETE", f"/v1/members/{member}", 200)
    erase = await admin.json("POST", f"/v1/members/{member}/erase", 409)
    assert erase["code"] == "INVALID_STATE" and "still open" in erase["message"]

    # A recording is not voided while a dispute of its payment is open.
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json={
        "paymentTypeId": rent, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": "+250788000002", "providerTransactionId": "TX-CODES-1",
        "completedAt": (utcnow() - timedelta(minutes=5)).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "note": "MTN statement", "idempotencyKey": idem()})
    # MTN's refund names the request that took the money, which a recording without gatewayReference lacks.
    unsendable = await admin.json("POST", f"/v1/payments/{recorded['id']}/refunds", 409,
                                  json={"amount": 1000, "idempotencyKey": idem()})
    assert unsendable["code"] == "PROVIDER_REFUSED" and "nothing was sent" in unsendable["message"]
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": recorded["id"], "reason": "OTHER"})
    void = await admin.json("POST", f"/v1/payments/{recorded['id']}/void", 409, json={"note": "typed twice"})
    assert void["code"] == "INVALID_STATE" and "close it before voiding" in void["message"]


async def test_ops_data_and_provider_callback_errors_have_a_code(client: Any, rt: Any, tenant: Caller) -> None:
    """Outside /v1 an integrator (the ops page's script, a provider's or her own test callback) sees error
    answers in the same shape: with a code, a 401 of /ops/data saying whether to refresh the token."""
    past = utcnow() - timedelta(hours=1)
    expired = await _refused(await client.get("/ops/data", headers={
        "Authorization": f"Bearer {_token(rt, iat=past, exp=past + timedelta(minutes=5))}"}), 401)
    assert expired["code"] == "TOKEN_EXPIRED"
    assert (await _refused(await client.get("/ops/data"), 401))["code"] == "UNAUTHORIZED"
    assert (await _refused(await tenant.req("GET", "/ops/data"), 403))["code"] == "FORBIDDEN"
    unknown = await _refused(await client.post("/webhooks/payments/nosuch", json={}), 404)
    assert unknown["code"] == "NOT_FOUND"


@requires_pg
async def test_a_refund_raced_by_a_dispute_being_opened_says_send_it_again(admin: Caller, rt: Any,
                                                                         demo: dict[str, Any],
                                                                         monkeypatch: Any) -> None:
    """A dispute opened after the refund read the payment's disputes and held by the officer moving it: nothing is
    refunded, and the code (not CONFLICT) says the same request sent again goes through."""
    from sqlalchemy import select

    from core.models import Refund

    rent = demo["payment_types"]["Monthly Rent"]
    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    await complete_payment(rt, paid["id"])
    opened = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    body = {"amount": 1000, "idempotencyKey": idem()}
    raced = await refund_raced(admin, rt, monkeypatch, paid["id"], opened["id"], "_lock_open_disputes", body)
    assert raced["code"] == "CONCURRENT_CHANGE" and "send the refund again" in raced["message"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Refund.id))).all() == []
    again = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json=body)
    assert again["amount"] == 1000


async def test_a_key_the_gateway_gives_its_own_requests_is_refused(admin: Caller, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    """A client's key under `ussd:` could take a member's USSD payment's (unique per cooperative: her payment would
    be answered with the client's); one under `dispute:`, the refund a dispute is resolved with (the officer would
    get a 409). Refused before anything is read or written."""
    from sqlalchemy import func, select

    from core.models import Payment, Refund

    rent = demo["payment_types"]["Monthly Rent"]
    ussd = await _refused(await admin.req("POST", "/v1/payments",
                                          json=payment_body(rent, idempotencyKey="ussd:africastalking:ATUid_1")), 400)
    assert (ussd["field"], ussd["message"]) == (
        "idempotencyKey", ["idempotencyKey must not start with 'ussd:': the gateway keys its own USSD payments so"])
    recorded = await admin.req("POST", "/v1/payments/recorded", json={
        "paymentTypeId": rent, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN", "providerTransactionId": "ST-1",
        "completedAt": "2026-01-05T10:00:00Z", "note": "from the statement", "idempotencyKey": " ussd:nalo:123456"})
    assert (await _refused(recorded, 400))["field"] == "idempotencyKey"
    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    await complete_payment(rt, paid["id"])
    refund = await _refused(await admin.req("POST", f"/v1/payments/{paid['id']}/refunds",
                                            json={"amount": 1000, "idempotencyKey": "dispute:0f9a3c1e"}), 400)
    assert refund["message"] == [
        "idempotencyKey must not start with 'dispute:': the gateway keys its own refunds of disputes so"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 1
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == 0
    # Keys merely containing the words are a client's own.
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                     json={"amount": 1000, "idempotencyKey": "refund-for-dispute:42"})
