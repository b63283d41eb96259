"""An M-Pesa success callback for a payment that had FAILED, whose Amount holds nothing (zero, or negative: a
reversal's sign, the provider's bug): the cooperative's system, told the payment failed, is not told "the money is
held" (payment.taken_after_failure) when none is. The report is still flagged and audited for a person."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.models import AuditEvent, OutboxJob, Payment
from core.state.payment import HELD, holds_money, taken_after_failure
from tests.core.test_provider_faults_mpesa import CHECKOUT, QUERY, RECEIPT, _payment, _pushed, _query_answer
from tests.providers.wires import due_now


def _callback(amount: int) -> dict[str, Any]:
    """Daraja's success callback (ResultCode 0) with the receipt number and `amount` (whole shillings)."""
    return {"Body": {"stkCallback": {
        "MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": CHECKOUT, "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": amount}, {"Name": "MpesaReceiptNumber", "Value": RECEIPT},
            {"Name": "TransactionDate", "Value": 20261122080102}, {"Name": "PhoneNumber", "Value": 254708000001}]}}}}


@pytest.mark.parametrize(("amount", "shown"), [(0, "0.00 KES"), (-150, "-150.00 KES")])
async def test_success_holding_nothing_after_a_failure_is_flagged_not_told_as_money_held(
        rt, demo, worker, client, amount, shown):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *_query_answer("1"))  # 1 = insufficient balance -> FAILED
    await due_now(rt, "payment.poll")
    await worker.run_once()
    assert (await _payment(rt, payment.id)).status == "FAILED"
    wire.on("POST", QUERY, *_query_answer("0"))  # the callback's confirming query says success
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}", json=_callback(amount))
    assert resp.status == 200

    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.collected_minor, stored.mismatch, stored.provider_transaction_id) == (
        "FAILED", 0, True, RECEIPT)
    assert stored.mismatch_detail == f"provider reported success ({shown}) after the payment had failed"
    assert not taken_after_failure(stored) and not holds_money(stored)
    async with rt.sessionmaker() as s:
        events = [e["event_type"] for e in (await s.execute(select(OutboxJob.payload).where(
            OutboxJob.kind == "webhook.event").order_by(OutboxJob.id))).scalars()]
        audit = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == payment.id, AuditEvent.action == "payment.success_after_failure"))).scalar_one()
        held = (await s.execute(select(Payment.id).where(Payment.id == payment.id, HELD))).scalar_one_or_none()
    # Told it failed, and its flag (payment.flagged): no money is held, so no payment.taken_after_failure.
    assert events == ["payment.failed", "payment.flagged"]
    assert audit == {"providerTransactionId": RECEIPT, "mismatch": True, "collected": 0, "currency": "KES",
                     "completedAt": audit["completedAt"], "first": True}
    assert audit["completedAt"] is not None
    assert held is None  # the reconciliation's view (HELD) agrees: nothing settled
