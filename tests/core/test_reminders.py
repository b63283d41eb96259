"""Payment reminders: who gets one, when, in which language, and never twice."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select, update

from core.db import utcnow
from core.models import Member, OutboxJob, Payment, PaymentType, SmsMessage
from core.reminders import due_dates, ensure_scheduled, scan
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain

# 28 November, 08:00 in Kigali: Monthly Rent (due day 1) falls due in 3 days, Water (day 10) in 12.
NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


def _type(due_day: int, interval: str = "MONTHLY", created: date = date(2026, 1, 15), recurring: bool = True) -> Any:
    return SimpleNamespace(is_recurring=recurring, recurring_interval=interval, due_day=due_day,
                           created_at=datetime.combine(created, datetime.min.time(), tzinfo=UTC))


@pytest.mark.parametrize(("ptype", "today", "expected"), [
    (_type(1), date(2026, 11, 28), (date(2026, 11, 1), date(2026, 12, 1))),
    (_type(1), date(2026, 12, 1), (date(2026, 11, 1), date(2026, 12, 1))),
    (_type(31), date(2027, 2, 2), (date(2027, 1, 31), date(2027, 2, 28))),  # short month: its last day
    (_type(31), date(2028, 2, 29), (date(2028, 1, 31), date(2028, 2, 29))),  # leap year
    (_type(10, "QUARTERLY"), date(2026, 11, 28), (date(2026, 10, 10), date(2027, 1, 10))),  # Jan, Apr, Jul, Oct
    (_type(5, "YEARLY", created=date(2025, 3, 2)), date(2026, 11, 28), (date(2026, 3, 5), date(2027, 3, 5))),
    (_type(1, recurring=False), date(2026, 11, 28), None),
    (_type(0), date(2026, 11, 28), None),
    (_type(1, "FORTNIGHTLY"), date(2026, 11, 28), None),
])
def test_due_dates(ptype: Any, today: date, expected: Any) -> None:
    assert due_dates(ptype, today) == expected


async def _reminder_jobs(rt: Any) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    return [j for j in jobs if j.payload["template"] == "payment_reminder"]


async def _paid(rt: Any, demo: dict[str, Any], phone: str, status: str, created: datetime,
                due: datetime | None = None) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(Payment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                      member_id=demo["members"][phone], reference=f"PAY_{uuid.uuid4().hex[:10]}",
                      amount_minor=50_000, currency="RWF", status=status, method="MOBILE_MONEY_MTN",
                      provider="mtn_momo", provider_reference=str(uuid.uuid4()), payment_account_enc="x",
                      payment_account_index="x", payment_account_masked="+25078****001",
                      idempotency_key=uuid.uuid4().hex, request_hash="h", channel="api",
                      expires_at=created + timedelta(minutes=5), created_at=created, due_date=due))


async def test_scan_reminds_unpaid_members_once(rt: Any, demo: dict[str, Any], worker: Any,
                                                aiohttp_server: Any) -> None:
    members = demo["members"]
    await _paid(rt, demo, "+250788000001", "COMPLETED", NOW - timedelta(days=3))  # paid this period
    await _paid(rt, demo, "+250733000001", "FAILED", NOW - timedelta(days=2))  # tried, not paid
    await _paid(rt, demo, "+250733000002", "COMPLETED", datetime(2026, 10, 20, tzinfo=UTC))  # last period
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == members["+250788000002"]).values(reminders_opt_out=True))
        await s.execute(update(Member).where(Member.id == members["+250788000003"]).values(status="SUSPENDED"))

    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 2
    jobs = await _reminder_jobs(rt)
    rent = demo["payment_types"]["Monthly Rent"]
    assert sorted((j.payload["member_id"], j.payload["context"]["payment_type_id"], j.payload["context"]["due_date"])
                  for j in jobs) == sorted([(members["+250733000001"], rent, "2026-12-01"),
                                            (members["+250733000002"], rent, "2026-12-01")])

    # A second scan (another worker, a retry, the next day) queues nothing new for the same due date.
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 0
        assert await scan(s, rt, now=NOW + timedelta(days=1)) == 0
    assert len(await _reminder_jobs(rt)) == 2

    # Delivered in each member's language through the SMS simulator.
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    assert sorted(sim.inbox) == ["+250733000001", "+250733000002"]
    french = sim.inbox["+250733000001"][0]["message"]
    swahili = sim.inbox["+250733000002"][0]["message"]
    # French groups digits with spaces (a French reader takes "50,000" for fifty).
    assert "Monthly Rent" in french and "50 000 RWF" in french and "01/12/2026" in french
    assert french != swahili and "01/12/2026" in swahili
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_reminder"))).scalars().all()
    assert len(rows) == 2 and {r.status for r in rows} <= {"SENT", "DELIVERED"}


async def test_scan_outside_the_window_and_for_inactive_types_sends_nothing(rt: Any, demo: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=datetime(2026, 11, 20, 6, tzinfo=UTC)) == 0  # rent in 11 days, water in 20
        await s.execute(update(PaymentType).values(is_active=False))
        assert await scan(s, rt, now=NOW) == 0
    assert await _reminder_jobs(rt) == []


async def test_the_first_day_reminded_is_exactly_the_days_before(rt: Any, demo: dict[str, Any]) -> None:
    """REMINDER_DAYS_BEFORE=3: nobody is reminded of the rent due 1 December on the 27th (4 days before); on the
    28th (3 days before) each unpaid active member is, once."""
    assert rt.settings.reminder_days_before == 3
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW - timedelta(days=1)) == 0
    assert await _reminder_jobs(rt) == []
    async with rt.sessionmaker.begin() as s:
        queued = await scan(s, rt, now=NOW)
    jobs = await _reminder_jobs(rt)
    assert queued == len(jobs) > 0
    assert {j.payload["context"]["due_date"] for j in jobs} == {"2026-12-01"}


async def test_the_daily_scan_schedules_itself_once(rt: Any, demo: dict[str, Any], worker: Any) -> None:
    today = utcnow().date()
    started = datetime.combine(today, time(5), tzinfo=UTC)  # before the hour (after it: test_reminder_schedule)
    await ensure_scheduled(rt, now=started)
    await ensure_scheduled(rt, now=started)  # a second worker starting: no second chain
    async with rt.sessionmaker() as s:
        scans = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "reminders.scan"))).scalars().all()
    assert sorted(j.payload["day"] for j in scans) == [str(today), str(today + timedelta(days=1))]
    # Run today's scan now: it keeps the chain going (tomorrow's is already there: still one job per day).
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "reminders.scan",
                                                OutboxJob.dedupe_key == f"reminders.scan:{today}")
                        .values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    async with rt.sessionmaker() as s:
        scans = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "reminders.scan"))).scalars().all()
    assert sorted((j.payload["day"], j.status) for j in scans) == [
        (str(today), "DONE"), (str(today + timedelta(days=1)), "PENDING")]


async def test_reminders_switched_off_send_nothing(rt: Any, demo: dict[str, Any]) -> None:
    from dataclasses import replace

    rt.settings = replace(rt.settings, reminders_enabled=False)
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 0
    assert await _reminder_jobs(rt) == []


async def test_a_queued_reminder_is_checked_again_when_its_turn_comes(rt: Any, demo: dict[str, Any], worker: Any,
                                                                    aiohttp_server: Any) -> None:
    """Reminders wait their turn (spread over the morning, or an aggregator outage): one whose member has
    paid, sent STOP or been suspended since the scan, or whose send window has passed, does not go out."""
    from core import metrics

    members = demo["members"]
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 5
    jobs = {j.payload["member_id"]: j for j in await _reminder_jobs(rt)}
    paid_since = datetime.fromisoformat(jobs[members["+250788000001"]].payload["paid_since"])
    assert paid_since == datetime(2026, 11, 15, 22, tzinfo=UTC)  # 16 November 00:00 in Kigali: mid-period
    send_before = datetime.fromisoformat(jobs[members["+250788000001"]].payload["send_before"])
    # Until 20:00 in Kigali: 12 hours after the scan's 08:00.
    assert timedelta(hours=11, minutes=59) < send_before - utcnow() <= timedelta(hours=12)

    def skipped(reason: str) -> float:
        return metrics.REGISTRY.get_sample_value("gateway_reminders_skipped_total", {"reason": reason}) or 0.0

    before = {r: skipped(r) for r in ("paid", "opted_out", "member_inactive", "too_late")}
    # Since the scan: one paid (through the USSD, say), one sent STOP, one was suspended, and one reminder
    # is still queued after its window (the aggregator was down all day).
    await _paid(rt, demo, "+250788000001", "COMPLETED", utcnow())
    await _paid(rt, demo, "+250733000002", "FAILED", utcnow())  # a failed try is not a payment: reminded
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == members["+250788000002"]).values(reminders_opt_out=True))
        await s.execute(update(Member).where(Member.id == members["+250788000003"]).values(status="SUSPENDED"))
        late = jobs[members["+250733000001"]]
        await s.execute(update(OutboxJob).where(OutboxJob.id == late.id).values(
            payload={**late.payload, "send_before": (utcnow() - timedelta(minutes=1)).isoformat()}))

    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    assert sorted(sim.inbox) == ["+250733000002"]
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_reminder"))).scalars().all()
        statuses = {j.status for j in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "sms.send"))).scalars()}
    assert [r.member_id for r in rows] == [members["+250733000002"]]
    assert statuses == {"DONE"}  # dropped reminders end their jobs; nothing is retried
    assert {r: skipped(r) - before[r] for r in before} == {"paid": 1, "opted_out": 1, "member_inactive": 1,
                                                           "too_late": 1}


async def test_reminders_turned_off_stop_those_already_queued(rt: Any, demo: dict[str, Any], worker: Any,
                                                             aiohttp_server: Any) -> None:
    """REMINDERS_ENABLED off stopped the next scans only: the morning's reminders already queued (spread over the
    day, or waiting out an aggregator outage) still went out after the operator turned them off."""
    from dataclasses import replace

    from core import metrics

    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 5
    before = metrics.REGISTRY.get_sample_value("gateway_reminders_skipped_total", {"reason": "reminders_off"}) or 0.0
    rt.settings = replace(rt.settings, reminders_enabled=False)
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    assert not sim.inbox
    async with rt.sessionmaker() as s:
        sent = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_reminder"))).scalars().all()
        statuses = {j.status for j in await _reminder_jobs(rt)}
    assert sent == [] and statuses == {"DONE"}
    after = metrics.REGISTRY.get_sample_value("gateway_reminders_skipped_total", {"reason": "reminders_off"})
    assert after == before + 5


async def test_reminders_the_sms_rate_cannot_send_before_the_evening_wait_for_the_next_scan(
        rt: Any, demo: dict[str, Any]) -> None:
    """A rate too low for everyone due: the reminders that would go out after 20:00 local are not queued (and
    not dropped for good); the next morning's scan queues them first."""
    from dataclasses import replace

    rt.settings = replace(rt.settings, sms_rate_per_second=0.002)  # one reminder each 1,000 s (half the rate)
    evening = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)  # 19:00 in Kigali: an hour left
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=evening) == 4  # at +0, +1,000, +2,000 and +3,000 s; not at +4,000 s
    first_day = {j.payload["member_id"] for j in await _reminder_jobs(rt)}
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW + timedelta(days=1)) == 1  # the one left, first in the morning
    jobs = await _reminder_jobs(rt)
    assert len(jobs) == 5 and len({j.payload["member_id"] for j in jobs}) == 5
    [left] = [j for j in jobs if j.payload["member_id"] not in first_day]
    assert left.run_at - utcnow() < timedelta(minutes=1)


