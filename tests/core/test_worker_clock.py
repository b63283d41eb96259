"""README (scale-out): the workers' clocks need not agree. A payment's approval window, its next poll and the
stuck-payment sweep are measured by PostgreSQL's clock, as leases are: a worker whose clock runs minutes fast
does not end a payment the payer is approving "not approved in time" (MTN calls back once: were that
callback lost, the payer would be charged and told "not approved", for good)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

import core.jobs as core_jobs
import core.outbox as outbox
from core.db import utcnow
from core.jobs import sweep_open_payments
from core.models import OutboxJob, Payment
from core.payments import create_payment
from tests.conftest import drain, requires_pg
from tests.providers.wires import ADMIN, due_now, mtn_adapter, mtn_payment, mtn_wire

REQUEST_TO_PAY = "/collection/v1_0/requesttopay"
SKEW = timedelta(minutes=6)


def _skewed(monkeypatch: pytest.MonkeyPatch, skew: timedelta) -> None:
    """This worker's clock runs `skew` off (the database's and the test's do not)."""
    for module in (core_jobs, outbox):
        monkeypatch.setattr(module, "utcnow", lambda: utcnow() + skew)


async def _payment(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


@requires_pg
async def test_a_fast_worker_clock_does_not_time_out_a_payment_being_approved(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    wire = mtn_wire().on("POST", REQUEST_TO_PAY, 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await worker.run_once()  # the collect: MTN prompts the payer (window: PAYMENT_TIMEOUT_SECONDS)
    ref = payment.provider_reference
    # The payer is reading the prompt; MTN's one callback will be lost.
    wire.on("GET", f"{REQUEST_TO_PAY}/{ref}", 200, {"status": "PENDING", "amount": "50000", "currency": "RWF"})
    _skewed(monkeypatch, SKEW)
    await due_now(rt, "payment.poll")
    asked = utcnow()  # the test's clock, before the poll runs (a loaded machine can take seconds over it)
    await drain(worker)
    held = await _payment(rt, payment.id)
    assert (held.status, held.failure_reason) == ("PROCESSING", None)  # not "not approved in time"
    # The next poll is set by the database's clock, inside the window (not 6 minutes on, past it).
    assert asked < held.next_poll_at <= utcnow() + timedelta(seconds=16)
    async with rt.sessionmaker() as s:
        poll = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.poll"))).scalar_one()
    assert poll.status == "PENDING" and abs((poll.run_at - held.next_poll_at).total_seconds()) < 2
    # The payer approves; MTN's status says so at the next poll.
    wire.on("GET", f"{REQUEST_TO_PAY}/{ref}", 200, {"status": "SUCCESSFUL", "amount": "50000", "currency": "RWF",
                                                    "financialTransactionId": "MTN-CLOCK-1"})
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.late, done.provider_transaction_id) == ("COMPLETED", False, "MTN-CLOCK-1")
    assert len(wire.sent("POST", REQUEST_TO_PAY)) == 1 and len(wire.sent("GET", f"{REQUEST_TO_PAY}/*")) == 2


@requires_pg
async def test_a_slow_worker_clock_still_finds_stalled_polls(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep compares next_poll_at (set by the database's clock) with the database's clock: a worker
    whose clock runs 6 minutes slow still re-queues a payment whose poll was parked 11 minutes ago."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll").values(status="PARKED"))
        await s.execute(update(Payment).where(Payment.id == payment.id)
                        .values(next_poll_at=utcnow() - timedelta(minutes=11)))
    _skewed(monkeypatch, -SKEW)
    swept = utcnow()  # the test's clock, before the sweep (a loaded machine can take seconds over it)
    assert await sweep_open_payments(rt) == 1
    async with rt.sessionmaker() as s:
        polls = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.poll",
                                                         OutboxJob.status == "PENDING"))).scalars().all()
    assert len(polls) == 1 and ":sweep:" in polls[0].dedupe_key
    next_poll_at = (await _payment(rt, payment.id)).next_poll_at
    assert swept - timedelta(seconds=5) < next_poll_at < utcnow() + timedelta(seconds=5)  # now, by the database
