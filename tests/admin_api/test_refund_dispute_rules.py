"""Rules of refunds and disputes that the other suites left unchecked (found by mutation testing): each test
asserts the API's answer and the rows, notices and audit entries behind it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from core.models import AuditEvent, OutboxJob, Payment, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment


async def _paid(admin: Caller, rt: Any, demo: dict[str, Any], **over: Any) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"], **over)
    await complete_payment(rt, payment["id"])
    return payment


async def _sms_templates(rt: Any) -> list[str]:
    async with rt.sessionmaker() as s:
        payloads = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "sms.send"))).scalars().all()
    return sorted(p["template"] for p in payloads)


async def test_evidence_alone_is_added_to_a_dispute_that_keeps_its_status(admin: Caller, rt: Any,
                                                                         demo: dict[str, Any]) -> None:
    """A statement line with no note, sent with the dispute's own status: kept on the dispute and audited, the
    member not messaged (not refused for want of a note)."""
    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    before = await _sms_templates(rt)
    kept = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                            json={"status": "OPEN", "evidence": "MTN statement line 42"})
    assert kept["status"] == "OPEN" and kept["resolvedAt"] is None
    [note] = kept["notes"]
    assert (note["text"], note["evidence"], note["status"]) == (None, "MTN statement line 42", "OPEN")
    assert await _sms_templates(rt) == before  # no SMS for evidence gathered
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == dispute["id"],
                                                          AuditEvent.action == "dispute.note_added"))).scalar_one()
    assert audit.after == {"note": None, "evidence": "MTN statement line 42"}


async def test_a_resolutions_own_refund_is_not_noted_on_its_dispute_as_one_made_meanwhile(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """The refund a resolution makes is the dispute's own (disputeId, refundId): the dispute is not told "a refund
    was made on the payment while this dispute is OPEN: count it before resolving", which is for refunds made
    apart from it."""
    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                                json={"status": "RESOLVED", "note": "refunding", "refundAmount": 10000})
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    assert (refund["disputeId"], refund["amount"], refund["status"]) == (dispute["id"], 10000, "PENDING")
    assert [(n["text"], n["status"]) for n in resolved["notes"]] == [("refunding", "RESOLVED")]
    async with rt.sessionmaker() as s:
        actions = (await s.execute(select(AuditEvent.action).where(AuditEvent.entity_id == dispute["id"])
                                   )).scalars().all()
    assert "dispute.refund_made" not in actions
    assert sorted(actions) == ["dispute.opened", "dispute.resolved"]


async def test_a_failed_refunds_provider_id_does_not_block_recording_that_reversal(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """A refund the provider answered with its id, then FAILED: that id names no money sent back, so the
    provider's reversal later recorded under it (returnedByProvider) is taken, not refused as a duplicate."""
    payment = await _paid(admin, rt, demo)
    failed = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 20000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == failed["id"]).values(
            status="FAILED", provider_transaction_id="MTN-REV-5", failure_reason="rejected"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{failed['id']}")
                        .values(status="DONE"))
    recorded = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={
        "amount": 20000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-5"}})
    assert (recorded["status"], recorded["providerTransactionId"], recorded["returnedByProvider"]) == (
        "COMPLETED", "MTN-REV-5", True)
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment["id"])
    assert (paid.status, paid.refunded_minor) == ("PARTIALLY_REFUNDED", 20000)
    # Recorded once: the same reversal again is refused.
    again = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 409, json={
        "amount": 1000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-5"}})
    assert (again["code"], again["message"]) == ("DUPLICATE_REFERENCE", "the provider's reversal MTN-REV-5 is "
                                                 f"already recorded, by refund {recorded['reference']}")


async def test_a_moves_note_is_stored_under_its_new_status_and_kept_in_its_audit_row(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    review = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                              json={"status": "UNDER_REVIEW", "note": "asked MTN"})
    rejected = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                                json={"status": "REJECTED", "note": "one payment on the statement"})
    assert [(n["text"], n["status"]) for n in rejected["notes"]] == [
        ("asked MTN", "UNDER_REVIEW"), ("one payment on the statement", "REJECTED")]
    assert review["notes"][-1]["status"] == "UNDER_REVIEW"
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent.action, AuditEvent.after).where(
            AuditEvent.entity_id == dispute["id"], AuditEvent.action == "dispute.rejected"))).all()
    [(_, after)] = rows
    assert (after["status"], after["note"]) == ("REJECTED", "one payment on the statement")


async def test_a_resolution_refund_of_nothing_is_refused_by_its_own_field(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 400,
                               json={"status": "RESOLVED", "refundAmount": 0})
    assert (refused["field"], refused["message"]) == ("refundAmount", ["refundAmount must be a positive number"])
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Refund.id).where(Refund.payment_id == payment["id"]))).first() is None
    assert (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["status"] == "OPEN"
