"""After PostgreSQL is restored to a point before a receipt was sent, its job (pending then) runs again and its
row is gone: the message is not sent a second time (the drill saw three receipts doubled). Africa's Talking's
answer is kept under the message's answer key at every send it may have; the job finds it, stores the row again as
SENT with that answer, and sends nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import delete, update

from channels.sms.jobs import ANSWER_SECONDS, message_keys
from core.db import utcnow
from core.models import OutboxJob, SmsMessage
from tests.channels.sms.test_send_faults import ALINE, queue_receipt, slow_simulator, the_job, the_row
from tests.conftest import drain


async def _restored_to_before_the_send(rt: Any) -> None:
    """What the restore leaves: no message row, its job PENDING and never tried, as the backup had them."""
    async with rt.sessionmaker.begin() as session:
        await session.execute(delete(SmsMessage))
        await session.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(
            status="PENDING", attempts=0, last_error=None, run_at=utcnow(), done_at=None))


async def test_a_receipt_sent_before_the_restore_is_not_sent_again(
        rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    await queue_receipt(rt, demo)
    await drain(worker)
    [copy] = sim.messages(ALINE)
    first = await the_row(rt)
    assert (first.status, first.provider_message_id) == ("SENT", copy["id"])
    _lock, kept = message_keys("receipt-1")
    assert 0 < await rt.redis.ttl(kept) <= ANSWER_SECONDS  # kept after the send, not only when its write failed

    await _restored_to_before_the_send(rt)
    await drain(worker)

    assert len(sim.requests) == 1 and sim.messages(ALINE) == [copy]  # no second SMS
    again = await the_row(rt)
    assert again.id != first.id  # stored anew, from the answer kept at the send
    assert (again.status, again.provider_message_id, again.provider_status, again.cost, again.sent_at) == (
        "SENT", copy["id"], "Success", copy["cost"], first.sent_at)
    assert (again.body, again.phone_masked, again.template, again.idempotency_key) == (
        first.body, first.phone_masked, first.template, "receipt-1")
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("DONE", 1)


async def test_an_unconfirmed_send_before_the_restore_is_not_sent_again(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """AT's answer was lost (it queued the message): recorded Unconfirmed; after the restore, Unconfirmed again."""
    sim, slow = await slow_simulator(rt, aiohttp_server, delay=1.0, wait=0.3)
    await queue_receipt(rt, demo)
    await drain(worker)
    slow["delay"] = 0
    assert (await the_row(rt)).provider_status == "Unconfirmed"
    await asyncio.sleep(1.0)  # AT's late answer went out: the simulator holds the one message
    assert len(sim.messages(ALINE)) == 1

    await _restored_to_before_the_send(rt)
    await drain(worker)

    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert row.failure_reason == "unconfirmed, not resent: ReadTimeout after the send"
    assert (await the_job(rt)).status == "DONE"
