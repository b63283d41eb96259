"""A provider says money was taken and the cooperative's system must be told, not only a log line:

1. a payer who paid twice (a second payment of an IremboPay invoice) is flagged and the cooperative's system gets
   `payment.paid_twice` (the second payment's money reference and amount), once per money reference;
2. an M-Pesa success callback (sent once) whose confirming status query failed, for a payment already given up
   (TIMEOUT, CANCELLED), FAILED or VOIDED (its recording voided), flags the payment (mismatch, audit
   `payment.unconfirmed_success`) without moving it, and the cooperative's system gets
   `payment.unconfirmed_success`; a repeat of the callback flags and queues nothing more. An open payment's
   callback is still left to its poll, unflagged."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import select

from admin_api.webhooks import ENDPOINT_CREATE
from core import webhooks
from core.audit import Actor
from core.models import AuditEvent, OutboxJob, Payment, ProviderEvent, WebhookDelivery
from core.ports import ProviderOutcome
from core.provider_events import KEPT_TRANSACTION_ID, UNCONFIRMED_FLAG, apply_collection_outcome
from core.recorded_payments import record_collected, void_recording
from core.state.payment import UNCONFIRMED
from tests.core.test_provider_faults_mpesa import CHECKOUT, QUERY, RECEIPT, _payment, _pushed, _stk_callback
from tests.core.test_webhooks import approved_endpoint
from tests.providers.test_irembopay_ambiguous import INVOICE
from tests.providers.test_irembopay_review3 import _invoiced, _paid
from tests.providers.test_mpesa_review3 import SPIKE_ARREST
from tests.providers.wires import ADMIN

PROVIDER = Actor("provider:mpesa", "provider")


def _event_id(event_type: str, payment_id: str, reference: str) -> str:
    """One event per payment and money reference (the reference digested: it is the provider's text)."""
    return f"evt_{event_type.replace('.', '_')}_{payment_id}_{hashlib.sha256(reference.encode()).hexdigest()[:16]}"


async def _events_queued(rt: Any, event_type: str) -> list[dict[str, Any]]:
    async with rt.sessionmaker() as s:
        payloads = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event")
                                    .order_by(OutboxJob.id))).scalars().all()
    return [p for p in payloads if p["event_type"] == event_type]


async def _audit(rt: Any, payment_id: str, action: str) -> list[tuple[Any, Any, str]]:
    async with rt.sessionmaker() as s:
        return [tuple(r) for r in (await s.execute(select(AuditEvent.before, AuditEvent.after, AuditEvent.actor).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == action))).all()]


