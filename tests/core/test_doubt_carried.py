"""Once a try of a money-moving job may have reached its provider unanswered (its worker lost after the call's stamp,
the try cut off), every later try asks before it sends, whatever the tries in between met: one that failed before
asking (PostgreSQL gone under its first read, its write of the outcome refused, a RetryLater, a schema of another
release) hands the doubt on as it found it. Before, such a try wrote its own error over the doubt (as CALL_SENT,
which a 5xx the provider deduplicates leaves: sent again as it was), and the try after it sent the request a second
time: a second STK push (M-Pesa has no idempotency key), a second Airtel refund (it names only the payment)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import ProgrammingError

import core.jobs as core_jobs
from app import create_worker
from core.db import utcnow
from core.errors import Conflict
from core.models import OutboxJob, Payment
from core.outbox import CALL_SENT, INTERRUPTED, OutboxWorker, RetryLater, call_starting, enqueue
from core.refunds import cancel_refund
from tests.core.test_lost_before_call import ACCEPTED, PUSH, DatabaseGone
from tests.core.test_worker_crash import _hang, _lose_worker_mid_call
from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, _ask_refund, _rows, airtel_collected
from tests.providers.wires import ADMIN, MPESA_BASE, due_now, mpesa_adapter, mpesa_payment, mpesa_wire


async def _job(rt: Any, kind: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalar_one()


def _fails(monkeypatch: pytest.MonkeyPatch, name: str, times: int) -> list[Exception]:
    """core.jobs' `name` raises DatabaseGone its next `times` calls, then works; the failures left."""
    real = getattr(core_jobs, name)
    failures: list[Exception] = [DatabaseGone("connection was closed in the middle of operation")] * times

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(core_jobs, name, flaky)
    return failures


@pytest.mark.parametrize("failed_tries", [1, 2])
async def test_an_stk_push_lost_after_its_stamp_is_not_pushed_again_after_a_failed_try(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, failed_tries: int) -> None:
    """The push left, the worker died; the next try(s) failed at their first read (PostgreSQL restarting), before
    they could ask. The try after them must still ask: M-Pesa would prompt the payer, and charge, a second time."""
    wire = mpesa_wire().on("POST", PUSH, _hang)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await _lose_worker_mid_call(rt, lambda: wire.sent("POST", PUSH), "payment.collect")
    wire.on("POST", PUSH, 200, ACCEPTED)
    left = _fails(monkeypatch, "payment_and_now", failed_tries)
    worker = create_worker(rt)
    for _ in range(failed_tries):
        await due_now(rt, "payment.collect")
        await worker.run_once()
        collect = await _job(rt, "payment.collect")
        assert collect.status == "PENDING" and "DatabaseGone" in collect.last_error
    assert not left
    await due_now(rt, "payment.collect")
    [again] = [j for j in await worker.claim() if j.kind == "payment.collect"]
    assert again.call_may_have_arrived, again.last_error  # what the next try decides by
    await worker.run_job(again)
    assert len(wire.sent("POST", PUSH)) == 1  # pushed once, by the lost try
    collect = await _job(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("DONE", 2 + failed_tries)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # left to the status poll


async def test_an_airtel_refund_lost_after_its_stamp_is_not_sent_again_after_a_failed_try(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Airtel took the refund, the worker died before its answer; the next try asked (PROCESSING, to be settled by
    its poll) but its write was lost to PostgreSQL going away. The try after it must not send the refund again
    (Airtel refunds name only the payment: a second request is a second refund, or a "not eligible" read as FAILED),
    and meanwhile the refund cannot be withdrawn."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-doubt")
    wire.on("POST", AIRTEL_REFUND, _hang)
    refund = await _ask_refund(rt, demo, payment, key="refund-doubt-1")
    await _lose_worker_mid_call(rt, lambda: wire.sent("POST", AIRTEL_REFUND), "refund.submit")
    wire.on("POST", AIRTEL_REFUND, 200, {
        "data": {"transaction": {"airtel_money_id": "MP210603.1234.A12345", "status": "FAILED"}},
        "status": {"code": "200", "message": "Transaction is not eligible for refund", "result_code": "ESB000011",
                   "success": False}})
    left = _fails(monkeypatch, "transition", 1)
    worker = create_worker(rt)
    await worker.run_once()  # asks: PENDING -> PROCESSING, which fails
    assert not left
    submit = await _job(rt, "refund.submit")
    assert submit.status == "PENDING" and "DatabaseGone" in submit.last_error
    async with rt.sessionmaker.begin() as s:
        with pytest.raises(Conflict, match="may already have reached the provider"):
            await cancel_refund(s, rt, refund_id=refund.id, cooperative_id=demo["cooperative_id"], note="by mistake",
                                actor=ADMIN)
    await due_now(rt, "refund.submit")
    await worker.run_once()
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, _, jobs = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING" and stored.failure_reason is None
    assert (await _job(rt, "refund.submit")).status == "DONE"
    assert [j.kind for j in jobs if j.kind == "refund.poll"] == ["refund.poll"]  # its poll settles it


async def _stamped_and_lost(sm: Any) -> OutboxWorker:
    """A `payment.collect` job whose try stamped its call and whose worker was then lost (the lease lapsed)."""
    async with sm.begin() as session:
        await enqueue(session, "payment.collect", {})
    lost = OutboxWorker(sm, {}, worker_id="lost")
    [job] = await lost.claim()
    await call_starting(sm, job)
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow()))
    return lost


