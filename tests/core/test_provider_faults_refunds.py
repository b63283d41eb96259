"""Refund callbacks: an unsigned one counts only as its provider's status query confirms it, and only for a
refund of a payment made through that provider."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.errors import BusinessRuleError
from core.models import OutboxJob, Payment, ProviderEvent, Refund
from core.money import Money
from core.payments import create_payment
from core.refunds import record_refund_outcome, request_refund
from tests.conftest import drain
from tests.providers.wires import ADMIN, NewPayment, completed, due_now, mtn_adapter, mtn_payment, mtn_wire

STATUS_PATH = "/disbursement/v1_0/refund/{}"


async def _refund(rt: Any, demo: dict[str, Any], payment: Payment) -> Refund:
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="duplicate payment", idempotency_key="refund-key-1",
                                         actor=ADMIN)
    return refund


async def _rows(rt: Any, refund_id: str, payment_id: str) -> tuple[Refund, Payment, list[ProviderEvent]]:
    async with rt.sessionmaker() as s:
        events = list((await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund"))).scalars())
        return await s.get(Refund, refund_id), await s.get(Payment, payment_id), events


def _body(refund: Refund, status: str) -> dict[str, Any]:
    return {"amount": "50000", "currency": "RWF", "financialTransactionId": "999",
            "externalId": refund.provider_reference, "payee": {"partyIdType": "MSISDN", "partyId": "250788000001"},
            "status": status}


async def test_unsigned_mtn_refund_callback_is_confirmed_by_the_refund_status(rt, demo, worker, client):
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    refund, payment = await _sent_refund(rt, demo, worker, wire)  # submitted: PROCESSING
    # MTN itself says the refund failed; a forged (or stale) callback says it succeeded.
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200, {
        "amount": "50000", "currency": "RWF", "externalId": refund.provider_reference, "status": "FAILED",
        "reason": "COULD_NOT_PERFORM_TRANSACTION"})
    resp = await client.put(f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}&kind=refund",
                            json=_body(refund, "SUCCESSFUL"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["result"] == "failed"
    stored, paid, [event] = await _rows(rt, refund.id, payment.id)
    assert [r.url.path for r in wire.sent("GET", "/disbursement/v1_0/refund/*")] == \
        [STATUS_PATH.format(refund.provider_reference)]
    assert (stored.status, stored.failure_reason) == ("FAILED", "MTN could not perform the transaction")
    assert (paid.status, paid.refunded_minor) == ("COMPLETED", 0)
    assert event.status == "FAILED"  # what was applied: the provider's answer, not the callback's claim
    # The same callback again: a duplicate, no second query.
    again = await client.put(f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}&kind=refund",
                             json=_body(refund, "SUCCESSFUL"))
    assert (await again.json())["result"] == "duplicate"
    assert len(wire.sent("GET", "/disbursement/v1_0/refund/*")) == 1


async def test_confirmed_mtn_refund_callback_completes_the_refund(rt, demo, worker, client):
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    refund, payment = await _sent_refund(rt, demo, worker, wire)
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200,
            {**_body(refund, "SUCCESSFUL"), "financialTransactionId": "RF-1"})
    resp = await client.post(f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}&kind=refund",
                             json=_body(refund, "SUCCESSFUL"))
    assert (await resp.json())["result"] == "completed"
    stored, paid, _ = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "RF-1")
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)


async def test_a_callback_to_one_provider_never_touches_another_providers_refund(rt, demo, client):
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_AIRTEL", account="0733000001", idempotency_key="key-airtel-0001",
            channel="api"), actor=ADMIN)
    assert payment.provider == "airtel"
    await completed(rt, payment, "AM-1")
    refund = await _refund(rt, demo, payment)
    for method in ("POST", "PUT"):
        resp = await client.request(method, f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}"
                                    "&kind=refund", json={"status": "FAILED",
                                                          "reason": "COULD_NOT_PERFORM_TRANSACTION"})
        assert resp.status == 200 and (await resp.json())["result"] in ("unknown_refund", "duplicate")
    stored, paid, events = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.failure_reason) == ("PENDING", None)
    assert paid.status == "COMPLETED"
    assert wire.seen == []  # nothing to confirm: no MTN refund has that reference
    # Kept as a callback for no refund of ours, to list and resolve (tests/admin_api/test_unmatched_callbacks.py).
    assert [(e.provider, e.outcome) for e in events] == [("mtn_momo", "unknown_refund")]


async def test_a_refund_of_a_bank_payment_waits_for_a_person_to_record_it(rt, demo, worker):
    """IremboPay has no refund API: the money goes back through the bank, outside the gateway. The refund holds
    its amount, PROCESSING with its poll parked for a person, who records it when the bank confirms (it was
    FAILED at once, and a failed refund cannot be recorded)."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="BANK_BK", account="+250788000001", idempotency_key="key-bank-0001", channel="api",
            member_id=demo["members"]["+250788000001"]), actor=ADMIN)
    await completed(rt, payment, "INV-0001")
    async with rt.sessionmaker.begin() as s:  # a part of it: a person's transfer can be any amount
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=Money(20_000, "RWF"), reason="charged twice",
                                         idempotency_key="refund-bank-1", actor=ADMIN)
    await drain(worker)
    await due_now(rt, "refund.poll")
    await drain(worker)
    stored, paid, _ = await _rows(rt, refund.id, payment.id)
    assert (stored.status, paid.refunded_minor) == ("PROCESSING", 0)
    async with rt.sessionmaker() as s:
        poll = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund-poll:{refund.id}"))
                ).scalar_one()
    assert poll.status == "PARKED" and "needs manual review" in poll.last_error
    # Meanwhile nothing more can be refunded than what it leaves; once the bank confirms, an admin records it.
    with pytest.raises(BusinessRuleError, match="exceeds the refundable 30,000 RWF"):
        async with rt.sessionmaker.begin() as s:
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                 amount=Money(30_001, "RWF"), reason="more", idempotency_key="refund-bank-2",
                                 actor=ADMIN)
    async with rt.sessionmaker.begin() as s:
        done = await record_refund_outcome(s, rt, refund_id=refund.id, cooperative_id=demo["cooperative_id"],
                                           succeeded=True, note="BK transfer on 1 December", actor=ADMIN,
                                           provider_transaction_id="BK-TRF-9912")
    assert done.status == "COMPLETED"
    stored, paid, _ = await _rows(rt, refund.id, payment.id)
    assert (paid.status, paid.refunded_minor) == ("PARTIALLY_REFUNDED", 20_000)