async def _delivered_to(rt: Any, demo: dict[str, Any], event: dict[str, Any], subscribed: list[str],
                        other: list[str]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Fan the queued event out to an endpoint that asked for `subscribed` and one that asked for `other`: the
    delivery rows made (endpoint url, event id, type, body)."""
    await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/told", events=subscribed)
    await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/other", events=other)
    assert await webhooks.fan_out(rt, event) == 1
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(WebhookDelivery))).scalars().all()
        urls = {e.id: e.url for e in (await s.execute(select(webhooks.WebhookEndpoint))).scalars()}
    return [(urls[r.endpoint_id], r.event_id, r.event_type, r.payload) for r in rows]


# --- 1. paid twice ----------------------------------------------------------------------------------------------

async def test_a_payer_who_paid_twice_is_told_to_the_cooperatives_system(rt, demo, worker, client):
    _, payment = await _invoiced(rt, demo, worker)
    first = await client.post("/webhooks/payments/irembopay", **_paid(payment, "MTN-REF-0001"))
    assert (await first.json())["result"] == "completed"
    second = await client.post("/webhooks/payments/irembopay", **_paid(payment, "BK-REF-0002", method="BK"))
    assert (await second.json())["result"] == "flagged_paid_twice"

    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
    detail = "paid twice: provider reported another payment (50,000 RWF), reference BK-REF-0002"
    assert (paid.status, paid.mismatch, paid.mismatch_detail) == ("COMPLETED", True, detail)
    assert await _audit(rt, payment.id, "payment.paid_twice") == [
        ({"status": "COMPLETED"}, {"moneyReference": "BK-REF-0002", "amount": 50000, "currency": "RWF"},
         "provider:irembopay")]
    [event] = await _events_queued(rt, "payment.paid_twice")
    assert (event["event_id"], event["cooperative_id"]) == (
        _event_id("payment.paid_twice", payment.id, "BK-REF-0002"), demo["cooperative_id"])
    data = event["data"]
    assert (data["id"], data["reference"], data["status"], data["mismatch"], data["mismatchDetail"]) == (
        payment.id, payment.reference, "COMPLETED", True, detail)
    assert data["reportedPayment"] == {"moneyReference": "BK-REF-0002", "amount": 50000, "currency": "RWF"}
    [completed] = await _events_queued(rt, "payment.completed")
    assert data["updatedAt"] > completed["data"]["updatedAt"]  # the newer news about the payment

    # IremboPay sends the second payment's webhook again: a duplicate, nothing more queued or flagged.
    again = await client.post("/webhooks/payments/irembopay", **_paid(payment, "BK-REF-0002", method="BK"))
    assert (await again.json())["result"] == "duplicate"
    assert len(await _events_queued(rt, "payment.paid_twice")) == 1
    assert len(await _audit(rt, payment.id, "payment.paid_twice")) == 1

    # An endpoint that asked for payment.completed is told (the event follows it); one that did not is not.
    [(url, event_id, event_type, body)] = await _delivered_to(rt, demo, event, ["payment.completed"],
                                                               ["refund.completed"])
    assert (url, event_id, event_type) == ("http://127.0.0.1:9/told", webhooks.stored_event_id(event["event_id"]),
                                           "payment.paid_twice")
    assert (body["id"], body["type"], body["data"]) == (event_id, "payment.paid_twice", data)
    assert f"{INVOICE}:PAID:BK-REF-0002" in [e for (e,) in await _stored(rt)]


async def _stored(rt: Any) -> list[tuple[str]]:
    async with rt.sessionmaker() as s:
        return [tuple(r) for r in (await s.execute(select(ProviderEvent.event_id))).all()]


# --- 2. a success callback whose confirming query failed, for a payment that is over ------------------------------

GIVE_UP = {
    "timeout": (ProviderOutcome.EXPIRED, None, "TIMEOUT"),
    "timeout_unconfirmed": (ProviderOutcome.EXPIRED, UNCONFIRMED, "TIMEOUT"),
    "cancelled": (ProviderOutcome.CANCELLED, "payer cancelled", "CANCELLED"),
    "failed": (ProviderOutcome.FAILED, "insufficient balance", "FAILED"),
}
TOLD = {"TIMEOUT": "payment.timeout", "CANCELLED": "payment.failed", "FAILED": "payment.failed"}


@pytest.mark.parametrize("how", list(GIVE_UP))
async def test_unconfirmed_success_for_a_payment_that_is_over_is_flagged_and_told(rt, demo, worker, client, how):
    wire, payment = await _pushed(rt, demo, worker)
    outcome, reason, status = GIVE_UP[how]
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), outcome, actor=PROVIDER,
                                       reason=reason)
    before = await _payment(rt, payment.id)
    assert before.status == status
    # Then M-Pesa's callback says the payer approved (the receipt), once; Daraja's STK query is rate-limited.
    wire.on("POST", QUERY, *SPIKE_ARREST)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200, await resp.text()

    async with rt.sessionmaker() as s:
        [event_row] = (await s.execute(select(ProviderEvent))).scalars().all()
    assert (event_row.status, event_row.outcome, event_row.payment_id) == ("PENDING", "pending", payment.id)
    assert event_row.payload[KEPT_TRANSACTION_ID] == RECEIPT
    flagged = await _payment(rt, payment.id)
    todo = ("a FAILED payment is not reopened: have the provider reverse it" if status == "FAILED"
            else "record with POST /v1/payments/{id}/outcome")
    said = f"provider says money was taken (receipt {RECEIPT}) but its status query failed: check the statement, " \
           f"{todo}"
    detail = f"{UNCONFIRMED_FLAG}; {said}" if reason == UNCONFIRMED else said
    # Not moved on the callback's unconfirmed word: same status, nothing recorded taken; flagged for a person.
    assert (flagged.status, flagged.completed_at, flagged.collected_minor, flagged.failure_reason) == (
        status, None, None, before.failure_reason)
    assert (flagged.mismatch, flagged.mismatch_detail) == (True, detail)
    assert flagged.updated_at > before.updated_at
    [(audit_before, audit_after, actor)] = await _audit(rt, payment.id, "payment.unconfirmed_success")
    assert (audit_before, actor) == ({"status": status}, "provider:mpesa")
    assert {k: audit_after[k] for k in ("providerTransactionId", "amount", "currency")} == {
        "providerTransactionId": RECEIPT, "amount": 15000, "currency": "KES"}
    assert "Spike Arrest" in audit_after["error"]
    [event] = await _events_queued(rt, "payment.unconfirmed_success")
    assert event["event_id"] == _event_id("payment.unconfirmed_success", payment.id, RECEIPT)
    data = event["data"]
    assert (data["id"], data["status"], data["collectedAmount"], data["mismatch"], data["mismatchDetail"]) == (
        payment.id, status, "0.00", True, detail)  # nothing recorded taken: 0 (the flag says what to check)
    assert data["reportedPayment"] == {"moneyReference": RECEIPT, "amount": "150.00", "currency": "KES"}
    [given_up] = await _events_queued(rt, TOLD[status])
    assert data["updatedAt"] > given_up["data"]["updatedAt"]

    # A repeat of the callback (its event id) is a duplicate: no query, no second flag, nothing more queued.
    queries = len(wire.sent("POST", QUERY))
    again = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                              json=_stk_callback(0, RECEIPT))
    assert again.status == 200
    assert len(wire.sent("POST", QUERY)) == queries
    assert (await _payment(rt, payment.id)).mismatch_detail == detail
    assert len(await _audit(rt, payment.id, "payment.unconfirmed_success")) == 1
    assert len(await _events_queued(rt, "payment.unconfirmed_success")) == 1

    # The endpoint that was told the payment timed out or failed is told; one that asked for completions is not.
    [(url, event_id, event_type, body)] = await _delivered_to(rt, demo, event, [TOLD[status]],
                                                               ["payment.completed"])
    assert (url, event_id, event_type) == ("http://127.0.0.1:9/told", webhooks.stored_event_id(event["event_id"]),
                                           "payment.unconfirmed_success")
    assert (body["type"], body["data"]) == ("payment.unconfirmed_success", data)


async def test_unconfirmed_success_for_a_voided_payment_is_flagged_and_told(rt, demo, worker, client):
    """A support desk recorded the given-up payment's money from a statement line, then voided that recording (the
    wrong line): VOIDED, its transaction id released, the cooperative's system told payment.voided. M-Pesa's callback
    then says the payer approved the request after all, once, and its status query is rate-limited: the payment is
    not moved (still VOIDED, nothing collected, no id taken back), but flagged for a person with what to do for a
    voided payment, audited, and told to the cooperative's system after its payment.voided."""
    wire, payment = await _pushed(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), ProviderOutcome.EXPIRED,
                                       actor=PROVIDER)
    async with rt.sessionmaker.begin() as s:
        await record_collected(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                               provider_transaction_id="SKL9WRONG01", note="M-Pesa statement line 4", actor=ADMIN)
    async with rt.sessionmaker.begin() as s:
        await void_recording(s, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                             note="line 4 is another member's", actor=ADMIN)
    before = await _payment(rt, payment.id)
    assert (before.status, before.collected_minor, before.provider_transaction_id) == ("VOIDED", 0, None)
    [voided] = await _events_queued(rt, "payment.voided")

    wire.on("POST", QUERY, *SPIKE_ARREST)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200, await resp.text()
    [queried] = wire.sent("POST", QUERY)
    assert json.loads(queried.content)["CheckoutRequestID"] == CHECKOUT  # the callback's own id was asked about

    async with rt.sessionmaker() as s:
        [event_row] = (await s.execute(select(ProviderEvent))).scalars().all()
    assert (event_row.status, event_row.outcome, event_row.payment_id) == ("PENDING", "pending", payment.id)
    assert event_row.payload[KEPT_TRANSACTION_ID] == RECEIPT
    flagged = await _payment(rt, payment.id)
    said = (f"provider says money was taken (receipt {RECEIPT}) but its status query failed: check the statement, "
            "record the statement line as a payment (POST /v1/payments/recorded)")
    # Not moved, nothing collected, no transaction id taken back (nor the request's, adopted): flagged only.
    assert (flagged.status, flagged.collected_minor, flagged.provider_transaction_id, flagged.failure_reason) == (
        "VOIDED", 0, None, before.failure_reason)
    assert (flagged.mismatch, flagged.mismatch_detail) == (True, said)
    assert flagged.updated_at > before.updated_at
    [(audit_before, audit_after, actor)] = await _audit(rt, payment.id, "payment.unconfirmed_success")
    assert (audit_before, actor) == ({"status": "VOIDED"}, "provider:mpesa")
    assert {k: audit_after[k] for k in ("providerTransactionId", "amount", "currency")} == {
        "providerTransactionId": RECEIPT, "amount": 15000, "currency": "KES"}
    assert "Spike Arrest" in audit_after["error"]
    [event] = await _events_queued(rt, "payment.unconfirmed_success")
    assert (event["event_id"], event["follows"]) == (
        _event_id("payment.unconfirmed_success", payment.id, RECEIPT), ["payment.voided"])
    data = event["data"]
    assert (data["id"], data["status"], data["mismatch"], data["mismatchDetail"]) == (payment.id, "VOIDED", True, said)
    assert data["reportedPayment"] == {"moneyReference": RECEIPT, "amount": "150.00", "currency": "KES"}
    assert data["updatedAt"] > voided["data"]["updatedAt"]
    assert await _audit(rt, payment.id, "payment.success_after_void") == []  # (that is for a confirmed success)

    # A repeat of the callback is a duplicate: no query, no second flag, nothing more queued.
    again = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                              json=_stk_callback(0, RECEIPT))
    assert again.status == 200
    assert len(wire.sent("POST", QUERY)) == 1
    assert (await _payment(rt, payment.id)).mismatch_detail == said
    assert len(await _audit(rt, payment.id, "payment.unconfirmed_success")) == 1
    assert len(await _events_queued(rt, "payment.unconfirmed_success")) == 1


