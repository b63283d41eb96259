"""Sessions no aggregator ends (Nalo sends no end-of-session notice; a lost AT notification) are closed by the
worker's periodic sweep, once, whatever the number of workers; a late hop of one still gets a valid screen."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, update

from channels.ussd import jobs as ussd_jobs
from channels.ussd import records
from core.db import new_id, utcnow
from core.models import OutboxJob, Payment, UssdSession
from core.outbox import Job, RetryLater
from core.phone import normalize
from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN, FR_AIRTEL, HubtelPhone, nalo
from tests.conftest import behind_a_lock, drain, requires_pg


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


def _sessions_counted(aggregator: str) -> dict[str, float]:
    """gateway_ussd_sessions_total of `aggregator`, by outcome (the process's real counter)."""
    from core.metrics import REGISTRY

    return {outcome: REGISTRY.get_sample_value("gateway_ussd_sessions_total",
                                               {"aggregator": aggregator, "outcome": outcome}) or 0.0
            for outcome in ("timed_out", "payment", "completed", "abandoned", "incomplete", "failed", "resumed")}


def _added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {outcome: after[outcome] - before[outcome] for outcome in after if after[outcome] != before[outcome]}


async def test_a_swept_session_that_ends_after_all_is_counted_once(client: Any, demo: Any, db: Any,
                                                                   rt: Any) -> None:
    """The sweep counted it timed_out; its late END (a payment) replaces the row's guess but counts no second
    outcome: a counter cannot take the timed_out back, so the session stays counted once, as the sweep did. A
    session the sweep never touched is still counted by its END."""
    await nalo(client, "nalo-late", "*384*123#", True)
    await _age(rt, "nalo-late", 11)
    before = _sessions_counted("nalo")
    assert await records.close_abandoned(rt) == 1
    assert _added(before, _sessions_counted("nalo")) == {"timed_out": 1}
    await nalo(client, "nalo-late", "1", False)
    await nalo(client, "nalo-late", "2", False)
    done = await nalo(client, "nalo-late", "1", False)
    assert done["MSGTYPE"] is False and "PAY_" in done["MSG"]
    assert (await _row(db, "nalo-late")).status == "Success"  # the row says how it really ended
    assert _added(before, _sessions_counted("nalo")) == {"timed_out": 1}
    # Not swept: its END counts it.
    await nalo(client, "nalo-paid", "*384*123#", True, EN_MTN)
    await nalo(client, "nalo-paid", "1", False, EN_MTN)
    await nalo(client, "nalo-paid", "2", False, EN_MTN)
    await nalo(client, "nalo-paid", "1", False, EN_MTN)
    assert _added(before, _sessions_counted("nalo")) == {"timed_out": 1, "payment": 1}


async def test_a_swept_session_the_aggregator_then_reports_left_is_counted_once(client: Any, demo: Any, db: Any,
                                                                                rt: Any) -> None:
    """Hubtel's Timeout, and Africa's Talking's notice, after the sweep: the row takes their word, the counter
    keeps the sweep's timed_out alone."""
    phone = HubtelPhone(client, EN_MTN, "hubtel-late")
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "1")
    await _age(rt, "hubtel-late", 11)
    resp = await client.post("/ussd/africastalking", data={
        "sessionId": "ATUid_left", "serviceCode": "*384*123#", "phoneNumber": "+250788000002",
        "networkCode": "63510", "text": ""})
    assert resp.status == 200
    await _age(rt, "ATUid_left", 11)
    hubtel, at = _sessions_counted("hubtel"), _sessions_counted("africastalking")
    assert await records.close_abandoned(rt) == 2
    assert (await phone.post("Timeout", ""))["Type"] == "Release"
    resp = await client.post("/ussd/africastalking/events", data={
        "date": "2026-01-15 10:00:00", "sessionId": "ATUid_left", "serviceCode": "*384*123#", "networkCode": "63510",
        "phoneNumber": "+250788000002", "status": "Incomplete", "cost": "KES 0.05", "durationInMillis": "20000",
        "hopsCount": "1", "input": "", "lastAppResponse": "CON Welcome", "errorMessage": "user left"})
    assert resp.status == 200
    left, notified = await _row(db, "hubtel-late"), await _row(db, "ATUid_left")
    assert (left.status, left.error, left.last_screen) == ("Incomplete", None, "pay_type")
    assert (notified.status, notified.error) == ("Incomplete", "user left")
    assert _added(hubtel, _sessions_counted("hubtel")) == {"timed_out": 1}
    assert _added(at, _sessions_counted("africastalking")) == {"timed_out": 1}
    # A notice of a session the sweep never closed still counts it.
    resp = await client.post("/ussd/africastalking/events", data={
        "date": "2026-01-15 10:00:00", "sessionId": "ATUid_other", "serviceCode": "*384*123#",
        "networkCode": "63510", "phoneNumber": "+250788000002", "status": "Failed", "cost": "", "durationInMillis": "",
        "hopsCount": "", "input": "", "lastAppResponse": "", "errorMessage": ""})
    assert resp.status == 200
    assert _added(at, _sessions_counted("africastalking")) == {"timed_out": 1, "failed": 1}


