"""Reports: the reconciliation summary for a period and CSV exports read in keyset-paged batches."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, false, func, null, or_, select, true, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import reminders
from core.cooperatives import zone_of
from core.db import iso_z
from core.errors import ValidationError
from core.models import AuditEvent, Cooperative, Dispute, Member, Payment, PaymentType, Refund
from core.money import total_to_api
from core.payments import collected_to_credit
from core.refunds import collected as taken
from core.state.payment import HELD, PAYMENT, PaymentStatus
from core.state.refund import RefundStatus

# Restricts a SELECT on a model to what the caller may see (core.auth.Principal.scope).
Scope = Callable[[Any, Any], Any]
OPEN_DISPUTES = ("OPEN", "UNDER_REVIEW")
FLAGGED_LIMIT = 500
# Rows of an export read at a time: one short read transaction each, whose connection is back in the pool before
# the rows are written to the client (_stream).
CHUNK_ROWS = 500
# What puts a row of an export in the period: when it was asked for, or when its money moved.
BASES = ("created", "completed")
# Why a payment is in a period's `flagged` list: asked for in it, its money moved in it, or a refund of it went back
# in it (a refund the provider contradicted, or one that paid the member back more than collected, is flagged when
# it happens: often a month after the payment, in the period whose `settled` lines carry that refund).
FLAGGED_IN = (*BASES, "refunded")
# What the provider actually took, reckoned as core.refunds.collected() does (refunds are capped by it): what it
# reported when that differs from the amount, less or more (NULL collected_minor: it reported the amount).
TAKEN = func.coalesce(Payment.collected_minor, Payment.amount_minor)
# A payment whose money `collected` counts: `collectedCount` counts those, one a line of the provider's statement. Not
# one that holds nothing: its money taken in another currency, or the same statement line as another payment's (a
# transaction id held twice, core.transaction_ids._flag_held_twice: counted on the other).
COUNTED = TAKEN > 0
# The audit actions that record a payment's money moving (its completed_at set, once): the move to COMPLETED
# (core.state.transition audits it as <machine>.<target>: a provider's answer, or an admin's statement line through
# POST /v1/payments/{id}/outcome, which is audited payment.outcome_recorded just before it, in the same transaction),
# and money reported taken after a definite failure (the payment stays FAILED; repeated if reported again).
# COMPLETED is reached once (no move leads back to it), so the first of these is when the completion was recorded.
COMPLETION_ACTIONS = (f"{PAYMENT.name}.{PaymentStatus.COMPLETED.value.lower()}", "payment.success_after_failure")
# How long before its completion's audit row a payment's updated_at may have been stamped. The move (or a success
# after a failure) stamps the row's updated_at and then its audit row's at, in one transaction: microseconds apart,
# at most a lock wait or a statement timeout's seconds on the way (changed_at also rounds down to the millisecond);
# updated_at never goes back after (a later change's changed_at is past it; a plain utcnow() stamp, a refund's, from
# another host may be behind it by the hosts' clock alignment, under a second: core.db.align_clock). So a completion
# recorded at or after a period's end is on a payment updated no earlier than this before it
# (_payments_recorded_later); a day is far more than any transaction lasts. Every way of recording money taken
# stamps it (test_every_way_of_recording_money_later_names_a_payment_untouched_for_weeks).
RECORDED_SLACK = timedelta(days=1)


def _amount(minor: int | None, currency: str) -> int | str:
    # Sums too: not Money, whose ceiling is per payment (a period's totals may pass it).
    return total_to_api(int(minor or 0), currency)


def _in_period(query: Any, column: Any, start: datetime | None, end: datetime | None) -> Any:
    if start is not None:
        query = query.where(column >= start)
    if end is not None:
        query = query.where(column < end)
    return query


def _within(column: Any, start: datetime | None, end: datetime | None) -> ColumnElement[bool]:
    """The column's moment is in the period (NULL never is, unless the period is open at both ends)."""
    bounds = ([column >= start] if start is not None else []) + ([column < end] if end is not None else [])
    return and_(*bounds) if bounds else true()


def _inside(moment: datetime | None, start: datetime | None, end: datetime | None) -> bool:
    return moment is not None and (start is None or moment >= start) and (end is None or moment < end)


def _figure_lines(groups: Select[Any], dialect: str) -> Select[Any]:
    """The lines of reconciliation()'s payment figures, added up from its groups (`groups`) in the database: each
    line's keys (the others NULL), payment type name (byPaymentType's lines, in their order: name, currency, id) and
    sums: `n`, `amount` of the payments asked for in the period; `kept`, `counted`, `taken`, `fee`, `refunded` of
    those holding money; `moved_*` of the payments holding money whose money moved in it. By status, by method, by
    payment type, by currency (totals) and by method and provider (settled's collections): GROUPING SETS on
    PostgreSQL, one SELECT each joined by UNION ALL on SQLite (which has none; the groups are a CTE there, which
    SQLite reads once for the five)."""
    sums = groups.subquery() if dialect == "postgresql" else groups.cte("sums")
    asked, kept, moved = sums.c.asked, and_(sums.c.asked, sums.c.held), and_(sums.c.moved, sums.c.held)
    figures = [
        func.sum(sums.c.n).filter(asked).label("n"), func.sum(sums.c.amount).filter(asked).label("amount"),
        func.sum(sums.c.n).filter(kept).label("kept"), func.sum(sums.c.counted).filter(kept).label("counted"),
        func.sum(sums.c.taken).filter(kept).label("taken"), func.sum(sums.c.fee).filter(kept).label("fee"),
        func.sum(sums.c.refunded).filter(kept).label("refunded"),
        func.sum(sums.c.n).filter(moved).label("moved_n"),
        func.sum(sums.c.counted).filter(moved).label("moved_counted"),
        func.sum(sums.c.taken).filter(moved).label("moved_taken"),
        func.sum(sums.c.fee).filter(moved).label("moved_fee"),
    ]
    keys = ("status", "method", "payment_type_id", "provider", "currency")
    levels = [("status", "currency"), ("method", "currency"), ("payment_type_id", "currency"), ("currency",),
              ("method", "provider", "currency")]
    if dialect == "postgresql":
        lines = select(*(sums.c[k] for k in keys), *figures).group_by(
            func.grouping_sets(*(tuple_(*(sums.c[k] for k in level)) for level in levels))).subquery()
    else:
        lines = union_all(*(
            select(*(sums.c[k] if k in level else null().label(k) for k in keys), *figures)
            .group_by(*(sums.c[k] for k in level)) for level in levels)).subquery()
    return (select(lines, PaymentType.name.label("type_name"))
            .outerjoin(PaymentType, PaymentType.id == lines.c.payment_type_id)
            .order_by(PaymentType.name, lines.c.currency, lines.c.payment_type_id))


