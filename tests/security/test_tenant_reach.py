"""What a tenant (a member's own API login) and an API key of limited scopes reach: only her own rows, whatever
she filters by, with another member's ids answered exactly as missing ones; her token ends with her membership
and her cooperative."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from tests.admin_api.conftest import (
    Caller,
    bearer,
    complete_payment,
    idem,
    login,
    make_payment,
    redis_fallbacks,
    redis_unreachable,
)

ALINE = "+250788000001"  # the demo tenant's member
JEAN = "+250788000002"  # another member of her cooperative


@pytest.fixture(autouse=True)
def _generous_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATE_LIMIT_MULTIPLIER", "1000")


def _comparable(status: int, body: Any) -> tuple[int, Any]:
    """An error answer without what differs from call to call (its time and path)."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("timestamp", "path", "requestId")}
    return status, body


async def _answer(caller: Caller, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    resp = await caller.req(method, path, **kw)
    return _comparable(resp.status, await resp.json())


async def _others_payment(rt: Any, admin: Caller, demo: dict[str, Any]) -> dict[str, Any]:
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], memberId=demo["members"][JEAN],
                              paymentAccount=JEAN, idempotencyKey=idem())
    await complete_payment(rt, paid["id"])
    return paid


async def test_filters_never_reach_another_members_rows(rt: Any, admin: Caller, tenant: Caller,
                                                        demo: dict[str, Any]) -> None:
    others = await _others_payment(rt, admin, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": others["id"], "reason": "OTHER"})
    mine = await make_payment(tenant, demo["payment_types"]["Water"], amount=5000)
    jean = demo["members"][JEAN]
    for query in (f"member={jean}", f"paymentAccount={JEAN}", "paymentAccount=0788000002",
                  f"reference={others['reference']}", "gatewayTransactionId=TX1", "status=COMPLETED",
                  f"cooperativeId={demo['cooperative_id']}", "limit=100",
                  "updatedFrom=2000-01-01T00:00:00Z"):
        listed = await tenant.json("GET", f"/v1/payments?{query}", 200)
        assert others["id"] not in [p["id"] for p in listed["data"]], query
        if "meta" in listed and "total" in listed["meta"]:
            assert listed["meta"]["total"] == len([p for p in listed["data"] if p["id"] == mine["id"]]), query
    for query in (f"paymentId={others['id']}", f"reference={dispute['reference']}", "open=true", "limit=100"):
        listed = await tenant.json("GET", f"/v1/disputes?{query}", 200)
        assert listed["data"] == [] and listed["meta"]["total"] == 0, query


async def test_another_members_ids_answer_as_missing_ones(rt: Any, admin: Caller, tenant: Caller,
                                                          demo: dict[str, Any]) -> None:
    others = await _others_payment(rt, admin, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": others["id"], "reason": "OTHER"})
    missing = str(uuid.uuid4())
    pairs = [
        ("GET", "/v1/payments/{}", others["id"]),
        ("GET", "/v1/payments/{}/status", others["id"]),
        ("GET", "/v1/members/{}", demo["members"][JEAN]),
        ("GET", "/v1/members/{}/transactions", demo["members"][JEAN]),
        ("GET", "/v1/disputes/{}", dispute["id"]),
    ]
    for method, path, real in pairs:
        seen = await _answer(tenant, method, path.format(real))
        assert seen[0] == 404 and seen == await _answer(tenant, method, path.format(missing)), (path, seen)
    opened = await _answer(tenant, "POST", "/v1/disputes", json={"paymentId": others["id"], "reason": "OTHER"})
    assert opened[0] == 404
    assert opened == await _answer(tenant, "POST", "/v1/disputes", json={"paymentId": missing, "reason": "OTHER"})
    # Admin-only acts on anyone's payment, hers too: refused for what she is, before any row is looked up.
    mine = await make_payment(tenant, demo["payment_types"]["Water"], amount=5000)
    for target in (mine["id"], others["id"]):
        for path, body in ((f"/v1/payments/{target}/refunds", {"amount": 100, "reason": "x", "idempotencyKey": idem()}),
                           (f"/v1/payments/{target}/cancel", {"note": "mine"}),
                           (f"/v1/payments/{target}/receipt", None)):
            resp = await tenant.req("POST", path, json=body)
            assert resp.status == 403, (path, await resp.text())
    for path in ("/v1/refunds", f"/v1/members/{demo['members'][ALINE]}/messages", f"/v1/payments/{mine['id']}/messages",
                 f"/v1/payments/{mine['id']}/callbacks", "/v1/audit-events", "/v1/webhook-endpoints", "/v1/jobs",
                 "/v1/reports/reconciliation?from=2026-01-01&to=2026-02-01", "/v1/users", "/v1/api-keys",
                 "/v1/members", "/v1/provider-callbacks", f"/v1/cooperatives/{others['cooperativeId']}"):
        resp = await tenant.req("GET", path)
        assert resp.status == 403, (path, resp.status)
    assert (await tenant.req("GET", "/ops/data")).status == 403


async def test_an_erased_members_idempotency_key_does_not_answer_with_his_payment(
        rt: Any, admin: Caller, tenant: Caller, demo: dict[str, Any]) -> None:
    """An erased payer's payments keep no request hash (core.members.erase_member), so the key alone names them:
    a tenant sending that key (a guessable one: an integration's `rent-<unit>-<month>`) was answered 201 with
    another member's payment, its id, amount, reference and member. She is refused as for any other request
    under a key the cooperative used."""
    key = "rent-B4-2026-11"
    jean = demo["members"][JEAN]
    his = await make_payment(admin, demo["payment_types"]["Monthly Rent"], memberId=jean, paymentAccount=JEAN,
                             idempotencyKey=key)
    await complete_payment(rt, his["id"])
    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/erase", 200)
    resp = await tenant.req("POST", "/v1/payments", json={
        "paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": ALINE, "idempotencyKey": key})
    body = await resp.json()
    assert resp.status == 409, body
    assert his["id"] not in str(body) and his["reference"] not in str(body)
    assert "already exists with a different request" in str(body["message"]), body
    listed = await tenant.json("GET", "/v1/payments", 200)
    assert his["id"] not in [p["id"] for p in listed["data"]]


async def test_her_token_ends_with_her_membership_and_her_cooperative(
        client: Any, rt: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    tokens = await login(client, *demo["tenant"])
    tenant = Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})
    await tenant.json("GET", "/v1/payments", 200)
    aline = demo["members"][ALINE]
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    assert (await tenant.req("GET", "/v1/payments")).status == 401
    assert (await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})).status == 401
    assert (await client.post("/v1/auth/token", json=dict(zip(("username", "password"), demo["tenant"],
                                                                 strict=True)))).status == 401
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"status": "ACTIVE"})
    tenant = await bearer(client, *demo["tenant"])
    await tenant.json("GET", "/v1/payments", 200)
    coop = (await tenant.json("GET", f"/v1/members/{aline}", 200))["cooperativeId"]
    await superadmin.json("DELETE", f"/v1/cooperatives/{coop}", 200)
    assert (await tenant.req("GET", "/v1/payments")).status == 401


