"""Payment reminders: an SMS to each member who has not yet paid a recurring type before its due day.

A daily `reminders.scan` job (one per day whatever the number of workers: its dedupe key is the date)
finds, per cooperative and in the cooperative's own time zone, the recurring payment types falling
due within `REMINDER_DAYS_BEFORE` days, and queues `payment_reminder` for every active member who
has not paid that type for the coming due date (see paid_for) and has not sent STOP. Each reminder's dedupe key
names the member, the type and the due date, so a re-run, a second worker or a late scan never
sends it twice.

No job's work grows with the number of members: the daily job fans out one `reminders.cooperative` job per
cooperative with a type due (dedupe-keyed by day and cooperative), and each of those queues the reminders of
CHUNK members (by member id, in one INSERT) and leaves the job for the next CHUNK. A retry redoes one chunk and
adds only what is missing; one cooperative failing leaves the others' reminders alone.

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

from sqlalchemy import and_, bindparam, exists, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core.cooperatives import zone_of
from core.db import UTCDateTime, parse_aware, row_insert, utcnow
from core.members import number_opted_out
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType
from core.notify import sms_job
from core.outbox import Handler, Job, NewJob, enqueue

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
# Members one reminders.cooperative job reads (keyset by member id): a few queries and one INSERT of up to
# CHUNK reminders per type due, well inside the worker's handler timeout whatever the cooperative's size.
CHUNK = 500
COOPERATIVE_SCAN = "reminders.cooperative"


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


_MEMBER, _PAYMENT, _OUTBOX = Member.__table__, Payment.__table__, OutboxJob.__table__


@dataclasses.dataclass(frozen=True)
class _Due:
    """A recurring type of the cooperative falling due within the reminder window, and what pays it."""

    type_id: str
    due: date
    period: PaidFor

    def dedupe(self, member_id: str) -> str:
        """The reminder's key after "sms:" (sms_job): one per member, type and due date, whatever release
        queued it."""
        return f"reminder:{member_id}:{self.type_id}:{self.due.isoformat()}"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One cooperative's scan: the same for each of its chunks of members."""

    cooperative_id: str
    start: datetime  # real time the send times count from (slot 0)
    send_before: datetime  # real time of the local cut-off (SEND_UNTIL_LOCAL)
    dues: tuple[_Due, ...]


async def _plan(session: AsyncSession, rt: Runtime, coop: Cooperative, now: datetime, start: datetime) -> _Plan:
    """What `coop`'s scan at `now` reminds of: its active recurring types due within the days before."""
    zone = zone_of(coop.timezone)
    today = now.astimezone(zone).date()
    types = (await session.execute(select(PaymentType).where(
        PaymentType.cooperative_id == coop.id, PaymentType.is_active.is_(True),
        PaymentType.is_recurring.is_(True)).order_by(PaymentType.id))).scalars().all()
    dues = []
    for ptype in types:
        window = due_dates(ptype, today, zone)
        if window is not None and 0 <= (window[1] - today).days <= rt.settings.reminder_days_before:
            dues.append(_Due(ptype.id, window[1], PaidFor.of(*window, zone)))
    # The local cut-off as real time (a scan run for another `now`, in tests, keeps the same window).
    send_before = start + (datetime.combine(today, SEND_UNTIL_LOCAL, tzinfo=zone) - now)
    return _Plan(coop.id, start, send_before, tuple(dues))


def _remindable(cooperative_id: str) -> Any:
    """SQL condition: a member of the cooperative who gets reminders (active, not opted out by STOP). The
    membership's flag alone (no join per chunk): a number that sent STOP elsewhere or before joining is not on it
    (core.members), and its reminder, queued as any other, is dropped at its turn (why_not_send)."""
    return and_(_MEMBER.c.cooperative_id == cooperative_id, _MEMBER.c.status == "ACTIVE",
                _MEMBER.c.reminders_opt_out.is_(False))


def _paid_by(plan: _Plan, due: _Due) -> Any:
    """SQL condition on _PAYMENT: a kept payment of `due`'s type and period (its member: the caller's)."""
    period = due.period
    return and_(_PAYMENT.c.cooperative_id == plan.cooperative_id, _PAYMENT.c.payment_type_id == due.type_id,
                _PAYMENT.c.status.in_(PAID),
                paid_clause(_PAYMENT, period.since, period.due_from, period.due_until))


async def _to_queue(session: AsyncSession, plan: _Plan) -> int:
    """How many reminders the cooperative's scan will queue: its members not paid up for a type due and not
    reminded of it yet (the daily fan-out hands out the send slots by it). One query per type due."""
    count = 0
    for due in plan.dues:
        key = literal("sms:reminder:") + _MEMBER.c.id + literal(f":{due.type_id}:{due.due.isoformat()}")
        count += (await session.execute(select(func.count()).select_from(_MEMBER).where(
            _remindable(plan.cooperative_id),
            ~exists().where(_PAYMENT.c.member_id == _MEMBER.c.id, _paid_by(plan, due)),
            ~exists().where(_OUTBOX.c.dedupe_key == key)))).scalar_one()
    return count


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """What one chunk of a cooperative's members came to."""

    members: int  # members read (at most CHUNK)
    queued: int  # reminders added (not counting those already queued)
    slot: int  # the next send slot
    after: str | None  # the last member read: the next chunk starts after it; None: the cooperative is done
    deferred: int  # reminders left for the next scan (past the cut-off)


