"""Refunds the provider may have carried out though it answered 5xx: a request that carries no reference of
ours (M-Pesa's reversal, Airtel's refund) is never sent again, since a second one is not recognised as the
same; the refund waits for the provider's word or a person's, and is never recorded as failed on an
"already done" answer while the money may have gone back. MTN refunds (our X-Reference-Id, deduplicated,
with a status query) are still retried."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.config import ProviderConfig, Secret
from core.models import OutboxJob, Payment, ProviderEvent, Refund
from core.outbox import replay_job
from core.payments import create_payment
from core.ports import ProviderError, ProviderOutcome, ProviderTimeout
from core.refunds import record_refund_outcome, request_refund
from providers.airtel.adapter import AirtelAdapter
from providers.mpesa.adapter import MpesaAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter
from tests.conftest import drain
from tests.core.test_provider_faults_mpesa import RECEIPT, REVERSAL, _pushed, _reversal_result
from tests.providers import test_airtel, test_mpesa, test_mtn_momo
from tests.providers.wires import (
    ADMIN,
    MPESA_BASE,
    MPESA_CREDS,
    MTN_BASE,
    NewPayment,
    Routes,
    completed,
    due_now,
    mpesa_wire,
    mtn_wire,
)

AIRTEL_BASE = "https://airtel.test"
AIRTEL_REFUND = "/standard/v1/payments/refund"
MTN_REFUND = "/disbursement/v1_0/refund"
ACCEPTED = {"OriginatorConversationID": "8521-1", "ConversationID": "AG_2", "ResponseCode": "0",
            "ResponseDescription": "Accept the service request successfully."}


def _unavailable(_request: httpx.Request) -> httpx.Response:
    """A gateway in front of the provider answers after the provider took the request."""
    return httpx.Response(503, text="<html><body>Service Unavailable</body></html>")


async def airtel_collected(rt: Any, demo: dict[str, Any], key: str) -> tuple[Routes, Payment]:
    """An Airtel payment of the rent, collected, with the Airtel adapter on a fail-closed wire."""
    wire = Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, {"access_token": "t", "expires_in": "180"})
    rt.providers = {**rt.providers, "airtel": AirtelAdapter(wire.client(), test_airtel.config(AIRTEL_BASE))}
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_AIRTEL", account="0733000001", idempotency_key=key, channel="api"),
            actor=ADMIN)
    await completed(rt, payment, "MP210603.1234.A12345")
    return wire, payment


async def _ask_refund(rt: Any, demo: dict[str, Any], payment: Payment, key: str = "refund-ambiguous-1") -> Refund:
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="paid twice", idempotency_key=key, actor=ADMIN)
    return refund


async def _submit_twice(rt: Any, worker: Any) -> None:
    """Run the refund's submission, then (were it left to retry) its retry."""
    await drain(worker)
    await due_now(rt, "refund.submit")
    await drain(worker)


async def _rows(rt: Any, refund_id: str, payment_id: str) -> tuple[Refund, Payment, list[OutboxJob]]:
    async with rt.sessionmaker() as s:
        jobs = list((await s.execute(select(OutboxJob).order_by(OutboxJob.id))).scalars())
        return await s.get(Refund, refund_id), await s.get(Payment, payment_id), jobs


def _told(jobs: list[OutboxJob], what: str) -> list[OutboxJob]:
    """The SMS and webhook jobs queued for `what` (refund_failed, refund_completed)."""
    return [j for j in jobs if what in (j.dedupe_key or "") or what.replace("_", ".") in json.dumps(j.payload)]


# --- adapters: which 5xx is ambiguous ------------------------------------------------------------------


async def test_a_reversal_answered_5xx_is_unanswered_not_retryable() -> None:
    wire = mpesa_wire().on("POST", REVERSAL, _unavailable)
    adapter = MpesaAdapter(wire.client(), ProviderConfig(
        base_url=MPESA_BASE, credentials={k: Secret(v) for k, v in MPESA_CREDS.items()},
        options={"shortcode": "174379"}))
    with pytest.raises(ProviderTimeout) as err:
        await adapter.request_refund(test_mpesa.refund())
    assert err.value.retryable is False and "503" in str(err.value)
    assert len(wire.sent("POST", REVERSAL)) == 1


