"""Ids are UUIDs, and UUIDs compare case-insensitively (RFC 4122): a client that writes them in upper case names the
payment type, member, payment or callback it means. Before, ids in a path or query were lower-cased where they were
read, but those in a JSON body were compared as sent: `paymentTypeId` in upper case answered "payment type not found"
(404) for the cooperative's own type. A body's ids are now stored and looked up lower-case (admin_api.validation
.normalised); a malformed one is still refused as before, and a field that only looks like a UUID (an
idempotency key, a provider's transaction id) is kept as sent."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.models import Dispute, Payment, ProviderEvent
from tests.admin_api.conftest import Caller, make_payment, payment_body
from tests.admin_api.test_recorded_payments import _line
from tests.admin_api.test_unmatched_callbacks import _lost_payment_reference, _mtn_callback

MEMBER = "+250788000001"


async def _payment(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


def _said(body: dict[str, Any]) -> list[str]:
    message = body["message"]
    return message if isinstance(message, list) else [message]


async def test_upper_case_ids_in_a_body_and_a_path_find_what_they_name(admin: Caller, rt: Any,
                                                                     demo: dict[str, Any]) -> None:
    rent, member = demo["payment_types"]["Monthly Rent"], demo["members"][MEMBER]
    # A .NET client's Guid.ToString().ToUpper(), as an idempotency key too: that one is the client's, kept as sent.
    key = "8D3F2C1A-4B5E-4F6A-9B7C-0D1E2F3A4B5C"
    made = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        rent.upper(), memberId=member.upper(), paymentAccount=MEMBER, idempotencyKey=key))
    assert (made["paymentTypeId"], made["memberId"]) == (rent, member)
    row = await _payment(rt, made["id"])
    assert (row.payment_type_id, row.member_id, row.idempotency_key) == (rent, member, key)

    # The same request again, ids in lower case this time: the same request, replayed, not a second payment.
    again = await admin.req("POST", "/v1/payments", json=payment_body(
        rent, memberId=member, paymentAccount=MEMBER, idempotencyKey=key))
    assert again.status == 201, await again.text()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["id"] == made["id"]

    # Paths and query parameters, as before.
    assert (await admin.json("GET", f"/v1/payments/{made['id'].upper()}", 200))["id"] == made["id"]
    assert (await admin.json("GET", f"/v1/members/{member.upper()}", 200))["id"] == member
    listed = await admin.json("GET", f"/v1/payments?member={member.upper()}&paymentTypeId={rent.upper()}", 200)
    assert [p["id"] for p in listed["data"]] == [made["id"]]

    # A dispute of it, named in upper case: the row holds the payment's id as stored, and the member's list finds it.
    opened = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": made["id"].upper(), "reason": "OTHER"})
    async with rt.sessionmaker() as s:
        dispute = await s.get(Dispute, opened["id"])
    assert (dispute.payment_id, dispute.member_id) == (made["id"], member)
    mine = await admin.json("GET", f"/v1/disputes?member={member.upper()}", 200)
    assert [d["id"] for d in mine["data"]] == [opened["id"]]


async def test_a_recorded_payment_names_its_callback_and_cooperative_in_upper_case(
        admin: Caller, superadmin: Caller, client: Any, rt: Any, demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    assert (await _mtn_callback(client, reference, txn="MTN-7731"))["result"] == "unknown_payment"
    [callback] = (await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true&resolved=false", 200))["data"]
    lost_id = "5B0F3C1E-8D2A-4F6B-9C7E-1A2B3C4D5E6F"
    done = await superadmin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, providerTransactionId="MTN-7731", callbackId=callback["id"].upper(), id=lost_id,
        cooperativeId=demo["cooperative_id"].upper(), paymentTypeId=demo["payment_types"]["Monthly Rent"].upper(),
        memberId=demo["members"][MEMBER].upper()))
    assert done["id"] == lost_id.lower()
    assert done["cooperativeId"] == demo["cooperative_id"]
    async with rt.sessionmaker() as s:
        event = await s.get(ProviderEvent, callback["id"])
        stored = (await s.execute(select(Payment.id, Payment.cooperative_id, Payment.payment_type_id,
                                         Payment.member_id))).one()
    assert event.outcome == "unknown_payment_resolved"
    assert tuple(stored) == (lost_id.lower(), demo["cooperative_id"], demo["payment_types"]["Monthly Rent"],
                             demo["members"][MEMBER])


async def test_a_malformed_id_is_still_refused(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent, member = demo["payment_types"]["Monthly Rent"], demo["members"][MEMBER]
    # A `format: uuid` field: refused by the shape check (400), naming the field. Python's UUID() also reads
    # "<uuid>}" and "<uuid>-", which passed it and then could only be not found.
    for bad in ("not-a-uuid", member + "}", member.upper() + "-", member + "\n"):
        refused = await admin.json("POST", "/v1/payments", 400, json=payment_body(
            rent, memberId=bad, paymentAccount=MEMBER))
        assert _said(refused) == ["memberId must be a valid uuid"], bad
    # paymentTypeId is not `format: uuid`: one that is no UUID is not found, as another cooperative's is.
    missing = await admin.json("POST", "/v1/payments", 404, json=payment_body(rent.upper() + "0"))
    assert _said(missing) == ["payment type not found"]
    gone = await admin.json("POST", "/v1/disputes", 404, json={"paymentId": "PAY_20261201_001", "reason": "OTHER"})
    assert _said(gone) == ["payment not found"]
    # Paths and query parameters.
    assert _said(await admin.json("GET", "/v1/payments/NOT-A-UUID", 404)) == ["payment not found"]
    assert _said(await admin.json("GET", f"/v1/payments?member={member}x", 400)) == ["member must be a UUID"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment.id))).first() is None


async def test_a_provider_transaction_id_shaped_like_a_uuid_is_kept_as_sent(admin: Caller, rt: Any,
                                                                           demo: dict[str, Any]) -> None:
    """Only ids are lower-cased: a provider's transaction id is its own string, matched as its statement has it."""
    txn = "C0FFEE00-1234-4ABC-8DEF-0123456789AB"
    made = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=MEMBER)
    await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": "member asked to stop"})
    row = await _payment(rt, made["id"])
    assert row.status == "CANCELLED", row.status
    await admin.json("POST", f"/v1/payments/{made['id'].upper()}/outcome", 200, json={
        "status": "COMPLETED", "providerTransactionId": txn, "note": "MTN statement line 4"})
    assert (await _payment(rt, made["id"])).provider_transaction_id == txn


async def test_upper_case_ids_in_the_audit_logs_filters_find_the_rows(admin: Caller, demo: dict[str, Any]) -> None:
    """GET /v1/audit-events?entityId= and ?actor= take ids as a path or another query parameter does: in upper case
    they name the same payment and the same admin (they found nothing)."""
    made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    rows = (await admin.json("GET", f"/v1/audit-events?entityId={made['id']}", 200))["data"]
    assert rows and {r["entityId"] for r in rows} == {made["id"]}
    upper = (await admin.json("GET", f"/v1/audit-events?entityId={made['id'].upper()}", 200))["data"]
    assert upper == rows
    actor = rows[-1]["actor"]
    kind, _, actor_id = actor.partition(":")
    assert kind == "admin"
    by_actor = (await admin.json("GET", f"/v1/audit-events?actor={kind}:{actor_id.upper()}", 200))["data"]
    assert by_actor and {r["actor"] for r in by_actor} == {actor}
    # Not a UUID: compared as sent (an entity's id of another form, a system actor).
    assert (await admin.json("GET", "/v1/audit-events?entityId=NOT-AN-ID", 200))["data"] == []