async def test_unconfirmed_success_for_an_open_payment_is_left_to_its_poll(rt, demo, worker, client):
    wire, payment = await _pushed(rt, demo, worker)
    wire.on("POST", QUERY, *SPIKE_ARREST)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    kept = await _payment(rt, payment.id)
    assert (kept.status, kept.mismatch, kept.mismatch_detail) == ("PROCESSING", False, None)
    assert await _audit(rt, payment.id, "payment.unconfirmed_success") == []
    assert await _events_queued(rt, "payment.unconfirmed_success") == []


async def test_money_taken_after_a_failure_is_not_flagged_again_by_an_unconfirmed_success(rt, demo, worker, client):
    """A FAILED payment whose money is held already (payment.taken_after_failure told) has its money on record."""
    wire, payment = await _pushed(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason="insufficient balance")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment.id), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, provider_transaction_id=RECEIPT)
    held = await _payment(rt, payment.id)
    wire.on("POST", QUERY, *SPIKE_ARREST)
    resp = await client.post(f"/webhooks/payments/mpesa?ref={payment.provider_reference}",
                             json=_stk_callback(0, RECEIPT))
    assert resp.status == 200
    assert (await _payment(rt, payment.id)).mismatch_detail == held.mismatch_detail
    assert await _audit(rt, payment.id, "payment.unconfirmed_success") == []
    assert await _events_queued(rt, "payment.unconfirmed_success") == []