async def test_an_airtel_refund_answered_5xx_is_unanswered_not_retryable() -> None:
    wire = Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, {"access_token": "t", "expires_in": "180"})
    wire.on("POST", AIRTEL_REFUND, 502, {"status": {"message": "Bad Gateway", "success": False}})
    adapter = AirtelAdapter(wire.client(), test_airtel.config(AIRTEL_BASE))
    with pytest.raises(ProviderTimeout) as err:
        await adapter.request_refund(test_airtel.refund())
    assert err.value.retryable is False and "HTTP 502" in str(err.value)


async def test_an_mtn_refund_answered_5xx_is_still_retried_with_the_same_reference() -> None:
    wire = mtn_wire().on("POST", MTN_REFUND, 500, {"code": "INTERNAL_PROCESSING_ERROR", "message": "internal error"})
    adapter = MtnMomoAdapter(wire.client(), test_mtn_momo.config(MTN_BASE))
    with pytest.raises(ProviderError) as err:
        await adapter.request_refund(test_mtn_momo.refund())
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.retryable, err.value.code) == (True, "HTTP_500")


def test_already_reversed_is_never_read_as_a_failure() -> None:
    adapter = MpesaAdapter(httpx.AsyncClient(), ProviderConfig(base_url=MPESA_BASE))
    body = _reversal_result("AG_2")
    body["Result"].update(ResultCode="R000001", ResultDesc="The transaction has already been reversed.")
    event = adapter.parse_callback(test_mpesa.inbound(body, query={"ref": "ours"}))
    assert event.outcome is ProviderOutcome.AMBIGUOUS
    assert event.reason == "The transaction has already been reversed."


# --- through the core ----------------------------------------------------------------------------------


async def test_mpesa_reversal_answered_5xx_is_not_sent_again_and_its_result_completes_it(rt, demo, worker,
                                                                                       client):
    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)
    # Daraja took the reversal (it will call back with ConversationID AG_1) but answered 503; a second
    # request would be another reversal (AG_2), refused "already reversed".
    wire.on("POST", REVERSAL, _unavailable)
    refund = await _ask_refund(rt, demo, payment)
    await drain(worker)
    wire.on("POST", REVERSAL, 200, ACCEPTED)
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", REVERSAL)) == 1
    stored, paid, jobs = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", None)
    assert [(j.kind, j.status) for j in jobs if j.kind.startswith("refund.")] == [
        ("refund.submit", "DONE"), ("refund.poll", "PENDING")]  # waits for the Result, else a person

    resp = await client.post(f"/webhooks/payments/mpesa?ref={refund.provider_reference}",
                             json=_reversal_result("AG_1"))
    assert resp.status == 200
    stored, paid, jobs = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "SREV4AB12")
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 15_000)
    assert _told(jobs, "refund_completed") and not _told(jobs, "refund_failed")
    assert len(wire.sent("POST", REVERSAL)) == 1


