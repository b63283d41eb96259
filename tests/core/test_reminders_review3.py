"""Reminders, third review: a reminder that did not go out is queued again by the next morning's scan (never two
sent for one due date), one whose type no longer falls due on its date is not sent, a member whose payment of the
period is still open is not told to pay again, and a fixed-amount period is paid only by the money kept."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core import metrics
from core.audit import Actor
from core.db import utcnow
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType, SmsMessage
from core.outbox import replay_job
from core.payment_types import deactivate_payment_type, update_payment_type
from core.reminders import fan_out, scan, why_not_send
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.core.test_reminders import NOW, _paid, _reminder_jobs

ADMIN = Actor("admin:test", "api")
ALINE = "+250788000001"
DAY = timedelta(days=1)


@pytest.fixture
def sender(rt: Any) -> Any:
    """A worker with room in the SMS rate for every reminder at once (those of a scan are all due at once, and
    no retry waits behind the send limiter's window)."""
    from app import create_worker

    rt.settings = replace(rt.settings, sms_rate_per_second=1000.0)
    return create_worker(rt)


def skipped(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("gateway_reminders_skipped_total", {"reason": reason}) or 0.0


async def _scan(rt: Any, days: int = 0) -> int:
    """The scan of NOW + `days` (08:00 in Kigali), in one go; how many reminders it queued."""
    async with rt.sessionmaker.begin() as s:
        return await scan(s, rt, now=NOW + days * DAY)


async def _planned(rt: Any, days: int = 0) -> int:
    """What the daily fan-out of NOW + `days` counts to queue (the send slots it hands out), left uncommitted."""
    async with rt.sessionmaker() as s:
        _jobs, planned = await fan_out(s, rt, (NOW + days * DAY).date(), NOW + days * DAY)
        await s.rollback()
    return planned


async def _sent(rt: Any) -> dict[str, list[str]]:
    """The reminder messages that left (SENT or DELIVERED), by member id: their idempotency keys."""
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage).where(
            SmsMessage.template == "payment_reminder", SmsMessage.status.in_(("SENT", "DELIVERED"))))).scalars()
        sent: dict[str, list[str]] = {}
        for row in rows:
            sent.setdefault(str(row.member_id), []).append(row.idempotency_key)
    return sent


def _texts(sim: Any, phone: str) -> list[str]:
    return [m["message"] for m in sim.inbox.get(phone, [])]


async def _set_member(rt: Any, member_id: str, **values: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == member_id).values(**values))


async def _payment(rt: Any, demo: dict[str, Any], phone: str, *, type_name: str = "Monthly Rent",
                   created: datetime = NOW - 5 * DAY, **values: Any) -> str:
    """A payment of the member's (COMPLETED 50,000 RWF of Monthly Rent, made 23 November, unless `values` say
    otherwise); its id."""
    row = {"amount_minor": 50_000, "currency": "RWF", "status": "COMPLETED", **values}
    async with rt.sessionmaker.begin() as s:
        payment = Payment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"][type_name],
                          member_id=demo["members"][phone], reference=f"PAY_{uuid.uuid4().hex[:10]}",
                          method="MOBILE_MONEY_MTN", provider="mtn_momo", provider_reference=str(uuid.uuid4()),
                          payment_account_enc="x", payment_account_index="x", payment_account_masked="+25078****001",
                          idempotency_key=uuid.uuid4().hex, request_hash="h", channel="api",
                          expires_at=created + timedelta(minutes=5), created_at=created, **row)
        s.add(payment)
        await s.flush()
        return payment.id


# Finding 1: a reminder that did not go out no longer keeps the due date's key from the next mornings' scans.


