"""Payment reminders: an SMS to each member who has not yet paid a recurring type before its due day.

A daily `reminders.scan` job (one per day whatever the number of workers: its dedupe key is the date)
finds, per cooperative and in the cooperative's own time zone, the recurring payment types falling
due within `REMINDER_DAYS_BEFORE` days, and queues `payment_reminder` for every active member who
has not paid that type for the coming due date (see PaidFor: for a fixed-amount type, the amount kept
reaches the type's), has no payment of it still open for that date (a second payment would pay twice), has
not sent STOP, and has not been reminded of that due date yet. Reminded: a reminder of it was sent (it left
for the aggregator), or one is still waiting to go (queued or being sent, before its day's cut-off). A
reminder's dedupe key (and its message's) names the member, the type, the due date and the scan's day, so a
re-run, a second worker or a late scan the same day never queues it twice, and one that did not go out (dropped
at its turn: the member suspended, STOP, the day over after an aggregator outage; or parked) is queued again by
the next morning's scan while the due date is still within the days before. Never two sent for one due date: one
sent counts for it whatever scan day its key names (read by the key's prefix), also one sent before
REMINDER_DAYS_BEFORE was lowered, on a day no longer among the days before.

No job's work grows with the number of members: the daily job fans out one `reminders.cooperative` job per
cooperative with a type due (dedupe-keyed by day and cooperative), and each of those queues the reminders of
CHUNK members (by member id, in one INSERT) and leaves the job for the next CHUNK. A retry redoes one chunk and
adds only what is missing; one cooperative failing leaves the others' reminders alone.

The reminders are not all due at once: their jobs' run_at is spread at REMINDER_SHARE of the SMS send
rate (SMS_RATE_PER_SECOND), so payment jobs queued meanwhile are claimed between them and receipts keep
the rest of the rate. A scan that missed its hour (no worker running) runs within CATCH_UP of it;
later than that it is skipped (the next day's scan reminds whoever is still due) rather than texting
members in the evening. Each reminder is checked again when its turn comes: one whose member has paid (or has a
payment of it open), sent STOP or been suspended since the scan, whose payment type was deactivated, no longer
falls due on the reminder's date or its cooperative suspended since, whose due date was reminded by another
reminder meanwhile, or still queued at SEND_UNTIL_LOCAL, is not sent.

A fixed amount the provider took only part of in the period (or partly refunded) is owed its balance: the reminder
states it beside the price (reminder_balance), and the USSD offers and charges it when she picks the type
(balance_owed, for the period a payment made then pays: current_period). An API payment states its own amount.
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, ColumnElement, and_, bindparam, case, exists, false, func, literal, or_, select, true
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal

from core.cooperatives import zone_of
from core.db import UTCDateTime, parse_aware, row_insert, utcnow
from core.errors import ValidationError
from core.members import number_opted_out
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType, SmsMessage
from core.notify import sms_job
from core.outbox import Handler, Job, NewJob, enqueue
from core.references import next_number
from core.state.payment import OPEN_VALUES, taken_after_failure_where
from core.state.sms import SKIPPED

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.reminders")

INTERVAL_MONTHS = {"MONTHLY": 1, "QUARTERLY": 3, "YEARLY": 12}
PAID = ("COMPLETED", "PARTIALLY_REFUNDED")  # money kept: a fully refunded payment does not count
# A payment still open (OPEN_VALUES) waits for the provider's word (held up to the settle grace in an outage): it
# may yet take the money, so its member is not told to pay again (she would pay twice); reminded if it fails.
# A reminder's message FAILED with provider_status SKIPPED (core.state.sms) was dropped at its turn: it never
# reached the aggregator, so it does not count as sent.
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
    """Which payments count toward a recurring type's period ending on the due date `due` (local day, the
    cooperative's zone): a kept payment that names that due date (the API's dueDate falls on that local day), or
    one that names none and was made after the midpoint between the previous due date and this one. For a type
    whose member chooses the amount any one of them pays the period; for a fixed-amount type the money they keep
    in its currency must reach amount_owed (_settled, why_not_send). A payment made on the
    due day itself, or late (the 5th, for rent due the 1st), pays that period, not the next: the member is
    still reminded of the next one. One made in the second half of the period pays ahead (early). A dueDate
    given as a bare date ("2026-12-01", read as UTC midnight, as seed 001 writes it) names that day in any zone,
    also west of UTC where UTC midnight is still the local day before."""

    since: datetime  # UTC: local midnight of the period's midpoint
    due_from: datetime  # UTC: local midnight starting the due day
    due_until: datetime  # UTC: local midnight ending it
    # UTC: the next period's `since`, from which a payment naming no due date pays that one instead; None: no end.
    # The scan, the USSD and the BALANCE SMS read the period coming or under way, which nothing was paid after yet,
    # and leave it open; a period read after it ended (the dues report) ends here, or every payment made since
    # naming none (the USSD's) would pay it too.
    until: datetime | None = None

    @classmethod
    def of(cls, previous_due: date, due: date, zone: tzinfo, *, opened: date | None = None) -> PaidFor:
        """`opened`: the local day the type was created (period_of). Its first period, whose previous due date came
        before it, is paid from that day: no period before it was there to pay late."""
        midpoint = previous_due + timedelta(days=math.ceil((due - previous_due).days / 2))
        if opened is not None and previous_due < opened < midpoint:
            midpoint = opened

        def midnight(day: date) -> datetime:
            return datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)

        return cls(midnight(midpoint), midnight(due), midnight(due + timedelta(days=1)))


def period_of(ptype: Any, window: tuple[date, date], zone: tzinfo) -> PaidFor:
    """PaidFor.of the period of `ptype` that due_dates' `window` (previous due date, due date) ends, from the day the
    type was created when that is its first: a susu created on the 3rd and due the 28th, paid on the 3rd, pays the
    28th's (the midpoint, the 13th, left it paying none: the BALANCE SMS, the dues report and the reminder asked for
    it again)."""
    opened = (ptype.created_at or utcnow()).astimezone(zone).date()
    return PaidFor.of(*window, zone, opened=opened)


def utc_midnight(day: date) -> datetime:
    """The instant a bare-date dueDate naming `day` is stored as."""
    return datetime.combine(day, time(), tzinfo=UTC)


def paid_clause(payment: Any, since: Any, due_from: Any, due_until: Any, named: Any, until: Any = None) -> Any:
    """SQL: the payment (a table) pays the period PaidFor describes (its bounds as SQL expressions; `named`: the
    due day's utc_midnight; `until`: PaidFor.until, None for none)."""
    undated = [payment.c.due_date.is_(None), payment.c.created_at > since]
    if until is not None:
        undated.append(payment.c.created_at <= until)
    return or_(and_(payment.c.due_date.is_not(None),
                    or_(and_(payment.c.due_date >= due_from, payment.c.due_date < due_until),
                        payment.c.due_date == named)),
               and_(*undated))


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


def first_due_date(ptype: Any, zone: tzinfo = UTC) -> date | None:
    """A recurring type's first due date: the first of its schedule on or after the local day it was made (None for
    a type that is not recurring). One earlier in the month it was made (rent due the 1st, made on the 5th) had passed
    when it was made: no one was asked for it (the USSD's period then was the next, paid from that day: period_of),
    reminded of it or can pay it by paying now, so it is none of the type's periods (the dues report refuses it)."""
    window = due_dates(ptype, (ptype.created_at or utcnow()).astimezone(zone).date(), zone)
    return None if window is None else window[1]


def due_dates_around(ptype: Any, day: date, zone: tzinfo = UTC) -> tuple[date | None, date | None] | None:
    """(the last due date before `day`, the first on or after it) of a recurring type on its schedule (due_dates'
    months), also before the type was made (due_dates starts at its first); None for a type that is not recurring.
    Either is None past the calendar's ends (year 1, year 9999)."""
    months = INTERVAL_MONTHS.get((ptype.recurring_interval or "MONTHLY").upper())
    if not ptype.is_recurring or not ptype.due_day or months is None:
        return None
    anchor = (ptype.created_at or utcnow()).astimezone(zone).date()
    elapsed = (day.year - anchor.year) * 12 + (day.month - anchor.month)
    # The month of the schedule on or before `day`'s (a month index: year * 12 + month - 1).
    index = anchor.year * 12 + anchor.month - 1 + elapsed // months * months

    def due_in(month_index: int) -> date | None:
        year, month = divmod(month_index, 12)
        return _on_day(year, month + 1, ptype.due_day) if 1 <= year <= 9999 else None

    due = due_in(index)
    if due is not None and due >= day:
        return due_in(index - months), due
    return due, due_in(index + months)


def due_date_refusal(ptype: Any, zone: tzinfo, due_date: datetime) -> ValidationError | None:
    """Why an API payment's `due_date` names no period of `ptype` (a PaymentType; `zone`: its cooperative's), if so.
    A payment pays the period whose due date its dueDate names (PaidFor: that local day, or the bare date, stored as
    UTC midnight), and no other: one naming another day (the 15th of rent due the 1st, the day before the due day
    in the cooperative's zone) paid none, its member UNPAID in every dues report, reminded and asked again by the
    USSD. Refused, naming the due dates either side, rather than read as some period: the 15th is as much the
    period before's (paid late) as the one after's (paid early), and the reminders, the USSD, the BALANCE SMS and
    the dues report find a period's payments by its due day. Any day of the type's schedule is taken, also one
    before the type was made (seed 001's example). A type that is not recurring has no periods: any day is."""
    utc_day = due_date.astimezone(UTC).date()
    try:
        local: date | None = due_date.astimezone(zone).date()
    except OverflowError:  # within a day of the calendar's ends
        local = None
    named = [day for day in (local, utc_day if due_date == utc_midnight(utc_day) else None) if day is not None]
    shown = local or utc_day
    around = due_dates_around(ptype, shown, zone)
    if around is None or any((due_dates_around(ptype, day, zone) or (None, None))[1] == day for day in named):
        return None
    either = " or ".join(day.isoformat() for day in around if day is not None)
    return ValidationError(f"dueDate must be a due date of {ptype.name!r}, the day its period ends (the "
                           f"cooperative's local day, or the bare date YYYY-MM-DD): {either}", field="dueDate")


_MEMBER, _PAYMENT, _OUTBOX, _SMS = Member.__table__, Payment.__table__, OutboxJob.__table__, SmsMessage.__table__


def amount_owed(allow_custom_amount: bool | None, amount_minor: int | None) -> int | None:
    """The amount that pays a period of a type: the period is paid once the money kept by its payments in the
    type's currency reaches it (a payment the provider took only in part, or in another currency, leaves the
    rest owed). None for a type whose member chooses the amount (a custom amount allowed, or none set): any
    payment kept pays the period."""
    return None if allow_custom_amount or not amount_minor else amount_minor


def _key_suffix(type_id: str, due: date, day: date | None) -> str:
    return f":{type_id}:{due.isoformat()}" + ("" if day is None else f":{day.isoformat()}")


def reminder_key(member_id: str, type_id: str, due: date, day: date | None) -> str:
    """A reminder's key after "sms:" (sms_job), also its message's idempotency key: one per member, type, due date
    and scan day (the cooperative's local day), so the next morning's scan can queue again one that did not go
    out. `day` None: the key of the releases before the day was in it (still read as this due date's)."""
    return f"reminder:{member_id}{_key_suffix(type_id, due, day)}"


def _key_of(member: Any, type_id: str, due: date, day: date | None) -> Any:
    """SQL: reminder_key of the member whose id is `member` (a column)."""
    return literal("reminder:") + member + literal(_key_suffix(type_id, due, day))


def _kept(payment: Any) -> Any:
    """SQL: what a payment (a table) keeps of the member's money: what the provider took (amount_minor unless a
    mismatch said otherwise; 0 when it took another currency) less what was refunded."""
    return func.coalesce(payment.c.collected_minor, payment.c.amount_minor) - func.coalesce(payment.c.refunded_minor, 0)


def _in_statuses(payment: Any, statuses: tuple[str, ...]) -> Any:
    """SQL: the payment (a table) is in one of `statuses`; with PAID, also a FAILED one whose money the provider then
    reported taken (core.state.payment.taken_after_failure: held, in the reconciliation and the member's statement,
    refundable). She was texted that the money was taken after all and not to pay again: it pays its period as a
    completed payment does (what it keeps, _kept), or the dues report listed her UNPAID, the reminders and the BALANCE
    SMS asked her for the whole price and the USSD charged it again."""
    found = payment.c.status.in_(statuses)
    if statuses != PAID:
        return found
    # Refunded in full it keeps nothing and stays FAILED: it counts for nothing, as a REFUNDED one (a type whose
    # member chooses the amount is paid by any payment counted here: _period_money's first).
    return or_(found, and_(taken_after_failure_where(payment.c), _kept(payment) > 0))


class _KeyOf(ColumnElement[bool]):
    """SQL condition: `key` (a text column) is a key of the due date whose reminder_key without a day is `prefix`
    (a SQL expression): that key itself (the releases before the day was in it) or it followed by ":<day>", any day.
    A range in byte order (after the due date comes nothing or ":", below ";"), read from an index: on PostgreSQL by
    the text_pattern_ops operators (ix_sms_messages_key_prefix: the unique index's collation is not byte order),
    on SQLite by its BINARY order."""

    type = Boolean()
    _is_implicitly_boolean = True  # a condition: no "= 1" after it where booleans are integers (SQLite)
    inherit_cache = True
    _traverse_internals = [("key", InternalTraversal.dp_clauseelement),
                           ("prefix", InternalTraversal.dp_clauseelement)]

    def __init__(self, key: Any, prefix: Any) -> None:
        self.key, self.prefix = key, prefix


def _compile_key_of(element: _KeyOf, compiler: Any, at_least: str, below: str, **kw: Any) -> str:
    key = compiler.process(element.key, **kw)
    return (f"({key} {at_least} ({compiler.process(element.prefix, **kw)}) AND "
            f"{key} {below} ({compiler.process(element.prefix + literal(';'), **kw)}))")


@compiles(_KeyOf)
def _key_of_default(element: _KeyOf, compiler: Any, **kw: Any) -> str:
    return _compile_key_of(element, compiler, ">=", "<", **kw)


@compiles(_KeyOf, "postgresql")
def _key_of_postgresql(element: _KeyOf, compiler: Any, **kw: Any) -> str:
    return _compile_key_of(element, compiler, "~>=~", "~<~", **kw)


def _sent(prefix: Any, *others: Any) -> Any:
    """SQL condition: a reminder message of the due date whose key without a day is `prefix` (a SQL expression),
    whatever scan day its key names (_KeyOf: the days that remind of a due date move with REMINDER_DAYS_BEFORE, the
    reminder sent before it was lowered is one of them all the same), left for the aggregator: anything but QUEUED
    (not yet sent, or parked) and FAILED SKIPPED (dropped at its turn). One the aggregator refused (REJECTED: this
    number) counts too: sending it again would only be refused again. `others`: conditions on _SMS besides."""
    return exists().where(_KeyOf(_SMS.c.idempotency_key, prefix), _SMS.c.status != "QUEUED",
                          func.coalesce(_SMS.c.provider_status, "") != SKIPPED, *others)


@dataclasses.dataclass(frozen=True)
class _Due:
    """A recurring type of the cooperative falling due within the reminder window, and what pays it."""

    type_id: str
    due: date
    period: PaidFor
    day: date  # the scan's local day: in the reminders' keys
    first_day: date  # the first scan day that reminds of this due date (REMINDER_DAYS_BEFORE before it)
    amount_minor: int | None  # what pays the period (kept, in `currency`); None: a free amount, any payment
    currency: str

    def dedupe(self, member_id: str) -> str:
        return reminder_key(member_id, self.type_id, self.due, self.day)

    def earlier(self) -> list[date | None]:
        """The days an earlier reminder of this due date still waiting to go may be keyed by: the scan days before
        this one (from REMINDER_DAYS_BEFORE before the due date as it is set now), and None (the key of the
        releases before the day was in it). One sent is found by any day (_sent)."""
        return [None, *_scan_days(self.first_day, self.day - timedelta(days=1))]


def _scan_days(first: date, last: date) -> list[date]:
    """The scan days from `first` to `last`, both included (none when `last` is before `first`)."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


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
    before = rt.settings.reminder_days_before
    types = (await session.execute(select(PaymentType).where(
        PaymentType.cooperative_id == coop.id, PaymentType.is_active.is_(True),
        PaymentType.is_recurring.is_(True)).order_by(PaymentType.id))).scalars().all()
    dues = []
    for ptype in types:
        window = due_dates(ptype, today, zone)
        if window is None:
            continue
        period = period_of(ptype, window, zone)
        # Not before the period's midpoint, from which a payment pays it (PaidFor.since): with REMINDER_DAYS_BEFORE
        # at 15 or more, a monthly type's reminder of 1 December went out on 11 November, while the USSD and the
        # BALANCE SMS still asked for November's, and her payment then paid November.
        first_day = max(window[1] - timedelta(days=before), period.since.astimezone(zone).date())
        if first_day <= today <= window[1]:
            dues.append(_Due(ptype.id, window[1], period, today, first_day,
                             amount_owed(ptype.allow_custom_amount, ptype.amount_minor), ptype.currency))
    # The local cut-off as real time (a scan run for another `now`, in tests, keeps the same window).
    send_before = start + (datetime.combine(today, SEND_UNTIL_LOCAL, tzinfo=zone) - now)
    return _Plan(coop.id, start, send_before, tuple(dues))


def _remindable(cooperative_id: str) -> Any:
    """SQL condition: a member of the cooperative who gets reminders (active, not opted out by STOP). The
    membership's flag alone (no join per chunk): a number that sent STOP elsewhere or before joining is not on it
    (core.members), and its reminder, queued as any other, is dropped at its turn (why_not_send)."""
    return and_(_MEMBER.c.cooperative_id == cooperative_id, _MEMBER.c.status == "ACTIVE",
                _MEMBER.c.reminders_opt_out.is_(False))


def of_period(cooperative_id: str, type_id: str, due: date, period: PaidFor, statuses: tuple[str, ...]) -> Any:
    """SQL condition on _PAYMENT: a payment of the member (the caller's _MEMBER row), of the type's period ending
    on `due` (`period`: PaidFor.of it), in one of `statuses`."""
    return and_(_PAYMENT.c.member_id == _MEMBER.c.id, _PAYMENT.c.cooperative_id == cooperative_id,
                _PAYMENT.c.payment_type_id == type_id, _in_statuses(_PAYMENT, statuses),
                paid_clause(_PAYMENT, period.since, period.due_from, period.due_until, utc_midnight(due),
                            period.until))


def _of_period(plan: _Plan, due: _Due, statuses: tuple[str, ...]) -> Any:
    return of_period(plan.cooperative_id, due.type_id, due.due, due.period, statuses)


def _period_money(of_period: Callable[[tuple[str, ...]], Any], currency: Any) -> tuple[Any, Any, Any]:
    """SQL, over the payments `of_period(statuses)` selects: whether one is kept (collected), the money they keep
    in `currency` (a fixed amount is paid when it reaches it), and whether one is still open. The scan and the
    send-time check read a period through these, so the two cannot disagree on what pays it."""
    return (exists().where(of_period(PAID)),
            select(func.coalesce(func.sum(_kept(_PAYMENT)), 0)).where(
                of_period(PAID), _PAYMENT.c.currency == currency).scalar_subquery(),
            exists().where(of_period(OPEN_VALUES)))


def period_money(cooperative_id: str, type_id: str, currency: str, due: date, period: PaidFor,
                 member_ids: Sequence[str] | None = None, *, now: datetime, grace: timedelta) -> Any:
    """SQL subquery: one row per member (`member_id`) with a payment kept or open of the type's period ending on `due`
    (`period`: PaidFor.of it, as of_period selects), with what the dues report (core.reports.dues_of) lists of her,
    read as the scan, why_not_send and balance_now read it: `kept` (the money her kept payments keep in the type's
    currency: _period_money's), `waiting` (the money her open payments ask in it: balance_now's), `still_open`
    (a payment of it open, in any currency: the scan does not remind her then), `last_paid_at` (the latest
    completed_at of those of her kept payments that `kept` counts money of: one the provider took in another
    currency, or that keeps nothing, is none). Open as balance_now and the USSD judge it at `now`
    (core.payments.still_open, PROCESSING up to `grace` past its window: core.payments.open_window's): a prompt past
    its approval window can no longer be approved, and the USSD asks her to pay again beside it, so it is neither
    paid nor awaiting her approval, whether or not the worker has closed it yet (the scan, reading any open payment,
    leaves her alone until it does). Nor a prompt she can no longer approve from her number now (members.phone_index:
    core.payments.approvable_by, as the USSD and balance_now judge it by the number she dials or texts from): one
    left on a SIM she lost, made before the office corrected her number; if it completes all the same, it counts as
    kept. One pass over the period's payments grouped by member: a subquery per member and column read them again for
    each of 20,000 members (seconds a page); approvable_by's, correlated on the payment's member, is read only for
    the few payments still open (AND evaluates left to right: a kept or closed one never reaches it), a few index
    reads each (her member row, her number's corrections in the audit log). `member_ids`: only theirs."""
    # local: core.payments reads paid_clause from this module at import
    from core.payments import approvable_by, still_open

    # Her number now, by the payment's member: correlated on payments only (members is also the outer query's).
    number = select(_MEMBER.c.phone_index).where(_MEMBER.c.id == _PAYMENT.c.member_id).correlate(_PAYMENT)
    kept_now = _in_statuses(_PAYMENT, PAID)
    open_now = and_(still_open(now, now - grace), approvable_by(_PAYMENT.c.member_id, number.scalar_subquery()))
    same = _PAYMENT.c.currency == currency
    query = select(
        _PAYMENT.c.member_id,
        func.coalesce(func.sum(case((and_(kept_now, same), _kept(_PAYMENT)), else_=0)), 0).label("kept"),
        func.coalesce(func.sum(case((and_(open_now, same), _PAYMENT.c.amount_minor), else_=0)), 0).label("waiting"),
        (func.sum(case((open_now, 1), else_=0)) > 0).label("still_open"),
        func.max(case((and_(kept_now, same, _kept(_PAYMENT) > 0), _PAYMENT.c.completed_at))).label("last_paid_at"),
    ).where(_PAYMENT.c.cooperative_id == cooperative_id, _PAYMENT.c.payment_type_id == type_id,
            or_(kept_now, open_now),
            paid_clause(_PAYMENT, period.since, period.due_from, period.due_until, utc_midnight(due), period.until)
            ).group_by(_PAYMENT.c.member_id)
    if member_ids is not None:
        query = query.where(_PAYMENT.c.member_id.in_(member_ids))
    return query.subquery("period_money")


def _settled(plan: _Plan, due: _Due) -> Any:
    """SQL condition on _MEMBER: nothing to remind her of for `due`'s period. Paid: for a fixed amount, the money
    kept by the period's payments in the type's currency reaches it (one the provider took only in part, or in
    another currency, is still owed); for a free amount, any payment kept. Or a payment of it is still open: she
    is not told to pay again while it may yet take the money (the next day's scan reminds her if it fails)."""
    any_kept, kept, still_open = _period_money(lambda statuses: _of_period(plan, due, statuses), due.currency)
    return or_(any_kept if due.amount_minor is None else kept >= due.amount_minor, still_open)


def _reminded(due: _Due, now: datetime) -> Any:
    """SQL condition on _MEMBER: she is reminded of `due`'s date already, or will be. Today's reminder is queued
    (whatever became of it: the key is taken until tomorrow), one of any earlier scan day was sent (see _sent:
    also one of a day before REMINDER_DAYS_BEFORE was lowered), or one of an earlier day is still waiting to go:
    being sent, or due to run (pending) before its day's cut-off (`send_before`, real time, as ISO text in UTC:
    compared as text, it orders as the instants do). One dropped at its turn, parked (an aggregator outage) or still
    pending past its cut-off (dropped when it runs) is not: this scan queues a new one. A few index probes per
    member (unique keys; the sent one by the key's prefix), whatever the tables' size.
    One being sent (RUNNING: its worker may have been lost mid-send, the lease not lapsed yet) is found whatever scan
    day its key names, as one sent is: of a day before REMINDER_DAYS_BEFORE was lowered, no longer among the days
    before (a job pending of such a day is past its day's cut-off). Read once per statement (an uncorrelated
    subquery, hashed), from the few running jobs (ix_outbox_due), not per member."""
    member = _MEMBER.c.id
    job_member = _OUTBOX.c.payload["member_id"].as_string()
    being_sent = select(job_member).where(
        _OUTBOX.c.status == "RUNNING",
        _KeyOf(_OUTBOX.c.dedupe_key, literal("sms:") + _key_of(job_member, due.type_id, due.due, None)))
    earlier = [_key_of(member, due.type_id, due.due, day) for day in due.earlier()]
    send_before = _OUTBOX.c.payload["send_before"].as_string()
    # A CASE, not a condition on status the planner could look up by ix_outbox_due: with the statistics behind
    # the thousands of reminders a scan adds, it scanned every pending job for each member (a chunk took seconds).
    waiting = case((_OUTBOX.c.status == "RUNNING", true()),
                   (_OUTBOX.c.status == "PENDING", or_(send_before.is_(None), send_before > now.isoformat())),
                   else_=false())
    return or_(exists().where(_OUTBOX.c.dedupe_key == literal("sms:") + _key_of(member, due.type_id, due.due,
                                                                               due.day)),
               _sent(_key_of(member, due.type_id, due.due, None)),
               exists().where(_OUTBOX.c.dedupe_key.in_([literal("sms:") + key for key in earlier]), waiting),
               member.in_(being_sent.scalar_subquery()))


def _to_remind(plan: _Plan, due: _Due, now: datetime) -> Any:
    """SQL condition on _MEMBER, a member who gets reminders (_remindable): to remind of `due` today."""
    return and_(~_settled(plan, due), ~_reminded(due, now))


async def _to_queue(session: AsyncSession, plan: _Plan) -> int:
    """How many reminders the cooperative's scan will queue: its members to remind of a type due (the daily
    fan-out hands out the send slots by it). One query per type due."""
    count, now = 0, utcnow()
    for due in plan.dues:
        count += (await session.execute(select(func.count()).select_from(_MEMBER).where(
            _remindable(plan.cooperative_id), _to_remind(plan, due, now)))).scalar_one()
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
    """Queue the reminders of the next CHUNK members (by id, after `after`) in the caller's transaction: a query
    per type due and one INSERT, whatever the cooperative's size. Those reminded already (a retry, a second scan
    the same day, an earlier day's reminder sent or still waiting, by this release or the one before) are skipped
    and take no send slot; the others take slots from `slot` on. Past the cut-off, the rest of the cooperative is
    left for the next scan."""
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
        # By primary key alone (the chunk's members were read as _remindable): with the cooperative's condition
        # too, the plan PostgreSQL settles on for a statement run again and again (a generic plan) read all its
        # members by ix_members_coop_id and ran the checks on each (half a second a chunk at 20,000 members).
        remind = set((await session.execute(select(_MEMBER.c.id).where(
            _MEMBER.c.id.in_(members), _to_remind(plan, due, now)))).scalars())
        for member_id in (member_id for member_id in members if member_id in remind):
            run_at = plan.start + shift + reminder_offset(slot, rate)
            if run_at >= plan.send_before:
                deferred += 1  # no job: tomorrow's scan (still within the days before) queues it first
                continue
            job = sms_job(template="payment_reminder", cooperative_id=plan.cooperative_id, member_id=member_id,
                          context={"member_id": member_id, "payment_type_id": due.type_id,
                                   "due_date": due.due.isoformat()},
                          cipher=rt.cipher, dedupe=due.dedupe(member_id))
            # Checked again when it is sent (channels.sms.jobs, why_not_send): paid for this due date since (or a
            # payment of it open), opted out, suspended, its type or cooperative no longer active, its type no
            # longer due that day, its due date reminded meanwhile, or still queued at the cut-off (an
            # aggregator outage), it is dropped.
            period = due.period
            payload = {**job.payload, "paid_since": period.since.isoformat(),
                       "due_from": period.due_from.isoformat(), "due_until": period.due_until.isoformat(),
                       "send_before": plan.send_before.isoformat(), "day": due.day.isoformat(),
                       "first_day": due.first_day.isoformat()}
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
# the reminder offers: its cooperative still active, its payment type still on the menu (NULL: deleted) and still
# falling due on the reminder's date. STOP is read on the membership and on its number (one primary-key probe): a
# membership does not carry its number's STOP sent elsewhere or before it was made (core.members: its cooperative
# must not learn of it). Both give the one reason opted_out: whatever reads a skipped reminder's reason cannot tell
# them apart.


def _reminder_state(of_period: Any) -> Any:
    """The state query; `of_period`: SQL condition on _PAYMENT, a payment of the reminder's period."""

    def payments(statuses: tuple[str, ...]) -> Any:
        return and_(_PAYMENT.c.member_id == _MEMBER.c.id, _PAYMENT.c.payment_type_id == bindparam("t"),
                    _in_statuses(_PAYMENT, statuses), of_period)

    paid, kept, still_open = _period_money(payments, _TYPE.c.currency)
    return select(
        or_(_MEMBER.c.reminders_opt_out, number_opted_out(_MEMBER.c.phone_index)).label("reminders_opt_out"),
        _MEMBER.c.status,
        _COOP.c.status.label("coop_status"),
        _COOP.c.timezone,
        _TYPE.c.is_active.label("type_active"),
        _TYPE.c.is_recurring, _TYPE.c.recurring_interval, _TYPE.c.due_day, _TYPE.c.created_at,
        _TYPE.c.allow_custom_amount, _TYPE.c.amount_minor,
        paid.label("paid"), kept.label("kept"), still_open.label("open"),
        _sent(bindparam("prefix"), _SMS.c.idempotency_key != bindparam("own")).label("sent"),
    ).select_from(
        _MEMBER.join(_COOP, _COOP.c.id == _MEMBER.c.cooperative_id)
        .outerjoin(_TYPE, _TYPE.c.id == bindparam("t"))
    ).where(_MEMBER.c.id == bindparam("m"))


_SINCE = bindparam("since", type_=UTCDateTime())
_REMINDER_STATE = _reminder_state(paid_clause(_PAYMENT, _SINCE, bindparam("due_from", type_=UTCDateTime()),
                                              bindparam("due_until", type_=UTCDateTime()),
                                              bindparam("named", type_=UTCDateTime())))
# A reminder queued by a release before PaidFor (no due_from in its payload): any payment kept since paid_since
# counts, as that release scanned it.
_REMINDER_STATE_BY_TIME = _reminder_state(_PAYMENT.c.created_at > _SINCE)


def _day(value: Any) -> date | None:
    return date.fromisoformat(str(value)[:10]) if value else None


def _others(payload: dict[str, Any], due: date | None, day: date | None) -> dict[str, Any]:
    """The parameters of _REMINDER_STATE's `sent`: the key without a day of the payload's due date (`prefix`: the
    other reminders of it are those of its keys, whatever scan day they name, and the key of the releases before the
    day was in it), and this reminder's own key (`own`, not another's); none (NULL: nothing matches) for a reminder
    queued by such a release."""
    context = payload.get("context") or {}
    if due is None or day is None:
        return {"prefix": None, "own": None}
    return {"prefix": reminder_key(payload["member_id"], str(context.get("payment_type_id")), due, None),
            "own": reminder_key(payload["member_id"], str(context.get("payment_type_id")), due, day)}


def _falls_due(state: Any, due: date, day: date | None) -> bool:
    """The reminder's type (its columns in `state`) still falls due next on `due` seen from the scan's `day`: not
    made one-off, nor its due day or interval changed since the scan (the text would give a wrong date, or "due
    on" for a one-off). A reminder queued before the day was in its payload: the type is still recurring."""
    window = due_dates(state, day or due, zone_of(state.timezone))
    return window is not None and (day is None or window[1] == due)


async def why_not_send(conn: AsyncConnection, payload: dict[str, Any]) -> str | None:
    """Why a queued reminder (an 'sms.send' job's payload) must not go out any more, None to send it:
    too_late, member_missing, cooperative_inactive, type_inactive, type_changed, member_inactive, opted_out,
    paid, payment_open or reminded.
    Reminders are spread over the morning and may wait out an aggregator outage: by their turn the member
    may have paid (or have a payment of it still open: she would pay twice), sent STOP or been suspended, the
    cooperative been suspended, the payment type taken off the menu ("Dial ... to pay" for what the USSD no
    longer offers) or its due date changed, another reminder of the due date been sent (a parked one replayed), or
    the day may be over (scan() sets `send_before` and `paid_since`)."""
    send_before = parse_aware(payload.get("send_before"))
    if send_before is not None and utcnow() > send_before:
        return "too_late"
    context = payload.get("context") or {}
    due, day = _day(context.get("due_date")), _day(payload.get("day"))
    # A job queued before paid_since existed: nothing is paid after now, so only the member is checked.
    params: dict[str, Any] = {"m": payload["member_id"], "t": context.get("payment_type_id"),
                              "since": parse_aware(payload.get("paid_since")) or utcnow(),
                              **_others(payload, due, day)}
    due_from, due_until = parse_aware(payload.get("due_from")), parse_aware(payload.get("due_until"))
    if due_from is not None and due_until is not None:
        named = due_from if due is None else utc_midnight(due)
        state = (await conn.execute(_REMINDER_STATE, {**params, "due_from": due_from, "due_until": due_until,
                                                      "named": named})).first()
    else:  # queued by a release before PaidFor
        state = (await conn.execute(_REMINDER_STATE_BY_TIME, params)).first()
    if state is None:
        return "member_missing"
    if state.coop_status != "ACTIVE":
        return "cooperative_inactive"
    if not state.type_active:  # deactivated, or gone (no row)
        return "type_inactive"
    if due is not None and not _falls_due(state, due, day):
        return "type_changed"
    # A suspended member's reminder says so whether or not her number sent STOP: the reason the stored message
    # shows (channels.sms.jobs.shown_reason) is then the same for a number that sent STOP elsewhere as for one
    # that did not.
    if state.status != "ACTIVE":
        return "member_inactive"
    if state.reminders_opt_out:
        return "opted_out"
    owed = amount_owed(state.allow_custom_amount, state.amount_minor)
    if state.paid if owed is None else state.kept >= owed:
        return "paid"
    if state.open:
        return "payment_open"
    if state.sent:
        return "reminded"
    return None


def current_period(ptype: Any, now: datetime, zone: tzinfo) -> tuple[date, PaidFor] | None:
    """(due date, PaidFor) of the period a payment made at `now` naming no due date pays of a recurring type (its
    columns as due_dates reads them), None for a type that is not: the next due date's once past the midpoint
    before it (paid early: the reminders remind of that one then), else the last one's (paid late)."""
    window = due_dates(ptype, now.astimezone(zone).date(), zone)
    if window is None:
        return None
    period = period_of(ptype, window, zone)
    if now > period.since:
        return window[1], period
    previous = due_dates(ptype, window[0], zone)
    if previous is None or previous[1] != window[0]:  # the type's first due date: there was no period before
        return window[1], period
    return window[0], period_of(ptype, previous, zone)


def _paid_in_period(statuses: tuple[str, ...]) -> Any:
    return and_(_PAYMENT.c.member_id == bindparam("m"), _PAYMENT.c.payment_type_id == bindparam("t"),
                _in_statuses(_PAYMENT, statuses),
                paid_clause(_PAYMENT, _SINCE, bindparam("due_from", type_=UTCDateTime()),
                            bindparam("due_until", type_=UTCDateTime()), bindparam("named", type_=UTCDateTime())))


# The money a member's payments of a type keep in its currency for one period (as the scan and why_not_send count it).
_PERIOD_KEPT = select(_period_money(_paid_in_period, bindparam("currency"))[1])


@functools.cache
def _period_kept_open() -> Any:
    """_PERIOD_KEPT and the money its open payments ask (awaiting her PIN, or the provider's word), in the same
    currency: those still open as the USSD judges them (core.payments.still_open: PENDING inside its approval window,
    `open_now`; PROCESSING up to the grace after it, `open_processing`: not a prompt past its window, which can no
    longer be approved and the worker closes as TIMEOUT) that she can still approve paying from the number whose
    blind index is `payer` (core.payments.approvable_by: not a prompt left on a SIM she lost). Built once, on first
    use."""
    # local: core.payments reads paid_clause from this module at import
    from core.payments import approvable_by, still_open

    return _PERIOD_KEPT.add_columns(
        select(func.coalesce(func.sum(_PAYMENT.c.amount_minor), 0)).where(
            _paid_in_period(OPEN_VALUES), _PAYMENT.c.currency == bindparam("currency"),
            still_open(bindparam("open_now", type_=UTCDateTime()), bindparam("open_processing", type_=UTCDateTime())),
            approvable_by(bindparam("m"), bindparam("payer"))).scalar_subquery())


@functools.cache
def _period_kept_numbered() -> Any:
    """_PERIOD_KEPT and the reference sequence's next number (owed_now_numbered). Built once, on first use."""
    return _PERIOD_KEPT.add_columns(next_number())


async def balance_owed(conn: AsyncConnection | AsyncSession, member_id: str, ptype: Any, due: date,
                       period: PaidFor) -> int | None:
    """What the member still owes of a fixed-amount type (`ptype`: its id, currency, amount_minor and
    allow_custom_amount) for the period ending on `due`, when its payments kept part of the price but not all of it
    (the provider took less, or part was refunded); None otherwise: a type whose member chooses the amount, a
    period paid in full, or one nothing was kept of (its price is owed, said as it always was). One query."""
    owed = amount_owed(ptype.allow_custom_amount, ptype.amount_minor)
    if owed is None:
        return None
    kept = await _period_kept(conn, member_id, ptype, due, period)
    return owed - kept if 0 < kept < owed else None


def _period_params(member_id: str, ptype: Any, due: date, period: PaidFor) -> dict[str, Any]:
    return {"m": member_id, "t": ptype.id, "currency": ptype.currency, "since": period.since,
            "due_from": period.due_from, "due_until": period.due_until, "named": utc_midnight(due)}


async def _period_kept(conn: AsyncConnection | AsyncSession, member_id: str, ptype: Any, due: date,
                       period: PaidFor) -> int:
    kept = (await conn.execute(_PERIOD_KEPT, _period_params(member_id, ptype, due, period))).scalar_one()
    return int(kept)  # PostgreSQL sums integers as numeric


async def owed_now(conn: AsyncConnection | AsyncSession, member_id: str, ptype: Any, timezone: str | None
                   ) -> tuple[date, int] | None:
    """The due date of the period a payment made now pays (current_period, in the cooperative's zone) of a
    fixed-amount recurring type, and what the member still owes of it: the price when nothing was kept, the
    balance (balance_owed) when part was, 0 when it is paid in full. What the USSD offers when she picks the type
    (create_payment._balance_refusal reads the same period itself); None for a type that is not recurring or whose
    member chooses the amount. One query."""
    return (await owed_now_numbered(conn, member_id, ptype, timezone, number=False))[0]


async def owed_now_numbered(conn: AsyncConnection | AsyncSession, member_id: str, ptype: Any, timezone: str | None,
                            *, number: bool) -> tuple[tuple[date, int] | None, int | None]:
    """owed_now, and with `number` (on PostgreSQL) the reference sequence's next number taken by the same statement
    (core.references.next_number): the USSD shows the payment's reference on the screen after the one that reads
    the balance, and its own nextval was a round trip of its own. None for the number when not asked, elsewhere
    than on PostgreSQL, or when owed_now makes no query (then None too)."""
    period = current_period(ptype, utcnow(), zone_of(timezone))
    owed = amount_owed(ptype.allow_custom_amount, ptype.amount_minor)
    if period is None or owed is None:
        return None, None
    params = _period_params(member_id, ptype, *period)
    dialect = conn.dialect if isinstance(conn, AsyncConnection) else conn.get_bind().dialect
    if number and dialect.name == "postgresql":
        kept, taken = (await conn.execute(_period_kept_numbered(), params)).one()
    else:
        kept, taken = (await conn.execute(_PERIOD_KEPT, params)).scalar_one(), None
    # PostgreSQL sums integers as numeric
    return (period[0], left_to_pay(owed, int(kept))), None if taken is None else int(taken)


def left_to_pay(owed: int, kept: Any) -> Any:
    """What is left of a fixed amount `owed` once a period's payments keep `kept` (an int, or a SQL expression):
    the price when nothing was kept, else the balance, 0 when it is paid in full (or more). What owed_now and
    balance_now say, and the dues report's amountOutstanding."""
    if isinstance(kept, int):
        return max(owed - kept, 0) if kept > 0 else owed
    return case((kept <= 0, owed), (kept >= owed, 0), else_=owed - kept)


@dataclasses.dataclass(frozen=True)
class BalanceNow:
    """owed_now's period and what is left of it, and what the member's open payments of it ask (`waiting`)."""

    due: date
    left: int
    waiting: int


async def balance_now(conn: AsyncConnection | AsyncSession, member_id: str, ptype: Any, timezone: str | None, *,
                      payer: str | None, grace: timedelta) -> BalanceNow | None:
    """owed_now, and the money the member's payments of that period still open ask in the type's currency (awaiting
    her PIN or the provider's word: money that may yet be taken, not counted as paid): the BALANCE SMS says a
    payment is under way, or she pays again. Only those the USSD takes for still open (core.payments.still_open,
    PROCESSING up to `grace` past its window: core.payments.open_window's): a prompt past its approval window can no
    longer be approved, and the USSD lets her pay beside it; and only those she can still approve from the number
    whose blind index is `payer` (core.payments.approvable_by): a prompt left on her lost SIM is not hers to
    approve either. None as owed_now. One query."""
    now = utcnow()  # the database's clock (utcnow is aligned to it), which dates expires_at
    period = current_period(ptype, now, zone_of(timezone))
    owed = amount_owed(ptype.allow_custom_amount, ptype.amount_minor)
    if period is None or owed is None:
        return None
    kept, waiting = (await conn.execute(_period_kept_open(), {**_period_params(member_id, ptype, *period),
                                                           "payer": payer, "open_now": now,
                                                           "open_processing": now - grace})).one()
    kept = int(kept)  # PostgreSQL sums integers as numeric
    return BalanceNow(period[0], left_to_pay(owed, kept), int(waiting))


async def reminder_balance(conn: AsyncConnection | AsyncSession, payload: dict[str, Any], ptype: Any) -> int | None:
    """balance_owed for a queued reminder (an 'sms.send' job's payload) of `ptype`: of the period its scan read
    (paid_since, due_from, due_until). None for one queued by a release before PaidFor: its price, as then."""
    context = payload.get("context") or {}
    due = _day(context.get("due_date"))
    since, due_from, due_until = (parse_aware(payload.get(name)) for name in ("paid_since", "due_from", "due_until"))
    if due is None or since is None or due_from is None or due_until is None or not payload.get("member_id"):
        return None
    return await balance_owed(conn, payload["member_id"], ptype, due, PaidFor(since, due_from, due_until))


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
