"""M-Pesa through the core, review 3: a receipt whose confirming STK query failed is kept (Daraja sends the
callback once), Daraja's documented failure ResultCodes fail the payment with a reason the payer can act on, and
an STK push refused with 500.001.1001 ("unable to lock subscriber") fails at once instead of waiting a day."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.config import ProviderConfig, Secret
from core.models import OutboxJob, ProviderEvent
from core.money import Money
from core.phone import normalize
from core.ports import CollectionRequest, ProviderError, ProviderOutcome, ProviderTimeout
from core.provider_events import KEPT_TRANSACTION_ID
from providers.mpesa.adapter import REASONS, MpesaAdapter
from providers.mpesa.simulator import create_simulator
from providers.simulation import SimulatorOptions
from tests.core.test_provider_faults_mpesa import (
    CHECKOUT,
    PUSH,
    QUERY,
    RECEIPT,
    _payment,
    _pushed,
    _query_answer,
    _refund_sends,
    _stk_callback,
)
from tests.providers.wires import MPESA_BASE, MPESA_CREDS, due_now, mpesa_adapter, mpesa_payment, mpesa_wire

# What Daraja's API gateway answers when the STK query's rate limit trips (Apigee spike arrest), and a plain 503.
SPIKE_ARREST = (500, {"requestId": "1", "errorCode": "500.003.02", "errorMessage": "Spike Arrest Violation"})
UNAVAILABLE = (503, {"requestId": "2", "errorCode": "503.001.01", "errorMessage": "Service Unavailable"})
LOCKED = {"requestId": "9458-79414631-1", "errorCode": "500.001.1001",
          "errorMessage": "Unable to lock subscriber, a transaction is already in process for the current subscriber"}


def _callback(code: int, desc: str) -> dict[str, Any]:
    body = _stk_callback(code)
    body["Body"]["stkCallback"]["ResultDesc"] = desc
    return body


async def _stored_events(rt: Any) -> list[ProviderEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(ProviderEvent))).scalars())


async def _failed_sms(rt: Any, payment_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        keys = (await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "sms.send"))).scalars().all()
    return [k for k in keys if k == f"sms:payment_failed:{payment_id}"]


# --- 1. the receipt of a callback whose confirming query failed ----------------------------------------------

@pytest.mark.parametrize("failure", [SPIKE_ARREST, UNAVAILABLE], ids=["spike_arrest", "unavailable"])
async def test_receipt_of_a_callback_whose_query_failed_is_kept_and_the_poll_completes_with_it(
        rt, demo, worker, client, failure):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *failure)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    # Daraja is told it was received (it never sends it again anyway); nothing moved on its word.
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    [event] = await _stored_events(rt)
    assert (event.status, event.outcome, event.payment_id) == ("PENDING", "pending", payment.id)
    assert event.payload[KEPT_TRANSACTION_ID] == RECEIPT
    assert ((await _payment(rt, payment.id)).status, len(wire.sent("POST", QUERY))) == ("PROCESSING", 1)
    # Daraja's STK query answers again: success, with no receipt number. The poll completes with the kept one.
    wire.on("POST", QUERY, *_query_answer("0"))
    await due_now(rt, "payment.poll")
    await worker.run_once()
    done = await _payment(rt, payment.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", RECEIPT)
    # The refund the receipt was kept for: the reversal names it.
    assert (await _refund_sends(rt, demo, worker, wire, payment))["TransactionID"] == RECEIPT


async def test_receipt_reaches_a_payment_the_poll_completed_even_when_its_query_fails(rt, demo, worker, client):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *_query_answer("0"))
    await due_now(rt, "payment.poll")
    await worker.run_once()
    assert (await _payment(rt, payment.id)).provider_transaction_id == CHECKOUT
    wire.on("POST", QUERY, *SPIKE_ARREST)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200, await resp.text()
    # Collected already (the query said so): nothing moves, the payment only takes the receipt it lacked.
    done = await _payment(rt, payment.id)
    assert (done.status, done.provider_transaction_id, done.mismatch) == ("COMPLETED", RECEIPT, False)
    [event] = await _stored_events(rt)
    assert (event.status, event.outcome) == ("SUCCEEDED", "already_completed")


async def test_failure_callback_whose_query_failed_moves_nothing(rt, demo, worker, client):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *UNAVAILABLE)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(1032))
    assert resp.status == 200
    [event] = await _stored_events(rt)
    assert (event.status, event.outcome) == ("PENDING", "pending")
    assert KEPT_TRANSACTION_ID not in event.payload
    assert (await _payment(rt, payment.id)).status == "PROCESSING"  # the poll settles it, not the callback


# --- 2. Daraja's documented failure ResultCodes ----------------------------------------------------------------

@pytest.mark.parametrize(("code", "desc"), [
    (1001, "Unable to lock subscriber, a transaction is already in process for the current subscriber"),
    (1025, "An error occurred while sending a push request"),
    (9999, "An error occurred while sending a push request"),
    (17, "Rule limited."),
    (26, "System busy. The service request is rejected."),
])
async def test_documented_failure_code_fails_the_payment_at_once_with_its_reason(rt, demo, worker, client, code, desc):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, 200, {**_query_answer("0")[1], "ResultCode": str(code), "ResultDesc": desc})
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}", json=_callback(code, desc))
    assert resp.status == 200, await resp.text()
    failed = await _payment(rt, payment.id)
    assert (failed.status, failed.failure_reason, failed.mismatch) == ("FAILED", REASONS[str(code)], False)
    assert len(await _failed_sms(rt, payment.id)) == 1  # the payer is told, inside the approval window


async def test_documented_failure_code_found_by_the_poll_fails_the_payment(rt, demo, worker):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, 200, {**_query_answer("0")[1], "ResultCode": "1001",
                                 "ResultDesc": "Unable to lock subscriber"})
    await due_now(rt, "payment.poll")
    await worker.run_once()
    failed = await _payment(rt, payment.id)
    assert (failed.status, failed.failure_reason) == ("FAILED", REASONS["1001"])


async def test_unexpected_result_code_is_a_failure_with_darajas_words(rt, demo, worker, client, caplog):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, 200, {**_query_answer("0")[1], "ResultCode": "4242", "ResultDesc": "Something new"})
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_callback(4242, "Something new"))
    assert resp.status == 200
    failed = await _payment(rt, payment.id)
    assert (failed.status, failed.failure_reason) == ("FAILED", "M-Pesa: Something new (ResultCode 4242)")
    assert any(r.levelname == "ERROR" and "unexpected STK ResultCode" in r.getMessage() for r in caplog.records)


async def test_still_processing_query_answer_keeps_the_payment_open(rt, demo, worker):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, 200, {**_query_answer("0")[1], "ResultCode": "4999",
                                 "ResultDesc": "The transaction is still under processing"})
    await due_now(rt, "payment.poll")
    await worker.run_once()
    assert (await _payment(rt, payment.id)).status == "PROCESSING"


# --- 3. an STK push refused with 500.001.1001 -------------------------------------------------------------------

async def test_push_refused_unable_to_lock_subscriber_fails_at_once(rt, demo, worker):
    wire = mpesa_wire().on("POST", PUSH, 500, LOCKED)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await worker.run_once()  # the collect job
    failed = await _payment(rt, payment.id)
    assert failed.status == "FAILED"
    assert failed.failure_reason == f"{REASONS['1001']} (Daraja 500.001.1001)"
    assert failed.provider_transaction_id is None
    assert len(wire.sent("POST", PUSH)) == 1 and wire.sent("POST", QUERY) == []  # never pushed again
    assert len(await _failed_sms(rt, payment.id)) == 1


async def test_push_5xx_without_a_known_code_still_waits_for_the_status(rt, demo, worker):
    wire = mpesa_wire().on("POST", PUSH, 500, {"requestId": "1", "errorCode": "500.003.02",
                                               "errorMessage": "System is busy. Please try again in few minutes."})
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await worker.run_once()
    held = await _payment(rt, payment.id)
    assert (held.status, held.failure_reason) == ("PENDING", None)  # the prompt may have gone out
    assert len(wire.sent("POST", PUSH)) == 1


async def test_stk_query_500_001_1001_is_still_pending_not_a_failure(rt, demo, worker):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *_query_answer(None))  # the same code on the query: still processing
    await due_now(rt, "payment.poll")
    await worker.run_once()
    assert (await _payment(rt, payment.id)).status == "PROCESSING"


# --- the simulator speaks both ----------------------------------------------------------------------------------

def _request(phone: str) -> CollectionRequest:
    return CollectionRequest(provider_reference="5b0c1c3e-8f3e-4a57-9c1e-2f8d7a6b5c4d",
                             payment_reference="PAY_20261122_001", amount=Money(15000, "KES"), payer=normalize(phone),
                             payer_account=phone, description="Rent",
                             callback_url="http://127.0.0.1:9/webhooks/payments/daraja", method="MPESA")


async def test_simulator_refuses_a_locked_subscriber_and_reports_1001(aiohttp_client):
    sim = await aiohttp_client(create_simulator(SimulatorOptions(delay=0.0, credentials=MPESA_CREDS)))
    config = ProviderConfig(base_url=str(sim.make_url("")).rstrip("/"),
                            credentials={k: Secret(v) for k, v in MPESA_CREDS.items()}, options={"shortcode": "174379"})
    async with httpx.AsyncClient() as http:
        adapter = MpesaAdapter(http, config)
        with pytest.raises(ProviderError) as err:  # ...0009: Daraja refuses the push, no prompt
            await adapter.request_collection(_request("+254708000009"))
        assert not isinstance(err.value, ProviderTimeout)
        assert (err.value.code, err.value.retryable) == ("500.001.1001", False)
        accepted = await adapter.request_collection(_request("+254708000008"))  # ...0008: ResultCode 1001
        for _ in range(100):
            status = await adapter.collection_status("ref", accepted.provider_transaction_id, "KES")
            if status.outcome is not ProviderOutcome.PENDING:
                break
            await asyncio.sleep(0.02)
    assert (status.outcome, status.reason, status.raw["ResultCode"]) == (ProviderOutcome.FAILED, REASONS["1001"],
                                                                          "1001")
