"""When reminders go out: spread over the SMS rate (payment jobs are not held up behind them), and a scan
missed at its hour runs only within its catch-up window, never in the evening."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core import reminders
from core.db import utcnow
from core.models import Member, OutboxJob
from core.outbox import Job, enqueue
from core.reminders import CATCH_UP, ensure_scheduled, reminder_offset, scan

# 28 November, 08:00 in Kigali: the demo's Monthly Rent (due day 1) falls due in 3 days.
NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


async def _reminder_jobs(rt: Any) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    return [j for j in jobs if j.payload["template"] == "payment_reminder"]


async def _run_cooperative_jobs(rt: Any) -> None:
    """Run the cooperatives' jobs the daily scan fanned out (and those they hand on), as a worker would."""
    handler = reminders.job_handlers(rt)[reminders.COOPERATIVE_SCAN]
    while True:
        async with rt.sessionmaker() as s:
            pending = (await s.execute(select(OutboxJob).where(
                OutboxJob.kind == reminders.COOPERATIVE_SCAN, OutboxJob.status == "PENDING")
                .order_by(OutboxJob.id))).scalars().all()
        if not pending:
            return
        for row in pending:
            await handler(Job(row.id, row.kind, dict(row.payload), row.attempts + 1, row.max_attempts, row.created_at))
            async with rt.sessionmaker.begin() as s:
                await s.execute(update(OutboxJob).where(OutboxJob.id == row.id).values(status="DONE"))


async def _scans(rt: Any) -> list[tuple[str, datetime]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "reminders.scan"))).scalars().all()
    return sorted((j.payload["day"], j.run_at) for j in rows)


@pytest.mark.parametrize(("rate", "offsets"), [
    (50.0, [(0, 0), (24, 0), (25, 1), (49, 1), (50, 2), (20_000, 800)]),  # 25 a second: half of 50
    (3.0, [(0, 0), (1, 1), (2, 2)]),  # 1.5 a second: one a second
    (1.0, [(0, 0), (1, 2), (2, 4)]),  # half a second: one every 2 s
])
def test_reminder_offsets_follow_half_the_sms_rate(rate: float, offsets: list[tuple[int, int]]) -> None:
    for index, seconds in offsets:
        assert reminder_offset(index, rate) == timedelta(seconds=seconds)


async def test_reminders_are_spread_and_a_payment_job_is_not_held_up(rt: Any, demo: dict[str, Any]) -> None:
    rt.settings = replace(rt.settings, sms_rate_per_second=20.0)  # reminders get 10 a second
    async with rt.sessionmaker.begin() as s:
        for i in range(45):
            s.add(Member(cooperative_id=demo["cooperative_id"], name=f"Member {i}", phone_enc="x",
                         phone_index=f"idx-spread-{i}", phone_masked="+25078****000", status="ACTIVE"))
    before = utcnow()
    async with rt.sessionmaker.begin() as s:
        queued = await scan(s, rt, now=NOW)
    assert queued >= 45
    jobs = await _reminder_jobs(rt)
    assert len(jobs) == queued
    first = min(j.run_at for j in jobs)
    assert before - timedelta(seconds=1) <= first <= utcnow()  # from when the scan ran, not the scan's `now`
    per_second = Counter(int((j.run_at - first).total_seconds()) for j in jobs)
    assert sorted(per_second) == list(range(math.ceil(queued / 10)))  # one step a second, none skipped
    assert all(count <= 10 for count in per_second.values())
    assert sum(per_second.values()) == queued

    # A payment queued just after the scan is claimed (by run_at) ahead of all but the first second's.
    async with rt.sessionmaker.begin() as s:
        await enqueue(s, "payment.collect", {"payment_id": "p1"}, dedupe_key="collect:p1")
    async with rt.sessionmaker() as s:
        order = (await s.execute(select(OutboxJob.kind).where(OutboxJob.kind.in_(("payment.collect", "sms.send")))
                                 .order_by(OutboxJob.run_at, OutboxJob.id))).scalars().all()
    assert order.index("payment.collect") <= 10


@pytest.mark.parametrize(("started", "today_too"), [
    (NOW - timedelta(hours=1), True),  # 05:00: today's is still to come
    (NOW + timedelta(minutes=10), True),  # 06:10: a restart just after the hour sends today's
    (NOW + CATCH_UP, True),  # the last moment of the catch-up window
    (NOW + CATCH_UP + timedelta(minutes=1), False),
    (NOW + timedelta(hours=16), False),  # 22:00: not tonight; tomorrow at 06:00
])
async def test_a_worker_starting_after_the_hour_catches_up_only_within_the_window(
    rt: Any, started: datetime, today_too: bool
) -> None:
    await ensure_scheduled(rt, now=started)
    await ensure_scheduled(rt, now=started)  # a second worker: still one job a day
    tomorrow = ("2026-11-29", datetime(2026, 11, 29, 6, tzinfo=UTC))
    today = ("2026-11-28", NOW)
    assert await _scans(rt) == ([today, tomorrow] if today_too else [tomorrow])