async def reconciliation(
    session: AsyncSession, *, scope: Scope, start: datetime | None, end: datetime | None, work_mem_mb: int = 0
) -> dict[str, Any]:
    """Counts and sums by status, method and payment type; fees, refunds, disputes, flagged payments.

    `work_mem_mb` (REPORT_WORK_MEM_MB; 0: the server's own): PostgreSQL's work_mem for the rest of the session's
    transaction (SET LOCAL), which the caller ends; the connection goes back to the pool with the server's."""
    if work_mem_mb and session.get_bind().dialect.name == "postgresql":
        # The period's payments are summed into their groups (`sums` below) by a hash of the groups, in memory, or
        # by a sort of every payment. A super admin's year, 1,000,000 payments of 1,000 types: 35,000 groups, a
        # hash of ~20 MB in each of the parallel plan's three processes. At the server's default 4 MB (8 MB for a
        # hash) PostgreSQL sorted them on disk instead: 107 MB written and read back, 6.2-7.2 s for the report
        # against 3.6-4.5 s with 64 MB (README). A cooperative's month is hashed in memory at 4 MB already.
        await session.execute(select(func.set_config("work_mem", f"{work_mem_mb}MB", true())))

    # One read of the payments for the five figures made of them: byStatus, byMethod, byPaymentType and totals (the
    # payments asked for in the period) and the collections of `settled` (money held whose completion is dated in
    # it, whenever asked for). They are summed by every key any of them groups by, and by whether each payment was
    # asked for in the period, moved money in it and holds money, and added up here into each figure's lines. Five
    # queries read a year's payments five times, one each (EXPLAIN ANALYZE in README: 2.1-2.7 s, now 0.5-0.7 s).
    created = _within(Payment.created_at, start, end)
    completed = and_(Payment.completed_at.is_not(None), _within(Payment.completed_at, start, end))
    keys = [Payment.status, Payment.method, Payment.payment_type_id, Payment.currency, Payment.provider,
            completed.label("moved"), HELD.label("held")]
    sums = scope(select(
        *keys,
        created.label("asked"),
        func.count(Payment.id).label("n"),
        func.coalesce(func.sum(Payment.amount_minor), 0).label("amount"),
        # What was taken, and by how many (COUNTED: collectedCount), fees, and what has been refunded so far.
        func.count(Payment.id).filter(COUNTED).label("counted"),
        func.coalesce(func.sum(TAKEN), 0).label("taken"),
        func.coalesce(func.sum(Payment.fee_minor), 0).label("fee"),
        func.coalesce(func.sum(Payment.refunded_minor), 0).label("refunded"),
    ), Payment).where(or_(created, and_(completed, HELD))).group_by(
        # (Open at both ends, the period holds every payment: `asked` is then a constant, grouped by nothing.)
        *keys, *([created] if start is not None or end is not None else []))
    # Fetched whole, not streamed: a server-side cursor is read a batch at a time (an Execute with a row limit),
    # and PostgreSQL then runs the plan without its parallel workers (EXPLAIN ANALYZE, 400,000 payments, a year's,
    # a super admin's: "Workers Launched: 0", 0.87 s against 0.57 s). So the groups are added up into each figure's
    # lines in the database (_figure_lines): what comes back is the report's lines, a few a payment type. Fetched,
    # the groups were held at once, ~1.2 KB each, a few dozen a payment type (a super admin's year, 1,000,000
    # payments of 200 cooperatives and 1,000 types: 35,000 groups, 44 MB of the process's memory for the request).
    figures = await session.execute(_figure_lines(sums, session.get_bind().dialect.name))
    status_lines: dict[tuple[str, str], list[int]] = {}
    method_lines: dict[tuple[str, str], list[int]] = {}
    type_lines: dict[tuple[str, str, str], list[int]] = {}
    total_lines: dict[str, list[int]] = {}
    collected: dict[tuple[str, str, str], list[int]] = {}
    for row in figures:
        c = row.currency
        n, amount, kept, counted, taken, fee, refunded = (
            int(row.n or 0), int(row.amount or 0), int(row.kept or 0), int(row.counted or 0), int(row.taken or 0),
            int(row.fee or 0), int(row.refunded or 0))
        # Which figure the line is of: the keys it is summed by (the others NULL; none of them is ever NULL in a
        # payment). A line is there when a payment is in it, as one first seen was.
        if row.status is not None:
            if n:
                status_lines[(row.status, c)] = [n, amount]
        elif row.provider is not None:
            moved, moved_counted, moved_taken, moved_fee = (int(row.moved_n or 0), int(row.moved_counted or 0),
                                                            int(row.moved_taken or 0), int(row.moved_fee or 0))
            if moved:
                collected[(row.method, row.provider, c)] = [moved_counted, moved_taken, moved_fee]
        elif row.method is not None:
            if n:
                # (What has been refunded so far of those whose money is held, as `totals` counts it: the lines by
                # method and by type add up to it.)
                method_lines[(row.method, c)] = [n, amount, kept, taken, refunded]
        elif row.payment_type_id is not None:
            if n:
                type_lines[(row.payment_type_id, row.type_name, c)] = [n, amount, kept, taken, refunded]
        elif kept:
            total_lines[c] = [counted, taken, fee, refunded]
    by_status = [
        {"status": s, "currency": c, "count": n, "amount": _amount(a, c)}
        for (s, c), (n, a) in sorted(status_lines.items())
    ]
    by_method = [
        {
            "paymentMethod": m,
            "currency": c,
            "count": n,
            "amount": _amount(a, c),
            "completedCount": cn,
            "completedAmount": _amount(ca, c),
            "refundedAmount": _amount(ra, c),
        }
        for (m, c), (n, a, cn, ca, ra) in sorted(method_lines.items())
    ]
    by_type = [
        {
            "paymentTypeId": t,
            "name": name,
            "currency": c,
            "count": n,
            "amount": _amount(a, c),
            "completedCount": cn,
            "completedAmount": _amount(ca, c),
            "refundedAmount": _amount(ra, c),
        }
        for (t, name, c), (n, a, cn, ca, ra) in type_lines.items()
    ]
    totals = [
        {
            "currency": c,
            "collectedCount": n,
            "collected": _amount(a, c),
            "fees": _amount(f, c),
            "refunded": _amount(r, c),
            "net": _amount(a - f - r, c),
        }
        for c, (n, a, f, r) in sorted(total_lines.items())
    ]
    refund_rows = (
        await session.execute(
            _in_period(
                scope(
                    select(
                        Refund.status,
                        Refund.currency,
                        func.count(Refund.id),
                        func.coalesce(func.sum(Refund.amount_minor), 0),
                    ),
                    Refund,
                ),
                Refund.created_at,
                start,
                end,
            )
            .group_by(Refund.status, Refund.currency)
            .order_by(Refund.status, Refund.currency)
        )
    ).all()
    refunds = [
        {"status": s, "currency": c, "count": n, "amount": _amount(a, c)} for s, c, n, a in refund_rows
    ]
    settled = await _settled(session, scope, start, end, collected)
    # Disputes open now, whatever the period (`openDisputes`: September's report read in December counts December's);
    # opened in the period; and open at its end (opened before it ended, not closed by then: resolved_at is set when a
    # dispute closes, and a closed one is never reopened; open-ended, its end is now).
    open_now = Dispute.status.in_(OPEN_DISPUTES)
    open_at_end = (open_now if end is None
                   else and_(Dispute.created_at < end, or_(open_now, Dispute.resolved_at >= end)))
    open_disputes, disputes_opened, disputes_open_at_end = (
        await session.execute(
            scope(select(func.count(Dispute.id).filter(open_now),
                         func.count(Dispute.id).filter(_within(Dispute.created_at, start, end)),
                         func.count(Dispute.id).filter(open_at_end)), Dispute)
        )
    ).one()
    # Late or mismatched payments asked for in the period, or whose money moved in it (a late success lands in the
    # period's `settled` lines when it completed, possibly a month after it was asked for): `flaggedIn` says which.
    refunded_in = (select(Refund.payment_id).where(Refund.status == "COMPLETED",
                                                   _within(Refund.completed_at, start, end)))
    is_flagged = and_(
        or_(Payment.mismatch.is_(True), Payment.late.is_(True)),
        or_(_within(Payment.created_at, start, end), _within(Payment.completed_at, start, end),
            and_(Payment.mismatch.is_(True), Payment.id.in_(refunded_in))),
    )
    flagged_rows = (
        (
            await session.execute(
                scope(select(Payment), Payment).where(is_flagged).order_by(Payment.created_at, Payment.id)
                .limit(FLAGGED_LIMIT)
            )
        )
        .scalars()
        .all()
    )
    flagged_count = len(flagged_rows)
    if flagged_count == FLAGGED_LIMIT:
        flagged_count = (
            await session.execute(scope(select(func.count(Payment.id)), Payment).where(is_flagged))
        ).scalar_one()
    recorded_later, recorded_later_count = await _recorded_later(session, scope, start, end)
    payments_later, payments_later_count = await _payments_recorded_later(session, scope, start, end)
    voided_later, voided_later_count = await _payments_voided_later(session, scope, start, end)
    refunded_here = set((await session.execute(
        refunded_in.where(Refund.payment_id.in_([p.id for p in flagged_rows])))).scalars()) if flagged_rows else set()
    flagged = [
        {
            "id": p.id,
            "reference": p.reference,
            "status": p.status,
            "amount": _amount(p.amount_minor, p.currency),
            "currency": p.currency,
            "mismatch": p.mismatch,
            "mismatchDetail": p.mismatch_detail,
            "late": p.late,
            "createdAt": _iso(p.created_at),
            "completedAt": _iso(p.completed_at),
            "flaggedIn": [name for name, moment in (("created", p.created_at), ("completed", p.completed_at))
                          if _inside(moment, start, end)]
                         + (["refunded"] if p.mismatch and p.id in refunded_here else []),  # as is_flagged
        }
        for p in flagged_rows
    ]
    return {
        "period": {"from": _iso(start), "to": _iso(end)},
        "payments": {"byStatus": by_status, "byMethod": by_method, "byPaymentType": by_type},
        "totals": totals,
        "refunds": refunds,
        "settled": settled,
        "openDisputes": int(open_disputes),
        "disputesOpened": int(disputes_opened),
        "disputesOpenAtEnd": int(disputes_open_at_end),
        "flagged": flagged,
        "flaggedCount": int(flagged_count),
        "refundsRecordedLater": recorded_later,
        "refundsRecordedLaterCount": recorded_later_count,
        "paymentsRecordedLater": payments_later,
        "paymentsRecordedLaterCount": payments_later_count,
        "paymentsVoidedLater": voided_later,
        "paymentsVoidedLaterCount": voided_later_count,
    }


