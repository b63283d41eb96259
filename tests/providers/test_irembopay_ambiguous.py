"""IremboPay through the core and its worker: a push that may have prompted the payer (no answer, 5xx,
PAYMENT_PROVIDER_ERROR) is never pushed again, and the invoice number is stored on the payment, so a status
poll in any worker process (or after a restart) can ask about it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from core.config import ProviderConfig, Secret
from core.db import utcnow
from core.models import OutboxJob, Payment
from core.payments import NewPayment, create_payment
from providers.irembopay.adapter import IremboPayAdapter
from tests.conftest import deadlines_from_the_call, drain
from tests.providers.wires import ADMIN, Routes, due_now

BASE = "https://irembo.test"
INVOICE = "880000000001"
PUSH = "/payments/transactions/initiate"
ANSWER = {"success": True, "data": {"invoiceNumber": INVOICE, "paymentStatus": "NEW", "amount": 50000,
                                    "currency": "RWF"}}


def irembopay(rt: Any, wire: Routes) -> IremboPayAdapter:
    """A fresh IremboPay adapter (nothing remembered, as in another worker process) collecting MTN."""
    adapter = IremboPayAdapter(wire.client(), ProviderConfig(
        base_url=BASE, credentials={"secret_key": Secret("irembo-test-key")},
        options={"payment_account": "PI-1", "payment_item_code": "PC-1"}))
    rt.providers = {**rt.providers, "irembopay": adapter}
    rt.routes = {**rt.routes, "MOBILE_MONEY_MTN": "irembopay"}
    return adapter


async def _payment(rt: Any, demo: dict[str, Any]) -> Payment:
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_MTN", account="0788000001", idempotency_key="key-irembo-1", channel="api",
            member_id=demo["members"]["+250788000001"]), actor=ADMIN)
    assert payment.provider == "irembopay"
    return payment


async def _get(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


def _lost(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("no answer", request=request)


@pytest.mark.parametrize(("status", "body"), [
    (502, {"success": False, "message": "Bad gateway"}),
    (500, {"success": False, "errors": [{"code": "PAYMENT_PROVIDER_ERROR", "detail": "MTN did not answer"}]}),
    (400, {"success": False, "errors": [{"code": "PAYMENT_PROVIDER_ERROR", "detail": "Provider refused"}]}),
    (0, None),  # no answer at all
], ids=["5xx", "provider_error_5xx", "provider_error_4xx", "no_answer"])
async def test_push_that_may_have_prompted_is_asked_about_never_pushed_again(rt, demo, worker, status, body):
    wire = Routes(BASE).on("POST", "/payments/invoices", 201, ANSWER)
    wire.on("POST", PUSH, _lost) if status == 0 else wire.on("POST", PUSH, status, body)
    irembopay(rt, wire)
    payment = await _payment(rt, demo)
    await worker.run_once()  # the collect job
    async with rt.sessionmaker() as s:
        [collect] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.collect"))).scalars()
    assert collect.status == "DONE"  # not retried: a second push is a second PIN prompt
    held = await _get(rt, payment.id)
    assert (held.status, held.provider_transaction_id) == ("PENDING", INVOICE)
    # The poll runs in another worker process (a fresh adapter): it asks by the stored invoice number.
    wire.on("POST", PUSH, 200, {"success": True, "data": {}})
    wire.on("GET", f"/payments/invoices/{INVOICE}", 200,
            {"success": True, "data": {**ANSWER["data"], "paymentStatus": "PAID"}})
    irembopay(rt, wire)
    await due_now(rt, "payment.collect")
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await _get(rt, payment.id)
    assert (done.status, done.late, done.provider_transaction_id) == ("COMPLETED", False, INVOICE)
    assert len(wire.sent("POST", PUSH)) == 1
    assert len(wire.sent("GET", f"/payments/invoices/{INVOICE}")) == 1


async def test_push_unanswered_then_the_window_ends_the_invoice_still_settles_it(rt, demo, worker):
    wire = Routes(BASE).on("POST", "/payments/invoices", 201, ANSWER).on("POST", PUSH, _lost)
    irembopay(rt, wire)
    payment = await _payment(rt, demo)
    await worker.run_once()
    irembopay(rt, wire)  # a restart: the adapter's own memory of the invoice is gone
    wire.on("GET", f"/payments/invoices/{INVOICE}", 200,
            {"success": True, "data": {**ANSWER["data"], "paymentStatus": "PAID"}})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment.id).values(expires_at=utcnow()))
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await _get(rt, payment.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", INVOICE)


async def test_push_refused_for_good_fails_the_payment_without_a_second_push(rt, demo, worker):
    wire = (Routes(BASE).on("POST", "/payments/invoices", 201, ANSWER)
            .on("POST", PUSH, 400, {"success": False,
                                    "errors": [{"code": "BAD_PHONE_NUMBER", "detail": "Invalid phone"}]}))
    irembopay(rt, wire)
    payment = await _payment(rt, demo)
    await drain(worker)
    failed = await _get(rt, payment.id)
    assert failed.status == "FAILED" and "BAD_PHONE_NUMBER" in failed.failure_reason
    assert len(wire.sent("POST", PUSH)) == 1


async def test_push_still_out_at_the_collects_deadline_stores_the_invoice_number(rt, demo, worker, monkeypatch):
    """The invoice was made, and its push was still out when the job's call deadline fired: the payer may be prompted.
    The invoice number, known before the push, is stored as for a push left unanswered (ProviderTimeout), so the poll
    of any process asks by it. Before: the deadline's TimeoutError carried nothing, and the payment kept no number
    until an answer brought it (a poll in another process asked by our transactionId)."""
    deadlines_from_the_call(monkeypatch, send=1.0)  # from the call's start: the invoice, then the push

    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2.0)  # past the call's deadline (it ends, so nothing is left running)
        return httpx.Response(200, json={"success": True, "data": {}})

    wire = Routes(BASE).on("POST", "/payments/invoices", 201, ANSWER).on("POST", PUSH, slow)
    irembopay(rt, wire)
    payment = await _payment(rt, demo)
    await worker.run_once()  # the collect job
    async with rt.sessionmaker() as s:
        [collect] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.collect"))).scalars()
    assert collect.status == "DONE"  # never pushed again: asked about
    held = await _get(rt, payment.id)
    assert (held.status, held.provider_transaction_id) == ("PENDING", INVOICE)
    assert len(wire.sent("POST", PUSH)) == 1
