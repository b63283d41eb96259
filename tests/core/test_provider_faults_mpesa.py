"""M-Pesa through the core: the receipt number a refund needs is never lost, and a push whose answer was lost
still completes when the payer approves."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import select

from core.models import AuditEvent, Payment, ProviderEvent
from core.refunds import request_refund
from providers.mpesa.simulator import STORE, create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.conftest import drain
from tests.providers.wires import (
    ADMIN,
    MPESA_BASE,
    MPESA_CREDS,
    due_now,
    jobs_done,
    mpesa_adapter,
    mpesa_payment,
    mpesa_wire,
)

PUSH, QUERY, REVERSAL = "/mpesa/stkpush/v1/processrequest", "/mpesa/stkpushquery/v1/query", "/mpesa/reversal/v1/request"
CHECKOUT = "ws_CO_22112026080000123456789012"
RECEIPT = "SKL3ABC123"


def _stk_callback(code: int, receipt: str | None = None) -> dict[str, Any]:
    callback: dict[str, Any] = {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": CHECKOUT,
                                "ResultCode": code, "ResultDesc": "The service request is processed successfully."}
    if receipt:
        callback["CallbackMetadata"] = {"Item": [
            {"Name": "Amount", "Value": 150}, {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "TransactionDate", "Value": 20261122080102}, {"Name": "PhoneNumber", "Value": 254708000001}]}
    return {"Body": {"stkCallback": callback}}


def _query_answer(code: str | None) -> tuple[int, dict[str, Any]]:
    if code is None:
        return 500, {"requestId": "1", "errorCode": "500.001.1001",
                     "errorMessage": "The transaction is being processed"}
    return 200, {"ResponseCode": "0", "MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": CHECKOUT,
                 "ResultCode": code, "ResultDesc": "The service request is processed successfully."}


async def _pushed(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Any, Payment]:
    """An M-Pesa payment whose STK push Daraja accepted (CheckoutRequestID saved), its poll due."""
    wire = mpesa_wire().on("POST", PUSH, 200, {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": CHECKOUT,
                                               "ResponseCode": "0", "ResponseDescription": "Success."})
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await worker.run_once()  # the collect job (the poll is not due yet)
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", CHECKOUT)
    return wire, stored


async def _payment(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


async def _refund_sends(rt: Any, demo: dict[str, Any], worker: Any, wire: Any, payment: Payment) -> dict[str, Any]:
    """Ask for a refund and return the reversal request the adapter sent."""
    wire.on("POST", REVERSAL, 200, {"OriginatorConversationID": "1", "ConversationID": "AG_1", "ResponseCode": "0"})
    await jobs_done(rt)
    async with rt.sessionmaker.begin() as s:
        await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"], amount=None,
                             reason="paid twice", idempotency_key="refund-key-1", actor=ADMIN)
    await drain(worker)
    [reversal] = wire.sent("POST", REVERSAL)
    return json.loads(reversal.content)


async def test_late_callback_brings_the_receipt_to_a_payment_the_poll_completed(rt, demo, worker, client):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *_query_answer("0"))  # Daraja's STK query: success, but no receipt number
    await due_now(rt, "payment.poll")
    await worker.run_once()
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", CHECKOUT)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", RECEIPT)
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment.id, AuditEvent.action == "payment.transaction_id_recorded"))).scalar_one()
    assert (audit.before, audit.after) == ({"providerTransactionId": CHECKOUT}, {"providerTransactionId": RECEIPT})
    assert audit.actor == "provider:mpesa"
    # A stale or forged callback cannot swap a receipt once stored.
    other = {"Body": {"stkCallback": {**_stk_callback(0, "SOTHER0001")["Body"]["stkCallback"],
                                      "ResultDesc": "again"}}}
    other["Body"]["stkCallback"]["CallbackMetadata"]["Item"][1]["Value"] = "SOTHER0001"
    await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}", json=other)
    assert (await _payment(rt, payment.id)).provider_transaction_id == RECEIPT
    # And the refund can now be made: the reversal names the receipt.
    assert (await _refund_sends(rt, demo, worker, wire, payment))["TransactionID"] == RECEIPT


async def _completed_without_an_id(rt: Any, demo: dict[str, Any]) -> tuple[Any, Payment]:
    """An M-Pesa payment whose push answer (the CheckoutRequestID) never reached us, completed on a word that names no
    transaction id (as the in-process simulators' test webhook completes one without gatewayTransactionId):
    COMPLETED, provider_transaction_id NULL. Its other jobs put aside."""
    from core.audit import Actor
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await jobs_done(rt)
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), ProviderOutcome.SUCCEEDED,
                                              actor=Actor("provider:test", "provider")) == "completed"
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", None)
    return wire, stored


async def test_late_callback_brings_the_receipt_to_a_payment_completed_without_an_id(rt, demo, worker, client):
    """A completed payment without a transaction id takes the late callback's receipt number (found by our reference
    on its URL, confirmed by the STK query, which names no receipt): audited, and the refund's reversal names it."""
    wire, payment = await _completed_without_an_id(rt, demo)
    wire.on("POST", QUERY, *_query_answer("0"))
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.provider_transaction_id, stored.mismatch) == ("COMPLETED", RECEIPT, False)
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment.id, AuditEvent.action == "payment.transaction_id_recorded"))).scalar_one()
        [event] = (await s.execute(select(ProviderEvent))).scalars().all()
    assert (audit.after, audit.actor) == ({"providerTransactionId": RECEIPT}, "provider:mpesa")
    assert (event.payment_id, event.outcome) == (payment.id, "already_completed")
    assert (await _refund_sends(rt, demo, worker, wire, payment))["TransactionID"] == RECEIPT


