"""The payment sweep settling parked jobs of ended payments (settle_parked_of_ended_payments) while an admin discards
(or replays) parked jobs in bulk: the bulk request locks its jobs one by one in id order and holds them to its end;
the sweep's UPDATE locked every matching job in whatever order its scan met them (run_at's index, or the heap, where
a job written since comes later). Two such jobs met in opposite orders deadlocked: PostgreSQL rolled one back (the
admin's request answered 503, "send it again"; or the sweep, which a later sweep made up for). The sweep now
takes the jobs in id order and skips one a person holds (settled by a later sweep, if still parked): it never waits
for one."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core.db import utcnow
from core.jobs import PARKED_SETTLED, settle_parked_of_ended_payments
from core.models import OutboxJob, Payment
from core.outbox import lock_parked, mark_discarded
from core.payments import create_payment
from tests.conftest import is_postgres, waiting_for_locks
from tests.providers.wires import ADMIN, mtn_payment

pytestmark = pytest.mark.skipif(not is_postgres(), reason="row locks: PostgreSQL")


async def _collect(rt: Any, payment_id: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "payment.collect", OutboxJob.payload["payment_id"].as_string() == payment_id))
        ).scalar_one()


async def test_a_bulk_discard_and_the_sweep_settling_the_same_parked_jobs_do_not_deadlock(rt, demo):
    async with rt.sessionmaker.begin() as s:
        first, _ = await create_payment(s, rt, mtn_payment(demo, "key-crossed-1"), actor=ADMIN)
        second, _ = await create_payment(s, rt, mtn_payment(demo, "key-crossed-2"), actor=ADMIN)
        await s.execute(update(Payment).where(Payment.id.in_((first.id, second.id)))
                        .values(status="FAILED", failure_reason="the request never reached the provider"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(
            status="PARKED", last_error="ProviderError: mtn_momo request_to_pay: cannot connect"))
    one, two = (await _collect(rt, first.id)).id, (await _collect(rt, second.id)).id
    assert one < two
    async with rt.sessionmaker.begin() as s:  # the lower id's job and payment written last, due later: met last
        await s.execute(update(OutboxJob).where(OutboxJob.id == one).values(run_at=utcnow() + timedelta(hours=1)))
        await s.execute(update(Payment).where(Payment.id == first.id).values(failure_reason="never reached it"))

    async with rt.sessionmaker.begin() as discarding:  # POST /v1/jobs/discard, id order, each held to its end
        held = await lock_parked(discarding, one)
        assert held is not None
        sweeping = asyncio.create_task(settle_parked_of_ended_payments(rt))
        # The sweep has met the second job first: ended, the first skipped (or, before, holding the second and waiting
        # for the first). Not a fixed 0.3 s, within which a loaded host's sweep had not yet started: the discard then
        # locked the second job itself, and the test failed with nothing wrong.
        await waiting_for_locks(rt, 1, done=sweeping)
        second_held = await lock_parked(discarding, two)  # (before: a deadlock, one of the two rolled back)
        mark_discarded(held, "the outage is over; the payment failed")
    assert await asyncio.wait_for(sweeping, 10) == 1  # (before: "deadlock detected", the sweep rolled back)
    assert second_held is None  # settled by the sweep meanwhile: no longer PARKED
    assert ((await _collect(rt, first.id)).status, (await _collect(rt, second.id)).last_error) == (
        "DISCARDED", PARKED_SETTLED)
