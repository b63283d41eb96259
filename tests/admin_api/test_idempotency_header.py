"""The Idempotency-Key HTTP header (Stripe's, which many client libraries send on every POST) on the routes that
take an `idempotencyKey` in the body: it stands for the body's key, so a client keying its requests by the header
alone has its retry answered with what the first request made (no second payment, refund, dispute or note). Both
given and different: 400 naming both, nothing made."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.models import Dispute, Payment, Refund
from tests.admin_api.conftest import complete_payment, idem, make_payment, payment_body

BOTH = ("the Idempotency-Key header and idempotencyKey in the body differ: send the key in one of them, or the "
        "same key in both")


def _without_key(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "idempotencyKey"}


async def _count(rt: Any, model: Any) -> int:
    async with rt.sessionmaker() as s:
        return int(await s.scalar(select(func.count()).select_from(model)))


async def test_a_payment_keyed_by_the_header_alone_is_made_once(admin, rt, demo):
    body = _without_key(payment_body(demo["payment_types"]["Monthly Rent"]))
    key = {"Idempotency-Key": idem()}
    first = await admin.req("POST", "/v1/payments", json=body, headers=key)
    made = await first.json()
    assert first.status == 201, made
    assert "Idempotent-Replayed" not in first.headers
    again = await admin.req("POST", "/v1/payments", json=body, headers=key)
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == made["id"]
    # The same key in the body is the same request: its answer too.
    same = await admin.req("POST", "/v1/payments", json={**body, "idempotencyKey": key["Idempotency-Key"]})
    assert (same.status, (await same.json())["id"]) == (201, made["id"])
    # ... and in both at once.
    both = await admin.req("POST", "/v1/payments", json={**body, "idempotencyKey": key["Idempotency-Key"]},
                           headers=key)
    assert (both.status, (await both.json())["id"]) == (201, made["id"])
    assert await _count(rt, Payment) == 1
    # Another request under the header's key is refused as under the body's.
    other = await admin.req("POST", "/v1/payments", json={**body, "amount": 40000}, headers=key)
    assert (other.status, (await other.json())["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert await _count(rt, Payment) == 1


async def test_two_different_keys_are_refused_naming_both(admin, rt, demo):
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    resp = await admin.req("POST", "/v1/payments", json=body, headers={"Idempotency-Key": idem()})
    answer = await resp.json()
    assert resp.status == 400, answer
    assert (answer["message"], answer["code"], answer["field"]) == ([BOTH], "VALIDATION_FAILED", "idempotencyKey")
    assert await _count(rt, Payment) == 0


async def test_the_header_is_checked_as_the_body_key_is(admin, rt, demo):
    body = _without_key(payment_body(demo["payment_types"]["Monthly Rent"]))
    length = ("the Idempotency-Key header must be 8 to 128 characters (the idempotency key, as idempotencyKey in "
              "the body)")
    for key, said in (("short", length), ("k" * 129, length),
                      ("ussd:mtn:123456", "idempotencyKey must not start with 'ussd:': the gateway keys its own "
                                          "USSD payments so")):
        resp = await admin.req("POST", "/v1/payments", json=body, headers={"Idempotency-Key": key})
        answer = await resp.json()
        assert resp.status == 400, answer
        assert (answer["message"], answer["field"]) == ([said], "idempotencyKey"), answer
    # Neither the header nor the body's key: refused as before.
    resp = await admin.req("POST", "/v1/payments", json=body)
    assert resp.status == 400
    assert await _count(rt, Payment) == 0


async def test_a_refund_keyed_by_the_header_alone_is_made_once(admin, rt, demo):
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    key = {"Idempotency-Key": idem()}
    answers = []
    for _ in range(2):
        resp = await admin.req("POST", f"/v1/payments/{paid['id']}/refunds", json={"amount": 1000, "reason": "x"},
                               headers=key)
        answers.append((resp.status, (await resp.json())["id"], resp.headers.get("Idempotent-Replayed")))
    assert answers[0][0] == answers[1][0] == 201
    assert answers[0][1] == answers[1][1]
    assert [a[2] for a in answers] == [None, "true"]
    assert await _count(rt, Refund) == 1


async def test_a_dispute_and_its_note_keyed_by_the_header_alone_are_made_once(admin, rt, demo):
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    key = {"Idempotency-Key": idem()}
    opened = [await admin.req("POST", "/v1/disputes", json={"paymentId": paid["id"], "reason": "OTHER"},
                              headers=key) for _ in range(2)]
    assert [r.status for r in opened] == [201, 201], [await r.json() for r in opened]
    dispute = (await opened[0].json())["id"]
    assert (await opened[1].json())["id"] == dispute
    assert await _count(rt, Dispute) == 1
    note = {"Idempotency-Key": idem()}
    for _ in range(2):
        resp = await admin.req("POST", f"/v1/disputes/{dispute}/transitions",
                               json={"status": "UNDER_REVIEW", "note": "called the member"}, headers=note)
        assert resp.status == 200, await resp.json()
    async with rt.sessionmaker() as s:
        notes = (await s.get(Dispute, dispute)).notes
    assert [n.get("text") for n in notes].count("called the member") == 1, notes


async def test_the_header_elsewhere_is_left_alone(admin):
    # A route without an idempotencyKey (nothing to key) answers as it did: the header is not read there.
    resp = await admin.req("POST", "/v1/payment-types", json={"name": "Levy", "amount": 500},
                           headers={"Idempotency-Key": "x"})
    assert resp.status == 201


async def test_the_document_names_the_header(admin):
    doc = await admin.json("GET", "/v1/openapi.json", 200)
    for path in ("/v1/payments", "/v1/payments/recorded", "/v1/payments/{id}/refunds", "/v1/disputes",
                 "/v1/disputes/{id}/transitions"):
        params = doc["paths"][path]["post"]["parameters"]
        assert any(p["in"] == "header" and p["name"] == "Idempotency-Key" for p in params), path
    assert not any(p["in"] == "header" for p in doc["paths"]["/v1/payment-types"]["post"]["parameters"])