async def _recorded_later(session: AsyncSession, scope: Scope, start: datetime | None, end: datetime | None
                          ) -> tuple[list[dict[str, Any]], int]:
    """Refunds paid back in the period (in its `settled` lines) but recorded at or after its end: a chargeback
    recorded later and dated by the provider's statement (created after the end), or a refund asked for in time
    whose completion an admin or the provider's late answer dated back into it (it became COMPLETED, its
    updated_at, after the end: a COMPLETED refund is never changed again). The period's `settled` figures changed
    after it closed (core.provider_events.money_moved_at); these are the refunds that changed them. None while the
    period is open-ended."""
    if end is None:
        return [], 0
    later = and_(Refund.status == RefundStatus.COMPLETED.value, _within(Refund.completed_at, start, end),
                 or_(Refund.created_at >= end, Refund.updated_at >= end))
    rows = (
        await session.execute(
            scope(select(Refund), Refund).where(later).order_by(Refund.completed_at, Refund.id).limit(FLAGGED_LIMIT)
        )
    ).scalars().all()
    count = len(rows)
    if count == FLAGGED_LIMIT:
        count = (await session.execute(scope(select(func.count(Refund.id)), Refund).where(later))).scalar_one()
    return [
        {
            "id": r.id,
            "reference": r.reference,
            "paymentId": r.payment_id,
            "amount": _amount(r.amount_minor, r.currency),
            "currency": r.currency,
            "completedAt": _iso(r.completed_at),
            "createdAt": _iso(r.created_at),
            "updatedAt": _iso(r.updated_at),
            "returnedByProvider": bool(r.returned_by_provider),
            "providerTransactionId": r.provider_transaction_id,
        }
        for r in rows
    ], int(count)