# --- the catalogue ------------------------------------------------------------------------------------------------

def test_the_new_events_are_in_the_catalogue_and_follow_what_the_system_was_told() -> None:
    assert webhooks.check_events(["payment.unconfirmed_success", "payment.paid_twice"]) == [
        "payment.paid_twice", "payment.unconfirmed_success"]
    assert {"payment.paid_twice", "payment.unconfirmed_success"} <= set(ENDPOINT_CREATE["properties"]["events"]
                                                                        ["items"]["enum"])
    # Each follows what the system was told of its payment (the job's "follows"), with what that follows.
    assert webhooks.subscribed(["payment.completed"], "payment.paid_twice", ("payment.completed",))
    # Money taken after a failure follows payment.failed, and a second payment of it follows that.
    assert webhooks.subscribed(["payment.failed"], "payment.paid_twice", ("payment.taken_after_failure",))
    # A system that asked only for failures is not told of a second payment of a payment that completed (it was
    # sent to it whatever the payment, before).
    assert not webhooks.subscribed(["payment.failed"], "payment.paid_twice", ("payment.completed",))
    assert webhooks.subscribed(["payment.timeout"], "payment.unconfirmed_success", ("payment.timeout",))
    assert webhooks.subscribed(["payment.failed"], "payment.unconfirmed_success", ("payment.failed",))
    assert not webhooks.subscribed(["payment.failed"], "payment.unconfirmed_success", ("payment.timeout",))
    assert not webhooks.subscribed(["payment.completed", "refund.completed"], "payment.unconfirmed_success",
                                   ("payment.failed",))
    assert not webhooks.subscribed(["refund.completed"], "payment.paid_twice", ("payment.completed",))
    assert webhooks.subscribed(["payment.paid_twice"], "payment.paid_twice")  # asked for by name
