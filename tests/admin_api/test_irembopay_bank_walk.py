"""A bank rent payment through IremboPay (seed 001's bank flow), over HTTP against the simulator: the cooperative's
support desk cancels it while its invoice is open. PROTOCOLS.md gives IremboPay no call to withdraw an invoice, so the
invoice stays payable at IremboPay until its expiryAt; the gateway no longer hands its paymentUrl out for the
cancelled payment (the 200 of the cancel, GET), so no client sends her to pay what her cooperative cancelled. Before,
both kept the link. A signed webhook naming her transactionId with another invoice is not about her invoice (IremboPay
makes one invoice per transactionId): it is kept unmatched for a person, and neither completes her payment nor takes
its gatewayTransactionId. Before, it completed the payment and replaced the invoice number. A refund of her bank
payment (IremboPay has no refund API) waits for the desk, and the parked job the desk finds says what to do: send it
back through the bank or by a transfer, then record it. Before, it said only "refunds are recorded manually"."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import select

from core.models import Payment, ProviderEvent
from providers.irembopay.adapter import signature_header
from providers.irembopay.simulator import STORE
from tests.admin_api.conftest import IREMBO_SECRET, Caller, Irembo, payment_body
from tests.conftest import drain
from tests.providers.wires import due_now


def _bank(demo: dict[str, Any], **over: Any) -> dict[str, Any]:
    return payment_body(demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                        paymentAccount="aline@example.rw", **over)


def _signed(data: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"success": True, "message": "Payment", "data": data}).encode()
    return {"data": body, "headers": {"irembopay-signature": signature_header(IREMBO_SECRET, int(time.time() * 1000),
                                                                              body),
                                      "Content-Type": "application/json"}}


def _paid(invoice: Any, **over: Any) -> dict[str, Any]:
    data = {"amount": invoice.amount, "invoiceNumber": invoice.invoice_number,
            "transactionId": invoice.transaction_id, "paidAt": "2026-11-22T10:00:00+02:00",
            "paymentStatus": "PAID", "paymentMethod": "BANK_BK", "paymentReference": "BKREF1", "currency": "RWF"}
    data.update(over)
    return _signed(data)


async def _made(admin: Caller, rt: Any, demo: Any, irembo: Irembo, worker: Any,
                **over: Any) -> tuple[dict[str, Any], Any]:
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo, **over))
    await drain(worker)
    [invoice] = [i for i in irembo.app[STORE].invoices.values() if i.invoice_number == (await admin.json(
        "GET", f"/v1/payments/{created['id']}", 200))["gatewayReference"]]
    return created, invoice


async def test_a_cancelled_bank_payment_no_longer_hands_out_its_invoice_url(
        admin: Caller, rt: Any, demo: Any, irembo: Irembo, worker: Any) -> None:
    created, invoice = await _made(admin, rt, demo, irembo, worker)
    on_portal = await admin.json("GET", f"/v1/payments/{created['id']}", 200)
    assert on_portal["status"] == "PROCESSING" and on_portal["paymentUrl"].endswith(f"/pay/{invoice.invoice_number}")
    cancelled = await admin.json("POST", f"/v1/payments/{created['id']}/cancel", 200,
                                 json={"note": "asked for by mistake"})
    assert cancelled["status"] == "CANCELLED" and cancelled["paymentUrl"] is None
    got = await admin.json("GET", f"/v1/payments/{created['id']}", 200)
    assert got["paymentUrl"] is None and got["gatewayReference"] == invoice.invoice_number
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, created["id"])
    assert stored is not None and stored.payment_url == on_portal["paymentUrl"]  # kept on record
    # Money she still pays on that invoice is not dropped: it completes the payment late, flagged.
    assert invoice.status() == "NEW"


async def test_a_webhook_naming_another_invoice_does_not_complete_hers(
        admin: Caller, rt: Any, demo: Any, irembo: Irembo, worker: Any, client: Any) -> None:
    created, invoice = await _made(admin, rt, demo, irembo, worker)
    other = await client.post("/webhooks/payments/irembopay", **_paid(invoice, invoiceNumber="8809999999999",
                                                                      paymentReference="OTHER-1"))
    assert other.status == 200 and (await other.json())["result"] == "unknown_payment"
    got = await admin.json("GET", f"/v1/payments/{created['id']}", 200)
    assert got["status"] == "PROCESSING" and got["gatewayTransactionId"] == invoice.invoice_number
    async with rt.sessionmaker() as s:
        kept = (await s.execute(select(ProviderEvent).where(ProviderEvent.provider == "irembopay"))).scalar_one()
    assert kept.payment_id is None and kept.outcome == "unknown_payment"
    assert kept.payload["invoiceNumber"] == "8809999999999"
    # Her own invoice's webhook completes it.
    own = await client.post("/webhooks/payments/irembopay", **_paid(invoice))
    assert own.status == 200 and (await own.json())["result"] == "completed"
    got = await admin.json("GET", f"/v1/payments/{created['id']}", 200)
    assert got["status"] == "COMPLETED" and got["gatewayTransactionId"] == invoice.invoice_number
    assert not got["mismatch"]


async def test_a_bank_refund_tells_the_desk_how_to_send_it_and_record_it(
        admin: Caller, rt: Any, demo: Any, irembo: Irembo, worker: Any, client: Any) -> None:
    created, invoice = await _made(admin, rt, demo, irembo, worker)
    assert (await (await client.post("/webhooks/payments/irembopay", **_paid(invoice))).json())["result"] == "completed"
    sent = list(irembo.sent)
    refund = await admin.json("POST", f"/v1/payments/{created['id']}/refunds", 201,
                              json={"idempotencyKey": "refund-bank-0001", "reason": "left the flat"})
    await drain(worker)
    await due_now(rt, "refund.poll")
    await drain(worker)
    assert irembo.sent == sent  # nothing to send it with
    waiting = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
    assert waiting["status"] == "PROCESSING" and waiting["amount"] == 50000
    jobs = await admin.json("GET", f"/v1/jobs?refundId={refund['id']}&status=PARKED", 200)
    [parked] = jobs["data"]
    assert parked["kind"] == "refund.poll"
    said = parked["lastError"]
    assert "through the bank" in said and f"POST /v1/refunds/{refund['id']}/outcome" in said, said