async def _payments_recorded_later(session: AsyncSession, scope: Scope, start: datetime | None,
                                   end: datetime | None) -> tuple[list[dict[str, Any]], int]:
    """Payments collected in the period (in its `settled` lines: completed_at in it, money held) whose completion
    was recorded at or after its end: a bank payment paid at 23:59:59 on the 31st whose webhook came after midnight
    (the provider's paidAt dates it), a provider's late answer, or an admin's statement line recorded with a
    `completedAt` in the period (core.provider_events.money_moved_at). The period's `settled` collections grew after it
    closed; these are the payments that grew them, with when and by whom the completion was recorded (the first of
    COMPLETION_ACTIONS in the audit log: a payment's updated_at cannot tell, a refund or a flag changes it later).
    A recording voided since stays named (VOIDED, with what it counted and the id it held until the void):
    _payments_voided_later names the void, and the two lists net out as `settled` does. None while the period is
    open-ended.

    Read from the payments completed in the period and updated since shortly before its end (RECORDED_SLACK: a
    completion recorded after the end updated its payment then, and updated_at never goes back), each probing its
    own audit rows (the (entity_type, entity_id) index). Probing every payment completed in the period instead read
    a year's report in seconds (EXPLAIN ANALYZE, 372,000 payments completed in the year: 5.6 to 6.6 s, one index
    probe each; 0.1 ms with the updated_at bound, through ix_payments_updated or ix_payments_coop_updated)."""
    if end is None:
        return [], 0
    completions = select(AuditEvent).where(
        AuditEvent.entity_type == PAYMENT.name, AuditEvent.entity_id == Payment.id,
        AuditEvent.action.in_(COMPLETION_ACTIONS)).correlate(Payment)
    recorded = completions.with_only_columns(func.min(AuditEvent.at)).scalar_subquery()
    # Who recorded it: the first completion's actor (a provider's callback or poll, or the admin).
    recorded_by = (completions.with_only_columns(AuditEvent.actor).order_by(AuditEvent.at, AuditEvent.id)
                   .limit(1).scalar_subquery())
    # A recording voided since (VOIDED holds nothing) stays named: paymentsVoidedLater names its void, and without
    # it here the void alone would read as money taken off a figure that, when the period ended, never counted it.
    voided = Payment.status == PaymentStatus.VOIDED.value
    later = and_(or_(HELD, voided), Payment.completed_at.is_not(None), _within(Payment.completed_at, start, end),
                 Payment.updated_at >= end - RECORDED_SLACK, recorded >= end)
    rows = (
        await session.execute(
            scope(select(Payment, recorded.label("recorded_at"), recorded_by.label("recorded_by")), Payment)
            .where(later).order_by(Payment.completed_at, Payment.id).limit(FLAGGED_LIMIT)
        )
    ).all()
    count = len(rows)
    if count == FLAGGED_LIMIT:
        count = (await session.execute(scope(select(func.count(Payment.id)), Payment).where(later))).scalar_one()
    # What a voided one counted, and the transaction id it held, until its void (the void's audit row's before).
    voided_ids = [p.id for p, _, _ in rows if p.status == PaymentStatus.VOIDED.value]
    was = {entity_id: before or {} for entity_id, before in (await session.execute(
        select(AuditEvent.entity_id, AuditEvent.before).where(
            AuditEvent.entity_type == PAYMENT.name, AuditEvent.action == VOID_ACTION,
            AuditEvent.entity_id.in_(voided_ids))))
    } if voided_ids else {}
    listed = []
    for p, recorded_at, recorded_by_actor in rows:
        counted, txn = taken(p), p.provider_transaction_id
        if p.id in was:
            said = was[p.id].get("collected")
            counted = p.amount_minor if said is None else int(said)
            txn = was[p.id].get("providerTransactionId")
        listed.append({
            "id": p.id,
            "reference": p.reference,
            "status": p.status,
            "provider": p.provider,
            "paymentMethod": p.method,
            "amount": _amount(p.amount_minor, p.currency),
            "collected": _amount(counted, p.currency),
            "currency": p.currency,
            "completedAt": _iso(p.completed_at),
            "createdAt": _iso(p.created_at),
            "recordedAt": _iso(recorded_at),
            "recordedBy": recorded_by_actor,
            "late": bool(p.late),
            "mismatch": bool(p.mismatch),
            "providerTransactionId": txn,
        })
    return listed, int(count)


# The audit action of a recording voided (core.recorded_payments.void_recording: the move to VOIDED, audited as
# <machine>.<target> with the note, and the collected figure and transaction id it cleared in its before).
VOID_ACTION = f"{PAYMENT.name}.{PaymentStatus.VOIDED.value.lower()}"


async def _payments_voided_later(session: AsyncSession, scope: Scope, start: datetime | None,
                                 end: datetime | None) -> tuple[list[dict[str, Any]], int]:
    """Recordings of money taken dated in the period (their completed_at in it, which a void keeps) and voided at
    or after its end (core.recorded_payments.void_recording): the period's `settled` collections shrank after it closed
    (a VOIDED payment holds nothing), and nothing else in the report says so (a void is not flagged, and the payment
    may have been asked for in another period). These are the payments that shrank them, with what each counted
    (`collected`, the void's audit row's before), when and by whom it was voided and why. None while the period is
    open-ended. A payment is voided once (VOIDED is final): one audit row each."""
    if end is None:
        return [], 0
    voids = and_(AuditEvent.entity_type == PAYMENT.name, AuditEvent.entity_id == Payment.id,
                 AuditEvent.action == VOID_ACTION)
    later = and_(Payment.status == PaymentStatus.VOIDED.value, Payment.completed_at.is_not(None),
                 _within(Payment.completed_at, start, end), AuditEvent.at >= end)
    rows = (
        await session.execute(
            scope(select(Payment, AuditEvent.at, AuditEvent.actor, AuditEvent.before, AuditEvent.after), Payment)
            .join(AuditEvent, voids).where(later).order_by(Payment.completed_at, Payment.id).limit(FLAGGED_LIMIT)
        )
    ).all()
    count = len(rows)
    if count == FLAGGED_LIMIT:
        count = (await session.execute(scope(select(func.count(Payment.id)), Payment).join(AuditEvent, voids)
                                       .where(later))).scalar_one()
    listed = []
    for p, voided_at, voided_by, before, after in rows:
        was, said = before or {}, after or {}
        counted = was.get("collected")
        listed.append({
            "id": p.id,
            "reference": p.reference,
            "provider": p.provider,
            "paymentMethod": p.method,
            "amount": _amount(p.amount_minor, p.currency),
            "collected": _amount(p.amount_minor if counted is None else counted, p.currency),
            "currency": p.currency,
            "completedAt": _iso(p.completed_at),
            "createdAt": _iso(p.created_at),
            "voidedAt": _iso(voided_at),
            "voidedBy": voided_by,
            "note": said.get("note"),
            "providerTransactionId": was.get("providerTransactionId"),
        })
    return listed, int(count)


