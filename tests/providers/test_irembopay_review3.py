"""IremboPay through the core, review 3: an invoice paid twice (two signed PAID webhooks naming two payments,
paymentReference) leaves the second payment on record: stored, the payment flagged, an audit entry. IremboPay's
retries of one webhook (the same paymentReference) stay duplicates."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import select

from core.models import AuditEvent, Payment, ProviderEvent
from providers.irembopay.adapter import signature_header
from tests.providers.test_irembopay_ambiguous import ANSWER, BASE, INVOICE, PUSH, _get, _payment, irembopay
from tests.providers.wires import Routes, due_now

SECRET = "irembo-test-key"


def _paid(payment: Payment, reference: str | None, amount: int = 50000, method: str = "MTN") -> dict[str, Any]:
    body = json.dumps({"success": True, "message": "Payment successful", "data": {
        "amount": amount, "invoiceNumber": INVOICE, "transactionId": payment.provider_reference,
        "paidAt": "2026-11-22T10:00:00.000+02", "paymentStatus": "PAID", "paymentMethod": method,
        "paymentReference": reference, "currency": "RWF"}}).encode()
    # Signed afresh each time, as IremboPay signs each delivery (the one-time key is the signature).
    return {"data": body, "headers": {"irembopay-signature": signature_header(SECRET, int(time.time() * 1000), body),
                                      "Content-Type": "application/json"}}


async def _invoiced(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Routes, Payment]:
    wire = Routes(BASE).on("POST", "/payments/invoices", 201, ANSWER).on("POST", PUSH, 200, {"success": True,
                                                                                           "data": {}})
    irembopay(rt, wire)
    payment = await _payment(rt, demo)
    await worker.run_once()  # the invoice and the push
    return wire, payment


async def _events(rt: Any) -> list[tuple[str, str | None, str | None]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(ProviderEvent.event_id, ProviderEvent.outcome, ProviderEvent.payment_id)
                                .order_by(ProviderEvent.received_at))).all()
    return [tuple(r) for r in rows]


async def _audit(rt: Any, payment_id: str, action: str) -> list[dict[str, Any]]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == action))).scalars())


async def test_second_payment_of_an_invoice_is_stored_flagged_and_audited(rt, demo, worker, client):
    _, payment = await _invoiced(rt, demo, worker)
    first = await client.post("/webhooks/payments/irembopay", **_paid(payment, "MTN-REF-0001"))
    assert (first.status, (await first.json())["result"]) == (200, "completed")
    second = await client.post("/webhooks/payments/irembopay", **_paid(payment, "BK-REF-0002", method="BK"))
    assert second.status == 200
    assert (await second.json())["result"] == "flagged_paid_twice"
    assert await _events(rt) == [(f"{INVOICE}:PAID:MTN-REF-0001", "completed", payment.id),
                                 (f"{INVOICE}:PAID:BK-REF-0002", "flagged_paid_twice", payment.id)]
    paid = await _get(rt, payment.id)
    # Still the one payment, collected once; the extra money is flagged for a person to refund.
    assert (paid.status, paid.collected_minor, paid.provider_transaction_id) == ("COMPLETED", None, INVOICE)
    assert paid.mismatch is True
    assert paid.mismatch_detail == "paid twice: provider reported another payment (50,000 RWF), reference BK-REF-0002"
    assert await _audit(rt, payment.id, "payment.paid_twice") == [
        {"moneyReference": "BK-REF-0002", "amount": 50000, "currency": "RWF"}]


async def test_retries_of_one_payments_webhook_stay_duplicates(rt, demo, worker, client):
    _, payment = await _invoiced(rt, demo, worker)
    for _ in range(2):
        resp = await client.post("/webhooks/payments/irembopay", **_paid(payment, "MTN-REF-0001"))
        assert resp.status == 200
    assert (await resp.json())["result"] == "duplicate"
    again = await client.post("/webhooks/payments/irembopay", **_paid(payment, "BK-REF-0002"))
    assert (await again.json())["result"] == "flagged_paid_twice"
    resent = await client.post("/webhooks/payments/irembopay", **_paid(payment, "BK-REF-0002"))
    assert (await resent.json())["result"] == "duplicate"  # the second payment's retry: flagged once
    assert len(await _events(rt)) == 2
    assert len(await _audit(rt, payment.id, "payment.paid_twice")) == 1
    paid = await _get(rt, payment.id)
    assert paid.mismatch_detail.count("paid twice") == 1


async def test_first_webhook_after_a_poll_completed_the_invoice_is_not_a_second_payment(rt, demo, worker, client):
    """Completed by the status poll (no payment reference stored): the webhook that follows is the same payment."""
    wire, payment = await _invoiced(rt, demo, worker)
    wire.on("GET", f"/payments/invoices/{INVOICE}", 200, {"success": True, "data": {**ANSWER["data"],
                                                                                    "paymentStatus": "PAID"}})
    await due_now(rt, "payment.poll")
    await worker.run_once()
    assert (await _get(rt, payment.id)).status == "COMPLETED"
    resp = await client.post("/webhooks/payments/irembopay", **_paid(payment, "MTN-REF-0001"))
    assert (await resp.json())["result"] == "already_completed"
    paid = await _get(rt, payment.id)
    assert (paid.status, paid.mismatch) == ("COMPLETED", False)
    assert await _audit(rt, payment.id, "payment.paid_twice") == []


async def test_webhook_without_a_payment_reference_keeps_the_invoice_and_status_event_id(rt, demo, worker, client):
    _, payment = await _invoiced(rt, demo, worker)
    resp = await client.post("/webhooks/payments/irembopay", **_paid(payment, None))
    assert (await resp.json())["result"] == "completed"
    assert [e[0] for e in await _events(rt)] == [f"{INVOICE}:PAID"]
