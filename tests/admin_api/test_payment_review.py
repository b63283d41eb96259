"""POST /v1/payments/{id}/review: the support desk clears a payment's flag (`mismatch`) once a person has checked the
provider's statement and dealt with it. The flagged list and the reconciliation's `flagged` stop showing it, the
payment's JSON still says it was flagged, why, who reviewed it and when (`review`), and the audit log keeps the
review; no money figure moves, and a flag raised after the review shows again, alone."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select

from core.models import AuditEvent, OutboxJob, Payment
from tests.admin_api.conftest import Caller, idem, make_payment
from tests.providers.wires import mtn_adapter, mtn_wire

STATUS = "/collection/v1_0/requesttopay/*"
ASKED_40K = "provider reported 40,000 RWF, expected 50,000 RWF"
NOTE = "MTN statement of 2 Dec shows 40,000 taken; member paid the rest in cash, receipt 118"


async def _mtn_says(client: Any, wire: Any, reference: str, amount: str, txn: str) -> str:
    """MTN's callback for the request `reference` (SUCCESSFUL, `txn`), confirmed by its status query answering
    `amount` taken: what the gateway made of it."""
    wire.on("GET", STATUS, 200, {"amount": amount, "currency": "RWF", "externalId": reference, "status": "SUCCESSFUL",
                                 "financialTransactionId": txn})
    body = {"referenceId": reference, "externalId": reference, "status": "SUCCESSFUL", "financialTransactionId": txn,
            "amount": amount, "currency": "RWF", "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}}
    answer = await client.post("/webhooks/payments/mtn_momo", data=json.dumps(body),
                               headers={"Content-Type": "application/json"})
    assert answer.status == 200, await answer.text()
    return str((await answer.json())["result"])


async def _flagged(rt: Any, client: Any, admin: Caller, demo: dict[str, Any]) -> tuple[dict[str, Any], Any, str]:
    """A 50,000 RWF rent of which MTN reports 40,000 taken: completed, flagged. The payment, MTN's wire and the
    request's reference."""
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker() as s:
        reference = (await s.get(Payment, payment["id"])).provider_reference
    assert await _mtn_says(client, wire, reference, "40000", "MTN-1") == "completed"
    return payment, wire, reference


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


async def _reviews(rt: Any, payment_id: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == "payment.reviewed").order_by(AuditEvent.id))
        ).scalars())


async def _events(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(OutboxJob)
                                    .where(OutboxJob.kind == "webhook.event"))).scalar_one())


def _money(report: dict[str, Any]) -> dict[str, Any]:
    """The reconciliation's figures, all but its exceptions (`flagged`, `flaggedCount`)."""
    return {k: v for k, v in report.items() if k not in ("flagged", "flaggedCount")}


async def test_a_reviewed_flag_leaves_the_lists_and_stays_readable(rt: Any, client: Any, admin: Caller,
                                                                   demo: dict[str, Any]) -> None:
    payment, _wire, _ = await _flagged(rt, client, admin, demo)
    url = f"/v1/payments/{payment['id']}"
    flagged = await admin.json("GET", url, 200)
    assert (flagged["status"], flagged["mismatch"], flagged["mismatchDetail"], flagged["collectedAmount"],
            flagged["review"]) == ("COMPLETED", True, ASKED_40K, 40000, None)
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?mismatch=true", 200))["data"]] == [payment["id"]]
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [f["id"] for f in report["flagged"]] == [payment["id"]]
    events, before = await _events(rt), await _row(rt, payment["id"])

    reviewed = await admin.json("POST", f"{url}/review", 200, json={"note": f"  {NOTE} "})

    row = await _row(rt, payment["id"])
    assert (row.mismatch, row.mismatch_detail, row.reviewed_detail, row.review_note) == (False, None, ASKED_40K, NOTE)
    assert row.reviewed_by.startswith("admin:") and row.reviewed_at is not None and row.updated_at > before.updated_at
    # Nothing else moved: the money, the status, the ids.
    for column in ("status", "amount_minor", "collected_minor", "refunded_minor", "fee_minor", "completed_at",
                   "provider_transaction_id", "late"):
        assert getattr(row, column) == getattr(before, column), column
    [audit] = await _reviews(rt, payment["id"])
    assert (audit.actor, audit.cooperative_id) == (row.reviewed_by, demo["cooperative_id"])
    assert audit.before == {"mismatch": True, "mismatchDetail": ASKED_40K}
    assert audit.after == {"mismatch": False, "mismatchDetail": None, "reviewedDetail": ASKED_40K, "note": NOTE,
                           "reviewedAt": reviewed["review"]["at"]}
    # The payment's JSON still says it was flagged, why, who cleared it and when.
    review = {"mismatchDetail": ASKED_40K, "note": NOTE, "by": row.reviewed_by, "at": reviewed["review"]["at"]}
    assert (reviewed["mismatch"], reviewed["mismatchDetail"], reviewed["review"]) == (False, None, review)
    assert (await admin.json("GET", url, 200))["review"] == review
    # Off the flagged lists, on the others.
    assert (await admin.json("GET", "/v1/payments?mismatch=true", 200))["data"] == []
    [listed] = (await admin.json("GET", "/v1/payments?mismatch=false", 200))["data"]
    assert (listed["id"], listed["review"]) == (payment["id"], review)
    after = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert (after["flagged"], after["flaggedCount"]) == ([], 0) and _money(after) == _money(report)
    # A refund is still capped at what was taken; one webhook event for the review (payment.flag_cleared, told in
    # tests/admin_api/test_payment_flagged_webhook.py).
    refused = await admin.json("POST", f"{url}/refunds", 422, json={"amount": 50000, "idempotencyKey": idem()})
    assert "exceeds the refundable 40,000 RWF" in refused["message"]
    assert await _events(rt) == events + 1

    again = await admin.json("POST", f"{url}/review", 409, json={"note": NOTE})
    assert again["message"] == ("payment is not flagged (mismatch is false), so there is nothing to review: its last "
                                f"flags were reviewed at {review['at']}")
    assert len(await _reviews(rt, payment["id"])) == 1