async def test_a_completed_payment_without_an_id_takes_the_final_id_of_a_callback_matched_by_a_provisional_one(
        rt, demo):
    """apply_collection_outcome's contract: a completed payment holding the callback's provisional id, or none, takes
    the callback's final id (audited from none)."""
    from core.audit import Actor
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    _wire, payment = await _completed_without_an_id(rt, demo)
    async with rt.sessionmaker.begin() as s:
        said = await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), ProviderOutcome.SUCCEEDED,
                                              actor=Actor("provider:mpesa", "provider"),
                                              provider_transaction_id=RECEIPT, provisional_transaction_id=CHECKOUT)
    assert said == "already_completed"
    stored = await _payment(rt, payment.id)
    assert (stored.provider_transaction_id, stored.mismatch) == (RECEIPT, False)
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment.id, AuditEvent.action == "payment.transaction_id_recorded"))).scalar_one()
    assert (audit.before, audit.after) == ({"providerTransactionId": None}, {"providerTransactionId": RECEIPT})


async def test_receipt_of_a_callback_the_query_could_not_confirm_yet_is_kept(rt, demo, worker, client):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *_query_answer(None))  # Daraja still processing when the callback comes
    resp = await client.post("/webhooks/payments/mpesa", json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    async with rt.sessionmaker() as s:
        [event] = (await s.execute(select(ProviderEvent))).scalars().all()
    assert (event.status, event.outcome, event.payment_id) == ("PENDING", "pending", payment.id)
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    wire.on("POST", QUERY, *_query_answer("0"))
    await due_now(rt, "payment.poll")
    await worker.run_once()
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", RECEIPT)
    assert [json.loads(r.content)["CheckoutRequestID"] for r in wire.sent("POST", QUERY)] == [CHECKOUT] * 2
    assert (await _refund_sends(rt, demo, worker, wire, payment))["TransactionID"] == RECEIPT


async def test_push_whose_answer_was_lost_completes_when_the_payer_approves(rt, demo, worker, client):
    # Safaricom (the simulator) takes the push and prompts the payer, but its answer comes too late.
    sim = create_simulator(SimulatorOptions(delay=0.05, hang_request=2.5, credentials=MPESA_CREDS))
    runner = web.AppRunner(sim, handler_cancellation=False)  # as `main.py simulate` runs it
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        # The gateway (the `client` fixture's server) is where the simulator calls back.
        rt.settings = dataclasses.replace(rt.settings, public_base_url=str(client.make_url("")).rstrip("/"))
        async with httpx.AsyncClient() as http:
            mpesa_adapter(rt, f"http://127.0.0.1:{port}", http, read_timeout="2")  # the token fetch's too
            payment = await mpesa_payment(rt, demo)
            await worker.run_once()  # collect: no answer in time, so no CheckoutRequestID on our side
            await sim[STATE].idle()  # the payer approved; the callback came back to the gateway
            stored = await _payment(rt, payment.id)
            [stk] = sim[STORE].stk.values()
            assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", stk.receipt)
            assert stk.callback_url.endswith(f"/webhooks/payments/daraja?ref={payment.provider_reference}")
            assert sim[STATE].requests == 1  # one push: never sent again
            async with rt.sessionmaker() as s:
                [event] = (await s.execute(select(ProviderEvent))).scalars().all()
            assert (event.outcome, event.payment_id, event.status) == ("completed", payment.id, "SUCCEEDED")
    finally:
        await runner.cleanup()


def _reversal_result(conversation: str, amount: int = 150) -> dict[str, Any]:
    return {"Result": {
        "ResultType": 0, "ResultCode": 0, "ResultDesc": "The service request is processed successfully.",
        "OriginatorConversationID": "8521-4298025-1", "ConversationID": conversation, "TransactionID": "SREV4AB12",
        "ResultParameters": {"ResultParameter": [{"Key": "Amount", "Value": amount},
                                                 {"Key": "OriginalTransactionID", "Value": RECEIPT}]}}}


async def test_reversal_whose_answer_was_lost_completes_when_its_result_comes(rt, demo, worker, client):
    """Daraja took the reversal but its answer (the ConversationID) never reached us: the Result callback
    names only that ConversationID, and is found by our reference on its ResultURL."""
    from core.models import Refund
    from tests.providers.wires import completed

    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)

    def lost(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    wire.on("POST", REVERSAL, lost)
    async with rt.sessionmaker.begin() as s:
        await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"], amount=None,
                             reason="paid twice", idempotency_key="refund-lost-1", actor=ADMIN)
    await drain(worker)
    [sent] = wire.sent("POST", REVERSAL)
    body = json.loads(sent.content)
    async with rt.sessionmaker() as s:
        refund = (await s.execute(select(Refund))).scalar_one()
    assert (refund.status, refund.provider_transaction_id) == ("PROCESSING", None)
    # Our reference rides on both URLs Daraja may call.
    for name in ("ResultURL", "QueueTimeOutURL"):
        assert body[name].endswith(f"/webhooks/payments/daraja?ref={refund.provider_reference}"), body[name]

    # A Result for another reference of ours that names an unknown ConversationID changes nothing.
    resp = await client.post("/webhooks/payments/mpesa?ref=not-ours", json=_reversal_result("AG_20261201_other"))
    assert resp.status == 200
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund.id)).status == "PROCESSING"

    resp = await client.post(f"/webhooks/payments/daraja?ref={refund.provider_reference}",
                             json=_reversal_result("AG_20261201_lost"))
    assert resp.status == 200
    async with rt.sessionmaker() as s:
        done = await s.get(Refund, refund.id)
        paid = await s.get(Payment, payment.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", "SREV4AB12")
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 15_000)
    assert len(wire.sent("POST", REVERSAL)) == 1  # never sent again


