"""Sessions no aggregator ends (Nalo sends no end-of-session notice; a lost AT notification) are closed by the
worker's periodic sweep, once, whatever the number of workers; a late hop of one still gets a valid screen."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import event, func, select, update

from channels.ussd import jobs as ussd_jobs
from channels.ussd import records
from core.db import utcnow
from core.models import OutboxJob, Payment, UssdSession
from tests.channels.ussd.test_hubtel_nalo_flows import FR_AIRTEL, nalo
from tests.conftest import drain


async def _age(rt: Any, session_id: str, minutes: int) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(UssdSession).where(UssdSession.session_id == session_id)
                        .values(started_at=utcnow() - timedelta(minutes=minutes)))


async def _row(db: Any, session_id: str) -> Any:
    return await db.one(UssdSession, UssdSession.session_id == session_id)


async def test_a_nalo_session_the_caller_left_is_closed_by_the_worker(client: Any, demo: Any, db: Any, rt: Any,
                                                                     worker: Any) -> None:
    """Nalo never says a session ended: left on the menu, its row said OPEN for ever (every list and count of
    sessions). The worker's sweep records it ended, as Hubtel's Timeout is (Incomplete)."""
    await nalo(client, "nalo-left", "*384*123#", True)
    await nalo(client, "nalo-left", "1", False)
    await nalo(client, "nalo-recent", "*384*123#", True)  # still within a session's life: left alone
    await _age(rt, "nalo-left", 11)
    assert (await _row(db, "nalo-left")).status == "OPEN"

    async with rt.sessionmaker.begin() as s:  # this slot's sweep, due
        await ussd_jobs.schedule_sweep(s, now=utcnow() - ussd_jobs.SWEEP_EVERY)
    await drain(worker)

    left = await _row(db, "nalo-left")
    assert (left.status, left.error) == ("Incomplete", records.TIMED_OUT) and left.ended_at is not None
    assert (await _row(db, "nalo-recent")).status == "OPEN"
    # The next sweep is queued: the chain goes on.
    assert await db.count(OutboxJob, OutboxJob.kind == ussd_jobs.SWEEP_JOB, OutboxJob.status == "PENDING") == 1


async def test_a_worker_starting_queues_the_sweep_once(rt: Any, db: Any) -> None:
    from app import schedule_periodic

    await schedule_periodic(rt)
    await schedule_periodic(rt)  # a second worker starting
    sweeps = await db.all(OutboxJob, OutboxJob.kind == ussd_jobs.SWEEP_JOB)
    assert len(sweeps) == 1 and sweeps[0].payload == {"all": True}  # the first reads every session
    assert await db.count(OutboxJob, OutboxJob.kind == "payments.sweep") == 1


async def test_a_sweep_reads_its_window_and_the_days_first_reads_everything(client: Any, demo: Any, db: Any,
                                                                             rt: Any) -> None:
    await nalo(client, "nalo-old", "*384*123#", True)
    await _age(rt, "nalo-old", 3 * 24 * 60)  # left while no worker ran
    assert await records.close_abandoned(rt, since=utcnow() - ussd_jobs.SWEEP_WINDOW) == 0
    assert await records.close_abandoned(rt) == 1


async def test_the_sweep_closes_each_session_once_with_two_workers(client: Any, demo: Any, db: Any,
                                                                   rt: Any) -> None:
    for n in range(7):
        await nalo(client, f"nalo-{n}", "*384*123#", True)
    ended = (await db.one(UssdSession, UssdSession.session_id == "nalo-6"))
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(UssdSession).where(UssdSession.id == ended.id)
                        .values(status="Success", ended_at=utcnow()))
        await s.execute(update(UssdSession).values(started_at=utcnow() - timedelta(hours=2)))
    counts = await asyncio.gather(records.close_abandoned(rt, batch=2), records.close_abandoned(rt, batch=2))
    assert sum(counts) == 6
    assert await records.close_abandoned(rt) == 0  # nothing left: idempotent
    async with rt.sessionmaker() as s:
        statuses = dict((await s.execute(select(UssdSession.status, func.count()).group_by(UssdSession.status))).all())
    assert statuses == {"Incomplete": 6, "Success": 1}  # an aggregator's own end is not touched


async def test_a_late_hop_of_a_swept_session_still_answers_and_its_end_is_recorded(client: Any, demo: Any,
                                                                                   db: Any, rt: Any) -> None:
    """The sweep guessed wrong (the session's state was still in Redis): the caller goes on, pays, and the row
    says how it really ended (Success, with its payment), not the sweep's Incomplete."""
    await nalo(client, "nalo-late", "*384*123#", True)
    await _age(rt, "nalo-late", 11)
    assert await records.close_abandoned(rt) == 1
    types = await nalo(client, "nalo-late", "1", False)
    assert types["MSGTYPE"] is True and "Monthly Rent" in types["MSG"]
    await nalo(client, "nalo-late", "2", False)
    done = await nalo(client, "nalo-late", "1", False)
    assert done["MSGTYPE"] is False and "PAY_" in done["MSG"]
    row = await _row(db, "nalo-late")
    payment = await db.one(Payment)
    assert (row.status, row.error, row.payment_id, row.last_screen) == ("Success", None, payment.id, "pay_done")


async def test_a_late_hop_after_the_state_expired_opens_the_menu_on_a_fresh_row(client: Any, demo: Any, db: Any,
                                                                                rt: Any) -> None:
    await nalo(client, "nalo-gone", "*384*123#", True)
    await _age(rt, "nalo-gone", 11)
    assert await records.close_abandoned(rt) == 1
    await rt.redis.flushdb()  # its state expired
    again = await nalo(client, "nalo-gone", "1", False, FR_AIRTEL)
    assert again["MSGTYPE"] is True and again["MSG"].startswith("Bienvenue")
    row = await _row(db, "nalo-gone")
    assert (row.status, row.ended_at, row.error) == ("OPEN", None, None)
    assert row.started_at > utcnow() - timedelta(minutes=1)


async def test_an_africas_talking_notice_after_the_sweep_replaces_its_guess(client: Any, demo: Any, db: Any,
                                                                            rt: Any) -> None:
    resp = await client.post("/ussd/africastalking", data={
        "sessionId": "ATUid_late", "serviceCode": "*384*123#", "phoneNumber": "+250788000002", "networkCode": "63510",
        "text": ""})
    assert resp.status == 200 and (await resp.text()).startswith("CON ")
    await _age(rt, "ATUid_late", 11)
    assert await records.close_abandoned(rt) == 1
    resp = await client.post("/ussd/africastalking/events", data={
        "date": "2026-01-15 10:00:00", "sessionId": "ATUid_late", "serviceCode": "*384*123#", "networkCode": "63510",
        "phoneNumber": "+250788000002", "status": "Success", "cost": "KES 0.05", "durationInMillis": "20000",
        "hopsCount": "3", "input": "1", "lastAppResponse": "END Bye", "errorMessage": ""})
    assert resp.status == 200
    row = await _row(db, "ATUid_late")
    assert (row.status, row.error, row.hops) == ("Success", None, 3)


async def test_each_batch_of_a_sweep_reads_on_from_where_the_one_before_ended(client: Any, demo: Any, db: Any,
                                                                               rt: Any) -> None:
    """The backlog the first sweep meets (every Nalo session left OPEN before it existed, 90 days of them) was closed
    in batches that each walked the started_at index from the oldest row again, past every row the batches before
    had closed: on 2 million rows, a third of them OPEN, a batch half-way read a million rows (0.5 to 0.8 s), the
    whole sweep minutes, past its job's time, parked after three tries. Each batch now reads from the latest start
    the one before closed."""
    for n in range(5):
        await nalo(client, f"nalo-{n}", "*384*123#", True)
        await _age(rt, f"nalo-{n}", 60 - n)  # nalo-0 the oldest
    started = {row.session_id: row.started_at for row in await db.all(UssdSession)}
    reads: list[Any] = []

    def read(_conn: Any, statement: Any, _multi: Any, params: Any, _options: Any) -> None:
        if statement in (records._abandoned_statement(True), records._abandoned_statement(False)):
            reads.append(params.get("since"))

    event.listen(rt.engine.sync_engine, "before_execute", read)
    try:
        assert await records.close_abandoned(rt, batch=2) == 5
    finally:
        event.remove(rt.engine.sync_engine, "before_execute", read)
    assert reads == [None, started["nalo-1"], started["nalo-3"]]
    assert await db.count(UssdSession, UssdSession.status == "OPEN") == 0


async def test_a_batch_closes_no_more_rows_than_its_size(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """PostgreSQL planned the batch's `id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` as the inner side of a
    semi join, run again for each row the UPDATE read, each time past the rows the statement had just closed (its
    own, skipped): one batch closed every OPEN row, the whole backlog in one transaction, reading it once a row."""
    for n in range(5):
        await nalo(client, f"nalo-{n}", "*384*123#", True)
        await _age(rt, f"nalo-{n}", 120)
    async with rt.sessionmaker.begin() as s:
        closed = (await s.execute(records._abandoned_statement(False), {
            "before": utcnow() - records.ABANDONED_AFTER, "batch": 2, "v_ended_at": utcnow()})).all()
    assert len(closed) == 2
    assert await db.count(UssdSession, UssdSession.status == "OPEN") == 3