async def test_a_key_that_only_makes_payments_reads_only_its_own(
        client: Any, rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    made = await admin.json("POST", "/v1/api-keys", 201, json={"name": "till", "scopes": ["payments:write"]})
    key = Caller(client, {"X-API-Key": made["key"]})
    others = await _others_payment(rt, admin, demo)
    own = await make_payment(key, demo["payment_types"]["Water"], amount=5000, paymentAccount=JEAN)
    await key.json("GET", f"/v1/payments/{own['id']}", 200)
    missing = str(uuid.uuid4())
    assert await _answer(key, "GET", f"/v1/payments/{others['id']}") == await _answer(
        key, "GET", f"/v1/payments/{missing}")
    for path in ("/v1/payments", "/v1/disputes", f"/v1/members/{demo['members'][JEAN]}",
                 f"/v1/members/{demo['members'][JEAN]}/transactions", "/v1/refunds"):
        assert (await key.req("GET", path)).status == 403, path
    assert (await key.req("POST", "/v1/disputes", json={"paymentId": own["id"], "reason": "OTHER"})).status == 403
    assert (await key.req("POST", "/v1/api-keys", json={"name": "x", "scopes": ["admin"]})).status == 403


async def test_a_suspension_ends_her_refresh_token_for_good(
        client: Any, rt: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """Her membership, then her cooperative, suspended and made active again: a refresh token from before it
    stays ended, as one from before her account's deactivation does (the suspension ended her sessions; taking
    it back does not start them again). A new sign-in works."""
    aline = demo["members"][ALINE]
    before = await login(client, *demo["tenant"])
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"status": "ACTIVE"})
    resp = await client.post("/v1/auth/refresh", json={"refreshToken": before["refreshToken"]})
    assert resp.status == 401, await resp.text()
    # Without Redis her access token is judged on the rows: ended by the suspension too.
    async with redis_unreachable(rt):
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            resp = await client.get("/v1/payments", headers={"Authorization": f"Bearer {before['accessToken']}"})
    assert resp.status == 401, await resp.text()
    assert len(redis_fallbacks(caplog)) == 1  # on the rows: no mark was read

    before = await login(client, *demo["tenant"])
    coop = demo["cooperative_id"]
    await superadmin.json("DELETE", f"/v1/cooperatives/{coop}", 200)
    await superadmin.json("PATCH", f"/v1/cooperatives/{coop}", 200, json={"status": "ACTIVE"})
    resp = await client.post("/v1/auth/refresh", json={"refreshToken": before["refreshToken"]})
    assert resp.status == 401, await resp.text()
    tenant = await bearer(client, *demo["tenant"])
    await tenant.json("GET", "/v1/payments", 200)


async def test_a_tenant_lists_only_the_payment_types_she_can_pay(admin: Caller, tenant: Caller,
                                                                   demo: dict[str, Any]) -> None:
    """includeInactive is the staff's: a retired payment type stays out of her list even when she asks for it."""
    water = demo["payment_types"]["Water"]
    await admin.json("DELETE", f"/v1/payment-types/{water}", 200)
    staff = await admin.json("GET", "/v1/payment-types?includeInactive=true", 200)
    assert water in [t["id"] for t in staff["data"]]
    for query in ("", "?includeInactive=true"):
        listed = await tenant.json("GET", f"/v1/payment-types{query}", 200)
        assert listed["data"] and all(t["isActive"] for t in listed["data"]), query
        assert water not in [t["id"] for t in listed["data"]], query
