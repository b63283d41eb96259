"""After PostgreSQL is restored to a point before a receipt was sent, its job (pending then) runs again and its
row is gone: the message is not sent a second time (the drill saw three receipts doubled). Africa's Talking's
answer is kept under the message's answer key at every send it may have; the job finds it, stores the row again as
SENT with that answer, and sends nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from channels.sms.jobs import ANSWER_SECONDS, message_keys
from core.db import utcnow
from core.models import Member, OutboxJob, Payment, SmsMessage
from core.notify import send_sms
from core.phone import Phone
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import make_payment
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


STRANGER = "+250788123222"  # a number no member had when it paid


@pytest.mark.parametrize("since", ["payment_voided", "number_went_to_a_member"])
async def test_a_receipt_sent_before_the_restore_is_stored_again_when_it_would_not_go_out_now(
        rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any, since: str) -> None:
    """After the restore (before the job's turn) the receipt became one that must not go out: its payment voided,
    or the number that paid a payment of no member given to a member (NEW_SIM). It went out before the restore all
    the same: stored again as SENT with AT's answer, as any other, the job done; not "not sent", nor retried until
    parked for a row it cannot build."""
    if since == "payment_voided":
        await queue_receipt(rt, demo)
        to, key = ALINE, "receipt-1"
    else:
        paid = await make_payment(rt, demo["cooperative_id"], account=STRANGER,
                                  created_at=datetime.now(UTC) - timedelta(minutes=5))
        async with rt.sessionmaker.begin() as session:
            await send_sms(session, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                           context={"payment_id": paid.id}, cipher=rt.cipher, phone=Phone(STRANGER),
                           dedupe="receipt-2")
        to, key = STRANGER, "receipt-2"
    await drain(worker)
    [copy] = sim.messages(to)
    first = await the_row(rt)
    assert (first.status, first.provider_message_id) == ("SENT", copy["id"])

    await _restored_to_before_the_send(rt)
    if since == "payment_voided":
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(Payment).values(status="VOIDED"))
    else:
        admin = await bearer(client, *demo["admin"])
        await admin.json("PATCH", f"/v1/members/{demo['members'][ALINE]}", 200,
                         json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    await drain(worker)

    assert len(sim.requests) == 1 and sim.messages(to) == [copy]  # no second SMS
    again = await the_row(rt)
    assert (again.status, again.provider_message_id, again.sent_at, again.failure_reason) == (
        "SENT", copy["id"], first.sent_at, None)
    assert (again.body, again.phone_masked, again.idempotency_key) == (first.body, first.phone_masked, key)
    job = await the_job(rt)
    assert (job.status, job.attempts, job.last_error) == ("DONE", 1, None)


async def _reminder(rt: Any, demo: dict[str, Any]) -> tuple[str, str]:
    member_id = demo["members"][ALINE]
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="payment_reminder", cooperative_id=demo["cooperative_id"],
                       context={"member_id": member_id, "payment_type_id": demo["payment_types"]["Monthly Rent"],
                                "due_date": "2026-02-01"}, cipher=rt.cipher, member_id=member_id, dedupe="reminder-1")
    return ALINE, "reminder-1"


async def _welcome(rt: Any, demo: dict[str, Any]) -> tuple[str, str]:
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="member_approved", cooperative_id=demo["cooperative_id"], context={},
                       cipher=rt.cipher,
                       member_id=demo["members"][ALINE], dedupe="welcome-1")
    return ALINE, "welcome-1"


async def _dispute_to_the_payer(rt: Any, demo: dict[str, Any], admin: Any) -> tuple[str, str]:
    paid = await make_payment(rt, demo["cooperative_id"], account=STRANGER,
                              created_at=datetime.now(UTC) - timedelta(days=1))
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "OTHER"})
    return STRANGER, f"dispute_opened:{dispute['id']}:opened"


@pytest.mark.parametrize("since", ["reminder_opted_out", "member_suspended", "number_went_to_a_member",
                                   "older_than_answer_days"])
async def test_an_sms_sent_before_the_restore_is_stored_again_when_its_send_checks_would_stop_it_now(
        rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any, since: str) -> None:
    """After the restore (before the job's turn) the message became one its send-time checks stop before anything
    else: a reminder whose member sent STOP (core.reminders.why_not_send), a welcome whose member was suspended, a
    dispute's SMS to the number that paid a payment of no member given to a member since (NEW_SIM) or whose payment
    turned older than SMS_PAYER_ANSWER_DAYS. It went out before the restore all the same: found by the answer kept at
    the send, stored again as SENT with AT's answer, the job done; not left with no row ("not sent") at all. A
    reminder so stored counts as sent (not SKIPPED): the next morning's scan does not queue its due date again."""
    admin = await bearer(client, *demo["admin"])
    if since == "reminder_opted_out":
        to, key = await _reminder(rt, demo)
    elif since == "member_suspended":
        to, key = await _welcome(rt, demo)
    else:
        to, key = await _dispute_to_the_payer(rt, demo, admin)
    await drain(worker)
    [copy] = sim.messages(to)
    first = await the_row(rt)
    assert (first.status, first.provider_message_id, first.idempotency_key) == ("SENT", copy["id"], key)

    await _restored_to_before_the_send(rt)
    async with rt.sessionmaker.begin() as session:
        if since == "reminder_opted_out":
            await session.execute(update(Member).values(reminders_opt_out=True))
        elif since == "member_suspended":
            await session.execute(update(Member).where(Member.id == demo["members"][ALINE]).values(status="SUSPENDED"))
        elif since == "older_than_answer_days":
            await session.execute(update(Payment).values(created_at=utcnow() - timedelta(days=91)))
    if since == "number_went_to_a_member":
        await admin.json("PATCH", f"/v1/members/{demo['members'][ALINE]}", 200,
                         json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    await drain(worker)

    assert len(sim.requests) == 1 and sim.messages(to) == [copy]  # no second SMS
    again = await the_row(rt)
    assert (again.status, again.provider_message_id, again.provider_status, again.sent_at, again.failure_reason) == (
        "SENT", copy["id"], "Success", first.sent_at, None)
    assert (again.body, again.phone_masked, again.idempotency_key) == (first.body, first.phone_masked, key)
    job = await the_job(rt)
    assert (job.status, job.attempts, job.last_error) == ("DONE", 1, None)


async def test_a_first_attempt_stopped_by_its_checks_with_no_answer_kept_is_not_sent_and_stores_nothing(
        rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    """The usual case of the same path: no answer kept (never sent). Nothing is sent or stored, as before."""
    await _reminder(rt, demo)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Member).values(reminders_opt_out=True))
    await drain(worker)
    assert sim.requests == []
    async with rt.sessionmaker() as session:
        assert (await session.execute(select(SmsMessage))).scalars().all() == []
    assert (await the_job(rt)).status == "DONE"
