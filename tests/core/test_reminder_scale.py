"""The daily reminder scan at scale: no job's work grows with the members (the daily job fans out one job per
cooperative, and each reads one chunk of members), a retry adds only what is missing, and nothing is queued
twice, whether the scan runs again, is retried part-way or follows the previous release's scan that day."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core import reminders
from core.db import utcnow
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType
from core.notify import sms_job
from core.outbox import Job, OutboxWorker, enqueue_job
from core.reminders import COOPERATIVE_SCAN

# 28 November, 08:10 in Kigali: a Monthly Rent due on the 1st falls due in 3 days. Years ahead: the reminders
# queued (their send times follow the scan's clock) and the next days' scans are not due for the worker.
NOW = datetime(2036, 11, 28, 6, 10, tzinfo=UTC)
DUE = "2036-12-01"
CHUNK = 4


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A small chunk, the scan's clock at NOW, and the members each chunk read (one entry per chunk)."""
    monkeypatch.setattr(reminders, "CHUNK", CHUNK)
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW)
    read: list[int] = []
    real = reminders._scan_chunk

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        chunk = await real(*args, **kwargs)
        read.append(chunk.members)
        return chunk

    monkeypatch.setattr(reminders, "_scan_chunk", recorded)
    return read


async def _cooperative(rt: Any, code: str, members: int) -> dict[str, Any]:
    """An active cooperative with a Monthly Rent due on the 1st, `members` members who get a reminder, and three
    who do not: one sent STOP, one suspended, one paid this period."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name=f"Cooperative {code}", short_code=code, country="RW", currency="RWF",
                           timezone="Africa/Kigali", status="ACTIVE")
        s.add(coop)
        await s.flush()
        rent = PaymentType(cooperative_id=coop.id, name="Monthly Rent", amount_minor=50_000, currency="RWF",
                           is_active=True, is_recurring=True, recurring_interval="MONTHLY", due_day=1,
                           created_at=datetime(2026, 1, 15, tzinfo=UTC))
        s.add(rent)

        def member(i: int, **values: Any) -> Member:
            row = Member(cooperative_id=coop.id, name=f"Member {code} {i}", phone_enc="x",
                         phone_index=f"idx-{code}-{i}", phone_masked="+25078****000", **values)
            s.add(row)
            return row

        due = [member(i, status="ACTIVE") for i in range(members)]
        member(members, status="ACTIVE", reminders_opt_out=True)
        member(members + 1, status="SUSPENDED")
        paid = member(members + 2, status="ACTIVE")
        await s.flush()
        s.add(Payment(cooperative_id=coop.id, payment_type_id=rent.id, member_id=paid.id,
                      reference=f"PAY_{uuid.uuid4().hex[:10]}", amount_minor=50_000, currency="RWF",
                      status="COMPLETED", method="MOBILE_MONEY_MTN", provider="mtn_momo",
                      provider_reference=str(uuid.uuid4()), payment_account_enc="x", payment_account_index="x",
                      payment_account_masked="+25078****001", idempotency_key=uuid.uuid4().hex, request_hash="h",
                      channel="api", expires_at=NOW, created_at=NOW - timedelta(days=2)))
        return {"id": coop.id, "rent": rent.id, "members": sorted(m.id for m in due), "paid": paid.id}


def _worker(rt: Any) -> OutboxWorker:
    """A worker running the reminder jobs as in production (claim, lease, handler timeout, retries); the
    reminders they queue are not due before NOW (their sending is tested elsewhere)."""
    return OutboxWorker(rt.sessionmaker, reminders.job_handlers(rt))


async def _drain(worker: OutboxWorker) -> None:
    while await worker.run_once():
        pass


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id)))
                    .scalars())


async def _reminders(rt: Any) -> list[tuple[str, str, str]]:
    return sorted((j.payload["member_id"], j.payload["context"]["payment_type_id"], j.payload["context"]["due_date"])
                  for j in await _jobs(rt, "sms.send") if j.payload["template"] == "payment_reminder")


async def _daily_scan(rt: Any) -> None:
    await reminders.job_handlers(rt)["reminders.scan"](Job(1, "reminders.scan", {"day": "2036-11-28"}, 1, 5, NOW))


async def test_the_daily_scan_fans_out_and_reminds_every_member_once_a_chunk_per_job(
        rt: Any, demo: dict[str, Any], chunks: list[int]) -> None:
    rt.settings = replace(rt.settings, sms_rate_per_second=2.0)  # one reminder a second
    coops = [await _cooperative(rt, code, members) for code, members in (("AAA", 10), ("BBB", 4), ("CCC", 7))]
    expected = sorted([(m, c["rent"], DUE) for c in coops for m in c["members"]]
                      + [(m, demo["payment_types"]["Monthly Rent"], DUE) for m in demo["members"].values()])

    await _daily_scan(rt)
    # One job per cooperative (the demo's too), and no reminder yet: the fan-out reads no member.
    assert sorted(str(j.cooperative_id) for j in await _jobs(rt, COOPERATIVE_SCAN)) == sorted(
        [c["id"] for c in coops] + [demo["cooperative_id"]])
    assert await _reminders(rt) == [] and chunks == []

    await _drain(_worker(rt))
    assert await _reminders(rt) == expected  # every eligible member, exactly once
    jobs = await _jobs(rt, COOPERATIVE_SCAN)
    assert {j.status for j in jobs} == {"DONE"}
    # Each job read one chunk, of at most CHUNK members (those who get reminders, paid or not): AAA's 11 in 3
    # jobs, BBB's 5 in 2, CCC's 8 in 3 (the last finds none left).
    assert len(chunks) == len(jobs) and max(chunks) <= CHUNK
    assert sorted(len([j for j in jobs if j.cooperative_id == c["id"]]) for c in coops) == [2, 3, 3]
    # The cooperatives' jobs ran apart, yet the reminders keep one send slot each at the SMS rate: one a second.
    runs = sorted(j.run_at for j in await _jobs(rt, "sms.send"))
    assert [(run - runs[0]).total_seconds() for run in runs] == list(range(len(expected)))

    # The daily job run again (a retry, a second worker): nothing new, nothing twice.
    await _daily_scan(rt)
    await _drain(_worker(rt))
    assert len(await _jobs(rt, COOPERATIVE_SCAN)) == len(jobs)
    assert await _reminders(rt) == expected
    # A scan the same day in one go (the previous release's shape) adds none either.
    async with rt.sessionmaker.begin() as s:
        assert await reminders.scan(s, rt, now=NOW) == 0
    assert await _reminders(rt) == expected


async def test_reminders_the_previous_release_queued_that_day_are_not_queued_again(
        rt: Any, chunks: list[int]) -> None:
    coop = await _cooperative(rt, "AAA", 10)
    # The previous release's scan queued the first three (its key: member, type, due date) and was stopped.
    async with rt.sessionmaker.begin() as s:
        for member_id in coop["members"][:3]:
            await enqueue_job(s, sms_job(template="payment_reminder", cooperative_id=coop["id"], member_id=member_id,
                                         context={"member_id": member_id, "payment_type_id": coop["rent"],
                                                  "due_date": DUE},
                                         cipher=rt.cipher, dedupe=f"reminder:{member_id}:{coop['rent']}:{DUE}"))
    await _daily_scan(rt)
    await _drain(_worker(rt))
    assert await _reminders(rt) == sorted((m, coop["rent"], DUE) for m in coop["members"])


async def test_a_cooperative_job_cut_off_part_way_adds_only_what_is_missing_when_retried(
        rt: Any, chunks: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    coop = await _cooperative(rt, "AAA", 10)
    inserted: list[int] = []  # rows sent to the database, per INSERT
    real_insert, cut_off = reminders._insert, [True]

    async def insert_then_cut_off(session: Any, rows: list[dict[str, Any]]) -> None:
        await real_insert(session, rows)
        inserted.append(len(rows))
        if cut_off[0] and len(chunks) == 2 and rows and rows[0]["kind"] == COOPERATIVE_SCAN:
            raise TimeoutError("cut off at the handler timeout")  # after its reminders and its follow-up

    monkeypatch.setattr(reminders, "_insert", insert_then_cut_off)
    await _daily_scan(rt)
    worker = _worker(rt)
    await _drain(worker)
    # The first chunk's job queued its reminders (3 or 4: the member who paid may be among the first 4 read)
    # and handed on; the second was cut off: its transaction is undone.
    first = [m for m in sorted([*coop["members"], coop["paid"]])[:CHUNK] if m != coop["paid"]]
    assert await _reminders(rt) == [(m, coop["rent"], DUE) for m in first]
    [failed] = [j for j in await _jobs(rt, COOPERATIVE_SCAN) if j.status == "PENDING"]
    assert failed.attempts == 1 and "cut off" in (failed.last_error or "")

    cut_off[0] = False
    inserted.clear()
    async with rt.sessionmaker.begin() as s:  # its retry is due (no backoff wait)
        await s.execute(update(OutboxJob).where(OutboxJob.id == failed.id).values(run_at=utcnow()))
    await _drain(worker)
    assert await _reminders(rt) == sorted((m, coop["rent"], DUE) for m in coop["members"])
    # The retry and the job after it each read one chunk and sent only the reminders not yet queued, and the
    # one follow-up job: not a row for any of the first chunk's.
    assert max(chunks) <= CHUNK and sum(inserted) == 10 - len(first) + 1

    # A job run again after it committed (its worker lost before marking it done) adds nothing.
    done = (await _jobs(rt, COOPERATIVE_SCAN))[0]
    inserted.clear()
    await reminders.job_handlers(rt)[COOPERATIVE_SCAN](
        Job(done.id, done.kind, dict(done.payload), 2, done.max_attempts, done.created_at))
    assert inserted == [0, 1]  # no reminder row; its follow-up's INSERT finds it there (ON CONFLICT)
    assert len(await _jobs(rt, COOPERATIVE_SCAN)) == 3 and len(await _reminders(rt)) == 10


async def test_a_cooperative_whose_rate_runs_past_the_evening_stops_handing_on(
        rt: Any, chunks: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cut-off every later slot is too: the cooperative's chain ends there; the next scan goes on."""
    rt.settings = replace(rt.settings, sms_rate_per_second=0.002)  # one reminder each 1,000 s
    evening = datetime(2036, 11, 28, 17, 0, tzinfo=UTC)  # 19:00 in Kigali: room for 4 reminders
    monkeypatch.setattr(reminders, "utcnow", lambda: evening)
    coop = await _cooperative(rt, "AAA", 10)
    async with rt.sessionmaker.begin() as s:  # (the daily job itself, this late, would skip the day)
        await reminders.fan_out(s, rt, evening.date(), evening)
    await _drain(_worker(rt))
    assert [m for m, _, _ in await _reminders(rt)] == coop["members"][:4]
    assert len(chunks) == 2  # the second chunk reached the cut-off: no third job