async def _scan_chunk(session: AsyncSession, rt: Runtime, plan: _Plan, *, after: str | None, slot: int) -> _Chunk:
    """Queue the reminders of the next CHUNK members (by id, after `after`) in the caller's transaction: a few
    queries and one INSERT, whatever the cooperative's size. Those already queued (a retry, a second scan the
    same day, by this release or the one before) are skipped and take no send slot; the others take slots from
    `slot` on. Past the cut-off, the rest of the cooperative is left for the next scan."""
    if not plan.dues:
        return _Chunk(0, 0, slot, None, 0)
    query = select(_MEMBER.c.id).where(_remindable(plan.cooperative_id)).order_by(_MEMBER.c.id).limit(CHUNK)
    if after is not None:
        query = query.where(_MEMBER.c.id > after)
    members = list((await session.execute(query)).scalars())
    if not members:
        return _Chunk(0, 0, slot, None, 0)
    rate = rt.settings.sms_rate_per_second
    # A chunk run later than its first slot (its job waited for a worker) keeps the spread from now on, rather
    # than making its reminders all due at once.
    shift = max(timedelta(0), utcnow() - (plan.start + reminder_offset(slot, rate)))
    rows: list[dict[str, Any]] = []
    deferred, now = 0, utcnow()
    for due in plan.dues:
        paid = set((await session.execute(select(_PAYMENT.c.member_id).where(
            _PAYMENT.c.member_id.in_(members), _paid_by(plan, due)))).scalars())
        keys = {member_id: due.dedupe(member_id) for member_id in members if member_id not in paid}
        queued = set((await session.execute(select(_OUTBOX.c.dedupe_key).where(
            _OUTBOX.c.dedupe_key.in_([f"sms:{key}" for key in keys.values()])))).scalars())
        for member_id, key in keys.items():
            if f"sms:{key}" in queued:
                continue
            run_at = plan.start + shift + reminder_offset(slot, rate)
            if run_at >= plan.send_before:
                deferred += 1  # no job: tomorrow's scan (still within the days before) queues it first
                continue
            job = sms_job(template="payment_reminder", cooperative_id=plan.cooperative_id, member_id=member_id,
                          context={"member_id": member_id, "payment_type_id": due.type_id,
                                   "due_date": due.due.isoformat()},
                          cipher=rt.cipher, dedupe=key)
            # Checked again when it is sent (channels.sms.jobs): paid for this due date since, opted out,
            # suspended, its type or cooperative no longer active, or still queued at the cut-off (an
            # aggregator outage), it is dropped.
            period = due.period
            payload = {**job.payload, "paid_since": period.since.isoformat(),
                       "due_from": period.due_from.isoformat(), "due_until": period.due_until.isoformat(),
                       "send_before": plan.send_before.isoformat()}
            rows.append(dataclasses.replace(job, payload=payload, run_at=run_at).row(now))
            slot += 1
    await _insert(session, rows)
    # Every slot left is past the cut-off once one is: the rest of the cooperative waits for the next scan.
    done = len(members) < CHUNK or deferred > 0
    return _Chunk(len(members), len(rows), slot, None if done else members[-1], deferred)


