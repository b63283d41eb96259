"""POST /v1/refunds/{id}/cancel: a refund queued while its provider is down (PENDING, its submission waiting to be
tried again) can be withdrawn before it goes, so that a chargeback the provider made meanwhile can be recorded and
the member is not paid twice; refused (409) when it may already have reached the provider."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select, update

from core.models import AuditEvent, Dispute, OutboxJob, Payment, Refund
from core.outbox import WORKER_LOST
from core.payments import create_payment
from core.refunds import refund_data
from tests.conftest import drain
from tests.providers.wires import ADMIN, completed, due_now, mtn_adapter, mtn_payment, mtn_wire

REFUND_PATH = "/disbursement/v1_0/refund"


def unreachable(request: httpx.Request) -> httpx.Response:
    """MTN down: the connection is refused, nothing reaches it (a 5xx would be an answer: see
    test_refund_cancel_after_try)."""
    raise httpx.ConnectError("connection refused", request=request)


async def _queued_while_mtn_is_down(admin: Any, rt: Any, demo: dict[str, Any], worker: Any,
                                    body: dict[str, Any] | None = None) -> tuple[Any, Payment, dict[str, Any]]:
    """A completed 50,000 RWF MTN payment and a full refund of it whose first try could not reach MTN: PENDING, its
    submission waiting to be tried again."""
    wire = mtn_wire().on("POST", REFUND_PATH, unreachable)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    refund = await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201,
                              json={"idempotencyKey": "refund-key-0001", **(body or {})})
    await drain(worker)
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.attempts, len(wire.sent("POST", REFUND_PATH))) == ("PENDING", 1, 1)
    return wire, payment, refund


async def _submission(rt: Any, refund_id: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == "refund.submit",
                                                             OutboxJob.dedupe_key == f"refund:{refund_id}")
                     )).scalars())


async def test_a_refund_queued_while_the_provider_is_down_is_withdrawn_and_the_chargeback_recorded(
        admin: Any, rt: Any, demo: dict[str, Any], worker: Any) -> None:
    wire, payment, refund = await _queued_while_mtn_is_down(admin, rt, demo, worker)
    # MTN reversed the payment itself meanwhile: the queued refund must not go.
    cancelled = await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 200,
                                 json={"note": "MTN reversed it itself (chargeback MTN-REV-77)"})
    assert (cancelled["status"], cancelled["failureReason"]) == \
        ("FAILED", "withdrawn by an admin: MTN reversed it itself (chargeback MTN-REV-77)")
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.last_error) == ("DONE", cancelled["failureReason"])
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "refund.cancelled"))).scalars()
        notices = (await s.execute(select(OutboxJob.kind, OutboxJob.dedupe_key, OutboxJob.payload).where(
            OutboxJob.kind.in_(("sms.send", "webhook.event")), OutboxJob.dedupe_key.like(f"%{refund['id']}%")))).all()
        stored = await s.get(Refund, refund["id"])
    assert (audit.entity_id, audit.before, audit.after) == (
        refund["id"], {"status": "PENDING"},
        {"status": "FAILED", "note": "MTN reversed it itself (chargeback MTN-REV-77)"})
    # The cooperative's system is told, as of any refund's end; the member, never told of it, gets no SMS.
    assert [(kind, key) for kind, key, _ in notices] == [("webhook.event", f"wh:evt_refund_failed_{refund['id']}")]
    assert notices[0][2]["data"] == refund_data(stored)
    # The chargeback can now be recorded: the payment is refunded once.
    await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201, json={
        "idempotencyKey": "chargeback-0001", "returnedByProvider": {"providerTransactionId": "MTN-REV-77"}})
    # MTN is back: nothing more is sent to it.
    wire.on("POST", REFUND_PATH, 202)
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", REFUND_PATH)) == 1  # the try that never connected only
    paid = await admin.json("GET", f"/v1/payments/{payment.id}", 200)
    assert (paid["status"], paid["refundedAmount"], paid["mismatch"]) == ("REFUNDED", 50000, False)


async def test_a_refund_whose_try_may_have_reached_the_provider_is_not_withdrawn(
        admin: Any, rt: Any, demo: dict[str, Any], worker: Any) -> None:
    _wire, _payment, refund = await _queued_while_mtn_is_down(admin, rt, demo, worker)
    url = f"/v1/refunds/{refund['id']}/cancel"
    # Its worker lost mid-call (or the call cut off): the next try asks MTN instead of sending, so it may be there.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund['id']}")
                        .values(last_error=WORKER_LOST))
    refused = await admin.json("POST", url, 409, json={"note": "do not send"})
    assert refused["message"] == ("the refund may already have reached the provider (its submission is being sent, "
                                  "or a try of it may have arrived): wait for its outcome")
    # Being sent right now.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund['id']}")
                        .values(status="RUNNING", last_error=None))
    assert (await admin.json("POST", url, 409, json={"note": "do not send"}))["message"] == refused["message"]
    [job] = await _submission(rt, refund["id"])
    assert job.status == "RUNNING"  # left to its worker
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "PENDING"
    # Parked after its tries: a person checks with the provider and records the outcome instead.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund['id']}")
                        .values(status="PARKED"))
    parked = await admin.json("POST", url, 409, json={"note": "do not send"})
    assert parked["message"] == ("the refund's submission is parked for manual review: check with the provider, "
                                 "then record its outcome")


async def test_only_a_refund_not_yet_sent_is_withdrawn(admin: Any, rt: Any, demo: dict[str, Any],
                                                      worker: Any) -> None:
    wire, _payment, refund = await _queued_while_mtn_is_down(admin, rt, demo, worker)
    wire.on("POST", REFUND_PATH, 202)  # MTN back: sent, accepted, not settled yet
    await due_now(rt, "refund.submit")
    await drain(worker)
    url = f"/v1/refunds/{refund['id']}/cancel"
    refused = await admin.json("POST", url, 409, json={"note": "too late"})
    assert refused["message"].startswith("refund is already PROCESSING: only one not yet sent to the provider can be "
                                         "withdrawn")
    await admin.json("POST", url, 400, json={"note": ""})  # why, for the audit log
    await admin.json("POST", "/v1/refunds/00000000-0000-0000-0000-000000000000/cancel", 404, json={"note": "none"})
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "PROCESSING"


async def test_a_dispute_resolved_with_the_withdrawn_refund_says_so(admin: Any, rt: Any, demo: dict[str, Any],
                                                                    worker: Any) -> None:
    wire = mtn_wire().on("POST", REFUND_PATH, unreachable)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment.id, "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                     json={"status": "RESOLVED", "refundAmount": 50000})
    await drain(worker)
    async with rt.sessionmaker() as s:
        refund_id = (await s.get(Dispute, dispute["id"])).refund_id
    await admin.json("POST", f"/v1/refunds/{refund_id}/cancel", 200, json={"note": "MTN reversed it itself"})
    notes = (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["notes"]
    assert notes[-1]["text"].endswith("withdrawn before it was sent: MTN reversed it itself; the member has not "
                                      "been paid back by it")


async def test_the_route_is_in_the_openapi_document(client: Any) -> None:
    doc = await (await client.get("/v1/openapi.json")).json()
    operation = doc["paths"]["/v1/refunds/{id}/cancel"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["required"] == ["note"]
    assert "409" in operation["responses"]


async def test_a_refund_withdrawn_twice_is_told_who_withdrew_it(admin: Any, rt: Any, demo: dict[str, Any],
                                                                worker: Any) -> None:
    """Two admins withdrawing the same queued refund (MTN down): the second, after the first, was answered "refund is
    already FAILED: only one not yet sent to the provider can be withdrawn", as if it had been sent. Now: withdrawn
    already, by whom, when and why, nothing of it sent."""
    _wire, _payment, refund = await _queued_while_mtn_is_down(admin, rt, demo, worker)
    url = f"/v1/refunds/{refund['id']}/cancel"
    await admin.json("POST", url, 200, json={"note": "MTN reversed it itself"})
    again = await admin.json("POST", url, 409, json={"note": "MTN reversed it, per its statement"})
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "refund.cancelled"))).scalars()
    assert (again["code"], again["message"]) == ("INVALID_STATE", (
        f"refund {refund['reference']} was withdrawn already by admin@kigali-heights.rw at "
        f"{audit.at.strftime('%Y-%m-%dT%H:%M:%SZ')} (MTN reversed it itself): nothing of it was sent"))
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["failureReason"] == \
        "withdrawn by an admin: MTN reversed it itself"  # the first withdrawal's note stands