async def test_reminders_an_aggregator_outage_parked_are_sent_the_next_morning_and_only_once(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Africa's Talking answers 503 through every attempt at 08:00: the reminders park (their messages QUEUED,
    RetriesExhausted). The next morning's scan queues them again (rent still due in 2 days) and they go; the
    scans after it queue nothing. An operator replaying the parked jobs later sends no second one."""
    assert await _scan(rt) == 5
    _server, sim = await start_simulator(aiohttp_server, rt)
    sim.set_failure("http503")
    for _ in range(10):  # each of the 10 attempts fails; no backoff wait
        await drain(sender)
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(OutboxJob).where(OutboxJob.status == "PENDING", OutboxJob.kind == "sms.send")
                            .values(run_at=utcnow()))
    parked = await _reminder_jobs(rt)
    assert {j.status for j in parked} == {"PARKED"} and sim.inbox == {}
    sim.set_failure(None)

    assert await _planned(rt, 1) == 5
    assert await _scan(rt, 1) == 5  # 29 November
    await drain(sender)
    assert await _scan(rt, 2) == 0 and await _scan(rt, 3) == 0  # 30 November, 1 December (the due day)
    await drain(sender)
    sent = await _sent(rt)
    assert sorted(sent) == sorted(demo["members"].values())
    assert all(keys == [f"reminder:{m}:{demo['payment_types']['Monthly Rent']}:2026-12-01:2026-11-29"]
               for m, keys in sent.items())
    assert all(len(_texts(sim, phone)) == 1 and "01/12/2026" in _texts(sim, phone)[0] for phone in demo["members"])

    # Replayed (its day's cut-off not even passed yet): the due date was reminded meanwhile, it is not sent.
    before = skipped("reminded")
    async with rt.sessionmaker.begin() as s:
        for job in parked:
            await replay_job(s, job.id)
    await drain(sender)
    assert skipped("reminded") - before == 5
    assert await _sent(rt) == sent and all(len(_texts(sim, phone)) == 1 for phone in demo["members"])
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(SmsMessage).where(SmsMessage.idempotency_key.like("%:2026-11-28")))
                  ).scalars().all()
    assert {(m.status, m.provider_status, m.failure_reason) for m in stored} == {
        ("FAILED", "Skipped", "not sent: reminded")}


async def _too_late(rt: Any, demo: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    """The workers (or the aggregator) down until 20:00 in Kigali: her reminder still queued at the cut-off."""
    async with rt.sessionmaker.begin() as s:
        for job in await _reminder_jobs(rt):
            if job.payload["member_id"] == demo["members"][ALINE]:
                await s.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
                    payload={**job.payload, "send_before": (utcnow() - timedelta(minutes=1)).isoformat()}))

    async def undo() -> None:  # the next morning is another day
        pass

    return undo


async def _suspended(rt: Any, demo: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    await _set_member(rt, demo["members"][ALINE], status="SUSPENDED")

    async def undo() -> None:  # reactivated that afternoon
        await _set_member(rt, demo["members"][ALINE], status="ACTIVE")

    return undo


async def _stop(rt: Any, demo: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    await _set_member(rt, demo["members"][ALINE], reminders_opt_out=True)

    async def undo() -> None:  # START that evening
        await _set_member(rt, demo["members"][ALINE], reminders_opt_out=False)

    return undo


async def _paid_then_refunded(rt: Any, demo: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    payment_id = await _payment(rt, demo, ALINE, created=utcnow())

    async def undo() -> None:  # refunded in full: no money kept
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == payment_id)
                            .values(status="REFUNDED", refunded_minor=50_000))

    return undo


async def _type_deactivated(rt: Any, demo: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    rent = demo["payment_types"]["Monthly Rent"]
    async with rt.sessionmaker.begin() as s:
        await deactivate_payment_type(s, cooperative_id=demo["cooperative_id"], payment_type_id=rent, actor=ADMIN)

    async def undo() -> None:  # back on the menu
        async with rt.sessionmaker.begin() as s:
            await update_payment_type(s, cooperative_id=demo["cooperative_id"], payment_type_id=rent,
                                      changes={"is_active": True}, actor=ADMIN)

    return undo


@pytest.mark.parametrize(("block", "everyone"), [
    (_too_late, False), (_suspended, False), (_stop, False), (_paid_then_refunded, False), (_type_deactivated, True),
])
async def test_a_reminder_dropped_at_its_turn_is_queued_again_by_the_next_mornings_scan(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any,
        block: Callable[[Any, dict[str, Any]], Awaitable[Callable[[], Awaitable[None]]]], everyone: bool) -> None:
    """Aline's reminder (or everyone's, for the type) is dropped when its turn comes; by the next morning what
    dropped it is undone and rent is still unpaid: she is reminded then, once. The others, reminded the first
    day, are not reminded again."""
    assert await _scan(rt) == 5
    undo = await block(rt, demo)
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert ALINE not in sim.inbox
    await undo()

    expected = 5 if everyone else 1
    assert await _planned(rt, 1) == expected
    assert await _scan(rt, 1) == expected
    await drain(sender)
    assert await _scan(rt, 2) == 0
    [text] = _texts(sim, ALINE)
    assert "Monthly Rent" in text and "01/12/2026" in text
    sent = await _sent(rt)
    assert sorted(sent) == sorted(demo["members"].values()) and all(len(keys) == 1 for keys in sent.values())
    assert all(len(_texts(sim, phone)) == 1 for phone in demo["members"])


async def test_a_reminder_sent_or_still_waiting_is_not_queued_again_on_the_later_days(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    assert await _scan(rt) == 5
    # Still queued (its turn to come, before its cut-off): the next scans leave it be.
    assert await _planned(rt, 1) == 0 and await _scan(rt, 1) == 0
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    for days in (1, 2, 3):  # sent: the scans up to the due day queue none
        assert await _planned(rt, days) == 0 and await _scan(rt, days) == 0
    await drain(sender)
    assert all(len(keys) == 1 for keys in (await _sent(rt)).values()) and len(await _sent(rt)) == 5
    assert all(len(_texts(sim, phone)) == 1 for phone in demo["members"])


async def test_a_reminder_queued_by_the_previous_release_and_sent_is_not_sent_again(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Its key has no day (member, type, due date): sent, it counts for its due date as any other."""
    assert await _scan(rt) == 5
    async with rt.sessionmaker.begin() as s:
        for job in await _reminder_jobs(rt):
            old = job.payload["key"].rsplit(":", 1)[0]
            payload = {k: v for k, v in job.payload.items() if k not in ("day", "first_day")}
            await s.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
                dedupe_key=f"sms:{old}", payload={**payload, "key": old}))
    _server, _sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert len(await _sent(rt)) == 5
    assert await _planned(rt, 1) == 0 and await _scan(rt, 1) == 0


