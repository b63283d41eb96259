"""A cooperative's system sends `POST /v1/payments` again with a key whose IremboPay payment a restore of PostgreSQL
lost. The new payment's transactionId is the first one's (derived from the cooperative, the key and the request),
and its invoice body differs (its own expiryAt): IremboPay refuses it as a reused transactionId. The gateway finds
the first invoice by that transactionId and collects with it, over HTTP against the IremboPay simulator: a paid one
completes the payment with the member's receipt, an open one is left to her answer to the first prompt; never a
second push, never FAILED with a "payment failed" SMS. Before, the refusal failed the payment and told her so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from core.models import OutboxJob
from providers.irembopay.simulator import STORE
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, Irembo, payment_body
from tests.admin_api.test_retried_key_after_restore import _lose
from tests.conftest import drain
from tests.providers.wires import due_now

PUSH = "/payments/transactions/initiate"


async def _sms_templates(rt: Any, payment_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars()
        return sorted(j.payload["template"] for j in jobs if j.payload["context"].get("payment_id") == payment_id)


async def _first_then_lost(admin: Caller, rt: Any, worker: Any, irembo: Irembo,
                           body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The first payment: its invoice made and its payer pushed; then the restore loses it. Its invoice."""
    first = await admin.json("POST", "/v1/payments", 201, json=body)
    await drain(worker)  # the collect job: the invoice, then the push
    await irembo.app[STATE].idle()
    assert irembo.sent == [("POST", "/payments/invoices"), ("POST", PUSH)]
    [invoice] = irembo.app[STORE].invoices.values()
    await _lose(rt, first["id"])
    # Made a while before the retry (a restore takes minutes): its expiryAt, the first payment's, is not the retry's,
    # whose invoice body IremboPay then refuses under the same transactionId. Still open for a minute.
    invoice.expiry_at = datetime.now(UTC) + timedelta(minutes=1)
    invoice.request_body = {**invoice.request_body, "expiryAt": invoice.expiry_at.isoformat(timespec="seconds")}
    return first, invoice


async def _retried(admin: Caller, rt: Any, worker: Any, body: dict[str, Any], first: dict[str, Any]) -> Any:
    """The cooperative's system sends its request again; the collect job and then a poll run."""
    retry = await admin.json("POST", "/v1/payments", 201, json=body)
    assert retry["id"] != first["id"]
    await drain(worker)  # collect: the invoice refused as a reused transactionId, found by it
    await due_now(rt, "payment.poll")
    await drain(worker)  # the poll asks about the invoice found
    return retry


async def test_a_paid_invoice_completes_the_retried_payment_without_a_second_push(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, irembo: Irembo) -> None:
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    first, invoice = await _first_then_lost(admin, rt, worker, irembo, body)
    assert invoice.status() == "PAID"  # the member approved the first prompt
    retry = await _retried(admin, rt, worker, body, first)
    lookup = f"/payments/invoices/{invoice.transaction_id}"
    assert irembo.sent[2:] == [("POST", "/payments/invoices"), ("GET", lookup),
                               ("GET", f"/payments/invoices/{invoice.invoice_number}")]
    assert list(irembo.app[STORE].invoices) == [invoice.invoice_number]  # one invoice, pushed once, paid once
    done = await admin.json("GET", f"/v1/payments/{retry['id']}", 200)
    assert (done["status"], done["gatewayTransactionId"], done["collectedAmount"]) == (
        "COMPLETED", invoice.invoice_number, 50000)
    assert await _sms_templates(rt, retry["id"]) == ["payment_receipt"]


async def test_an_open_invoice_is_not_pushed_again_and_her_first_approval_completes_the_retry(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, irembo: Irembo) -> None:
    # +250788000003 never answers at the simulator: the first push is still on her phone when the request comes again.
    body = payment_body(demo["payment_types"]["Monthly Rent"], paymentAccount="+250788000003")
    first, invoice = await _first_then_lost(admin, rt, worker, irembo, body)
    assert invoice.status() == "NEW"
    retry = await _retried(admin, rt, worker, body, first)
    assert irembo.calls("POST", PUSH) == 1  # no second PIN prompt
    pending = await admin.json("GET", f"/v1/payments/{retry['id']}", 200)
    assert pending["status"] == "PROCESSING"
    assert await _sms_templates(rt, retry["id"]) == []  # nothing said while she may still approve
    # She approves the first prompt (the simulator marks the invoice paid, as IremboPay would).
    invoice.payment_status, invoice.payment_reference = "PAID", "IPR-approved-1"
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await admin.json("GET", f"/v1/payments/{retry['id']}", 200)
    assert (done["status"], done["gatewayTransactionId"]) == ("COMPLETED", invoice.invoice_number)
    assert irembo.calls("POST", PUSH) == 1
    assert await _sms_templates(rt, retry["id"]) == ["payment_receipt"]