async def _settled(session: AsyncSession, scope: Scope, start: datetime | None, end: datetime | None,
                   collected: dict[tuple[str, str, str], list[int]]) -> list[dict[str, Any]]:
    """Money that moved in the period, per provider account (the provider that carried it, and the method) and
    currency, as the provider's statement lists it: payments collected (completed_at in the period, whatever
    became of them since: `collected`, [count, amount, fees] by (method, provider, currency), read with the
    period's other payment figures by reconciliation()) and refunds paid back (completed_at in the period, whichever
    period their payment was in; a refund goes back through its payment's provider). A method routed
    through another provider part-way through a period (PAYMENT_ROUTES) has a line per provider. A period that has
    ended keeps these figures (a refund made later is in the later period's, not this one's), except for money the
    provider dates in it and the gateway learns of later (core.provider_events.money_moved_at)."""
    refunded_rows = (
        await session.execute(
            _in_period(
                scope(select(Payment.provider, Payment.method, Refund.currency, func.count(Refund.id),
                             func.coalesce(func.sum(Refund.amount_minor), 0)), Refund),
                Refund.completed_at, start, end,
            )
            .join(Payment, Payment.id == Refund.payment_id)
            .where(Refund.status == RefundStatus.COMPLETED.value, Refund.completed_at.is_not(None))
            .group_by(Payment.provider, Payment.method, Refund.currency)
        )
    ).all()
    # Keyed method first: the lines keep the order they had when there was one per method.
    lines: dict[tuple[str, str, str], list[int]] = {}
    for key, values in collected.items():
        lines.setdefault(key, [0, 0, 0, 0, 0])[:3] = values
    for provider, method, currency, n, amount in refunded_rows:
        lines.setdefault((method, provider, currency), [0, 0, 0, 0, 0])[3:] = [int(n), int(amount)]
    return [
        {
            "provider": provider,
            "paymentMethod": method,
            "currency": currency,
            "collectedCount": n,
            "collected": _amount(amount, currency),
            "fees": _amount(fees, currency),
            "refundedCount": rn,
            "refunded": _amount(refunded, currency),
            "net": _amount(amount - fees - refunded, currency),
        }
        for (method, provider, currency), (n, amount, fees, rn, refunded) in sorted(lines.items())
    ]


_iso = iso_z


# What a spreadsheet may read as the start of a formula or a DDE command, after leading blanks and line breaks
# (some trim them), full-width forms included.
_FORMULA_STARTS = frozenset("=+-@|\t\r\n\uff1d\uff0b\uff0d\uff20")
# Numbers and masked phone numbers (+25078****001, -5.00): a spreadsheet can run nothing in them, and a quote
# in front would break the scripts that read the file.
_INERT = re.compile(r"^[+-]?[0-9*., ]+$")


def _first_seen(value: str) -> str:
    """The first character a reader sees: past blanks of any kind (no-break and ideographic spaces too) and the
    invisible ones (zero-width spaces and joiners, a byte-order mark, controls), which a spreadsheet may drop."""
    for char in value:
        if not char.isspace() and unicodedata.category(char) not in ("Cf", "Cc"):
            return char
    return ""


def _cell(value: Any) -> Any:
    """Neutralise spreadsheet formulas in free text (CSV injection)."""
    if isinstance(value, str) and not _INERT.match(value) and (
            value[:1] in _FORMULA_STARTS or _first_seen(value) in _FORMULA_STARTS):
        return "'" + value
    return value


# The exports' separators (admin_api.reports: `delimiter=`). A French-locale Excel (Rwanda) splits a file on `;`,
# and reads `1500.00` as text: a `;` file writes its amounts with a decimal comma, as Excel's own does.
DELIMITERS = {"comma": ",", "semicolon": ";"}
_AMOUNT_COLUMNS = frozenset({"amount", "fee", "refundedAmount", "collectedAmount",
                            # dues.csv's
                            "amountDue", "amountPaid", "amountAwaitingApproval", "amountOutstanding"})
# Identifiers Excel would read as numbers: 13+ digits in scientific notation, digits past the 15th lost, leading
# zeros dropped. With `excel`, a digit-only one (a `+` first allowed: a number in E.164) is written ="<digits>",
# which Excel shows as the text it is. Only digits are ever put between the quotes, and only after _cell: the
# formula guard is unchanged for every other value (a provider's `=...` still starts with `'`).
# dues.csv's `unit` too: a unit of digits only (0012) keeps its zeros.
_ID_COLUMNS = frozenset({"unit", "reference", "paymentReference", "gatewayReference", "gatewayTransactionId",
                         "providerTransactionId", "paymentAccount", "cooperativeShortCode"})
_DIGITS = re.compile(r"\+?[0-9]+")


def _spreadsheet(header: tuple[str, ...], delimiter: str, excel: bool) -> Callable[[list[Any]], list[Any]] | None:
    """What the options change in a row's cells (already through _cell), None when nothing: the default file."""
    commas = [i for i, name in enumerate(header) if name in _AMOUNT_COLUMNS] if delimiter == ";" else []
    texts = [i for i, name in enumerate(header) if name in _ID_COLUMNS] if excel else []
    if not commas and not texts:
        return None

    def cells(values: list[Any]) -> list[Any]:
        for i in commas:
            values[i] = str(values[i]).replace(".", ",")
        for i in texts:
            if isinstance(values[i], str) and _DIGITS.fullmatch(values[i]):
                values[i] = f'="{values[i]}"'
        return values
    return cells


# The provider that carried the money (the `settled` lines' provider account; a refund goes back through its
# payment's), and the days of creation and completion in the row's own cooperative's time zone (createdAt and
# completedAt are UTC instants: 00:30 on 1 November in Kigali is 2026-10-31T22:30:00Z).
_ADDED = ("provider", "createdLocalDate", "completedLocalDate")


