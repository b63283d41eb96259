"""A recurring type's first period: a payment made the day the type was created, before the midpoint between the due
date before it (when the type did not exist) and its first one, pays that first period.

Found in the Kumasi susu walk: a monthly susu (due the 28th) created on 3 December, paid at once through Hubtel; the
BALANCE SMS then still said "Monthly susu 50.00 GHS" to pay, the dues report listed her UNPAID and the reminder scan
read the period from 13 December only, so she would have been reminded to pay it again."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from core.reminders import PaidFor, current_period, due_dates
from core.reports import dues_of

ACCRA = ZoneInfo("Africa/Accra")
CREATED = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
PAID = datetime(2026, 12, 3, 9, 5, tzinfo=UTC)


def susu(created: datetime = CREATED) -> SimpleNamespace:
    return SimpleNamespace(id="t", name="Monthly susu", is_recurring=True, due_day=28, recurring_interval="MONTHLY",
                           created_at=created, allow_custom_amount=False, amount_minor=5000, currency="GHS",
                           cooperative_id="c")


def test_a_payment_made_the_day_the_type_was_created_pays_its_first_period() -> None:
    due, period = current_period(susu(), PAID, ACCRA)  # type: ignore[misc]
    assert due == date(2026, 12, 28)
    assert period.since <= PAID < period.due_from  # counted by paid_clause (created_at > since)
    assert period.since == datetime(2026, 12, 3, tzinfo=UTC)  # the type's first local day, Accra is UTC+0


def test_the_dues_report_of_the_first_period_counts_from_the_day_the_type_was_created() -> None:
    first = dues_of(susu(), "Africa/Accra", None, PAID, grace=timedelta(0))  # type: ignore[arg-type]
    assert (first.due, first.period.since) == (date(2026, 12, 28), datetime(2026, 12, 3, tzinfo=UTC))
    # It ends where the next one starts, at its midpoint: no payment pays both.
    assert first.period.until == datetime(2027, 1, 13, tzinfo=UTC)


def test_a_later_period_and_a_type_created_before_the_midpoint_keep_the_midpoint() -> None:
    # A period after the first: from its midpoint, as always.
    due, period = current_period(susu(), datetime(2027, 1, 20, tzinfo=UTC), ACCRA)  # type: ignore[misc]
    assert (due, period.since) == (date(2027, 1, 28), datetime(2027, 1, 13, tzinfo=UTC))
    # Created on 20 November: a payment that day already pays 28 November's (past the midpoint, 13 November).
    window = due_dates(susu(datetime(2026, 11, 20, 8, tzinfo=UTC)), date(2026, 11, 20), ACCRA)  # type: ignore[arg-type]
    assert window is not None and PaidFor.of(*window, ACCRA).since == datetime(2026, 11, 13, tzinfo=UTC)
