"""Worker jobs against real adapters over fail-closed wires: what is sent, resent, retried or parked."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from core.db import utcnow
from core.jobs import SETTLE_GRACE
from core.models import OutboxJob, Payment, Refund
from core.ops import dashboard
from core.outbox import INTERRUPTED, Job
from core.payments import create_payment
from core.refunds import request_refund
from core.state.payment import UNCONFIRMED
from tests.admin_api.conftest import bearer
from tests.conftest import deadlines_from_the_call, drain
from tests.providers.wires import (
    ADMIN,
    MPESA_BASE,
    completed,
    due_now,
    mpesa_adapter,
    mpesa_payment,
    mpesa_wire,
    mtn_adapter,
    mtn_payment,
    mtn_wire,
)

PUSH = "/mpesa/stkpush/v1/processrequest"
# The worker's cut-off behind a status query's own deadline, from the query's start (tests.conftest.
# deadlines_from_the_call: the tests below cut a provider call off counting from the call, not from the claim,
# whose token and reads before the call a loaded CI host once spent over 4 s on).
CUT = 4.0


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id)))
                    .scalars())


async def _get(rt: Any, model: Any, row_id: str) -> Any:
    async with rt.sessionmaker() as s:
        return await s.get(model, row_id)


async def _refund(rt: Any, demo: dict[str, Any], payment: Payment) -> Refund:
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="duplicate payment", idempotency_key="refund-key-1",
                                         actor=ADMIN)
    return refund


async def _mtn_refund(rt: Any, demo: dict[str, Any]) -> tuple[Any, Payment, Refund]:
    """An MTN payment completed and a full refund of it asked for; the MTN wire the worker will talk to."""
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    return wire, payment, await _refund(rt, demo, payment)


# --- MTN refunds the provider never received --------------------------------------------------------


async def test_mtn_refund_lost_on_its_way_is_sent_again_with_the_same_reference(rt, demo, worker):
    wire, payment, refund = await _mtn_refund(rt, demo)
    posts = 0

    def refund_post(_request: httpx.Request) -> httpx.Response:
        nonlocal posts
        posts += 1
        if posts == 1:
            raise httpx.ReadError("connection reset by peer")  # lost before MTN stored it
        return httpx.Response(202)

    wire.on("POST", "/disbursement/v1_0/refund", refund_post)
    wire.on("GET", "/disbursement/v1_0/refund/*", 404,
            {"code": "RESOURCE_NOT_FOUND", "message": "Requested resource was not found."})
    await drain(worker)  # submit: no answer, so PROCESSING and polled
    assert (await _get(rt, Refund, refund.id)).status == "PROCESSING"
    await due_now(rt, "refund.poll")
    await drain(worker)  # MTN has no such refund: sent again, same X-Reference-Id, and polled again
    wire.on("GET", "/disbursement/v1_0/refund/*", 200, {
        "amount": "50000", "currency": "RWF", "financialTransactionId": "RF-77", "externalId":
        refund.provider_reference, "status": "SUCCESSFUL"})
    await due_now(rt, "refund.poll")
    await drain(worker)

    sent = wire.sent("POST", "/disbursement/v1_0/refund")
    assert len(sent) == 2
    assert {r.headers["X-Reference-Id"] for r in sent} == {refund.provider_reference}
    assert json.loads(sent[0].content) == json.loads(sent[1].content)
    assert json.loads(sent[1].content)["referenceIdToRefund"] == payment.provider_reference
    assert [r.url.path for r in wire.sent("GET", "/disbursement/v1_0/refund/*")] == \
        [f"/disbursement/v1_0/refund/{refund.provider_reference}"] * 2
    stored, paid = await _get(rt, Refund, refund.id), await _get(rt, Payment, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "RF-77")
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)
    polls = await _jobs(rt, "refund.poll")
    assert [(j.status, j.payload.get("resent")) for j in polls] == [("DONE", None), ("DONE", 1)]


async def test_mtn_refund_resends_are_bounded_then_parked(rt, demo, worker):
    wire, _payment, refund = await _mtn_refund(rt, demo)
    wire.on("POST", "/disbursement/v1_0/refund", 202)
    wire.on("GET", "/disbursement/v1_0/refund/*", 404, {"code": "RESOURCE_NOT_FOUND"})
    await drain(worker)
    for _ in range(6):
        await due_now(rt, "refund.poll")
        await drain(worker)
    assert len(wire.sent("POST", "/disbursement/v1_0/refund")) == 1 + 3  # the submit, then three resends
    polls = await _jobs(rt, "refund.poll")
    assert [j.status for j in polls] == ["DONE", "DONE", "DONE", "PARKED"]
    assert "needs manual review" in polls[-1].last_error and "after 3 resends" in polls[-1].last_error
    assert (await _get(rt, Refund, refund.id)).status == "PROCESSING"


# --- M-Pesa reversals that never report -------------------------------------------------------------


async def test_mpesa_refund_unsettled_after_a_day_is_parked_for_review(rt, demo, worker, client, caplog):
    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await completed(rt, payment, "SKL3ABC123")
    refund = await _refund(rt, demo, payment)
    wire.on("POST", "/mpesa/reversal/v1/request", 200, {
        "OriginatorConversationID": "29112-1", "ConversationID": "AG_20261122_0001", "ResponseCode": "0",
        "ResponseDescription": "Accept the service request successfully."})
    await drain(worker)
    assert json.loads(wire.sent("POST", "/mpesa/reversal/v1/request")[0].content)["TransactionID"] == "SKL3ABC123"
    # Polling cannot tell (Daraja reports reversals by callback only): waiting costs no attempt...
    await due_now(rt, "refund.poll")
    await drain(worker)
    [poll] = await _jobs(rt, "refund.poll")
    assert (poll.status, poll.attempts) == ("PENDING", 0)
    # ...until a day has passed: then a person must look.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund.id).values(created_at=utcnow() - timedelta(hours=25)))
    await due_now(rt, "refund.poll")
    with caplog.at_level(logging.WARNING, logger="gateway.jobs"):
        await drain(worker)
    [poll] = await _jobs(rt, "refund.poll")
    assert poll.status == "PARKED" and poll.cooperative_id == demo["cooperative_id"]
    assert f"refund {refund.reference} needs manual review" in poll.last_error
    assert "mpesa has not settled it 25 h after" in poll.last_error
    assert any(r.getMessage().startswith("refund still unsettled") for r in caplog.records)
    assert (await _get(rt, Refund, refund.id)).status == "PROCESSING"
    assert len(wire.seen) == 2  # the token and the reversal: polls made no call
    # Where operators look: the jobs API and the ops page.
    admin = await bearer(client, *demo["admin"])
    page = await admin.json("GET", "/v1/jobs?status=PARKED&kind=refund.poll", 200)
    assert [(j["id"], j["lastError"]) for j in page["data"]] == [(poll.id, poll.last_error)]
    async with rt.sessionmaker() as s:
        assert (await dashboard(s, demo["cooperative_id"]))["outbox"]["parked"] == 1


# --- collections: rate limits, our own deadline, a cut-off attempt, an M-Pesa 5xx ------------------


async def test_mtn_rate_limit_retries_the_collection_after_retry_after(rt, demo, worker):
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    wire.on("POST", "/collection/v1_0/requesttopay", lambda _r: httpx.Response(
        429, json={"statusCode": 429, "message": "Rate limit is exceeded. Try again in 120 seconds."},
        headers={"Retry-After": "120"}))
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    before = utcnow()
    await worker.run_once()
    [collect] = await _jobs(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("PENDING", 1) and "HTTP 429" in collect.last_error
    assert collect.run_at >= before + timedelta(seconds=119)
    assert (await _get(rt, Payment, payment.id)).status == "PENDING"
    wire.on("POST", "/collection/v1_0/requesttopay", 202)
    await due_now(rt, "payment.collect")
    await worker.run_once()
    assert (await _get(rt, Payment, payment.id)).status == "PROCESSING"
    sent = wire.sent("POST", "/collection/v1_0/requesttopay")
    assert [r.headers["X-Reference-Id"] for r in sent] == [payment.provider_reference] * 2


async def test_collect_still_waiting_at_its_deadline_is_left_to_the_status_query(rt, demo, worker, monkeypatch):
    # The job's budget is ample, so the token, the reads and the stamp before the push are never what runs out on a
    # slow host (a CI run once spent over 4 s there and the attempt was, rightly, "not sent, sent later"); the push
    # itself then has one second from the moment it starts: its deadline is what passes while it is out.
    deadlines_from_the_call(monkeypatch, send=1.0)
    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())

    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)  # cut off long before, by the push's deadline
        return httpx.Response(200, json={"CheckoutRequestID": "ws_CO_1", "ResponseCode": "0"})

    wire.on("POST", PUSH, slow)
    payment = await mpesa_payment(rt, demo)
    await drain(worker)
    [collect] = await _jobs(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("DONE", 1), collect.last_error
    assert len(wire.sent("POST", PUSH)) == 1
    assert (await _get(rt, Payment, payment.id)).status == "PENDING"


async def test_collect_cut_off_by_the_worker_is_not_sent_again(rt, demo, worker, monkeypatch):
    deadlines_from_the_call(monkeypatch, worker=1.0)  # the worker's cut-off a second into the push
    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())

    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)  # cut off long before, by the worker
        return httpx.Response(200, json={"CheckoutRequestID": "ws_CO_1", "ResponseCode": "0"})

    wire.on("POST", PUSH, slow)
    payment = await mpesa_payment(rt, demo)
    await worker.run_once()
    [collect] = await _jobs(rt, "payment.collect")
    assert collect.status == "PENDING" and collect.last_error.startswith(INTERRUPTED)
    await due_now(rt, "payment.collect")
    await worker.run_once()
    [collect] = await _jobs(rt, "payment.collect")
    assert collect.status == "DONE"
    assert len(wire.sent("POST", PUSH)) == 1  # a second STK push would be a second charge
    assert (await _get(rt, Payment, payment.id)).status == "PENDING"


async def test_a_payment_polls_status_query_has_the_calls_deadline(rt, demo, worker, monkeypatch):
    """M-Pesa takes the push, then its status query hangs. It had no deadline of its own: the worker cut the poll
    off (INTERRUPTED), each try using an attempt (30, then parked) and never reaching the settling grace. It has the
    call's deadline now, as a refund poll's lookup: unanswered by then, it is a failed query, asked again on the
    payment's cadence (its attempt given back) with TIMEOUT's reason."""
    wire = mpesa_wire().on("POST", PUSH, 200, {"CheckoutRequestID": "ws_CO_1", "ResponseCode": "0"})
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await drain(worker)  # the push, answered
    asked: list[str] = []

    async def hangs(_request: httpx.Request) -> httpx.Response:
        asked.append("status")
        await asyncio.sleep(30)
        return httpx.Response(200, json={})

    wire.on("POST", "/mpesa/stkpushquery/v1/query", hangs)
    # The query's deadline half a second into it, inside the worker's cut-off (the poll's reads before it not counted).
    deadlines_from_the_call(monkeypatch, lookup=0.5, worker=CUT)
    await due_now(rt, "payment.poll")
    await worker.run_once()
    [poll] = await _jobs(rt, "payment.poll")
    assert (poll.status, poll.attempts, poll.after_failure) == ("PENDING", 0, True), poll.last_error
    assert poll.last_error == "status query failed: mpesa status: no answer by the call's deadline"
    assert asked == ["status"] and (await _get(rt, Payment, payment.id)).status == "PROCESSING"


def test_job_interrupted_reads_the_previous_attempts_error():
    def job(error: str | None) -> Job:
        return Job(1, "payment.collect", {}, 2, 8, utcnow(), last_error=error)

    assert job(f"{INTERRUPTED}: still running after 55s and cancelled").interrupted
    assert not job("ProviderError: MTN MoMo request to pay failed (HTTP 503)").interrupted
    assert not job(None).interrupted


async def test_mpesa_5xx_on_the_push_is_asked_about_never_resent(rt, demo, worker):
    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    wire.on("POST", PUSH, 503, {"requestId": "1", "errorCode": "500.003.02", "errorMessage": "System is busy"})
    payment = await mpesa_payment(rt, demo)
    await drain(worker)
    [collect] = await _jobs(rt, "payment.collect")
    assert collect.status == "DONE"
    assert (await _get(rt, Payment, payment.id)).status == "PENDING"
    # Status polling takes over; without a CheckoutRequestID it cannot ask Daraja, and never pushes again.
    await due_now(rt, "payment.poll")
    await drain(worker)
    # The push may have reached the phone: past the window the payment stays open (a callback may still
    # come), and is given up only after the settling grace, saying the outcome was never confirmed.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment.id).values(expires_at=utcnow()))
    await due_now(rt, "payment.poll")
    await drain(worker)
    assert (await _get(rt, Payment, payment.id)).status == "PENDING"
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            expires_at=utcnow() - SETTLE_GRACE))
    await due_now(rt, "payment.poll")
    await drain(worker)
    stored = await _get(rt, Payment, payment.id)
    assert (stored.status, stored.failure_reason) == ("TIMEOUT", UNCONFIRMED)
    assert len(wire.sent("POST", PUSH)) == 1


@pytest.mark.parametrize("lease", [60, 10, 5, 3])
def test_collect_budget_stays_inside_the_handler_timeout(lease):
    from core.jobs import collect_call_budget
    from core.outbox import handler_timeout

    assert 0 < collect_call_budget(lease) < handler_timeout(lease) < lease


# --- refunds cut off mid-call -------------------------------------------------------------------------


async def test_refund_cut_off_by_the_worker_is_asked_about_not_sent_again(rt, demo, worker, monkeypatch):
    """Airtel refunds by the payment's id: a second request is refused 'not eligible' although the first
    went through. A submit cut off at the handler timeout waits for the provider's word instead."""
    from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, _told, airtel_collected

    deadlines_from_the_call(monkeypatch, worker=1.0)  # the worker's cut-off a second into the call
    wire, payment = await airtel_collected(rt, demo, "key-airtel-cut")

    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)  # cut off long before, by the worker
        raise AssertionError("cut off before the answer")

    wire.on("POST", AIRTEL_REFUND, slow)
    refund = await _refund(rt, demo, payment)
    await worker.run_once()
    [submit] = await _jobs(rt, "refund.submit")
    assert submit.status == "PENDING" and submit.last_error.startswith(INTERRUPTED)
    wire.on("POST", AIRTEL_REFUND, 200, {
        "data": {"transaction": {"airtel_money_id": "MP210603.1234.A12345", "status": "FAILED"}},
        "status": {"code": "200", "message": "Transaction is not eligible for refund", "result_code": "ESB000011",
                   "success": False}})
    await due_now(rt, "refund.submit")
    await worker.run_once()
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    assert (await _get(rt, Refund, refund.id)).status == "PROCESSING"
    [submit] = await _jobs(rt, "refund.submit")
    [poll] = await _jobs(rt, "refund.poll")
    assert (submit.status, poll.status) == ("DONE", "PENDING")
    async with rt.sessionmaker() as s:
        jobs = list((await s.execute(select(OutboxJob))).scalars())
    assert not _told(jobs, "refund_failed")