async def test_reversal_result_naming_another_refunds_id_is_not_applied_by_reference(rt, demo, worker, client):
    """A failure Result whose ConversationID differs from the one stored for the refund its reference names
    is about another (earlier) request of that refund, not the one it waits for: not applied to it. (Such a
    success is: the money went back; tests/providers/test_refund_ambiguous.py.)"""
    from core.models import Refund
    from tests.providers.wires import completed

    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)
    await _refund_sends(rt, demo, worker, wire, payment)  # answered: ConversationID AG_1 stored
    async with rt.sessionmaker() as s:
        refund = (await s.execute(select(Refund))).scalar_one()
    assert (refund.status, refund.provider_transaction_id) == ("PROCESSING", "AG_1")
    other = _reversal_result("AG_someone_else")
    other["Result"].update(ResultCode=1, ResultDesc="The balance is insufficient for the transaction.")
    resp = await client.post(f"/webhooks/payments/mpesa?ref={refund.provider_reference}", json=other)
    assert resp.status == 200
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund.id)).status == "PROCESSING"
    resp = await client.post(f"/webhooks/payments/mpesa?ref={refund.provider_reference}",
                             json=_reversal_result("AG_1"))
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund.id)).status == "COMPLETED"


async def test_late_callback_of_a_voided_recording_flags_it_and_takes_back_no_id(rt, demo, worker, client):
    """A push given up (TIMEOUT), its money recorded by an admin from the statement (the receipt replaces the
    CheckoutRequestID), then the recording voided (core.recorded_payments.void_recording: its id released). Daraja's
    late callback finds it by our reference (no payment holds the CheckoutRequestID any more): flagged for a person, and
    the voided payment holds no id again (it would be found by it, and shown with it)."""
    from sqlalchemy import update

    from core.audit import Actor
    from core.recorded_payments import record_collected, void_recording

    wire, payment = await _pushed(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            status="TIMEOUT", failure_reason="not approved in time"))
    admin = Actor("admin:desk", "admin")
    async with rt.sessionmaker.begin() as s:
        await record_collected(s, rt, payment_id=payment.id, cooperative_id=None, provider_transaction_id=RECEIPT,
                               note="statement line 4", actor=admin)
    async with rt.sessionmaker.begin() as s:
        await void_recording(s, payment_id=payment.id, cooperative_id=None, note="wrong line: not hers",
                             actor=admin)
    wire.on("POST", QUERY, *_query_answer("0"))
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, "SKL3LATE99"))
    assert resp.status == 200
    stored = await _payment(rt, payment.id)
    assert (stored.status, stored.collected_minor, stored.mismatch) == ("VOIDED", 0, True)
    assert "after the recording was voided" in (stored.mismatch_detail or "")
    assert stored.provider_transaction_id is None
