"""Refund outcomes that meet: two recorded on one payment at the same moment each count (the second read a stale
refunded total and the payment lost the first one's amount), callbacks on one payment's refunds at once are all
applied (they deadlocked, and one was answered 500), and an admin cannot record FAILED for a refund whose status
the gateway is still asking the provider for (the poll then dropped it without asking, and the provider's
payment of it went unseen while its amount went back a second time)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

import core.refunds
from core.db import utcnow
from core.errors import Conflict
from core.jobs import REFUND_POLL_LIMIT
from core.models import OutboxJob, Payment, ProviderEvent, Refund
from core.money import Money
from core.payments import create_payment
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from core.refunds import record_refund_outcome, request_refund
from tests.conftest import drain, requires_pg, waiting_for_locks
from tests.providers.wires import ADMIN, completed, due_now, mtn_adapter, mtn_payment, mtn_wire

STATUS_PATH = "/disbursement/v1_0/refund/{}"


async def _paid(rt: Any, demo: dict[str, Any]) -> Payment:
    """A completed 50,000 RWF MTN payment."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    return payment


async def _refund(rt: Any, payment: Payment, amount: int | None = None, *, sent: bool = True) -> Refund:
    """A refund of `amount` (default: all that is left); `sent`: its submission done and no answer known
    (PROCESSING, no live poll: what a person records the outcome of)."""
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(
            s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
            amount=None if amount is None else Money(amount, "RWF"), reason="paid twice",
            idempotency_key=f"refund-{uuid.uuid4().hex}", actor=ADMIN)
        if sent:
            await s.execute(update(Refund).where(Refund.id == refund.id).values(status="PROCESSING"))
            await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund.id}")
                            .values(status="DONE"))
    return refund


async def _record(rt: Any, refund: Refund, succeeded: bool, txn: str | None = None) -> Refund:
    async with rt.sessionmaker.begin() as s:
        return await record_refund_outcome(
            s, rt, refund_id=refund.id, cooperative_id=refund.cooperative_id, succeeded=succeeded,
            note="as the statement shows", actor=ADMIN, provider_transaction_id=txn)


def _provider_says(refund: Refund, outcome: ProviderOutcome, txn: str | None = None) -> Event:
    return Event(provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex,
                 reference=refund.provider_reference, outcome=outcome, provider_transaction_id=txn,
                 reason=None if outcome is ProviderOutcome.SUCCEEDED else "COULD_NOT_PERFORM_TRANSACTION")


async def _while_the_payment_is_held(rt: Any, payment: Payment, *calls: Any) -> list[Any]:
    """Run `calls` one after another into a wait on the payment's row lock (held by another transaction, as any
    refund or callback of it holds it a moment), then let them all go at once: their results, or exceptions."""
    async with rt.engine.connect() as holder:
        await holder.begin()
        await holder.execute(select(Payment.id).where(Payment.id == payment.id).with_for_update())
        tasks = []
        for call in calls:
            tasks.append(asyncio.create_task(call()))
            await waiting_for_locks(rt, len(tasks))
        await holder.rollback()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def _rows(rt: Any, payment: Payment) -> tuple[Payment, list[Refund]]:
    async with rt.sessionmaker() as s:
        refunds = (await s.execute(select(Refund).where(Refund.payment_id == payment.id)
                                   .order_by(Refund.created_at))).scalars().all()
        return await s.get(Payment, payment.id), list(refunds)


@requires_pg
async def test_two_outcomes_recorded_at_once_count_both_amounts(rt: Any, demo: dict[str, Any]) -> None:
    payment = await _paid(rt, demo)
    first, second, third = [await _refund(rt, payment, amount) for amount in (10_000, 15_000, 25_000)]
    await _record(rt, first, True, "ST-1")
    # Both with the statement's id (which reads the payment before the lock), as a bank payment's all are.
    results = await _while_the_payment_is_held(rt, payment, lambda: _record(rt, second, True, "ST-2"),
                                               lambda: _record(rt, third, True, "ST-3"))
    assert [r.status for r in results] == ["COMPLETED", "COMPLETED"]
    paid, refunds = await _rows(rt, payment)
    assert [(r.amount_minor, r.status) for r in refunds] == [(10_000, "COMPLETED"), (15_000, "COMPLETED"),
                                                             (25_000, "COMPLETED")]
    assert (paid.status, paid.refunded_minor, paid.mismatch) == ("REFUNDED", 50_000, False)


@requires_pg
async def test_an_outcome_recorded_while_a_callback_completes_another_refund_counts_both(
        rt: Any, demo: dict[str, Any]) -> None:
    payment = await _paid(rt, demo)
    first, by_provider, by_admin = [await _refund(rt, payment, amount) for amount in (10_000, 15_000, 25_000)]
    await _record(rt, first, True, "ST-1")
    # The provider's callback takes the payment's lock first; the admin's outcome had read the payment before.
    results = await _while_the_payment_is_held(
        rt, payment, lambda: handle_provider_event(rt, _provider_says(by_provider, ProviderOutcome.SUCCEEDED, "RF-2")),
        lambda: _record(rt, by_admin, True, "ST-3"))
    assert results[0] == "completed" and results[1].status == "COMPLETED", results
    paid, _ = await _rows(rt, payment)
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)


