"""M-Pesa money taken after its payment FAILED is refunded by a reversal, which needs the receipt number: the
late callback's MpesaReceiptNumber replaces the CheckoutRequestID the push left (it was kept, and the reversal
failed at once with "receipt unknown")."""

from __future__ import annotations

import json

from core.models import Refund
from core.refunds import request_refund
from tests.conftest import drain
from tests.core.test_provider_faults_mpesa import (
    QUERY,
    RECEIPT,
    REVERSAL,
    _payment,
    _pushed,
    _query_answer,
    _stk_callback,
)
from tests.providers.wires import ADMIN, due_now, jobs_done


async def test_mpesa_refund_of_money_taken_after_failure(rt, demo, worker, client):
    wire, payment = await _pushed(rt, demo, worker)
    # Daraja's query answers a definite failure: 1 = insufficient balance.
    wire.on("POST", QUERY, *_query_answer("1"))  # 1 = insufficient balance -> FAILED
    await due_now(rt, "payment.poll")
    await worker.run_once()
    p = await _payment(rt, payment.id)
    assert p.status == "FAILED"
    # Later M-Pesa's query says success and the callback brings the receipt: money taken after the failure.
    wire.on("POST", QUERY, *_query_answer("0"))
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    p = await _payment(rt, payment.id)
    assert (p.status, p.provider_transaction_id, p.collected_minor) == ("FAILED", RECEIPT, p.amount_minor)
    await jobs_done(rt)
    wire.on("POST", REVERSAL, 200, {"OriginatorConversationID": "1", "ConversationID": "AG_1", "ResponseCode": "0"})
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="taken after failure", idempotency_key="refund-key-1",
                                         actor=ADMIN)
    await drain(worker)
    async with rt.sessionmaker() as s:
        r = await s.get(Refund, refund.id)
    [reversal] = wire.sent("POST", REVERSAL)
    assert json.loads(reversal.content)["TransactionID"] == RECEIPT
    assert r.status == "PROCESSING" and r.provider_transaction_id == "AG_1"  # waiting for the reversal's Result