# Finding 2: the type no longer falls due on the reminder's date.


@pytest.mark.parametrize("changes", [{"due_day": 15}, {"is_recurring": False}])
async def test_a_reminder_whose_type_no_longer_falls_due_on_its_date_is_not_sent(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any, changes: dict[str, Any]) -> None:
    """Queued for rent due 1 December; before its turn the due day moves to the 15th, or rent stops recurring:
    "due on 01/12/2026" (or "due" at all) would be wrong."""
    assert await _scan(rt) == 5
    async with rt.sessionmaker.begin() as s:
        await update_payment_type(s, cooperative_id=demo["cooperative_id"],
                                  payment_type_id=demo["payment_types"]["Monthly Rent"], changes=changes, actor=ADMIN)
    before = skipped("type_changed")
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert sim.inbox == {} and await _sent(rt) == {}
    assert skipped("type_changed") - before == 5


async def test_a_due_day_moved_after_the_scan_is_reminded_with_its_new_date_the_next_morning(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    assert await _scan(rt) == 5
    async with rt.sessionmaker.begin() as s:
        await update_payment_type(s, cooperative_id=demo["cooperative_id"],
                                  payment_type_id=demo["payment_types"]["Monthly Rent"], changes={"due_day": 2},
                                  actor=ADMIN)
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert sim.inbox == {}
    assert await _scan(rt, 1) == 5  # 29 November: rent due 2 December
    await drain(sender)
    texts = [text for phone in demo["members"] for text in _texts(sim, phone)]
    assert len(texts) == 5 and all("02/12/2026" in text for text in texts)


# Finding 3: a payment of the period still open holds the reminder back.


async def test_no_reminder_while_a_payment_of_the_period_is_open_and_one_once_it_failed(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Aline paid yesterday evening; the provider has not told the outcome yet (an outage: the payment stays
    PENDING up to the settle grace). Told "Dial ... to pay" she would pay twice. It fails: the next morning she
    is reminded."""
    members = demo["members"]
    pending = await _payment(rt, demo, ALINE, status="PENDING", created=NOW - timedelta(hours=12))
    assert await _planned(rt) == 4 and await _scan(rt) == 4
    assert members[ALINE] not in {j.payload["member_id"] for j in await _reminder_jobs(rt)}  # no key taken
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert ALINE not in sim.inbox and len(sim.inbox) == 4

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == pending).values(status="FAILED"))
    assert await _scan(rt, 1) == 1
    await drain(sender)
    assert len(_texts(sim, ALINE)) == 1


async def test_a_reminder_is_dropped_when_a_payment_of_the_period_is_open_at_its_turn(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    assert await _scan(rt) == 5
    await _paid(rt, demo, ALINE, "PROCESSING", utcnow())  # started through the USSD after the scan
    before = skipped("payment_open")
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert ALINE not in sim.inbox and len(sim.inbox) == 4
    assert skipped("payment_open") - before == 1


# Finding 4: a fixed amount is paid by the money kept, not by a payment's status.


async def test_a_fixed_amount_is_paid_only_when_the_money_kept_reaches_it(rt: Any, demo: dict[str, Any]) -> None:
    members = demo["members"]
    # Taken only in part (COMPLETED, mismatch: 10,000 of 50,000).
    await _payment(rt, demo, "+250788000001", collected_minor=10_000, mismatch=True)
    # Taken in another currency (the gateway records collected 0).
    await _payment(rt, demo, "+250788000002", collected_minor=0, mismatch=True)
    # Paid in two halves: paid.
    await _payment(rt, demo, "+250733000001", amount_minor=25_000)
    await _payment(rt, demo, "+250733000001", amount_minor=25_000, created=NOW - 4 * DAY)
    # 20,000 of it refunded: 30,000 kept.
    await _payment(rt, demo, "+250733000002", status="PARTIALLY_REFUNDED", refunded_minor=20_000)
    # Paid in full.
    await _payment(rt, demo, "+250788000003")
    assert await _planned(rt) == 3 and await _scan(rt) == 3
    rent = demo["payment_types"]["Monthly Rent"]
    reminded = {j.payload["member_id"] for j in await _reminder_jobs(rt) if j.payload["context"]["payment_type_id"]
                == rent}
    assert reminded == {members["+250788000001"], members["+250788000002"], members["+250733000002"]}


async def test_at_its_turn_a_reminder_is_dropped_only_when_the_money_kept_reaches_the_amount(
        rt: Any, demo: dict[str, Any]) -> None:
    members = demo["members"]
    assert await _scan(rt) == 5
    jobs = {j.payload["member_id"]: j.payload for j in await _reminder_jobs(rt)}
    await _payment(rt, demo, "+250788000001", created=utcnow(), collected_minor=10_000, mismatch=True)
    await _payment(rt, demo, "+250788000002", created=utcnow())
    async with rt.sessionmaker() as s:
        conn = await s.connection()
        assert await why_not_send(conn, jobs[members["+250788000001"]]) is None
        assert await why_not_send(conn, jobs[members["+250788000002"]]) == "paid"


async def test_a_free_amount_is_paid_by_any_payment_kept(rt: Any, demo: dict[str, Any]) -> None:
    """A savings contribution (the member chooses the amount): 1,000 RWF pays its period."""
    async with rt.sessionmaker.begin() as s:
        savings = PaymentType(cooperative_id=demo["cooperative_id"], name="Savings", amount_minor=0, currency="RWF",
                              allow_custom_amount=True, is_active=True, is_recurring=True,
                              recurring_interval="MONTHLY", due_day=1, created_at=datetime(2026, 1, 15, tzinfo=UTC))
        s.add(savings)
        await s.flush()
    demo["payment_types"]["Savings"] = savings.id
    await _payment(rt, demo, ALINE, type_name="Savings", amount_minor=1_000)
    await _scan(rt)
    reminded = {j.payload["member_id"] for j in await _reminder_jobs(rt)
                if j.payload["context"]["payment_type_id"] == savings.id}
    assert reminded == set(demo["members"].values()) - {demo["members"][ALINE]}


# Minor: a bare-date dueDate (stored as UTC midnight) names its day west of UTC too.


async def test_a_bare_date_due_date_pays_that_day_in_a_zone_west_of_utc(rt: Any) -> None:
    """Cape Verde (UTC-1): "2026-12-01" is 30 November 23:00 there; it names 1 December all the same."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Praia Coop", short_code="PRA", country="RW", currency="RWF",
                           timezone="Atlantic/Cape_Verde", status="ACTIVE")
        s.add(coop)
        await s.flush()
        rent = PaymentType(cooperative_id=coop.id, name="Rent", amount_minor=50_000, currency="RWF", is_active=True,
                           is_recurring=True, recurring_interval="MONTHLY", due_day=1,
                           created_at=datetime(2026, 1, 15, 12, tzinfo=UTC))
        s.add(rent)
        ids = []
        for i, named in enumerate((datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))):
            member = Member(cooperative_id=coop.id, name=f"Member {i}", phone_enc="x", phone_index=f"idx-pra-{i}",
                            phone_masked="+25078****000", status="ACTIVE")
            s.add(member)
            await s.flush()
            ids.append(member.id)
            s.add(Payment(cooperative_id=coop.id, payment_type_id=rent.id, member_id=member.id,
                          reference=f"PAY_{uuid.uuid4().hex[:10]}", amount_minor=50_000, currency="RWF",
                          status="COMPLETED", method="MOBILE_MONEY_MTN", provider="mtn_momo",
                          provider_reference=str(uuid.uuid4()), payment_account_enc="x", payment_account_index="x",
                          payment_account_masked="+25078****001", idempotency_key=uuid.uuid4().hex, request_hash="h",
                          channel="api", expires_at=NOW, created_at=datetime(2026, 11, 3, 10, tzinfo=UTC),
                          due_date=named))
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW, cooperative_id=coop.id)
    # The one naming 1 November (the last period) is reminded; the one naming 1 December is not.
    assert {j.payload["member_id"] for j in await _reminder_jobs(rt)} == {ids[1]}


