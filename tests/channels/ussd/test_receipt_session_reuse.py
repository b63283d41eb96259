"""A receipt by SMS asked for over USSD under a session id the aggregator uses again (Hubtel, Nalo), run through the
worker to the SMS simulator: what the member's phone receives.

The receipt was keyed by the session id alone, and a previous session's receipt told apart only while its outbox
job was still there. `prune` deletes DONE jobs after RETENTION_OUTBOX_DONE_DAYS (30): next month's receipt was
queued again under last month's key, the SMS job found that key's sms_messages row (kept for good) SENT and sent
nothing, while the member was told "will arrive by SMS". It is keyed by when the session opened (its row's
started_at) now; one session still sends one receipt, whatever its hops went through.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.models import OutboxJob, Payment, SmsMessage, UssdSession
from core.retention import RetentionPolicy, prune
from tests.channels.sms.helpers import start_simulator
from tests.channels.ussd.test_hubtel_nalo_certification import hubtel_pay, hubtel_receipt, next_month
from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN, HubtelPhone
from tests.conftest import drain

INBOX = "+" + EN_MTN


async def _month_old_jobs_pruned(rt: Any, db: Any) -> None:
    """The nightly prune, its default policy, a month later: last month's DONE outbox jobs are gone."""
    month = timedelta(days=31)
    async with rt.sessionmaker.begin() as s:
        for job in (await s.execute(select(OutboxJob))).scalars():
            job.run_at -= month
            job.updated_at -= month
            if job.done_at is not None:
                job.done_at -= month
    await prune(rt.engine, RetentionPolicy())
    assert await db.count(OutboxJob, OutboxJob.kind == "sms.send") == 0


# A session id as Hubtel's look, and one of 110 characters (parse takes up to 128): the receipt's key is cut to
# what an SMS's idempotency key holds (160) with its session tag kept whole (cut off, next month's receipt met
# last month's SENT row again).
@pytest.mark.parametrize("session", ["receipt-0001", "r" * 110])
async def test_a_receipt_asked_for_again_after_last_months_job_was_pruned_is_sent(
        client: Any, demo: Any, db: Any, rt: Any, worker: Any, aiohttp_server: Any, session: str) -> None:
    _server, sim = await start_simulator(aiohttp_server, rt)
    await hubtel_pay(client, "pay-0001")
    sent = await hubtel_receipt(client, session)
    assert sent["Type"] == "Release" and "will arrive by SMS" in sent["Message"]
    await drain(worker)
    [last_month] = sim.messages(INBOX)
    assert last_month["message"].startswith("Payment PAY_")
    await next_month(rt)
    await _month_old_jobs_pruned(rt, db)

    again = await hubtel_receipt(client, session)
    assert again["Message"] == sent["Message"]  # she is told it will arrive by SMS: it does
    await drain(worker)
    assert [m["message"] for m in sim.messages(INBOX)] == [last_month["message"]] * 2
    rows = await db.all(SmsMessage)
    assert len(rows) == 2 and {row.status for row in rows} == {"SENT"}
    payment = await db.one(Payment)
    opened = (await db.one(UssdSession, UssdSession.session_id == session)).started_at
    tag = f"@{round(opened.timestamp() * 1000)}"
    own = f"ussd-receipt:{payment.id}:{session}"
    assert f"{own[:160 - len(tag)]}{tag}" in {row.idempotency_key for row in rows}  # this session's own key

    await rt.redis.flushdb()  # this session asks again (its state lost): still one SMS for it
    await hubtel_receipt(client, session)
    await drain(worker)
    assert len(sim.messages(INBOX)) == 2


async def test_one_session_sends_one_receipt(client: Any, demo: Any, db: Any, rt: Any, worker: Any,
                                             aiohttp_server: Any) -> None:
    """A retried hop, two copies of it at once, and a hop replayed after Redis lost the session: one SMS."""
    _server, sim = await start_simulator(aiohttp_server, rt)
    await hubtel_pay(client, "pay-0002")
    phone = HubtelPhone(client, EN_MTN, "receipt-0002")
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "2")
    detail = await phone.post("Response", "1")
    key = next(line.split(".")[0] for line in detail["Message"].split("\n") if "by SMS" in line)
    both = await asyncio.gather(phone.post("Response", key, sequence=4), phone.post("Response", key, sequence=4))
    assert all("will arrive by SMS" in done["Message"] for done in both), both
    assert "will arrive by SMS" in (await phone.post("Response", key, sequence=4))["Message"]  # retried
    await rt.redis.flushdb()  # lost mid-way: Hubtel's next hops open the session again, same row
    replayed = HubtelPhone(client, EN_MTN, "receipt-0002")
    await replayed.post("Response", "1")
    await replayed.post("Response", "2")
    await replayed.post("Response", "1")
    assert "will arrive by SMS" in (await replayed.post("Response", key))["Message"]
    await drain(worker)
    assert len(sim.messages(INBOX)) == 1
    assert await db.count(SmsMessage) == 1