async def test_a_reminder_retried_through_an_outage_is_checked_again_each_attempt(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """The aggregator is down for the first attempt (the message is stored, QUEUED); by the retry the member
    has sent STOP: the stored message ends FAILED "not sent: skipped" (as one whose day ran out: the STOP may have
    been sent to another cooperative, tests/admin_api/test_optout_not_disclosed) and nothing leaves."""
    members = demo["members"]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id != members["+250733000001"]).values(reminders_opt_out=True))
        assert await scan(s, rt, now=NOW) == 1
    _server, sim = await start_simulator(aiohttp_server, rt)
    sim.set_failure("http503")  # every request refused until cleared
    await drain(worker)
    async with rt.sessionmaker() as s:
        [queued] = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_reminder"))).scalars()
    assert queued.status == "QUEUED" and sim.inbox == {}
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == members["+250733000001"]).values(reminders_opt_out=True))
        await s.execute(update(OutboxJob).where(OutboxJob.status == "PENDING").values(run_at=utcnow()))
    sim.set_failure(None)
    await drain(worker)
    async with rt.sessionmaker() as s:
        message = await s.get(SmsMessage, queued.id)
        [job] = [j for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars()]
    assert (message.status, message.failure_reason) == ("FAILED", "not sent: skipped")
    assert sim.inbox == {} and job.status == "DONE"