async def test_mtn_refund_cut_off_is_settled_by_its_status(rt, demo, worker, monkeypatch):
    """MTN can be asked: the cut-off refund is not sent again, its status query completes it."""
    deadlines_from_the_call(monkeypatch, worker=1.0)  # the worker's cut-off a second into the call
    wire, _payment, refund = await _mtn_refund(rt, demo)

    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)  # cut off long before, by the worker
        return httpx.Response(202)

    wire.on("POST", "/disbursement/v1_0/refund", slow)
    wire.on("GET", "/disbursement/v1_0/refund/*", 200, {
        "amount": "50000", "currency": "RWF", "financialTransactionId": "RF-9", "externalId":
        refund.provider_reference, "status": "SUCCESSFUL"})
    await worker.run_once()
    await due_now(rt, "refund.submit")
    await worker.run_once()
    await due_now(rt, "refund.poll")
    await drain(worker)
    assert len(wire.sent("POST", "/disbursement/v1_0/refund")) == 1
    stored = await _get(rt, Refund, refund.id)
    assert (stored.status, stored.provider_transaction_id) == ("COMPLETED", "RF-9")


# --- the payment sweep --------------------------------------------------------------------------------


@pytest.mark.parametrize("poll_status", ["PENDING", "RUNNING"])
async def test_sweep_leaves_a_payment_whose_poll_is_only_overdue(rt, demo, poll_status):
    """After an outage every open payment is far behind its next poll, but its poll job is still there:
    a second one would keep a second chain of status queries alive until the payment closes."""
    from core.jobs import sweep_open_payments

    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        past = utcnow() - timedelta(minutes=15)
        await s.execute(update(Payment).values(next_poll_at=past))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll").values(
            status=poll_status, run_at=past))
    assert await sweep_open_payments(rt) == 0
    assert [j.dedupe_key for j in await _jobs(rt, "payment.poll")] == [f"poll:{payment.id}"]
    async with rt.sessionmaker.begin() as s:  # once that job is parked, the sweep takes over
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll").values(status="PARKED"))
    assert await sweep_open_payments(rt) == 1
    polls = await _jobs(rt, "payment.poll")
    assert [j.status for j in polls] == ["PARKED", "PENDING"] and ":sweep:" in polls[1].dedupe_key


