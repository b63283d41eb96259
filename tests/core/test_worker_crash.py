"""A worker lost mid-call (SIGKILL, out of memory, its host gone) writes nothing: its jobs come back when
their lease lapses, and the next attempt must treat the call as one that may have arrived (Job.interrupted):
no second STK push, no second Airtel refund, no second SMS; calls the provider deduplicates go on as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import select, update

from app import create_worker
from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender
from core.config import Secret
from core.db import utcnow
from core.models import OutboxJob, Payment, Refund, SmsMessage
from core.outbox import WORKER_LOST
from core.payments import create_payment
from tests.channels.sms.test_send_faults import queue_receipt
from tests.conftest import drain
from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, _ask_refund, _rows, _told, airtel_collected
from tests.providers.wires import (
    ADMIN,
    MPESA_BASE,
    due_now,
    mpesa_adapter,
    mpesa_payment,
    mpesa_wire,
    mtn_adapter,
    mtn_payment,
    mtn_wire,
)

PUSH = "/mpesa/stkpush/v1/processrequest"
REQUEST_TO_PAY = "/collection/v1_0/requesttopay"


async def _hang(_request: httpx.Request) -> httpx.Response:
    """The provider took the request; its answer never comes before the worker dies."""
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def _job(rt: Any, kind: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalar_one()


async def _lose_worker_mid_call(rt: Any, sent: Any, kind: str) -> None:
    """A worker claims the due jobs and runs the `kind` one; once its request is out (`sent()`), the worker
    dies: its task is cancelled and nothing is written, as with SIGKILL. Then its lease lapses."""
    lost = create_worker(rt)
    claimed = [job for job in await lost.claim() if job.kind == kind]
    task = asyncio.create_task(lost.run_job(claimed[0]))
    for _ in range(300):
        if sent():
            break
        await asyncio.sleep(0.01)
    assert sent(), "the request never left"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert (await _job(rt, kind)).status == "RUNNING"  # the lost worker recorded nothing
    async with rt.sessionmaker.begin() as s:  # OUTBOX_LEASE_SECONDS later
        await s.execute(update(OutboxJob).where(OutboxJob.status == "RUNNING")
                        .values(run_at=utcnow()))


async def test_a_lost_workers_stk_push_is_asked_about_not_pushed_again(rt: Any, demo: dict[str, Any]) -> None:
    wire = mpesa_wire().on("POST", PUSH, _hang)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await _lose_worker_mid_call(rt, lambda: wire.sent("POST", PUSH), "payment.collect")
    wire.on("POST", PUSH, 200, {"CheckoutRequestID": "ws_CO_2", "ResponseCode": "0"})
    await create_worker(rt).run_once()  # another worker, after the lease
    assert len(wire.sent("POST", PUSH)) == 1  # M-Pesa has no idempotency key: a second push is a second charge
    collect = await _job(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("DONE", 2)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # left to the status poll


async def test_a_lost_workers_mtn_collection_goes_on_under_its_reference(rt: Any, demo: dict[str, Any]) -> None:
    """MTN deduplicates by X-Reference-Id: the cut-off request is asked about, and when MTN never got it,
    sent again under the same reference; the payment completes."""
    wire = mtn_wire().on("POST", REQUEST_TO_PAY, _hang)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await _lose_worker_mid_call(rt, lambda: wire.sent("POST", REQUEST_TO_PAY), "payment.collect")
    wire.on("POST", REQUEST_TO_PAY, 202)
    wire.on("GET", f"{REQUEST_TO_PAY}/*", 404, {"code": "RESOURCE_NOT_FOUND", "message": "not found"})
    worker = create_worker(rt)
    await worker.run_once()  # the collect: cut off, so not sent again
    assert len(wire.sent("POST", REQUEST_TO_PAY)) == 1
    await due_now(rt, "payment.poll")
    await drain(worker)  # MTN never got it: the poll queues the collect again, which sends it
    wire.on("GET", f"{REQUEST_TO_PAY}/*", 200, {"status": "SUCCESSFUL", "amount": "50000", "currency": "RWF",
                                                "financialTransactionId": "MTN-1"})
    await due_now(rt, "payment.poll")
    await drain(worker)
    sent = wire.sent("POST", REQUEST_TO_PAY)
    assert [r.headers["X-Reference-Id"] for r in sent] == [payment.provider_reference] * 2
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "COMPLETED"


async def test_a_lost_workers_airtel_refund_is_not_sent_again_nor_failed(rt: Any, demo: dict[str, Any]) -> None:
    wire, payment = await airtel_collected(rt, demo, "key-airtel-lost")
    wire.on("POST", AIRTEL_REFUND, _hang)  # Airtel refunded; the worker died before the answer came
    refund = await _ask_refund(rt, demo, payment)
    await _lose_worker_mid_call(rt, lambda: wire.sent("POST", AIRTEL_REFUND), "refund.submit")
    # Sent again, Airtel would refuse it ("not eligible": the first went through) and it would read FAILED.
    wire.on("POST", AIRTEL_REFUND, 200, {
        "data": {"transaction": {"airtel_money_id": "MP210603.1234.A12345", "status": "FAILED"}},
        "status": {"code": "200", "message": "Transaction is not eligible for refund", "result_code": "ESB000011",
                   "success": False}})
    worker = create_worker(rt)
    await worker.run_once()
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, _, jobs = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING" and not _told(jobs, "refund_failed")
    assert (await _job(rt, "refund.submit")).status == "DONE"
    # Airtel cannot be asked about a refund: its poll parks it for a person.
    await due_now(rt, "refund.poll")
    await worker.run_once()
    poll = await _job(rt, "refund.poll")
    assert poll.status == "PARKED" and "needs manual review" in poll.last_error
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund.id)).status == "PROCESSING"
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1


async def test_a_lost_workers_receipt_is_not_sent_again(rt: Any, demo: dict[str, Any]) -> None:
    requests: list[httpx.Request] = []
    hang = True

    async def aggregator(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if hang:
            await asyncio.sleep(3600)
        return httpx.Response(201, json={"SMSMessageData": {"Message": "Sent to 1/1", "Recipients": [
            {"statusCode": 101, "number": "+250788000001", "status": "Success", "cost": "RWF 10",
             "messageId": f"ATXid_{len(requests)}"}]}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(aggregator)) as http:
        rt.sms = AfricasTalkingSender(http, AfricasTalkingConfig("http://127.0.0.1:9", "u", Secret("k"), "COOPPAY"))
        await queue_receipt(rt, demo)
        locks: list[int] = []

        async def sending() -> bool:
            if requests and not locks:
                locks.extend([await rt.redis.ttl(key) async for key in rt.redis.scan_iter("sms:lock:*")])
            return bool(requests)

        lost = create_worker(rt)
        [job] = [j for j in await lost.claim() if j.kind == "sms.send"]
        task = asyncio.create_task(lost.run_job(job))
        for _ in range(300):
            if await sending():
                break
            await asyncio.sleep(0.01)
        # The send lock outlives the lease: a run claimed again after it cannot start while the lock is held.
        assert len(locks) == 1 and locks[0] >= rt.settings.outbox_lease_seconds - 1
        task.cancel()  # SIGKILL
        await asyncio.gather(task, return_exceptions=True)
        async for key in rt.redis.scan_iter("sms:lock:*"):  # whatever is left of it expires in the end
            await rt.redis.delete(key)
        async with rt.sessionmaker.begin() as s:  # the lease lapses
            await s.execute(update(OutboxJob).where(OutboxJob.status == "RUNNING").values(run_at=utcnow()))
        hang = False
        await create_worker(rt).run_once()
    assert len(requests) == 1  # no SMS twice
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(SmsMessage))).scalar_one()
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert "cut off" in row.failure_reason
    sms_job = await _job(rt, "sms.send")
    assert (sms_job.status, sms_job.attempts) == ("DONE", 2)


async def test_the_claim_says_why_the_job_came_back(rt: Any, demo: dict[str, Any]) -> None:
    """What the next attempt sees (and an operator reads in last_error) of a job whose worker was lost."""
    wire = mpesa_wire().on("POST", PUSH, _hang)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    await mpesa_payment(rt, demo)
    await _lose_worker_mid_call(rt, lambda: wire.sent("POST", PUSH), "payment.collect")
    [again] = [j for j in await create_worker(rt).claim() if j.kind == "payment.collect"]
    assert again.interrupted and again.last_error == WORKER_LOST
    assert (await _job(rt, "payment.collect")).last_error == WORKER_LOST