async def _next_claim(sm: Any, worker: OutboxWorker | None = None) -> Any:
    """The job, due now, claimed by `worker` (which runs it next)."""
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.status == "PENDING").values(run_at=utcnow()))
    [job] = await (worker or OutboxWorker(sm, {}, worker_id="next")).claim()
    return job


async def _later(_job: Any) -> None:
    raise RetryLater(30, "provider busy, asked again later")


async def _read_fails(_job: Any) -> None:
    raise DatabaseGone("connection refused")


async def _old_schema(_job: Any) -> None:
    raise ProgrammingError("select", {}, asyncpg.exceptions.UndefinedColumnError("column does not exist"))


@pytest.mark.parametrize("meets", [_later, _read_fails, _old_schema], ids=["retry_later", "failure", "schema"])
async def test_a_try_that_met_something_else_before_asking_hands_the_doubt_on(sm: Any, meets: Any) -> None:
    """Whatever ends a try before it asks, the doubt outlives it, over any number of such tries; the job stays
    one whose refund could not be withdrawn (core.refunds._untried_or_refused reads INTERRUPTED and CALL_SENT)."""
    await _stamped_and_lost(sm)
    worker = OutboxWorker(sm, {"payment.collect": meets}, worker_id="between")
    for _ in range(3):
        job = await _next_claim(sm, worker)
        assert job.call_may_have_arrived, job.last_error
        await worker.run_job(job)
        async with sm() as session:
            row = (await session.execute(select(OutboxJob))).scalar_one()
        assert row.status == "PENDING", row.last_error
        assert row.last_error.startswith((INTERRUPTED, CALL_SENT)), row.last_error
    assert (await _next_claim(sm)).call_may_have_arrived


async def test_a_5xx_the_provider_deduplicates_is_still_sent_again(sm: Any) -> None:
    """The carried doubt is not CALL_SENT's: a try answered 5xx by a provider that deduplicates by our reference
    (a retryable ProviderError) is sent again as it was, under its reference, and so are the tries after it."""
    from core.ports import ProviderError

    async def stamped_5xx(job: Any) -> None:
        await call_starting(sm, job)
        raise ProviderError("MTN MoMo refund failed on the provider's side (HTTP 504)", retryable=True,
                            code="HTTP_504")

    async with sm.begin() as session:
        await enqueue(session, "refund.submit", {})
    await OutboxWorker(sm, {"refund.submit": stamped_5xx}, worker_id="first").run_once()
    second = OutboxWorker(sm, {"refund.submit": _read_fails}, worker_id="second")
    job = await _next_claim(sm, second)
    assert job.last_error.startswith(CALL_SENT) and not job.call_may_have_arrived
    await second.run_job(job)
    job = await _next_claim(sm)
    assert job.last_error.startswith(CALL_SENT) and not job.call_may_have_arrived


async def test_the_lost_workers_stamp_is_what_the_doubt_is_carried_from(sm: Any) -> None:
    """A worker lost before its stamp never called: a try after it that fails carries no doubt (the payer of an
    M-Pesa push that was never sent must still be prompted)."""
    async with sm.begin() as session:
        await enqueue(session, "payment.collect", {})
    await OutboxWorker(sm, {}, worker_id="lost").claim()
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow()))
    between = OutboxWorker(sm, {"payment.collect": _read_fails}, worker_id="between")
    job = await _next_claim(sm, between)
    assert job.lost_before_call and not job.call_may_have_arrived
    await between.run_job(job)
    job = await _next_claim(sm)
    assert not job.call_may_have_arrived and not job.last_error.startswith((INTERRUPTED, CALL_SENT))