async def test_a_flag_raised_after_the_review_shows_again_alone(rt: Any, client: Any, admin: Caller,
                                                               demo: dict[str, Any]) -> None:
    payment, wire, reference = await _flagged(rt, client, admin, demo)
    url = f"/v1/payments/{payment['id']}"
    first = (await admin.json("POST", f"{url}/review", 200, json={"note": NOTE}))["review"]

    # MTN then reports a second payment of the request (another transaction id): the payer paid twice.
    assert await _mtn_says(client, wire, reference, "50000", "MTN-2") == "flagged_paid_twice"
    flagged = await admin.json("GET", url, 200)
    assert flagged["mismatch"] is True and flagged["review"] == first
    assert flagged["mismatchDetail"].startswith("paid twice: provider reported another payment")
    assert ASKED_40K not in flagged["mismatchDetail"]  # what was reviewed is not flagged again
    assert flagged["collectedAmount"] == 40000
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?mismatch=true", 200))["data"]] == [payment["id"]]
    assert [f["id"] for f in (await admin.json("GET", "/v1/reports/reconciliation", 200))["flagged"]] == [
        payment["id"]]

    second = (await admin.json("POST", f"{url}/review", 200, json={"note": "refunded the second 50,000 by hand"}))
    assert (second["mismatch"], second["review"]["mismatchDetail"]) == (False, flagged["mismatchDetail"])
    assert [a.before["mismatchDetail"] for a in await _reviews(rt, payment["id"])] == [
        ASKED_40K, flagged["mismatchDetail"]]
    # Each review told on its own (payment.flag_cleared, one event per review), saying what it cleared.
    async with rt.sessionmaker() as s:
        told = [j.payload for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.event")
                                                    .order_by(OutboxJob.id))).scalars()
                if j.payload["event_type"] == "payment.flag_cleared"]
    assert [t["data"]["review"] for t in told] == [first, second["review"]]
    assert len({t["event_id"] for t in told}) == 2


async def test_only_a_flagged_payment_is_reviewed(rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    body = await admin.json("POST", f"/v1/payments/{payment['id']}/review", 409, json={"note": NOTE})
    assert body["message"] == "payment is not flagged (mismatch is false), so there is nothing to review"
    row = await _row(rt, payment["id"])
    assert (row.mismatch, row.reviewed_at, row.updated_at.isoformat()[:19]) == (
        False, None, payment["updatedAt"][:19])
    assert await _reviews(rt, payment["id"]) == []


async def test_notes_roles_and_cooperatives(rt: Any, client: Any, admin: Caller, tenant: Caller, superadmin: Caller,
                                            coop_b: dict[str, Any], demo: dict[str, Any]) -> None:
    payment, _wire, _ = await _flagged(rt, client, admin, demo)
    url = f"/v1/payments/{payment['id']}/review"
    for bad in ({}, {"note": "ok"}, {"note": "   ab   "}, {"note": "x" * 301}, {"note": 12345},
                {"note": NOTE, "mismatch": False}):
        said = await admin.json("POST", url, 400, json=bad)
        assert said["message"], bad
    assert "note must be 3 to 300 characters" in (await admin.json("POST", url, 400, json={"note": "   ab   "})
                                                  )["message"][0]
    await tenant.json("POST", url, 403, json={"note": NOTE})
    other = await coop_b["admin"].json("POST", url, 404, json={"note": NOTE})
    assert other["message"] == "payment not found"
    await admin.json("POST", "/v1/payments/00000000-0000-4000-8000-000000000000/review", 404, json={"note": NOTE})
    row = await _row(rt, payment["id"])
    assert (row.mismatch, row.mismatch_detail, row.reviewed_at) == (True, ASKED_40K, None)
    assert await _reviews(rt, payment["id"]) == []

    # A super admin reviews any cooperative's payment.
    done = await superadmin.json("POST", url, 200, json={"note": NOTE})
    assert done["mismatch"] is False and done["review"]["by"].startswith("admin:")
    [audit] = await _reviews(rt, payment["id"])
    assert audit.cooperative_id == demo["cooperative_id"]