async def _left_open(rt: Any, count: int) -> None:
    """`count` Nalo sessions left OPEN an hour ago (a backlog), started a minute apart."""
    async with rt.sessionmaker.begin() as s:
        for n in range(count):
            await s.execute(insert(UssdSession).values(
                id=new_id(), aggregator="nalo", session_id=f"nalo-backlog-{n}", phone_index="ix", phone_masked="x",
                service_code="*384*123#", status="OPEN", hops=1, started_at=utcnow() - timedelta(minutes=60 + n)))


async def test_one_sweep_run_closes_a_backlog_of_several_batches(db: Any, rt: Any, worker: Any,
                                                                 monkeypatch: Any) -> None:
    monkeypatch.setattr(ussd_jobs, "SWEEP_BATCH", 2)
    await _left_open(rt, 5)
    async with rt.sessionmaker.begin() as s:  # this slot's sweep, due
        await ussd_jobs.schedule_sweep(s, now=utcnow() - ussd_jobs.SWEEP_EVERY)
    await drain(worker)
    assert await db.count(UssdSession, UssdSession.status == "OPEN") == 0
    [ran] = await db.all(OutboxJob, OutboxJob.kind == ussd_jobs.SWEEP_JOB, OutboxJob.status == "DONE")
    assert ran.attempts == 1


async def test_a_sweep_out_of_time_stops_between_batches_and_runs_again_for_the_rest(db: Any, rt: Any,
                                                                                      monkeypatch: Any) -> None:
    """A backlog the handler's time does not cover: it stops between two batches (the worker's timeout would cut
    one mid-way, each attempt used up, and park the sweep after three) and is run again at once, its attempt given
    back, until none is left."""
    monkeypatch.setattr(ussd_jobs, "SWEEP_BATCH", 2)
    monkeypatch.setattr(ussd_jobs, "SWEEP_MARGIN", 3600.0)  # no time at all: one batch a run
    await _left_open(rt, 5)
    sweep = ussd_jobs.job_handlers(rt)[ussd_jobs.SWEEP_JOB]
    job = Job(id=1, kind=ussd_jobs.SWEEP_JOB, payload={"all": True}, attempts=1, max_attempts=3,
              created_at=utcnow())
    left, reached = [], []
    for _ in range(2):
        with pytest.raises(RetryLater) as later:
            await sweep(job)
        assert later.value.delay <= 1
        left.append(await db.count(UssdSession, UssdSession.status == "OPEN"))
        # The next run goes on from the latest start this one closed (its payload says it), not from the oldest.
        assert later.value.payload is not None and later.value.payload["all"] is True
        reached.append(datetime.fromisoformat(later.value.payload["from"]))
        closed = await db.all(UssdSession, UssdSession.status == "Incomplete")
        assert reached[-1] == max(row.started_at for row in closed)
        job = dataclasses.replace(job, payload=later.value.payload)
    await sweep(job)  # the last, short, batch: done
    assert left == [3, 1] and await db.count(UssdSession, UssdSession.status == "OPEN") == 0
    assert reached[0] < reached[1]


async def test_a_sweep_out_of_time_run_by_the_worker_uses_no_attempt_however_many_runs_it_takes(
        db: Any, rt: Any, worker: Any, monkeypatch: Any) -> None:
    """The same, through the worker: each run handed back (RetryLater) gives its attempt back, so a backlog of more
    runs than the sweep's max_attempts (3) is closed to the end and the job ends DONE, not PARKED."""
    monkeypatch.setattr(ussd_jobs, "SWEEP_BATCH", 1)
    monkeypatch.setattr(ussd_jobs, "SWEEP_MARGIN", 3600.0)  # one batch a run: five runs
    await _left_open(rt, 5)
    async with rt.sessionmaker.begin() as s:  # this slot's sweep, due
        await ussd_jobs.schedule_sweep(s, now=utcnow() - ussd_jobs.SWEEP_EVERY)
    [job] = await db.all(OutboxJob, OutboxJob.kind == ussd_jobs.SWEEP_JOB)
    runs = []
    for _ in range(10):
        runs.append(await drain(worker))
        ran = await db.one(OutboxJob, OutboxJob.id == job.id)
        if ran.status != "PENDING":
            break
        assert ran.attempts == 0 and ran.run_at <= utcnow() + timedelta(seconds=2)  # at once, its attempt back
        async with rt.sessionmaker.begin() as s:  # its second's wait skipped
            await s.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(run_at=utcnow()))
    assert (ran.status, ran.attempts) == ("DONE", 1)
    assert runs[:5] == [1, 1, 1, 1, 1] and await db.count(UssdSession, UssdSession.status == "OPEN") == 0