# REMINDER_DAYS_BEFORE lowered while a due date is inside its reminder window: one reminder per due date still.


async def test_a_long_reminder_window_waits_for_the_periods_midpoint(rt: Any, demo: dict[str, Any]) -> None:
    """REMINDER_DAYS_BEFORE=20: 1 December's rent was reminded on 11 November, while a payment made then pays
    November's (a period is paid from its midpoint, 16 November: PaidFor.since), as the USSD and BALANCE said. The
    first reminder of 1 December now goes on the 16th."""
    rt.settings = replace(rt.settings, reminder_days_before=20)
    assert await _scan(rt, -17) == 0  # 11 November
    assert await _scan(rt, -13) == 0  # 15 November
    assert await _scan(rt, -12) == 5  # 16 November: the midpoint
    assert {(j.payload["context"]["due_date"], j.payload["first_day"]) for j in await _reminder_jobs(rt)} == {
        ("2026-12-01", "2026-11-16")}


async def test_a_reminder_sent_before_the_days_before_were_lowered_is_not_sent_again(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Reminded on 24 November (7 days before 1 December), then REMINDER_DAYS_BEFORE lowered to 3 (a deploy): the
    scan of the 28th, now the first day that reminds of the 1st, finds the reminder of the 24th all the same."""
    rt.settings = replace(rt.settings, reminder_days_before=7)
    assert await _scan(rt, -4) == 5
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert len(await _sent(rt)) == 5
    rt.settings = replace(rt.settings, reminder_days_before=3)
    for days in (0, 1, 2, 3):
        assert await _planned(rt, days) == 0 and await _scan(rt, days) == 0
    await drain(sender)
    assert all(len(keys) == 1 for keys in (await _sent(rt)).values())
    assert all(len(_texts(sim, phone)) == 1 for phone in demo["members"])


async def test_at_its_turn_a_reminder_finds_one_sent_before_its_first_day(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """The send-time check reads every reminder of the due date, whatever day its scan first reminded of it: one of
    the 28th (first day the 28th: 3 days before) is dropped when one of the 24th was sent."""
    rt.settings = replace(rt.settings, reminder_days_before=7)
    assert await _scan(rt, -4) == 5
    _server, _sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    [job] = [j for j in await _reminder_jobs(rt) if j.payload["member_id"] == demo["members"][ALINE]]
    day = NOW.date().isoformat()
    payload = {**job.payload, "key": job.payload["key"].rsplit(":", 1)[0] + f":{day}", "day": day, "first_day": day,
               "send_before": (utcnow() + DAY).isoformat()}
    async with rt.engine.connect() as conn:
        assert await why_not_send(conn, payload) == "reminded"


async def test_a_reminder_being_sent_since_before_the_days_before_were_lowered_is_not_queued_again(
        rt: Any, demo: dict[str, Any]) -> None:
    """Queued on 24 November (7 days before 1 December) and still being sent (RUNNING: its worker lost mid-send,
    the lease not lapsed yet) when REMINDER_DAYS_BEFORE is lowered to 3: the scan of the 28th, whose window no longer
    has the 24th, finds it all the same, as it would one of a day inside it; the others are reminded."""
    rt.settings = replace(rt.settings, reminder_days_before=7)
    assert await _scan(rt, -4) == 5
    aline = demo["members"][ALINE]
    [job] = [j for j in await _reminder_jobs(rt) if j.payload["member_id"] == aline]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status="DONE"))
        await s.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(status="RUNNING"))
    rt.settings = replace(rt.settings, reminder_days_before=3)
    assert await _planned(rt) == 4 and await _scan(rt) == 4
    today = [j for j in await _reminder_jobs(rt) if j.payload["day"] == NOW.date().isoformat()]
    assert len(today) == 4 and aline not in {j.payload["member_id"] for j in today}
