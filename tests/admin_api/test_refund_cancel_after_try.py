"""POST /v1/refunds/{id}/cancel after tries of the refund were sent: a try the provider answered 5xx (MTN's 504 is
its back end not answering in time: it may still carry the refund out) may have reached it, for the rest of the
submission's life, whatever later tries met (409: withdrawn and refunded again, the member would be paid twice);
tries refused before anything was processed (a connection never made, an HTTP 429) or failed before the call (its
token) leave the refund withdrawable."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.models import OutboxJob, Payment, Refund
from core.outbox import CALL_SENT
from core.payments import create_payment
from tests.admin_api.test_refund_cancel import REFUND_PATH, _submission, unreachable
from tests.conftest import drain
from tests.providers.conftest import load
from tests.providers.wires import ADMIN, Routes, completed, due_now, mtn_adapter, mtn_payment, mtn_wire

MAY_HAVE_ARRIVED = ("the refund may already have reached the provider (its submission is being sent, or a try of "
                    "it may have arrived): wait for its outcome")


async def _refund_tried(admin: Any, rt: Any, demo: dict[str, Any], worker: Any,
                        wire: Routes) -> tuple[Payment, dict[str, Any]]:
    """A completed 50,000 RWF MTN payment and a full refund of it, tried once over `wire`."""
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    refund = await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201,
                              json={"idempotencyKey": "refund-key-0001"})
    await drain(worker)
    return payment, refund


async def _try_again(rt: Any, worker: Any, wire: Routes, answer: Any) -> None:
    wire.on("POST", REFUND_PATH, answer)
    await due_now(rt, "refund.submit")
    await drain(worker)


async def test_a_refund_mtn_answered_504_is_not_withdrawn_nor_paid_twice(admin: Any, rt: Any, demo: dict[str, Any],
                                                                         worker: Any) -> None:
    wire = mtn_wire().on("POST", REFUND_PATH, 504)
    payment, refund = await _refund_tried(admin, rt, demo, worker, wire)
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.attempts) == ("PENDING", 1)
    assert job.last_error.startswith(CALL_SENT) and "HTTP 504" in job.last_error
    refused = await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 409, json={"note": "asked by mistake"})
    assert refused["message"] == MAY_HAVE_ARRIVED
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.attempts) == ("PENDING", 1)  # left to be sent again
    async with rt.sessionmaker() as s:
        stored = await s.get(Refund, refund["id"])
        cancelled = (await s.execute(select(OutboxJob.id).where(OutboxJob.kind == "webhook.event",
                                                                OutboxJob.dedupe_key.like(f"%{refund['id']}%")))).all()
    assert (stored.status, stored.failure_reason, cancelled) == ("PENDING", None, [])
    # Its amount is still held: no second refund of the same money.
    await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 422, json={"idempotencyKey": "refund-key-0002"})
    # MTN back: the same refund is sent again under its own reference (MTN takes it once), and awaits MTN's word.
    await _try_again(rt, worker, wire, 202)
    sent = wire.sent("POST", REFUND_PATH)
    assert [r.headers["X-Reference-Id"] for r in sent] == [stored.provider_reference] * 2
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "PROCESSING"


async def test_a_try_that_may_have_arrived_is_not_forgotten_by_later_refusals(
        admin: Any, rt: Any, demo: dict[str, Any], worker: Any) -> None:
    wire = mtn_wire().on("POST", REFUND_PATH, 504)
    _payment, refund = await _refund_tried(admin, rt, demo, worker, wire)
    url = f"/v1/refunds/{refund['id']}/cancel"
    # The next tries are refused unprocessed: the first may still be carried out at MTN.
    for answer in (unreachable, 429):
        await _try_again(rt, worker, wire, answer)
        [job] = await _submission(rt, refund["id"])
        assert job.status == "PENDING" and job.last_error.startswith(CALL_SENT), job.last_error
        assert (await admin.json("POST", url, 409, json={"note": "asked by mistake"}))["message"] == MAY_HAVE_ARRIVED
    assert job.attempts == 3 and "HTTP 429" in job.last_error
    assert len(wire.sent("POST", REFUND_PATH)) == 3
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "PENDING"


async def test_tries_refused_unprocessed_or_never_sent_leave_it_withdrawable(
        admin: Any, rt: Any, demo: dict[str, Any], worker: Any) -> None:
    # MTN's token endpoint fails (5xx): the refund itself is never sent.
    wire = mtn_wire().on("POST", "/disbursement/token/", 503).on("POST", REFUND_PATH, 202)
    payment, refund = await _refund_tried(admin, rt, demo, worker, wire)
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.attempts, wire.sent("POST", REFUND_PATH)) == ("PENDING", 1, [])
    # Then MTN rate limits it (429: nothing processed), then cannot be reached.
    wire.on("POST", "/disbursement/token/", 200, load("mtn_momo", "token.json"))
    for answer in (429, unreachable):
        await _try_again(rt, worker, wire, answer)
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.attempts, len(wire.sent("POST", REFUND_PATH))) == ("PENDING", 3, 2)
    assert not job.last_error.startswith(CALL_SENT), job.last_error
    cancelled = await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 200, json={"note": "asked by mistake"})
    assert (cancelled["status"], cancelled["failureReason"]) == ("FAILED", "withdrawn by an admin: asked by mistake")
    [job] = await _submission(rt, refund["id"])
    assert (job.status, job.last_error) == ("DONE", cancelled["failureReason"])
    assert (await admin.json("GET", f"/v1/payments/{payment.id}", 200))["refundedAmount"] == 0
