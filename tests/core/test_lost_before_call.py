"""A worker lost before its provider call (PostgreSQL went away under the handler's first read, the process
killed while the job waited) never sent anything: the next attempt sends it, as a first attempt would. The
collect and refund handlers stamp the job just before the call (core.outbox.call_starting); only a job lost
after its stamp, or one nobody can tell about, is treated as a call that may have arrived (asked, not resent).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

import core.jobs as core_jobs
from app import create_worker
from core.db import utcnow
from core.models import OutboxJob, Payment
from core.outbox import CALL_STARTED, INTERRUPTED, UNSTAMPED, WORKER_LOST, OutboxWorker, enqueue
from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, _ask_refund, _rows, airtel_collected
from tests.providers.wires import MPESA_BASE, mpesa_adapter, mpesa_payment, mpesa_wire

PUSH = "/mpesa/stkpush/v1/processrequest"
ACCEPTED = {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": "ws_CO_1", "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing"}


class DatabaseGone(ConnectionError):
    """What the worker's reads and writes raise while PostgreSQL is down."""


async def _job(rt: Any, kind: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalar_one()


async def _lease_lapses(rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:  # OUTBOX_LEASE_SECONDS later
        await s.execute(update(OutboxJob).where(OutboxJob.status == "RUNNING").values(run_at=utcnow()))


async def _lost_at_first_read(rt: Any, kind: str) -> None:
    """PostgreSQL crashes while a worker holds the `kind` job: its handler fails at its first read, before
    any provider call, and recording that fails too (the job stays RUNNING); then its lease lapses."""
    lost = create_worker(rt)
    [job] = [j for j in await lost.claim() if j.kind == kind]

    async def first_read_fails(_job: Any) -> None:
        raise DatabaseGone("connection was closed in the middle of operation")

    async def cannot_record(*_args: Any, **_kwargs: Any) -> None:
        raise DatabaseGone("connection refused")

    lost._handlers[kind] = first_read_fails
    lost._finish = cannot_record  # type: ignore[method-assign]
    with pytest.raises(DatabaseGone):
        await lost.run_job(job)
    assert (await _job(rt, kind)).status == "RUNNING"
    await _lease_lapses(rt)


async def test_an_stk_push_held_when_postgres_crashed_is_sent_once_it_is_back(rt: Any, demo: dict[str, Any]) -> None:
    """The reviewer's IremboPay/M-Pesa case: no CheckoutRequestID, so the status cannot be asked; taken for
    a call that may have arrived, the payer would never be prompted and the payment end TIMEOUT."""
    wire = mpesa_wire().on("POST", PUSH, 200, ACCEPTED)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await _lost_at_first_read(rt, "payment.collect")
    await create_worker(rt).run_once()  # another worker (or the same, restarted), after the lease
    assert len(wire.sent("POST", PUSH)) == 1  # sent now, and once
    collect = await _job(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("DONE", 2)
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", "ws_CO_1")


async def test_a_refund_held_when_postgres_crashed_is_sent_once_it_is_back(rt: Any, demo: dict[str, Any]) -> None:
    wire, payment = await airtel_collected(rt, demo, "key-airtel-before-call")
    wire.on("POST", AIRTEL_REFUND, 200, {
        "data": {"transaction": {"airtel_money_id": "RF-1", "status": "SUCCESS"}},
        "status": {"code": "200", "message": "SUCCESS", "result_code": "ESB000010", "success": True}})
    refund = await _ask_refund(rt, demo, payment, key="refund-before-call-1")
    await _lost_at_first_read(rt, "refund.submit")
    await create_worker(rt).run_once()
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1  # not parked unsent for a person
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "COMPLETED"


async def test_a_worker_lost_after_its_stamp_is_still_asked_about(rt: Any, demo: dict[str, Any]) -> None:
    """The stamp is on the job while the call is out; a worker lost then leaves a call that may have
    arrived: no second push (M-Pesa has no idempotency key)."""
    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    lost = create_worker(rt)
    [job] = [j for j in await lost.claim() if j.kind == "payment.collect"]
    assert (await _job(rt, "payment.collect")).last_error == UNSTAMPED
    seen: list[str | None] = []

    async def hang(_request: httpx.Request) -> httpx.Response:
        seen.append((await _job(rt, "payment.collect")).last_error)  # what the job says while the call is out
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    wire.on("POST", PUSH, hang)
    task = asyncio.create_task(lost.run_job(job))
    for _ in range(300):
        if seen:
            break
        await asyncio.sleep(0.01)
    task.cancel()  # SIGKILL: nothing more is written
    await asyncio.gather(task, return_exceptions=True)
    assert seen == [CALL_STARTED]
    await _lease_lapses(rt)
    wire.on("POST", PUSH, 200, ACCEPTED)
    [again] = [j for j in await create_worker(rt).claim() if j.kind == "payment.collect"]
    assert again.last_error == WORKER_LOST and not again.lost_before_call and again.call_may_have_arrived
    await create_worker(rt).run_job(again)
    assert len(wire.sent("POST", PUSH)) == 1
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # left to the status poll


async def test_a_push_accepted_but_not_recorded_is_not_pushed_again(rt: Any, demo: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Daraja accepted the push, then the database went away before PROCESSING was written (and came back for
    the worker's own record): the attempt is recorded interrupted, and the next one asks instead of pushing."""
    wire = mpesa_wire().on("POST", PUSH, 200, ACCEPTED)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    real = core_jobs.transition
    failures = [DatabaseGone("connection was closed in the middle of operation")]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(core_jobs, "transition", flaky)
    worker = create_worker(rt)
    await worker.run_once()
    collect = await _job(rt, "payment.collect")
    assert collect.status == "PENDING" and collect.last_error.startswith(INTERRUPTED)
    assert "after its provider call started" in collect.last_error
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id == collect.id).values(run_at=utcnow()))
    await worker.run_once()
    assert len(wire.sent("POST", PUSH)) == 1
    assert (await _job(rt, "payment.collect")).status == "DONE"
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # the status poll settles it


async def test_a_worker_whose_lease_was_taken_does_not_call(rt: Any, demo: dict[str, Any]) -> None:
    """A worker that starts a job after its lease lapsed (and another worker took the job) does not send: its
    stamp finds the job no longer its own. The other worker sends it, once."""
    wire = mpesa_wire().on("POST", PUSH, 200, ACCEPTED)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    await mpesa_payment(rt, demo)
    slow = create_worker(rt)
    [late] = [j for j in await slow.claim() if j.kind == "payment.collect"]
    await _lease_lapses(rt)
    rescuer = create_worker(rt)
    [taken] = [j for j in await rescuer.claim() if j.kind == "payment.collect"]
    assert taken.lost_before_call and not taken.call_may_have_arrived
    await slow.run_job(late)
    assert not wire.sent("POST", PUSH)
    await rescuer.run_job(taken)
    assert len(wire.sent("POST", PUSH)) == 1
    assert (await _job(rt, "payment.collect")).status == "DONE"


async def test_only_a_lost_first_attempt_claimed_by_this_version_counts_as_never_called(sm: Any) -> None:
    """Doubt counts as arrived: a job lost on a retry (its last_error another failure), or lost by a worker
    that never wrote UNSTAMPED (an older release, during an upgrade), is still interrupted for every handler."""
    async with sm.begin() as session:
        for n in ("fresh", "retry", "older"):
            await enqueue(session, "k", {"n": n})
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.payload["n"].as_string() == "retry")
                              .values(last_error="ProviderError: HTTP 503"))
    first = OutboxWorker(sm, {}, worker_id="first")
    claimed = {j.payload["n"]: j for j in await first.claim()}
    assert [claimed[n].last_error for n in ("fresh", "retry", "older")] == [None, "ProviderError: HTTP 503", None]
    async with sm.begin() as session:  # the older release's claim left last_error as it was; all leases lapse
        await session.execute(update(OutboxJob).where(OutboxJob.payload["n"].as_string() == "older")
                              .values(last_error=None))
        await session.execute(update(OutboxJob).values(run_at=utcnow()))
    again = {j.payload["n"]: j for j in await OutboxWorker(sm, {}, worker_id="second").claim()}
    assert all(j.last_error == WORKER_LOST and j.interrupted for j in again.values())
    assert [again[n].lost_before_call for n in ("fresh", "retry", "older")] == [True, False, False]
    assert [again[n].call_may_have_arrived for n in ("fresh", "retry", "older")] == [False, True, True]