async def test_a_refund_mtn_reports_for_another_amount_completes_flagged_for_a_person(rt, demo, worker, client):
    """MTN's status says the refund went back, but for less than was asked: the member may have less back than her
    SMS and the reconciliation say. It completes (the provider says the money moved), the payment flagged, audited."""
    from core import metrics
    from core.models import AuditEvent

    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    refund, payment = await _sent_refund(rt, demo, worker, wire)
    before = metrics.REFUND_ANOMALIES.labels(kind="amount_mismatch")._value.get()
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200,
            {**_body(refund, "SUCCESSFUL"), "amount": "30000", "financialTransactionId": "RF-2"})
    resp = await client.post(f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}&kind=refund",
                             json=_body(refund, "SUCCESSFUL"))
    assert resp.status == 200, await resp.text()
    stored, paid, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "COMPLETED"
    assert (paid.status, paid.refunded_minor, paid.mismatch) == ("REFUNDED", 50_000, True)
    assert paid.mismatch_detail.endswith(
        f"refund {refund.reference}: provider reported 30,000 RWF sent back, expected 50,000 RWF"), paid.mismatch_detail
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "refund.amount_mismatch"))
                   ).scalars().all()
    assert (audit.entity_id, audit.after) == (refund.id, {"reported": 30_000, "reportedCurrency": "RWF",
                                                          "expected": 50_000})
    assert metrics.REFUND_ANOMALIES.labels(kind="amount_mismatch")._value.get() == before + 1


async def test_an_unsigned_callbacks_own_amount_is_never_taken_for_the_providers(rt, demo, worker, client):
    """An MTN refund callback claims another amount; MTN's status confirms the success but names none: the claim,
    unconfirmed (forged or stale), neither flags the payment nor is audited. Only the status query's amount counts."""
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    refund, payment = await _sent_refund(rt, demo, worker, wire)
    answer = {k: v for k, v in _body(refund, "SUCCESSFUL").items() if k not in ("amount", "currency")}
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200, {**answer, "financialTransactionId": "RF-4"})
    resp = await client.put(f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}&kind=refund",
                            json={**_body(refund, "SUCCESSFUL"), "amount": "30000"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["result"] == "completed"
    stored, paid, _ = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "RF-4")
    assert (paid.status, paid.refunded_minor, paid.mismatch) == ("REFUNDED", 50_000, False)


@pytest.mark.parametrize("reported", ["50000", "60000"])
async def test_a_refund_polled_complete_is_flagged_only_for_another_amount(rt, demo, worker, reported):
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    refund, payment = await _sent_refund(rt, demo, worker, wire)
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200,
            {**_body(refund, "SUCCESSFUL"), "amount": reported, "financialTransactionId": "RF-3"})
    await due_now(rt, "refund.poll")
    await drain(worker)
    stored, paid, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "COMPLETED" and wire.sent("GET", "/disbursement/v1_0/refund/*")
    assert (paid.status, paid.refunded_minor, paid.mismatch) == ("REFUNDED", 50_000, reported != "50000")
    if reported != "50000":
        assert paid.mismatch_detail.endswith("provider reported 60,000 RWF sent back, expected 50,000 RWF")


async def _sent_refund(rt: Any, demo: dict[str, Any], worker: Any, wire: Any) -> tuple[Refund, Payment]:
    """A completed MTN payment's refund, submitted (PROCESSING) through `wire`."""
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    refund = await _refund(rt, demo, payment)
    await drain(worker)
    return refund, payment