async def _insert(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Add outbox rows (NewJob.row) in one statement run for all of them; one whose dedupe key exists (queued
    meanwhile by a concurrent scan) is skipped. One statement whatever the number of rows (not enqueue_many's
    INSERT of n rows, built and cached for each n)."""
    if rows:
        await session.execute(row_insert(session.get_bind().dialect.name, OutboxJob,
                                         ignore_conflict=("dedupe_key",)), rows)


async def _active(session: AsyncSession, cooperative_id: str | None = None) -> Sequence[Cooperative]:
    query = select(Cooperative).where(Cooperative.status == "ACTIVE").order_by(Cooperative.id)
    if cooperative_id is not None:
        query = query.where(Cooperative.id == cooperative_id)
    return (await session.execute(query)).scalars().all()


def _log_deferred(cooperative_id: str, deferred: int, queued: int) -> None:
    if deferred:
        log.warning("reminders left for the next scan: the SMS rate does not reach every member before the "
                    "evening", extra={"cooperative_id": cooperative_id, "deferred": deferred, "queued": queued})


async def scan(session: AsyncSession, rt: Runtime, *, now: datetime | None = None,
               cooperative_id: str | None = None, first_slot: int = 0) -> int:
    """Queue every reminder due at `now` (of one cooperative, or all) in the caller's transaction; returns how
    many were queued (duplicates are not counted). `first_slot`: send slots already taken by this scan's other
    reminders, so the send times keep following one another at the SMS rate. The worker does not run this
    (its cost grows with the members): its daily job fans out one job per cooperative, a chunk each."""
    if not rt.settings.reminders_enabled:
        return 0
    now = now or utcnow()
    start = utcnow()  # the jobs' run_at is real time, whatever `now` the scan is for
    slot = first_slot
    queued = 0
    for coop in await _active(session, cooperative_id):
        plan = await _plan(session, rt, coop, now, start)
        after: str | None = None
        deferred = coop_queued = 0
        while True:
            chunk = await _scan_chunk(session, rt, plan, after=after, slot=slot)
            slot, deferred, coop_queued = chunk.slot, deferred + chunk.deferred, coop_queued + chunk.queued
            if chunk.after is None:
                break
            after = chunk.after
        queued += coop_queued
        _log_deferred(coop.id, deferred, coop_queued)
    return queued


_COOP, _TYPE = Cooperative.__table__, PaymentType.__table__
# A reminder's member as it is at sending time (STOP sent, suspended or left, paid since the scan), and what
# the reminder offers: its cooperative still active, its payment type still on the menu (NULL: deleted). STOP is
# read on the membership and on its number (one primary-key probe): a membership does not carry its number's STOP
# sent elsewhere or before it was made (core.members: its cooperative must not learn of it). Both give the one
# reason opted_out: whatever reads a skipped reminder's reason cannot tell them apart.


def _reminder_state(paid_for: Any) -> Any:
    return select(
        or_(_MEMBER.c.reminders_opt_out, number_opted_out(_MEMBER.c.phone_index)).label("reminders_opt_out"),
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


async def fan_out(session: AsyncSession, rt: Runtime, day: date, now: datetime) -> tuple[int, int]:
    """The daily scan's work, in the caller's transaction: one COOPERATIVE_SCAN job per active cooperative with
    a type due (dedupe-keyed by day and cooperative: a retried or second fan-out adds none twice), each given
    its first send slot after the reminders of those before it, so the send times of all of them follow one
    another at the SMS rate. Returns (jobs, reminders to queue). A query or two per cooperative, none per
    member."""
    jobs, slot = [], 0
    for coop in await _active(session):
        plan = await _plan(session, rt, coop, now, now)
        if not plan.dues:
            continue
        jobs.append(_cooperative_job(day, coop.id, now, slot=slot, after=None))
        slot += await _to_queue(session, plan)
    await _insert(session, [job.row() for job in jobs])
    return len(jobs), slot


def _cooperative_job(day: date, cooperative_id: str, now: datetime, *, slot: int, after: str | None) -> NewJob:
    """The job scanning the cooperative's members after `after` (None: from the first), one CHUNK of them, its
    first reminder taking send slot `slot`. `at`: the daily scan's time, the same for all its jobs."""
    key = f"reminders.scan:{day.isoformat()}:{cooperative_id}" + ("" if after is None else f":{after}")
    return NewJob(COOPERATIVE_SCAN, {"day": day.isoformat(), "cooperative_id": cooperative_id,
                                     "at": now.isoformat(), "slot": slot, "after": after},
                  dedupe_key=key, cooperative_id=cooperative_id, max_attempts=5)


async def scan_chunk_job(session: AsyncSession, rt: Runtime, payload: dict[str, Any]) -> _Chunk | None:
    """A COOPERATIVE_SCAN job's work, in the caller's transaction: one chunk of members, and the job for the
    next chunk (dedupe-keyed by where it starts: a retry queues neither its reminders nor it twice). None: the
    cooperative is no longer active (suspended since the fan-out), or reminders were switched off."""
    if not rt.settings.reminders_enabled:
        return None
    coops = await _active(session, payload["cooperative_id"])
    if not coops:
        return None
    now = datetime.fromisoformat(payload["at"])
    plan = await _plan(session, rt, coops[0], now, now)
    chunk = await _scan_chunk(session, rt, plan, after=payload.get("after"), slot=int(payload["slot"]))
    if chunk.after is not None:
        follow = _cooperative_job(date.fromisoformat(payload["day"]), plan.cooperative_id, now, slot=chunk.slot,
                                  after=chunk.after)
        await _insert(session, [follow.row()])
    _log_deferred(plan.cooperative_id, chunk.deferred, chunk.queued)
    return chunk


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
        if not rt.settings.reminders_enabled:
            return
        # One job per cooperative, a chunk of members each: no job's work grows with the members (this one
        # ran them all and was cut off at the handler timeout past some 40,000), a cooperative that fails is
        # retried alone, and a retry redoes one chunk, not the day.
        async with rt.sessionmaker.begin() as session:
            jobs, planned = await fan_out(session, rt, day, now)
        log.info("reminder scan fanned out", extra={"day": day.isoformat(), "cooperatives": jobs,
                                                    "reminders": planned})

    async def run_cooperative(job: Job) -> None:
        async with rt.sessionmaker.begin() as session:
            chunk = await scan_chunk_job(session, rt, job.payload)
        if chunk is not None:
            log.info("reminders queued", extra={"day": job.payload["day"],
                                                "cooperative_id": job.payload["cooperative_id"],
                                                "members": chunk.members, "count": chunk.queued})

    return {"reminders.scan": run_scan, COOPERATIVE_SCAN: run_cooperative}