def _kigali(day: date, hour: int = 10) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=UTC) - timedelta(hours=2)


async def test_a_payment_pays_the_due_date_it_names_or_the_nearest_one(
        rt: Any, demo: dict[str, Any]) -> None:
    """Rent falls due on the 1st. A payment on the due day itself or a few days late pays that month, not the
    next: the member is reminded of December like everyone (before, punctual and late payers never were).
    One made in the second half of November pays December ahead; a dueDate says outright which it pays."""
    members = demo["members"]
    await _paid(rt, demo, "+250788000001", "COMPLETED", _kigali(date(2026, 11, 1)))  # on the due day
    await _paid(rt, demo, "+250788000002", "COMPLETED", _kigali(date(2026, 11, 5)))  # late for November
    await _paid(rt, demo, "+250788000003", "COMPLETED", _kigali(date(2026, 11, 20)))  # early for December
    await _paid(rt, demo, "+250733000001", "COMPLETED", _kigali(date(2026, 11, 2)),  # names December
                due=_kigali(date(2026, 12, 1), 0))
    await _paid(rt, demo, "+250733000002", "COMPLETED", _kigali(date(2026, 11, 25)),  # names November (late)
                due=_kigali(date(2026, 11, 1), 0))
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    reminded = {j.payload["member_id"] for j in await _reminder_jobs(rt)
                if j.payload["context"]["payment_type_id"] == demo["payment_types"]["Monthly Rent"]}
    assert reminded == {members["+250788000001"], members["+250788000002"], members["+250733000002"]}