async def test_an_earlier_reversals_result_completes_a_refund_stored_under_a_later_one(rt, demo, worker, client):
    """A refund asked twice before this fix (or by a submission run twice) holds the later ConversationID:
    the later reversal's "already reversed" never fails it, an earlier reversal's failure says nothing of
    it, and the earlier reversal's success, which came to the refund's own ResultURL, completes it."""
    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)
    wire.on("POST", REVERSAL, 200, ACCEPTED)
    refund = await _ask_refund(rt, demo, payment)
    await drain(worker)
    assert (await _rows(rt, refund.id, payment.id))[0].provider_transaction_id == "AG_2"
    url = f"/webhooks/payments/mpesa?ref={refund.provider_reference}"

    again = _reversal_result("AG_2")
    again["Result"].update(ResultCode="R000001", ResultDesc="The transaction has already been reversed.")
    again["Result"].pop("ResultParameters")
    assert (await client.post(url, json=again)).status == 200
    refused = _reversal_result("AG_0")
    refused["Result"].update(ResultCode=1, ResultDesc="The balance is insufficient for the transaction.")
    assert (await client.post(url, json=refused)).status == 200
    stored, paid, jobs = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.failure_reason) == ("PROCESSING", None)
    assert (paid.status, paid.refunded_minor) == ("COMPLETED", 0)
    assert not _told(jobs, "refund_failed")

    assert (await client.post(url, json=_reversal_result("AG_1"))).status == 200
    stored, paid, jobs = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "SREV4AB12")
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 15_000)
    async with rt.sessionmaker() as s:
        events = {e.event_id: e.status for e in (await s.execute(select(ProviderEvent).where(
            ProviderEvent.kind == "refund"))).scalars()}
    assert events == {"reversal:AG_2:R000001": "AMBIGUOUS", "reversal:AG_0:1": "FAILED",
                      "reversal:AG_1:0": "SUCCEEDED"}


async def test_airtel_refund_answered_5xx_is_parked_for_a_person_not_sent_again(rt, demo, worker):
    wire, payment = await airtel_collected(rt, demo, "key-airtel-5xx")
    # Airtel refunded, but its gateway answered 502; sent again, the refund is "not eligible" (ESB000011).
    wire.on("POST", AIRTEL_REFUND, 502, {"status": {"message": "Bad Gateway", "success": False}})
    refund = await _ask_refund(rt, demo, payment)
    await drain(worker)
    wire.on("POST", AIRTEL_REFUND, 200, {
        "data": {"transaction": {"airtel_money_id": "MP210603.1234.A12345", "status": "FAILED"}},
        "status": {"code": "200", "message": "Transaction is not eligible for refund", "result_code": "ESB000011",
                   "success": False}})
    await due_now(rt, "refund.submit")
    await due_now(rt, "refund.poll")
    await drain(worker)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, paid, jobs = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING" and paid.refunded_minor == 0
    [poll] = [j for j in jobs if j.kind == "refund.poll"]
    assert poll.status == "PARKED" and "manual review" in (poll.last_error or "")
    assert not _told(jobs, "refund_failed")

    # A person checks with Airtel and records what it did.
    async with rt.sessionmaker.begin() as s:
        await record_refund_outcome(s, rt, refund_id=refund.id, cooperative_id=demo["cooperative_id"],
                                    succeeded=True, note="Airtel confirmed the refund by phone", actor=ADMIN,
                                    provider_transaction_id="RF210604.0934.B54321")
    stored, paid, jobs = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "RF210604.0934.B54321")
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1


async def test_an_airtel_refund_parked_for_a_person_says_what_to_do_and_replays_nothing(rt, demo, worker):
    """The on-call engineer reads the parked poll's reason: Airtel never answered (502), so its reason must not say
    "the refund answer is final" (there was none: the money may or may not have gone back), and it names how to
    settle it. Replaying the poll (a person's first reflex) sends nothing and parks it with the same words."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-parked-words")
    wire.on("POST", AIRTEL_REFUND, 502, {"status": {"message": "Bad Gateway", "success": False}})
    refund = await _ask_refund(rt, demo, payment)
    await drain(worker)
    await due_now(rt, "refund.poll")
    await drain(worker)
    [poll] = [j for j in (await _rows(rt, refund.id, payment.id))[2] if j.kind == "refund.poll"]
    assert poll.status == "PARKED"
    assert "answer is final" not in poll.last_error
    assert refund.reference in poll.last_error and f"POST /v1/refunds/{refund.id}/outcome" in poll.last_error

    async with rt.sessionmaker.begin() as s:
        assert await replay_job(s, poll.id) is not None
    await drain(worker)
    async with rt.sessionmaker() as s:
        again = await s.get(OutboxJob, poll.id)
    assert (again.status, again.last_error) == ("PARKED", poll.last_error)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
