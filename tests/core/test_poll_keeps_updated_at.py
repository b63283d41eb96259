"""An open payment's polls change nothing a reader sees, so they leave `updated_at` alone: an `updatedFrom` sync
listed an open payment again at every poll (up to a day of polls for one whose outcome the provider cannot tell)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from core.db import utcnow
from core.jobs import sweep_open_payments
from core.models import OutboxJob, Payment
from tests.conftest import drain
from tests.core.test_pending_past_window import _mtn_processing, _payment, _window_over


async def test_a_poll_that_asks_again_keeps_the_payments_updated_at(rt, demo, worker):
    _, payment = await _mtn_processing(rt, demo, worker)
    await _window_over(rt, payment.id)
    before = await _payment(rt, payment.id)
    await drain(worker)  # still PENDING at MTN inside the grace: the poll is scheduled again (schedule_poll)
    after = await _payment(rt, payment.id)
    assert after.status == "PROCESSING"
    assert after.next_poll_at > before.next_poll_at
    assert after.updated_at == before.updated_at


async def test_the_sweep_of_a_stalled_poll_keeps_the_payments_updated_at(rt, demo, worker):
    _, payment = await _mtn_processing(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:
        # Its poll job parked hours ago: the sweep queues another and moves next_poll_at.
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll").values(status="PARKED"))
        await s.execute(update(Payment).where(Payment.id == payment.id)
                        .values(next_poll_at=utcnow() - timedelta(hours=2)))
    before = await _payment(rt, payment.id)
    assert await sweep_open_payments(rt) == 1
    after = await _payment(rt, payment.id)
    assert after.next_poll_at > before.next_poll_at
    assert after.updated_at == before.updated_at