# Who paid and whose cooperative it is, after those: a provider's statement line names the payer (the member's id
# and masked number did not), and a super admin's export of every cooperative mixed their rows with nothing to tell
# them apart. A payment no member holds has no name ("").
_PAYER = ("memberName", "cooperativeShortCode")


def _local_date(moment: datetime | None, timezone: str | None) -> str:
    return moment.astimezone(zone_of(timezone)).date().isoformat() if moment is not None else ""


PAYMENT_COLUMNS = (
    "id",
    "reference",
    "createdAt",
    "completedAt",
    "status",
    "paymentMethod",
    "amount",
    "currency",
    "fee",
    "refundedAmount",
    "collectedAmount",
    "paymentTypeId",
    "paymentType",
    "memberId",
    "paymentAccount",
    "gatewayReference",
    "gatewayTransactionId",
    "channel",
    "mismatch",
    "late",
    "description",
    # Added at the end, so scripts that read columns by position still find the others where they were.
    *_ADDED,
    *_PAYER,
    # Why a FAILED, CANCELLED or TIMEOUT payment is one (the payment's JSON `failureReason`; refunds.csv has its
    # own in place). Free text, a provider's among it: neutralised as any (_cell).
    "failureReason",
)
REFUND_COLUMNS = (
    "id",
    "reference",
    "paymentId",
    "paymentReference",
    "createdAt",
    "completedAt",
    "status",
    "amount",
    "currency",
    "reason",
    "failureReason",
    "disputeId",
    *_ADDED,
    # The provider's id of the money sent back (to match its statement line), and whether the refund was recorded
    # rather than sent (a chargeback: core.refunds.ReturnedByProvider). After the others: positions unchanged.
    "providerTransactionId",
    "returnedByProvider",
    *_PAYER,
)


async def _stream(
    sessions: async_sessionmaker[AsyncSession],
    query: Select[Any],
    order: tuple[Any, Any],
    header: tuple[str, ...],
    row: Callable[[Any], list[Any]],
    delimiter: str = ",",
    excel: bool = False,
) -> AsyncIterator[bytes]:
    """The export's rows in `order` (its moment, then the id: unique; columns of the entity each row starts with),
    CHUNK_ROWS at a time, each batch read in a session of its own that is closed before the batch is yielded.
    Nothing waits on the client with a transaction open: one cursor read the whole export before, and a slow
    download held a pooled connection and an old snapshot as long as it lasted (an hour for 70 MB at 16 KB/s: the
    pool starved for USSD and callbacks, vacuum held back, and idle_in_transaction_session_timeout cut the file).

    The next batch starts after the last row read (keyset on `order`), never at an offset: each row that existed
    when the export began, and still matches its filters when its batch is read, is in the file once and in order,
    none repeated or skipped. That holds because a row's moment never changes once set: created_at is written
    once, and completed_at once, when the money moves (from NULL, never moved or cleared after). The file is no
    longer one snapshot, which is accepted: a row committed during the download is in it if it sorts after the rows
    already read (a payment asked for meanwhile; for basis=completed, money that moved meanwhile, unless the
    provider dated it back before them, core.provider_events.money_moved_at), and a row is as its batch found it (a
    status changed meanwhile shows, and a row that no longer matches status= or basis=completed's money held is
    left out). On a quiet database the file is the one a single snapshot gave, byte for byte.

    Each batch is a range of an index on its moment, the row comparison read as `moment >= ...` and the ties
    sorted by id: (cooperative_id, created_at|completed_at) for a cooperative's exports, (created_at) and
    (completed_at) for a super admin's payments and refunds (migrations 0013 and 0014; the payments' completion
    index holds only the payments whose money moved, which is what basis=completed reads).
    """
    async def batches() -> AsyncIterator[Sequence[Any]]:
        after: tuple[Any, Any] | None = None
        while True:
            page = query if after is None else query.where(tuple_(*order) > after)  # binds typed as `order`
            async with sessions() as session:
                result = await session.stream(
                    page.order_by(*order).limit(CHUNK_ROWS).execution_options(yield_per=CHUNK_ROWS))
                items = await result.all()
            yield items
            if len(items) < CHUNK_ROWS:
                return
            last = items[-1][0]
            after = (getattr(last, order[0].key), getattr(last, order[1].key))

    async for chunk in _written(batches(), header, row, delimiter, excel):
        yield chunk