async def test_a_reminder_is_dropped_when_its_due_date_is_paid_meanwhile_by_name(
        rt: Any, demo: dict[str, Any]) -> None:
    """Checked again at its turn by the same rule: a payment naming December (made through the API after the
    scan) drops it; one naming November (a late payment of the last period) does not."""
    from core.reminders import why_not_send

    members = demo["members"]
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    rent = demo["payment_types"]["Monthly Rent"]
    jobs = {j.payload["member_id"]: j for j in await _reminder_jobs(rt)
            if j.payload["context"]["payment_type_id"] == rent}
    await _paid(rt, demo, "+250788000001", "COMPLETED", utcnow(), due=_kigali(date(2026, 12, 1), 0))
    await _paid(rt, demo, "+250788000002", "COMPLETED", utcnow(), due=_kigali(date(2026, 11, 1), 0))
    async with rt.sessionmaker() as s:
        conn = await s.connection()
        assert await why_not_send(conn, jobs[members["+250788000001"]].payload) == "paid"
        assert await why_not_send(conn, jobs[members["+250788000002"]].payload) is None


def test_a_quarterly_type_is_anchored_on_the_local_day_it_was_created() -> None:
    """Created 1 February at 00:30 in Nairobi (31 January 21:30 UTC): due February, May, August, November."""
    from zoneinfo import ZoneInfo

    ptype = SimpleNamespace(is_recurring=True, recurring_interval="QUARTERLY", due_day=1,
                            created_at=datetime(2026, 1, 31, 21, 30, tzinfo=UTC))
    assert due_dates(ptype, date(2026, 10, 29), ZoneInfo("Africa/Nairobi")) == (date(2026, 8, 1), date(2026, 11, 1))


async def test_a_reminder_queued_by_the_previous_release_counts_any_payment_since_its_scan(
        rt: Any, demo: dict[str, Any]) -> None:
    """Its payload has paid_since but no due_from/due_until: a payment made since, dueDate or not, drops it (as
    that release judged it), not only one without a dueDate."""
    from core.reminders import why_not_send

    members = demo["members"]
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    rent = demo["payment_types"]["Monthly Rent"]
    jobs = {j.payload["member_id"]: j for j in await _reminder_jobs(rt)
            if j.payload["context"]["payment_type_id"] == rent}
    old = {k: v for k, v in jobs[members["+250788000001"]].payload.items() if k not in ("due_from", "due_until")}
    old["paid_since"] = (utcnow() - timedelta(minutes=5)).isoformat()
    async with rt.sessionmaker() as s:
        assert await why_not_send(await s.connection(), old) is None
    await _paid(rt, demo, "+250788000001", "COMPLETED", utcnow(), due=_kigali(date(2026, 12, 1), 0))
    async with rt.sessionmaker() as s:
        assert await why_not_send(await s.connection(), old) == "paid"