async def test_a_scan_job_run_late_is_skipped_and_the_chain_goes_on(
    rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_scan = reminders.job_handlers(rt)["reminders.scan"]
    job = Job(1, "reminders.scan", {"day": "2026-11-28"}, 1, 5, NOW)
    # The workers were down all day: today's scan job first runs at 20:00. Nothing is sent tonight.
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + timedelta(hours=14))
    await run_scan(job)
    assert await _reminder_jobs(rt) == []
    assert [day for day, _ in await _scans(rt)] == ["2026-11-29"]

    # Run within the window (a restart at 06:10), it sends; run again, it sends nothing twice.
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + timedelta(minutes=10))
    await run_scan(job)
    await _run_cooperative_jobs(rt)  # the cooperatives' jobs it fanned out
    sent = await _reminder_jobs(rt)
    assert len(sent) >= 2
    await run_scan(job)
    await _run_cooperative_jobs(rt)
    assert len(await _reminder_jobs(rt)) == len(sent)
    assert len({j.dedupe_key for j in sent}) == len(sent)


async def test_a_scan_that_fails_keeps_the_chain_and_what_it_queued(
    rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.models import Cooperative, PaymentType

    run_scan = reminders.job_handlers(rt)["reminders.scan"]
    job = Job(1, "reminders.scan", {"day": "2026-11-28"}, 1, 5, NOW)
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + timedelta(minutes=10))
    async with rt.sessionmaker() as s:
        # Scanned after the demo cooperative (cooperatives are scanned in id order), its rent due too.
        other = Cooperative(id="ffffffff-ffff-4fff-8fff-ffffffffffff", name="Second Cooperative", short_code="SEC",
                            country="RW", currency="RWF",
                            timezone="Africa/Kigali", status="ACTIVE")
        s.add(other)
        s.add(PaymentType(cooperative_id=other.id, name="Rent", amount_minor=10_000, currency="RWF", is_active=True,
                          is_recurring=True, recurring_interval="MONTHLY", due_day=1))
        s.add(Member(cooperative_id=other.id, name="Second Member", phone_enc="x", phone_index="idx-second",
                     phone_masked="+25078****000", status="ACTIVE"))
        await s.commit()
        other_id = other.id
    real_chunk = reminders._scan_chunk

    async def chunk_failing_on_the_second(session: Any, rt: Any, plan: Any, **kw: Any) -> Any:
        if plan.cooperative_id == other_id:
            raise TimeoutError("the scan ran out of time")  # e.g. cancelled at the handler timeout
        return await real_chunk(session, rt, plan, **kw)

    monkeypatch.setattr(reminders, "_scan_chunk", chunk_failing_on_the_second)
    await run_scan(job)  # it only fans out: one job per cooperative
    with pytest.raises(TimeoutError):
        await _run_cooperative_jobs(rt)
    # Tomorrow's scan exists although the second cooperative's job failed, and the first one's reminders stay.
    assert [day for day, _ in await _scans(rt)] == ["2026-11-29"]
    queued = await _reminder_jobs(rt)
    assert len(queued) >= 2 and {j.cooperative_id for j in queued} == {demo["cooperative_id"]}
    # Its retry queues the second cooperative's, and nothing twice.
    monkeypatch.setattr(reminders, "_scan_chunk", real_chunk)
    await run_scan(job)
    await _run_cooperative_jobs(rt)
    after = await _reminder_jobs(rt)
    assert len(after) == len(queued) + 1 and len({j.dedupe_key for j in after}) == len(after)
    assert [j.cooperative_id for j in after if j.cooperative_id == other_id] == [other_id]


async def test_a_type_created_after_the_days_scan_is_reminded_of_the_next_morning(
    rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the README says: the day's scan has run (and a worker restarted within the catch-up window runs none
    again); a type made at 09:00 UTC, due in two days, is first reminded of by the next morning's scan."""
    from core.models import PaymentType

    handlers = reminders.job_handlers(rt)
    async with rt.sessionmaker.begin() as s:
        await reminders.schedule(s, NOW.date())
        row = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "reminders.scan"))).scalar_one()
        today = Job(row.id, row.kind, dict(row.payload), 1, row.max_attempts, row.created_at)
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + timedelta(minutes=10))
    await handlers["reminders.scan"](today)
    await _run_cooperative_jobs(rt)
    before = {j.dedupe_key for j in await _reminder_jobs(rt)}
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id == row.id).values(status="DONE"))
        levy = PaymentType(cooperative_id=demo["cooperative_id"], name="Levy", amount_minor=2_000, currency="RWF",
                           is_active=True, is_recurring=True, recurring_interval="MONTHLY", due_day=30,
                           created_at=NOW + timedelta(hours=3))
        s.add(levy)
        await s.flush()
        levy_id = levy.id
    await ensure_scheduled(rt, now=NOW + timedelta(minutes=70))  # a restart at 07:10: today's scan is done
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(OutboxJob.status).where(OutboxJob.id == row.id))).scalar_one() == "DONE"
    assert {j.dedupe_key for j in await _reminder_jobs(rt)} == before

    # The next morning (29 November, 08:00 in Kigali): the levy, due on the 30th, is reminded of.
    async with rt.sessionmaker() as s:
        nxt = (await s.execute(select(OutboxJob).where(
            OutboxJob.dedupe_key == "reminders.scan:2026-11-29"))).scalar_one()
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + timedelta(days=1, minutes=10))
    await handlers["reminders.scan"](Job(nxt.id, nxt.kind, dict(nxt.payload), 1, nxt.max_attempts, nxt.created_at))
    await _run_cooperative_jobs(rt)
    levies = [j for j in await _reminder_jobs(rt) if j.payload["context"]["payment_type_id"] == levy_id]
    assert levies and {j.payload["context"]["due_date"] for j in levies} == {"2026-11-30"}
