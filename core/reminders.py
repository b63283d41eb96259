"""Payment reminders: an SMS to each member who has not yet paid a recurring type before its due day.

A daily `reminders.scan` job (one per day whatever the number of workers: its dedupe key is the date)
finds, per cooperative and in the cooperative's own time zone, the recurring payment types falling
due within `REMINDER_DAYS_BEFORE` days, and queues `payment_reminder` for every active member who
has not paid that type for the coming due date (see paid_for) and has not sent STOP. Each reminder's dedupe key
names the member, the type and the due date, so a re-run, a second worker or a late scan never
sends it twice.

The reminders are not all due at once: their jobs' run_at is spread at REMINDER_SHARE of the SMS send
rate (SMS_RATE_PER_SECOND), so payment jobs queued meanwhile are claimed between them and receipts keep
the rest of the rate. A scan that missed its hour (no worker running) runs within CATCH_UP of it;
later than that it is skipped (the next day's scan reminds whoever is still due) rather than texting
members in the evening. Each reminder is checked again when its turn comes: one whose member has paid,
sent STOP or been suspended since the scan, whose payment type was deactivated or cooperative suspended
since, or still queued at SEND_UNTIL_LOCAL, is not sent.
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core.cooperatives import zone_of
from core.db import UTCDateTime, parse_aware, utcnow
from core.models import Cooperative, Member, Payment, PaymentType
from core.notify import sms_job
from core.outbox import Handler, Job, enqueue, enqueue_job

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.reminders")

INTERVAL_MONTHS = {"MONTHLY": 1, "QUARTERLY": 3, "YEARLY": 12}
PAID = ("COMPLETED", "PARTIALLY_REFUNDED")  # money kept: a fully refunded payment does not count
SCAN_HOUR_UTC = 6  # 08:00 in Kigali, 09:00 in Nairobi: a reasonable hour for an SMS
# A scan missed at its hour (workers down, or one first started later) still runs up to this long after;
# past it, it is skipped: a reminder at 22:00 is worse than the next morning's.
CATCH_UP = timedelta(hours=2)
# Reminders go out before this local time of the cooperative. One the spread would send later (more members
# due than the SMS rate allows in the day) is not queued: the next day's scan queues it first. One still
# queued at this hour (an aggregator outage) is dropped when its turn comes.
SEND_UNTIL_LOCAL = time(20)
# The share of the SMS send rate the reminders are spread over; the rest stays free for receipts and notices.
REMINDER_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class PaidFor:
    """What counts as having paid a recurring type for the due date `due` (local day, the cooperative's zone):
    a kept payment that names that due date (the API's dueDate falls on that local day), or one that names
    none and was made after the midpoint between the previous due date and this one. A payment made on the
    due day itself, or late (the 5th, for rent due the 1st), pays that period, not the next: the member is
    still reminded of the next one. One made in the second half of the period pays ahead (early)."""

    since: datetime  # UTC: local midnight of the period's midpoint
    due_from: datetime  # UTC: local midnight starting the due day
    due_until: datetime  # UTC: local midnight ending it

    @classmethod
    def of(cls, previous_due: date, due: date, zone: tzinfo) -> PaidFor:
        midpoint = previous_due + timedelta(days=math.ceil((due - previous_due).days / 2))

        def midnight(day: date) -> datetime:
            return datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)

        return cls(midnight(midpoint), midnight(due), midnight(due + timedelta(days=1)))

    def params(self) -> dict[str, datetime]:
        return {"since": self.since, "due_from": self.due_from, "due_until": self.due_until}


def paid_clause(payment: Any, since: Any, due_from: Any, due_until: Any) -> Any:
    """SQL: the payment (a table) pays the period PaidFor describes (its bounds as SQL expressions)."""
    return or_(and_(payment.c.due_date.is_not(None), payment.c.due_date >= due_from, payment.c.due_date < due_until),
               and_(payment.c.due_date.is_(None), payment.c.created_at > since))


def reminder_offset(index: int, rate_per_second: float) -> timedelta:
    """How long after the scan the `index`-th reminder (from 0) is due: REMINDER_SHARE of the SMS rate, in
    whole-second steps (the send limiter's window) of as many reminders as that share allows a second."""
    rate = max(rate_per_second * REMINDER_SHARE, 1e-3)
    if rate >= 1:
        return timedelta(seconds=index // math.floor(rate))
    return timedelta(seconds=index * math.ceil(1 / rate))


def _add_months(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def _on_day(year: int, month: int, day: int) -> date:
    """The due day in that month, moved back to the month's last day when it is shorter (31 → 30/28)."""
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def due_dates(ptype: PaymentType, today: date, zone: tzinfo = UTC) -> tuple[date, date] | None:
    """(previous due date, next due date on or after `today`) of a recurring type, or None.

    Quarterly and yearly types fall due in the month the type was created (in the cooperative's `zone`) and
    every 3 or 12 months from there.
    """
    months = INTERVAL_MONTHS.get((ptype.recurring_interval or "MONTHLY").upper())
    if not ptype.is_recurring or not ptype.due_day or months is None:
        return None
    anchor = (ptype.created_at or utcnow()).astimezone(zone).date()
    # Step from the anchor month in whole intervals to the first due date on or after today.
    elapsed = (today.year - anchor.year) * 12 + (today.month - anchor.month)
    steps = max(0, elapsed // months)
    year, month = _add_months(anchor.year, anchor.month, steps * months)
    due = _on_day(year, month, ptype.due_day)
    while due < today:
        year, month = _add_months(year, month, months)
        due = _on_day(year, month, ptype.due_day)
    prev_year, prev_month = _add_months(year, month, -months)
    return _on_day(prev_year, prev_month, ptype.due_day), due


async def scan(session: AsyncSession, rt: Runtime, *, now: datetime | None = None,
               cooperative_id: str | None = None, first_slot: int = 0) -> int:
    """Queue every reminder due at `now` (of one cooperative, or all); returns how many were queued (duplicates
    are not counted). `first_slot`: reminders already queued by this scan for other cooperatives, so the
    send times keep following one another at the SMS rate."""
    if not rt.settings.reminders_enabled:
        return 0
    now = now or utcnow()
    days_before = rt.settings.reminder_days_before
    queued = first_slot
    start = utcnow()  # the jobs' run_at is real time, whatever `now` the scan is for
    active = select(Cooperative).where(Cooperative.status == "ACTIVE")
    if cooperative_id is not None:
        active = active.where(Cooperative.id == cooperative_id)
    coops = (await session.execute(active)).scalars().all()
    deferred = 0
    for coop in coops:
        zone = zone_of(coop.timezone)
        today = now.astimezone(zone).date()
        # The local cut-off as real time (a scan run for another `now`, in tests, keeps the same window).
        send_before = start + (datetime.combine(today, SEND_UNTIL_LOCAL, tzinfo=zone) - now)
        types = (await session.execute(select(PaymentType).where(
            PaymentType.cooperative_id == coop.id, PaymentType.is_active.is_(True),
            PaymentType.is_recurring.is_(True)))).scalars().all()
        members: Sequence[str] | None = None
        for ptype in types:
            window = due_dates(ptype, today, zone)
            if window is None:
                continue
            previous_due, due = window
            if not 0 <= (due - today).days <= days_before:
                continue
            period = PaidFor.of(previous_due, due, zone)
            paid = set((await session.execute(select(Payment.member_id).where(
                Payment.cooperative_id == coop.id, Payment.payment_type_id == ptype.id,
                Payment.status.in_(PAID), paid_clause(_PAYMENT, period.since, period.due_from, period.due_until),
                Payment.member_id.is_not(None)))).scalars())
            if members is None:  # once per cooperative, and only when one of its types is due
                members = (await session.execute(select(Member.id).where(
                    Member.cooperative_id == coop.id, Member.status == "ACTIVE",
                    Member.reminders_opt_out.is_(False)))).scalars().all()
            for member_id in members:
                if member_id in paid:
                    continue
                job = sms_job(
                    template="payment_reminder", cooperative_id=coop.id, member_id=member_id,
                    context={"member_id": member_id, "payment_type_id": ptype.id, "due_date": due.isoformat()},
                    cipher=rt.cipher, dedupe=f"reminder:{member_id}:{ptype.id}:{due.isoformat()}")
                run_at = start + reminder_offset(queued, rt.settings.sms_rate_per_second)
                if run_at >= send_before:
                    deferred += 1  # no job: tomorrow's scan (still within the days before) queues it first
                    continue
                # Checked again when it is sent (channels.sms.jobs): paid for this due date since, opted
                # out, suspended, its type or cooperative no longer active, or still queued at the cut-off
                # (an aggregator outage), it is dropped.
                payload = {**job.payload, "paid_since": period.since.isoformat(),
                           "due_from": period.due_from.isoformat(), "due_until": period.due_until.isoformat(),
                           "send_before": send_before.isoformat()}
                created = await enqueue_job(session, dataclasses.replace(job, payload=payload, run_at=run_at))
                queued += int(created)
    if deferred:
        log.warning("reminders left for the next scan: the SMS rate does not reach every member before the "
                    "evening", extra={"deferred": deferred, "queued": queued})
    return queued - first_slot


_MEMBER, _PAYMENT = Member.__table__, Payment.__table__
_COOP, _TYPE = Cooperative.__table__, PaymentType.__table__
# A reminder's member as it is at sending time (STOP sent, suspended or left, paid since the scan), and what
# the reminder offers: its cooperative still active, its payment type still on the menu (NULL: deleted).


def _reminder_state(paid_for: Any) -> Any:
    return select(
        _MEMBER.c.reminders_opt_out,
        _MEMBER.c.status,
        _COOP.c.status.label("coop_status"),
        _TYPE.c.is_active.label("type_active"),
        exists().where(_PAYMENT.c.member_id == _MEMBER.c.id, _PAYMENT.c.payment_type_id == bindparam("t"),
                       _PAYMENT.c.status.in_(PAID), paid_for).label("paid"),
    ).select_from(
        _MEMBER.join(_COOP, _COOP.c.id == _MEMBER.c.cooperative_id)
        .outerjoin(_TYPE, _TYPE.c.id == bindparam("t"))
    ).where(_MEMBER.c.id == bindparam("m"))


_SINCE = bindparam("since", type_=UTCDateTime())
_REMINDER_STATE = _reminder_state(paid_clause(_PAYMENT, _SINCE, bindparam("due_from", type_=UTCDateTime()),
                                              bindparam("due_until", type_=UTCDateTime())))
# A reminder queued by a release before PaidFor (no due_from in its payload): any payment kept since paid_since
# counts, as that release scanned it.
_REMINDER_STATE_BY_TIME = _reminder_state(_PAYMENT.c.created_at > _SINCE)


async def why_not_send(conn: AsyncConnection, payload: dict[str, Any]) -> str | None:
    """Why a queued reminder (an 'sms.send' job's payload) must not go out any more, None to send it:
    too_late, member_missing, cooperative_inactive, type_inactive, opted_out, member_inactive or paid.
    Reminders are spread over the morning and may wait out an aggregator outage: by their turn the member
    may have paid, sent STOP or been suspended, the cooperative been suspended or the payment type taken
    off the menu ("Dial ... to pay" for what the USSD no longer offers), or the day may be over (scan()
    sets `send_before` and `paid_since`)."""
    send_before = parse_aware(payload.get("send_before"))
    if send_before is not None and utcnow() > send_before:
        return "too_late"
    context = payload.get("context") or {}
    # A job queued before paid_since existed: nothing is paid after now, so only the member is checked.
    params: dict[str, Any] = {"m": payload["member_id"], "t": context.get("payment_type_id"),
                              "since": parse_aware(payload.get("paid_since")) or utcnow()}
    due_from, due_until = parse_aware(payload.get("due_from")), parse_aware(payload.get("due_until"))
    if due_from is not None and due_until is not None:
        state = (await conn.execute(_REMINDER_STATE, {**params, "due_from": due_from, "due_until": due_until})).first()
    else:  # queued by a release before PaidFor
        state = (await conn.execute(_REMINDER_STATE_BY_TIME, params)).first()
    if state is None:
        return "member_missing"
    if state.coop_status != "ACTIVE":
        return "cooperative_inactive"
    if not state.type_active:  # deactivated, or gone (no row)
        return "type_inactive"
    if state.reminders_opt_out:
        return "opted_out"
    if state.status != "ACTIVE":
        return "member_inactive"
    if state.paid:
        return "paid"
    return None


def _scan_time(day: date) -> datetime:
    return datetime.combine(day, time(SCAN_HOUR_UTC), tzinfo=UTC)


async def schedule(session: AsyncSession, day: date) -> None:
    """Make sure the scan of `day` exists (idempotent: one job per date)."""
    await enqueue(session, "reminders.scan", {"day": day.isoformat()}, dedupe_key=f"reminders.scan:{day}",
                  run_at=_scan_time(day), max_attempts=5)


async def ensure_scheduled(rt: Runtime, *, now: datetime | None = None) -> None:
    """Called when a worker starts: tomorrow's scan exists, and today's while its hour is still to come
    or passed by less than CATCH_UP (a worker restarted at 06:10 sends today's; one first started at 22:00
    does not)."""
    now = now or utcnow()
    async with rt.sessionmaker.begin() as session:
        if now <= _scan_time(now.date()) + CATCH_UP:
            await schedule(session, now.date())
        await schedule(session, now.date() + timedelta(days=1))


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    async def run_scan(job: Job) -> None:
        day = date.fromisoformat(job.payload["day"])
        now = utcnow()
        late = now > _scan_time(day) + CATCH_UP
        # The next day's scan first, in its own transaction: a scan that fails or runs out of time (and is
        # retried, then parked) never breaks the chain.
        async with rt.sessionmaker.begin() as session:
            await schedule(session, max(day, now.date()) + timedelta(days=1))
        if late:
            # A scan whose job ran too late (no worker up all morning) is skipped, not sent at night.
            log.warning("reminder scan skipped: too late after its hour", extra={"day": day.isoformat()})
            return
        async with rt.sessionmaker() as session:
            coops = list((await session.execute(select(Cooperative.id).where(Cooperative.status == "ACTIVE")
                                                .order_by(Cooperative.id))).scalars())
        # One transaction per cooperative: what is queued stays queued if a later one fails, and a retried
        # scan queues only what is missing (a reminder's dedupe key is its member, type and due day).
        count = 0
        for coop_id in coops:
            async with rt.sessionmaker.begin() as session:
                count += await scan(session, rt, now=now, cooperative_id=coop_id, first_slot=count)
        log.info("reminders queued", extra={"day": day.isoformat(), "count": count})

    return {"reminders.scan": run_scan}
