"""What an integrator's error handling reads: a refusal says what to change. A cooperative's accounting system
signs in with an API key made for it, and a 403 or a 405 is all it has to go on (before: "Forbidden resource"
whatever scope was missing, and "405: Method Not Allowed" naming neither the method nor the ones allowed)."""

from __future__ import annotations

from tests.admin_api.conftest import Caller, complete_payment, idem, payment_body


async def test_a_key_refused_for_its_scopes_is_told_the_scope_it_lacks(client, admin, demo):
    writer = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP", "scopes": ["payments:write"]})
    reader = await admin.json("POST", "/v1/api-keys", 201, json={"name": "BI", "scopes": ["payments:read"]})
    erp, bi = Caller(client, {"X-API-Key": writer["key"]}), Caller(client, {"X-API-Key": reader["key"]})

    listed = await erp.json("GET", "/v1/payments", 403)
    assert listed["message"] == "Forbidden resource: this API key lacks the payments:read scope"
    made = await bi.json("POST", "/v1/payments", 403, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    assert made["message"] == "Forbidden resource: this API key lacks the payments:write scope"
    members = await bi.json("GET", "/v1/members", 403)
    assert members["message"] == "Forbidden resource: this API key lacks the admin scope"
    # A dispute is opened by payments:write, but a key that cannot read payments does not handle them.
    dispute = await erp.json("POST", "/v1/disputes", 403, json={
        "paymentId": "00000000-0000-4000-8000-000000000000", "reason": "OTHER"})
    assert dispute["message"] == "Forbidden resource: this API key lacks the payments:read scope"


async def test_a_role_refused_is_told_why(admin, tenant):
    assert (await admin.json("POST", "/v1/cooperatives", 403, json={"name": "X", "shortCode": "XYZ", "country": "RW"})
            )["message"] == "Forbidden resource: super admins only"
    assert (await tenant.json("GET", "/v1/members", 403))["message"] == "Forbidden resource: not open to tenants"


async def test_a_method_the_path_does_not_take_names_the_ones_it_does(admin):
    resp = await admin.req("PUT", "/v1/payments", json={})
    body = await resp.json()
    assert resp.status == 405 and body["error"] == "Method Not Allowed"
    assert body["message"] == "Cannot PUT /v1/payments: it takes GET, POST"
    assert set(resp.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_the_document_alone_says_what_the_rate_headers_and_the_signature_key_are(client):
    """An integrator generating her client from /v1/openapi.json: X-RateLimit-Reset is an epoch time, not seconds
    to wait (README, "Rate limits"), and the HMAC key is the secret as given, `whsec_` and all, not its base64
    decoded as Standard Webhooks' `whsec_` secrets are (before: three bare integers, and "the endpoint's secret")."""
    doc = await (await client.get("/v1/openapi.json")).json()
    headers = doc["paths"]["/v1/payments"]["get"]["responses"]["200"]["headers"]
    assert "epoch seconds" in headers["X-RateLimit-Reset"]["description"]
    assert headers["X-RateLimit-Limit"]["description"] and headers["X-RateLimit-Remaining"]["description"]
    assert doc["paths"]["/v1/payments"]["get"]["responses"]["429"]["headers"]["X-RateLimit-Reset"] == \
        headers["X-RateLimit-Reset"]
    [signature] = [p for p in doc["webhooks"]["payment.completed"]["post"]["parameters"]
                   if p["name"] == "X-Gateway-Signature"]
    assert "whole secret" in signature["description"] and "not base64-decoded" in signature["description"]


async def test_a_refusal_about_one_field_names_it(admin, rt, demo):
    """The code knows which field each refusal is about (DomainError.field); the answer now says it in `field`, so
    her system can show the error next to that input without parsing English (before: only in the message, when
    it happened to name it: "payment type not found", "refund of 40,000 RWF exceeds the refundable 30,000 RWF")."""
    rent = demo["payment_types"]["Monthly Rent"]
    unknown = await admin.json("POST", "/v1/payments", 404, json=payment_body(
        "00000000-0000-4000-8000-000000000000"))
    assert (unknown["message"], unknown["field"]) == ("payment type not found", "paymentTypeId")
    wrong = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, amount=1))
    assert wrong["field"] == "amount" and wrong["message"][0].startswith("Monthly Rent costs")
    body = payment_body(rent)
    paid = await admin.json("POST", "/v1/payments", 201, json=body)
    again = await admin.json("POST", "/v1/payments", 409, json={**body, "description": "another"})
    assert again["field"] == "idempotencyKey"
    await complete_payment(rt, paid["id"])
    refunds = f"/v1/payments/{paid['id']}/refunds"
    await admin.json("POST", refunds, 201, json={"amount": 20000, "idempotencyKey": idem()})
    over = await admin.json("POST", refunds, 422, json={"amount": 40000, "idempotencyKey": idem()})
    assert over["field"] == "amount" and "exceeds the refundable" in over["message"]
    # A refusal of the request's shape lists every field in its message; one not about a field has no `field`.
    shape = await admin.json("POST", "/v1/payments", 400, json={"amount": 1})
    assert len(shape["message"]) > 1 and "field" not in shape
    assert "field" not in await admin.json("GET", "/v1/payments/00000000-0000-4000-8000-000000000000", 404)
    # A refusal of the payment's state names no field: its `status` is none of the request's.
    state = await admin.json("POST", f"/v1/payments/{paid['id']}/cancel", 409, json={"note": "asked by mistake"})
    assert state["message"].startswith("payment is") and "field" not in state


async def test_a_refusal_of_what_the_payment_or_refund_is_names_no_field_on_an_outcome(admin, rt, demo):
    """POST .../outcome takes a `status` (the outcome recorded); a refusal of the payment's or the refund's own state,
    whatever outcome was sent, is not about that field (before: `field: status`, as if the outcome sent were wrong
    and another would do)."""
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    paid = await admin.json("POST", "/v1/payments", 201, json=body)
    await complete_payment(rt, paid["id"])
    # (COMPLETED is the only outcome a payment's takes)
    done = await admin.json("POST", f"/v1/payments/{paid['id']}/outcome", 409, json={
        "status": "COMPLETED", "note": "statement checked", "providerTransactionId": "TXN-OUTCOME-1"})
    assert done["message"].startswith("payment is COMPLETED") and "field" not in done, done
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    for status in ("COMPLETED", "FAILED"):
        queued = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 409,
                                  json={"status": status, "note": "statement checked"})
        assert "not been sent to the provider yet" in queued["message"] and "field" not in queued, queued