async def _written(batches: AsyncIterator[Sequence[Any]], header: tuple[str, ...], row: Callable[[Any], list[Any]],
                   delimiter: str, excel: bool) -> AsyncIterator[bytes]:
    """An export's CSV, a chunk per batch of items (`row`: the cells of one); the header goes out with the first
    batch: nothing is yielded before its query has run (the route sends its status line on the first chunk, so a
    failing query is still an error response)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(header)
    spreadsheet = _spreadsheet(header, delimiter, excel)
    async for items in batches:
        for item in items:
            cells = [_cell(v) for v in row(item)]
            writer.writerow(spreadsheet(cells) if spreadsheet else cells)
        if buffer.tell():  # nothing only for an empty batch after a full one
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()


def payments_csv(
    sessions: async_sessionmaker[AsyncSession],
    *,
    scope: Scope,
    start: datetime | None,
    end: datetime | None,
    status: str | None = None,
    method: str | None = None,
    payment_type_id: str | None = None,
    member_id: str | None = None,
    basis: str = "created",
    delimiter: str = ",",
    excel: bool = False,
) -> AsyncIterator[bytes]:
    moment = Payment.completed_at if basis == "completed" else Payment.created_at
    query = _in_period(scope(select(Payment, PaymentType.name, Cooperative.timezone, Cooperative.short_code,
                                    Member.name), Payment), moment, start, end)
    if basis == "completed":
        # The lines behind the reconciliation's `settled` collections: money in, whatever became of it since.
        query = query.where(moment.is_not(None), HELD)
    query = query.join(PaymentType, PaymentType.id == Payment.payment_type_id).join(
        Cooperative, Cooperative.id == Payment.cooperative_id).outerjoin(Member, Member.id == Payment.member_id)
    if status:
        query = query.where(Payment.status == status)
    if method:
        query = query.where(Payment.method == method)
    # One payment type's or one member's rows (the reconciliation's byPaymentType line, a member's statement), as
    # the payments list filters them.
    if payment_type_id:
        query = query.where(Payment.payment_type_id == payment_type_id)
    if member_id:
        query = query.where(Payment.member_id == member_id)

    def row(item: Any) -> list[Any]:
        p, type_name, timezone, short_code, member_name = item
        return [
            p.id,
            p.reference,
            _iso(p.created_at),
            _iso(p.completed_at),
            p.status,
            p.method,
            _amount(p.amount_minor, p.currency),
            p.currency,
            _amount(p.fee_minor, p.currency),
            _amount(p.refunded_minor, p.currency),
            _amount(collected_to_credit(p).minor, p.currency),  # as the payment's JSON and webhook state it
            p.payment_type_id,
            type_name,
            p.member_id,
            p.payment_account_masked,
            p.gateway_reference or p.provider_reference,
            p.provider_transaction_id or "",
            p.channel,
            str(bool(p.mismatch)).lower(),
            str(bool(p.late)).lower(),
            p.description or "",
            p.provider,
            _local_date(p.created_at, timezone),
            _local_date(p.completed_at, timezone),
            member_name or "",
            short_code,
            p.failure_reason or "",
        ]

    return _stream(sessions, query, (moment, Payment.id), PAYMENT_COLUMNS, row, delimiter, excel)


def refunds_csv(
    sessions: async_sessionmaker[AsyncSession],
    *,
    scope: Scope,
    start: datetime | None,
    end: datetime | None,
    status: str | None = None,
    basis: str = "created",
    delimiter: str = ",",
    excel: bool = False,
) -> AsyncIterator[bytes]:
    moment = Refund.completed_at if basis == "completed" else Refund.created_at
    query = _in_period(scope(select(Refund, Payment.reference, Payment.provider, Cooperative.timezone,
                                    Cooperative.short_code, Member.name), Refund), moment, start, end)
    if basis == "completed":
        # The lines behind the reconciliation's `settled` refunds: money paid back in the period.
        query = query.where(moment.is_not(None), Refund.status == RefundStatus.COMPLETED.value)
    query = query.join(Payment, Payment.id == Refund.payment_id).join(
        Cooperative, Cooperative.id == Refund.cooperative_id).outerjoin(Member, Member.id == Payment.member_id)
    if status:
        query = query.where(Refund.status == status)

    def row(item: Any) -> list[Any]:
        r, payment_ref, provider, timezone, short_code, member_name = item
        return [
            r.id,
            r.reference,
            r.payment_id,
            payment_ref,
            _iso(r.created_at),
            _iso(r.completed_at),
            r.status,
            _amount(r.amount_minor, r.currency),
            r.currency,
            r.reason or "",
            r.failure_reason or "",
            r.dispute_id or "",
            provider,
            _local_date(r.created_at, timezone),
            _local_date(r.completed_at, timezone),
            r.provider_transaction_id or "",
            str(bool(r.returned_by_provider)).lower(),
            member_name or "",
            short_code,
        ]

    return _stream(sessions, query, (moment, Refund.id), REFUND_COLUMNS, row, delimiter, excel)


# --- dues: who has paid a period of a recurring payment type --------------------------------------------------------

# A member's line of a period, first that applies: PAID (her kept payments reach the price), AWAITING_APPROVAL (a
# payment of it is still open as the USSD judges it: her PIN or the provider's word, as the reminders leave her alone
# then; not a prompt past its approval window: reminders.period_money), PARTIAL (part of the price kept), UNPAID.
DUES_STATUSES = ("PAID", "AWAITING_APPROVAL", "PARTIAL", "UNPAID")
DUES_COLUMNS = ("memberId", "name", "unit", "status", "currency", "amountDue", "amountPaid", "amountAwaitingApproval",
                "amountOutstanding", "lastPaymentAt", "dueDate")


@dataclasses.dataclass(frozen=True)
class Dues:
    """One period of a fixed-amount recurring type: what its dues report reads (core.reminders' own terms)."""

    ptype: PaymentType
    timezone: str
    previous_due: date
    due: date
    # Its PaidFor, ending (`until`) where the next period's starts: from then a payment naming no due date pays the
    # next one, and the USSD and the BALANCE SMS ask a member for the next one. A member registered after it is
    # listed only if she has a payment of this one.
    period: reminders.PaidFor
    owed: int  # the price: what pays the period (reminders.amount_owed)
    # When it is read, and how long a PROCESSING payment stays open past its approval window (core.payments.
    # open_window's grace): a payment of the period is awaiting approval while the USSD takes it for open
    # (reminders.period_money). One moment for every page and batch of a read.
    now: datetime
    grace: timedelta

    @property
    def paid_until(self) -> datetime:
        assert self.period.until is not None
        return self.period.until


def dues_of(ptype: PaymentType, timezone: str | None, day: date | None, now: datetime, *,
            grace: timedelta) -> Dues:
    """The period of `ptype` ending on the due date `day` (None: the period a payment made `now` pays, as the USSD
    and the BALANCE SMS read it: reminders.current_period), read at `now` (`grace`: Dues.grace). ValidationError
    (field paymentTypeId) for a type that is not recurring or whose member chooses the amount, (field period) for a
    day that is not one of its due dates, or is one before its first (reminders.first_due_date; its due dates
    either side are named, from the first)."""
    zone = zone_of(timezone)
    owed = reminders.amount_owed(ptype.allow_custom_amount, ptype.amount_minor)
    if reminders.due_dates(ptype, now.astimezone(zone).date(), zone) is None:
        raise ValidationError(f"payment type {ptype.name!r} is not recurring (no due day): it has no dues to "
                              "report; its payments are in payments.csv?paymentTypeId=", field="paymentTypeId")
    if owed is None:
        raise ValidationError(f"payment type {ptype.name!r} takes the amount the member chooses: no amount is owed "
                              "for a period, so it has no dues to report; its payments are in "
                              "payments.csv?paymentTypeId=", field="paymentTypeId")
    if day is None:
        current = reminders.current_period(ptype, now, zone)
        assert current is not None  # recurring: checked above
        day = current[0]
    try:
        window = reminders.due_dates(ptype, day, zone)
        following = reminders.due_dates(ptype, day + timedelta(days=1), zone)
    except (ValueError, OverflowError):  # a due date after 9999-12-31
        raise ValidationError(f"period must be a due date of {ptype.name!r} before the last of year 9999",
                              field="period") from None
    assert window is not None
    first = reminders.first_due_date(ptype, zone)
    assert first is not None
    if window[1] != day or day < first:
        # Before the type's first period (reminders.first_due_date: a due date earlier in the month it was made had
        # passed when it was made, nobody was asked for it and every member would read UNPAID), the due dates
        # before it are none of its periods (refused too): that period's only.
        around = " or ".join(d.isoformat() for d in window if first <= d < day) or None
        after = max(window[1], first).isoformat()
        raise ValidationError(f"period must be a due date of {ptype.name!r}: {around + ' or ' if around else ''}"
                              f"{after}", field="period")
    assert following is not None and following[0] == day
    try:
        period = dataclasses.replace(reminders.period_of(ptype, window, zone),
                                     until=reminders.period_of(ptype, following, zone).since)
    except OverflowError:  # the next period's due day ends in year 10000 (a type due the 31st, read in 9999)
        raise ValidationError(f"period must be a due date of {ptype.name!r} before the last of year 9999",
                              field="period") from None
    return Dues(ptype, timezone or "UTC", window[0], day, period, owed, now, grace)


def _dues_lines(dues: Dues, status: str | None, member_ids: Sequence[str] | None = None) -> tuple[Any, Any]:
    """(the lines' query, its subquery of members): the cooperative's ACTIVE members registered before `paid_until`
    (the USSD asked them for this period), or after it with a payment of the period kept or open, each with her money
    of the period as core.reminders reads it, and her status; `status`: only the lines in it; `member_ids`: only
    theirs (a batch of the CSV: their payments only are read, not all the period's)."""
    ptype = dues.ptype
    money = reminders.period_money(ptype.cooperative_id, ptype.id, ptype.currency, dues.due, dues.period, member_ids,
                                   now=dues.now, grace=dues.grace)
    members = select(Member.id, Member.name, Member.unit, func.coalesce(money.c.kept, 0).label("kept"),
                     func.coalesce(money.c.waiting, 0).label("waiting"),
                     func.coalesce(money.c.still_open, false()).label("still_open"),
                     money.c.last_paid_at).outerjoin(money, money.c.member_id == Member.id).where(
        Member.cooperative_id == ptype.cooperative_id, Member.status == "ACTIVE",
        or_(Member.created_at < dues.paid_until, money.c.member_id.is_not(None)),
        true() if member_ids is None else Member.id.in_(member_ids)).subquery("dues")
    kept = members.c.kept
    line_status = case((kept >= dues.owed, "PAID"), (members.c.still_open, "AWAITING_APPROVAL"),
                       (kept > 0, "PARTIAL"), else_="UNPAID")
    query = select(members.c.id, members.c.name, members.c.unit, kept, members.c.waiting, members.c.last_paid_at,
                   line_status.label("status"),
                   reminders.left_to_pay(dues.owed, kept).label("outstanding"))
    if status:
        query = query.where(line_status == status)
    return query, members


def dues_line(dues: Dues, row: Any) -> dict[str, Any]:
    currency = dues.ptype.currency
    return {"memberId": row.id, "name": row.name, "unit": row.unit, "status": row.status, "currency": currency,
            "amountDue": _amount(dues.owed, currency), "amountPaid": _amount(row.kept, currency),
            "amountAwaitingApproval": _amount(row.waiting, currency),
            "amountOutstanding": _amount(row.outstanding, currency),
            "lastPaymentAt": _iso(row.last_paid_at) if row.last_paid_at is not None else None}


def dues_page(dues: Dues, status: str | None) -> Select[Any]:
    """The lines in the report's order (name, then member id)."""
    query, members = _dues_lines(dues, status)
    return query.order_by(members.c.name, members.c.id)


async def dues_totals(session: AsyncSession, dues: Dues, status: str | None) -> dict[str, Any]:
    """The lines' totals (every page's), and how many lines each status has."""
    query, _ = _dues_lines(dues, status)
    lines = query.subquery()
    rows = (await session.execute(select(
        lines.c.status, func.count(), func.coalesce(func.sum(lines.c.kept), 0),
        func.coalesce(func.sum(lines.c.waiting), 0), func.coalesce(func.sum(lines.c.outstanding), 0),
    ).group_by(lines.c.status))).all()
    by_status = dict.fromkeys(DUES_STATUSES, 0) | {s: int(n) for s, n, *_ in rows}
    count = sum(by_status.values())
    currency = dues.ptype.currency

    def total(index: int) -> int | str:
        return _amount(sum(int(row[index]) for row in rows), currency)

    return {"members": count, "byStatus": by_status, "currency": currency,
            "amountDue": _amount(dues.owed * count, currency), "amountPaid": total(2),
            "amountAwaitingApproval": total(3), "amountOutstanding": total(4)}


def dues_csv(sessions: async_sessionmaker[AsyncSession], dues: Dues, *, status: str | None = None,
             delimiter: str = ",", excel: bool = False) -> AsyncIterator[bytes]:
    """dues_page's lines as CSV (DUES_COLUMNS), streamed in batches as the other exports are (_dues_batches)."""

    def row(item: Any) -> list[Any]:
        line = dues_line(dues, item)
        return [*(line[name] if line[name] is not None else "" for name in DUES_COLUMNS[:-1]),
                dues.due.isoformat()]

    return _written(_dues_batches(sessions, dues, status), DUES_COLUMNS, row, delimiter, excel)


async def _dues_batches(sessions: async_sessionmaker[AsyncSession], dues: Dues, status: str | None
                        ) -> AsyncIterator[Sequence[Any]]:
    """The dues' lines (`status`: those in it) CHUNK_ROWS at a time, each batch in a session of its own, in the
    order (name, then member id) of the members listed when the download began: who is in the file, and where, is
    read once (their ids), and each batch reads its members' lines by id, as they are then. A keyset on the name (it
    is not a row's moment: an admin edits it) repeated a member renamed during the download to after the lines
    already sent, and skipped one renamed to before them. A member no longer listed when her batch is read is left
    out."""
    query, members = _dues_lines(dues, status)
    async with sessions() as session:
        ids = list((await session.execute(
            query.with_only_columns(members.c.id).order_by(members.c.name, members.c.id))).scalars())
    for start in range(0, max(len(ids), 1), CHUNK_ROWS):
        batch = ids[start:start + CHUNK_ROWS]
        async with sessions() as session:
            items = (await session.execute(_dues_lines(dues, status, batch)[0])).all() if batch else []
        position = {member_id: n for n, member_id in enumerate(batch)}
        yield sorted(items, key=lambda item: position[item.id])