@requires_pg
async def test_callbacks_on_one_payments_refunds_at_once_are_all_applied(rt: Any, demo: dict[str, Any]) -> None:
    """A refund that failed goes through after all while another, asked for since, is answered too: the first
    looks for refunds not yet sent to withdraw while the second holds its refund and waits for the payment.
    That was a deadlock: one callback rolled back and answered 500."""
    payment = await _paid(rt, demo)
    failed = await _refund(rt, payment)
    assert await handle_provider_event(rt, _provider_says(failed, ProviderOutcome.FAILED)) == "failed"
    again = await _refund(rt, payment, sent=False)  # PENDING: its submission queued
    results = await _while_the_payment_is_held(
        rt, payment, lambda: handle_provider_event(rt, _provider_says(failed, ProviderOutcome.SUCCEEDED, "RF-1")),
        lambda: handle_provider_event(rt, _provider_says(again, ProviderOutcome.SUCCEEDED, "RF-2")))
    assert results == ["completed", "completed"]
    paid, refunds = await _rows(rt, payment)
    assert [r.status for r in refunds] == ["COMPLETED", "COMPLETED"]
    # Both went back: the member has twice what was collected, and the payment says so for a person.
    assert (paid.refunded_minor, paid.mismatch) == (100_000, True)
    assert "50,000 RWF more than collected has gone back to the payer" in paid.mismatch_detail


async def test_a_refund_callback_rolled_back_in_a_deadlock_is_applied_again(rt: Any, demo: dict[str, Any],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    payment = await _paid(rt, demo)
    refund = await _refund(rt, payment)
    apply = core.refunds.apply_refund_outcome
    calls = []

    class Deadlock(Exception):
        sqlstate = "40P01"

    async def deadlocked_once(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise DBAPIError("SELECT ... FOR UPDATE", {}, Deadlock("deadlock detected"))
        return await apply(*args, **kwargs)

    monkeypatch.setattr(core.refunds, "apply_refund_outcome", deadlocked_once)
    assert await handle_provider_event(rt, _provider_says(refund, ProviderOutcome.SUCCEEDED, "RF-1")) == "completed"
    assert len(calls) == 2
    paid, [done] = await _rows(rt, payment)
    assert (done.status, paid.status, paid.refunded_minor) == ("COMPLETED", "REFUNDED", 50_000)
    async with rt.sessionmaker() as s:  # the rolled-back attempt stored nothing: one event row
        assert len((await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund"))).all()) == 1


async def _polled_refund(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Any, Payment, Refund]:
    """A full refund MTN accepted (202) and has not settled: PROCESSING, its status poll live."""
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    mtn_adapter(rt, wire)
    payment = await _paid(rt, demo)
    refund = await _refund(rt, payment, sent=False)
    await drain(worker)
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund.id)).status == "PROCESSING"
        assert (await s.execute(select(OutboxJob.status).where(OutboxJob.kind == "refund.poll"))
                ).scalars().all() == ["PENDING"]
    return wire, payment, refund


async def test_failed_is_refused_for_a_refund_whose_status_is_still_asked_for(rt: Any, demo: dict[str, Any],
                                                                             worker: Any) -> None:
    wire, payment, refund = await _polled_refund(rt, demo, worker)
    with pytest.raises(Conflict) as refused:
        await _record(rt, refund, False)
    assert refused.value.message.startswith("refund is still being settled with the provider")
    # The amount stays held: nothing more can be refunded while MTN may still pay this one out.
    async with rt.sessionmaker.begin() as s:
        with pytest.raises(Exception, match=r"^nothing is left to refund; refunds not settled yet hold 50,000 RWF"):
            await request_refund(s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id, amount=None,
                                 reason="again", idempotency_key="refund-key-again", actor=ADMIN)
    # MTN pays it out; the poll asks, and the refund completes.
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200, {
        "amount": "50000", "currency": "RWF", "externalId": refund.provider_reference, "status": "SUCCESSFUL",
        "financialTransactionId": "RF-1"})
    await due_now(rt, "refund.poll")
    await drain(worker)
    assert [r.url.path for r in wire.sent("GET", "/disbursement/v1_0/refund/*")] == \
        [STATUS_PATH.format(refund.provider_reference)]
    paid, [done] = await _rows(rt, payment)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", "RF-1")
    assert (paid.status, paid.refunded_minor, paid.mismatch) == ("REFUNDED", 50_000, False)


async def test_completed_from_the_statement_is_taken_while_the_status_is_still_asked_for(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    _wire, payment, refund = await _polled_refund(rt, demo, worker)
    assert (await _record(rt, refund, True, "ST-1")).status == "COMPLETED"
    paid, _ = await _rows(rt, payment)
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)


async def test_failed_is_recorded_once_the_poll_is_parked_for_manual_review(rt: Any, demo: dict[str, Any],
                                                                           worker: Any) -> None:
    wire, payment, refund = await _polled_refund(rt, demo, worker)
    # A day on, MTN still says PENDING: the poll parks it for a person.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund.id)
                        .values(created_at=utcnow() - REFUND_POLL_LIMIT - timedelta(minutes=1)))
    wire.on("GET", STATUS_PATH.format(refund.provider_reference), 200, {
        "amount": "50000", "currency": "RWF", "externalId": refund.provider_reference, "status": "PENDING"})
    await due_now(rt, "refund.poll")
    await drain(worker)
    async with rt.sessionmaker() as s:
        [poll] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "refund.poll"))).scalars().all()
    assert poll.status == "PARKED"
    failed = await _record(rt, refund, False)
    assert (failed.status, failed.failure_reason) == ("FAILED", "recorded by an admin: as the statement shows")
    async with rt.sessionmaker() as s:
        poll = await s.get(OutboxJob, poll.id)
    assert poll.status == "DONE"  # settled: no longer read as work for a person
    paid, _ = await _rows(rt, payment)
    assert (paid.status, paid.refunded_minor) == ("COMPLETED", 0)