async def test_a_failing_sweep_does_not_end_the_chain(rt, worker, monkeypatch):
    """The next sweep is queued before the work: a run that fails on every attempt (parked) still leaves
    the next one."""
    from core import jobs as core_jobs

    async def broken(_rt):
        raise RuntimeError("sweep query timed out")

    monkeypatch.setattr(core_jobs, "sweep_open_payments", broken)
    now = utcnow()
    async with rt.sessionmaker.begin() as s:
        await core_jobs.schedule_sweep(s, now=now - core_jobs.SWEEP_EVERY)  # this slot's sweep, due
    slot = int(now.timestamp() // core_jobs.SWEEP_EVERY.total_seconds())
    for _ in range(3):  # its attempts, each failing
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"payments.sweep:{slot}",
                                                    OutboxJob.status == "PENDING").values(run_at=utcnow()))
        await worker.run_once()
    sweeps = await _jobs(rt, "payments.sweep")
    assert [(j.status, j.dedupe_key) for j in sweeps] == [
        ("PARKED", f"payments.sweep:{slot}"), ("PENDING", f"payments.sweep:{slot + 1}")]


# --- Latency series -----------------------------------------------------------------------------------


def _count(histogram: Any, provider: str, operation: str) -> float:
    return next((s.value for s in histogram.collect()[0].samples if s.name.endswith("_count")
                 and s.labels == {"provider": provider, "operation": operation}), 0.0)