@requires_pg
async def test_a_late_end_waiting_on_the_sweeps_lock_is_told_the_sweep_closed_it(client: Any, demo: Any, db: Any,
                                                                                 rt: Any) -> None:
    """The late END (and a notice) while the sweep's batch holds the row: each waits for the sweep to commit, then
    writes the row as the sweep left it, swept; its close is not counted a second time."""
    for session_id in ("nalo-race", "ATUid_race"):
        await nalo(client, session_id, "*384*123#", True)
        await _age(rt, session_id, 11)
    async with rt.sessionmaker.begin() as s:
        swept = (await s.execute(records._abandoned_statement(False), {
            "before": utcnow() - records.ABANDONED_AFTER, "batch": 10, "v_ended_at": utcnow()})).all()
        assert len(swept) == 2
        late = asyncio.create_task(records.closed(rt, aggregator="nalo", session_id="nalo-race", hops=3,
                                                  last_screen="home", data={}))
        notice = asyncio.create_task(records.record_event(rt, records.SessionEvent(
            aggregator="nalo", session_id="ATUid_race", phone=normalize("+250733000001"), service_code="*384*123#",
            network=None, status="Failed", hops=2, duration_ms=None, cost=None, error="network")))
        await behind_a_lock(rt, late, notice)
        assert not late.done() and not notice.done()  # waiting on the sweep's row locks
    assert await late is True and await notice is True
    race, noticed = await _row(db, "nalo-race"), await _row(db, "ATUid_race")
    assert (race.status, race.error, race.hops) == ("Success", None, 3)
    assert (noticed.status, noticed.error, noticed.hops) == ("Failed", "network", 2)


async def test_a_sweep_run_again_after_its_time_reads_on_from_where_it_stopped(db: Any, rt: Any, worker: Any,
                                                                               monkeypatch: Any) -> None:
    """Run by the worker: the job handed back keeps in its payload where it stopped, and its next run reads the
    started_at index from there. It read again from the oldest row, past every row the runs before had closed: a
    backlog of millions read once a run."""
    monkeypatch.setattr(ussd_jobs, "SWEEP_BATCH", 2)
    monkeypatch.setattr(ussd_jobs, "SWEEP_MARGIN", 3600.0)  # one batch a run
    await _left_open(rt, 5)
    async with rt.sessionmaker.begin() as s:  # this slot's sweep, due
        await ussd_jobs.schedule_sweep(s, now=utcnow() - ussd_jobs.SWEEP_EVERY)
    [job] = await db.all(OutboxJob, OutboxJob.kind == ussd_jobs.SWEEP_JOB)
    await drain(worker)
    ran = await db.one(OutboxJob, OutboxJob.id == job.id)
    assert ran.status == "PENDING" and ran.attempts == 0
    closed = await db.all(UssdSession, UssdSession.status == "Incomplete")
    assert len(closed) == 2
    assert datetime.fromisoformat(ran.payload["from"]) == max(row.started_at for row in closed)
    seen: list[dict[str, Any]] = []
    real = records.close_abandoned

    async def close_abandoned(rt: Any, **kwargs: Any) -> int:
        seen.append(kwargs)
        return await real(rt, **kwargs)

    monkeypatch.setattr(ussd_jobs, "close_abandoned", close_abandoned)
    for _ in range(4):
        async with rt.sessionmaker.begin() as s:  # its second's wait skipped
            await s.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(run_at=utcnow()))
        await drain(worker)
        if (await db.one(OutboxJob, OutboxJob.id == job.id)).status == "DONE":
            break
    assert await db.count(UssdSession, UssdSession.status == "OPEN") == 0
    assert seen[0]["since"] == datetime.fromisoformat(ran.payload["from"])
    assert seen[1]["since"] > seen[0]["since"]