async def test_a_refunds_http_call_and_its_whole_operation_are_timed_in_their_own_series(rt, demo, worker):
    """One MTN refund, one POST: gateway_provider_call_seconds{refund} counts that one call, and
    gateway_provider_operation_seconds{refund} the job's one operation (both were one series, counted twice)."""
    from core.metrics import PROVIDER_CALLS, PROVIDER_OPERATIONS

    wire, _payment, refund = await _mtn_refund(rt, demo)
    wire.on("POST", "/disbursement/v1_0/refund", 202)
    calls, operations = _count(PROVIDER_CALLS, "mtn_momo", "refund"), _count(PROVIDER_OPERATIONS, "mtn_momo", "refund")
    await drain(worker)
    assert len(wire.sent("POST", "/disbursement/v1_0/refund")) == 1
    assert _count(PROVIDER_CALLS, "mtn_momo", "refund") == calls + 1
    assert _count(PROVIDER_OPERATIONS, "mtn_momo", "refund") == operations + 1
    assert (await _get(rt, Refund, refund.id)).status == "PROCESSING"


# --- A member suspended before the collect ran ---------------------------------------------------------


async def test_a_member_suspended_after_the_payment_was_made_is_not_prompted(rt, demo, worker):
    """The member was suspended (DELETE /v1/members/{id}) between the payment's making (her USSD hop read her as
    ACTIVE) and its collect job: no PIN prompt is sent; the payment ends CANCELLED saying nothing was taken."""
    from core import jobs
    from core.members import update_member
    from core.models import Member

    wire = mtn_wire().on("POST", "/collection/v1_0/requesttopay", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    async with rt.sessionmaker.begin() as s:
        await update_member(s, await s.get(Member, payment.member_id), actor=ADMIN, status="SUSPENDED")
    await drain(worker)
    assert wire.sent("POST", "/collection/v1_0/requesttopay") == []
    stored = await _get(rt, Payment, payment.id)
    assert (stored.status, stored.failure_reason) == ("CANCELLED", jobs.MEMBER_NOT_ACTIVE)
    assert [j.status for j in await _jobs(rt, "payment.collect")] == ["DONE"]


async def test_a_payment_whose_cooperative_was_suspended_after_it_was_made_is_not_collected(rt, demo, worker):
    """The cooperative was suspended (PATCH /v1/cooperatives/{id}) between the payment's making and its collect job:
    it takes no payments (README), so no PIN prompt is sent; the payment ends CANCELLED saying nothing was taken."""
    from core import jobs
    from core.cooperatives import get_cooperative, update_cooperative

    wire = mtn_wire().on("POST", "/collection/v1_0/requesttopay", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    async with rt.sessionmaker.begin() as s:
        await update_cooperative(s, await get_cooperative(s, payment.cooperative_id), actor=ADMIN,
                                 changes={"status": "SUSPENDED"})
    await drain(worker)
    assert wire.sent("POST", "/collection/v1_0/requesttopay") == []
    stored = await _get(rt, Payment, payment.id)
    assert (stored.status, stored.failure_reason) == ("CANCELLED", jobs.COOPERATIVE_NOT_ACTIVE)
    assert [j.status for j in await _jobs(rt, "payment.collect")] == ["DONE"]


async def test_a_member_suspended_after_a_push_that_may_have_arrived_is_left_to_the_poll(rt, demo, worker,
                                                                                         monkeypatch):
    """The collect's first push was cut off mid-call (the PIN prompt may be on her phone), or answered 5xx (MTN
    may have stored it); then she is suspended. The retry sends nothing more, and does not end the payment
    "nothing was taken": the status poll asks MTN, which has her approval, and the payment completes."""
    from core.members import update_member
    from core.models import Member
    from core.outbox import INTERRUPTED

    deadlines_from_the_call(monkeypatch, worker=1.0)  # the worker's cut-off a second into the call
    rtp = "/collection/v1_0/requesttopay"
    for first_answer in ("cut off", "5xx"):
        wire = mtn_wire()
        mtn_adapter(rt, wire)

        async def slow(_request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(30)  # cut off long before, by the worker
            return httpx.Response(202)

        if first_answer == "cut off":
            wire.on("POST", rtp, slow)
        else:
            wire.on("POST", rtp, 500, {})
        async with rt.sessionmaker.begin() as s:
            payment, _ = await create_payment(s, rt, mtn_payment(demo, key=f"key-suspended-{first_answer}"),
                                              actor=ADMIN)
        await worker.run_once()
        async with rt.sessionmaker() as s:
            collect = (await s.execute(select(OutboxJob).where(
                OutboxJob.kind == "payment.collect", OutboxJob.payload["payment_id"].as_string() == payment.id)
            )).scalar_one()
        assert collect.status == "PENDING"
        assert first_answer == "5xx" or collect.last_error.startswith(INTERRUPTED)
        async with rt.sessionmaker.begin() as s:
            member = await s.get(Member, payment.member_id)
            await update_member(s, member, actor=ADMIN, status="SUSPENDED")
        await due_now(rt, "payment.collect")
        await worker.run_once()
        assert len(wire.sent("POST", rtp)) == 1  # nothing sent again
        assert ((await _get(rt, Payment, payment.id)).status, first_answer) == ("PENDING", first_answer)
        wire.on("GET", rtp + "/*", 200, {"status": "SUCCESSFUL", "amount": "50000", "currency": "RWF",
                                         "financialTransactionId": "MTN-TAKEN-1", "externalId": payment.reference})
        await due_now(rt, "payment.poll")
        await drain(worker)
        assert ((await _get(rt, Payment, payment.id)).status, first_answer) == ("COMPLETED", first_answer)
        async with rt.sessionmaker.begin() as s:
            await update_member(s, await s.get(Member, payment.member_id), actor=ADMIN, status="ACTIVE")
