"""Provider outcomes applied to payments through the state machine: callbacks, polls, cancels."""

from __future__ import annotations

import hashlib
import logging
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from core import metrics, pgraw
from core.audit import Actor, record
from core.db import iso_ms, iso_z, row_insert, table_of, utcnow
from core.errors import INVALID_STATE, Conflict
from core.models import Payment, ProviderEvent
from core.money import Money
from core.notify import changed_at, emit_event, event_job, notice_jobs
from core.outbox import NewJob, enqueue_job, enqueue_many
from core.payment_statements import stored_and_locked
from core.payments import (
    _by_transaction,
    _loaded,
    _locked_payment,
    add_flag,
    collected_to_credit,
    flagged_before,
    payer_phone,
)
from core.ports import MONEY_REFERENCE, EventKind, ProviderError, ProviderOutcome, StatusResult
from core.ports import ProviderEvent as ProviderEventData
from core.state import StaleTransition, transition
from core.state.machine import _attr_keys
from core.state.payment import COLLECTED, OPEN, PAYMENT, UNCONFIRMED, PaymentStatus, holds_money, taken_after_failure
from core.text import admin_note
from core.transaction_ids import IdLocked, _flag_held_twice, _held_elsewhere, _id_lock_key, _same_money
from core.unmatched_callbacks import UNMATCHED, keep_unmatched, report_unmatched, store_unmatched
from core.webhooks import FLAG_CLEARED, FLAGGED

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.payments")
P = PaymentStatus

# A payment given up after its settling grace with the provider never saying what became of it (core.jobs): the
# money may have been taken, so it ends TIMEOUT flagged for a person, and the payer is told "not confirmed",
# not "not approved".
UNCONFIRMED_FLAG = "the provider never confirmed the outcome: check its statement (record money taken with " \
    "POST /v1/payments/{id}/outcome)"


def event_data(payment: Payment) -> dict[str, Any]:
    """The payment as cooperatives' systems receive it in webhooks (no full phone number). `collectedAmount`
    is what to credit: `amount` is what was asked, and a provider may take less or more (`mismatch`).
    `updatedAt` (to the millisecond) is the updated_at the change being told writes (a _Moved carries the move's,
    see changed_at): of two events about one payment, the later change has the later one."""
    money = Money(payment.amount_minor, payment.currency)
    return {
        "id": payment.id, "reference": payment.reference, "status": payment.status,
        "amount": money.to_api(), "currency": payment.currency,
        "collectedAmount": collected_to_credit(payment).to_api(), "paymentMethod": payment.method,
        "paymentAccount": payment.payment_account_masked, "paymentTypeId": payment.payment_type_id,
        "memberId": payment.member_id, "gatewayTransactionId": payment.provider_transaction_id,
        "failureReason": payment.failure_reason, "late": payment.late, "mismatch": payment.mismatch,
        "mismatchDetail": payment.mismatch_detail,
        "completedAt": iso_z(payment.completed_at),
        "createdAt": iso_z(payment.created_at),
        "updatedAt": iso_ms(payment.updated_at),
    }


@dataclass
class _Settle:
    """A stored callback whose outcome is recorded with what applying it wrote (see apply_collection_outcome)."""

    event_row_id: str
    payment_id: str
    id_locked: IdLocked | None = None  # the transaction id the callback's first statement locked and probed
    done: bool = False

    def write(self, result: str) -> tuple[Any, dict[str, Any]]:
        """The outcome's UPDATE, to travel with the move; `done` is set once the move has run (moved())."""
        return _SET_OUTCOME, {"b_id": self.event_row_id, "b_outcome": result, "b_payment_id": self.payment_id}

    def moved(self) -> None:
        self.done = True


def _locked(settle: _Settle | None) -> IdLocked | None:
    return None if settle is None else settle.id_locked


# Where a provider's outcome is applied: an ORM session, or (a callback on PostgreSQL: handle_provider_event) a
# transaction on a Core connection, with a session joined to it only where a rare branch needs the ORM (_orm).
Db = AsyncSession | pgraw.Transaction


def _orm(db: Db) -> AsyncSession:
    """`db`'s ORM session: itself, or the one joined to a callback's Core transaction (made at the first need, the
    payment in it: core.pgraw.Transaction.session)."""
    return db if isinstance(db, AsyncSession) else db.session()


def _writer(db: Db) -> AsyncSession | AsyncConnection:
    """Where a statement that runs raw on PostgreSQL goes (the move, the outcome's UPDATE, the id's probe): the
    session if there is one (its pending changes, a flag's audit row, flushed first as before), else the callback's
    Core connection."""
    if isinstance(db, AsyncSession):
        return db
    return db.conn if db.joined is None else db.joined


class _Moved:
    """A payment as it reads once a move's `changes` are written: its receipt and webhook event are built
    from it before the move, so that they travel in the move's statement (see transition's `jobs`)."""

    __slots__ = ("_changes", "_payment")

    def __init__(self, payment: Payment, changes: dict[str, Any]) -> None:
        self._payment, self._changes = payment, changes

    def __getattr__(self, name: str) -> Any:
        changes = self._changes
        return changes[name] if name in changes else getattr(self._payment, name)


def _notices(rt: Runtime, payment: Any, template: str, event_type: str) -> list[NewJob]:
    """The payer's SMS (to the member, or to the paying phone of a mobile-money payment without one) and
    the cooperative's webhook event for a payment's new state. No phone once the account was erased (payer_phone:
    money taken after the failure of a payment whose payer was erased since)."""
    phone = payer_phone(rt.cipher, payment)
    return notice_jobs(template=template, event_type=event_type, cooperative_id=payment.cooperative_id,
                       key=payment.id, context={"payment_id": payment.id}, data=event_data(payment), cipher=rt.cipher,
                       member_id=payment.member_id, phone=phone)


_FAILED_TARGET = {
    ProviderOutcome.FAILED: (P.FAILED, "payment_failed", "payment.failed"),
    ProviderOutcome.CANCELLED: (P.CANCELLED, "payment_failed", "payment.failed"),
    ProviderOutcome.EXPIRED: (P.TIMEOUT, "payment_timeout", "payment.timeout"),
}


def money_moved_at(since: datetime, said: datetime | None) -> datetime:
    """When money moved, as the provider's statement dates it (reports' `settled`): the provider's own time, or
    the one an admin read on its statement, kept between `since` (the request) and now (a provider's clock
    ahead of ours never dates money in the future, one behind never before it was asked for); without one,
    now: when the gateway learnt it."""
    now = utcnow()
    return now if said is None else min(max(said, since), now)


async def apply_collection_outcome(
    session: Db,
    rt: Runtime,
    payment: Payment,
    outcome: ProviderOutcome,
    *,
    actor: Actor,
    amount: Money | None = None,
    provider_transaction_id: str | None = None,
    reason: str | None = None,
    event_row_id: str | None = None,
    provisional_transaction_id: str | None = None,
    occurred_at: datetime | None = None,
    audit: dict[str, Any] | None = None,
    id_locked: IdLocked | None = None,
) -> str:
    """Apply what the provider says to a payment; returns what happened, in one word.

    `event_row_id`: the stored callback being applied; its outcome is recorded in the same transaction
    (where the payment moved, in the statement that queues the receipt and the webhook event).
    `provisional_transaction_id`: the provider's id this callback was matched by, when it is an id given
    at request time rather than the final one (M-Pesa's CheckoutRequestID before the receipt number): a
    completed payment still holding it (or none) takes the callback's final id.
    `occurred_at`: when the provider says the money moved (see money_moved_at).
    `audit`: more for the audit row of a move to a failed state (an admin's note: cancel_payment).
    `id_locked`: a transaction id whose lock (_ID_LOCK) this transaction holds already, taken with the payment's
    row by the callback's first statement (_store_event_and_lock), with what that statement's probe found under it:
    the lock not taken again, the id not probed again when it was free."""
    settle = None if event_row_id is None else _Settle(event_row_id, payment.id, id_locked)
    result = await _apply_outcome(session, rt, payment, outcome, actor=actor, amount=amount,
                                  provider_transaction_id=provider_transaction_id, reason=reason, settle=settle,
                                  provisional_transaction_id=provisional_transaction_id, occurred_at=occurred_at,
                                  audit=audit)
    if settle is not None and not settle.done:
        await _set_outcome(_writer(session), settle.event_row_id, result, payment.id)
    return result


async def _apply_outcome(
    db: Db,
    rt: Runtime,
    payment: Payment,
    outcome: ProviderOutcome,
    *,
    actor: Actor,
    amount: Money | None,
    provider_transaction_id: str | None,
    reason: str | None,
    settle: _Settle | None,
    provisional_transaction_id: str | None = None,
    occurred_at: datetime | None = None,
    checked_transaction_id: str | None = None,
    audit: dict[str, Any] | None = None,
) -> str:
    """`checked_transaction_id`: the id the caller found free under its lock (record_collected), not probed again.
    `db`: a callback's Core transaction takes the common moves (to COMPLETED, or to a failed state) on its connection;
    every branch that uses the ORM asks for its joined session first (_orm), before it changes the payment."""
    current = P(payment.status)
    if outcome in (ProviderOutcome.PENDING, ProviderOutcome.AMBIGUOUS):
        return "pending"
    if outcome is ProviderOutcome.SUCCEEDED:
        if current in (P.COMPLETED, P.PARTIALLY_REFUNDED, P.REFUNDED):
            stored = payment.provider_transaction_id
            if provider_transaction_id and provider_transaction_id != stored and (
                    stored is None or stored == provisional_transaction_id):
                # Completed by a status query that names no final id (M-Pesa's STK query has no receipt
                # number): the late callback's id is what a refund needs.
                session = _orm(db)
                holder = await _held_elsewhere(session, payment, provider_transaction_id, _locked(settle))
                flag: dict[str, Any] = {}
                if holder is not None:
                    # The other payment's money, counted here since the completion. Nothing refunded or being
                    # refunded of it here: counted and refundable there only (collected 0), as when the id comes
                    # with the completion. Else a refund may be paying it back from here: flagged, not changed.
                    # Another cooperative's recording moves nothing here (_same_money).
                    from core.refunds import refunds_holding  # local: core.refunds imports this module

                    spare = (_same_money(payment, holder) and current is P.COMPLETED
                             and await refunds_holding(session, payment) == 0)
                    said = await _flag_held_twice(session, payment, provider_transaction_id, holder, actor=actor,
                                                  collected=0 if spare else payment.collected_minor)
                    flag = {"mismatch": True, "mismatch_detail": add_flag(payment.mismatch_detail, said),
                            "updated_at": changed_at(payment.updated_at), **({"collected_minor": 0} if spare else {})}
                await _record_transaction_id(session, payment, provider_transaction_id, actor=actor, flag=flag)
                if holder is not None:
                    await emit_flagged(session, payment, "transaction_id_held_twice", said)
            elif (provider_transaction_id and stored is not None and provider_transaction_id != stored
                  and provider_transaction_id != provisional_transaction_id):
                await _flag_other_transaction_id(_orm(db), payment, provider_transaction_id, actor=actor)
            return "already_completed"
        if current is P.VOIDED:
            return await _flag_success_after_void(_orm(db), payment, provider_transaction_id, amount, actor=actor)
        if current is P.FAILED:
            session = _orm(db)
            # Money taken after a definite failure: never reopen, but never drop it either.
            first = payment.completed_at is None
            kept = (provider_transaction_id if provider_transaction_id
                    and payment.provider_transaction_id in (None, provisional_transaction_id)
                    else payment.provider_transaction_id)
            # (the first report only: a repeat's money is recorded already, its probe made then)
            holder = (await _held_elsewhere(session, payment, kept, _locked(settle))
                      if first and kept and kept != provisional_transaction_id else None)
            before = {"status": current.value, "mismatch": payment.mismatch,
                      "collected": payment.collected_minor, "completedAt": iso_z(payment.completed_at)}
            if first:
                # (A repeat flags nothing again: after a person reviewed the flag it would set mismatch with no
                # detail saying why.)
                payment.mismatch = True
                # The first report only: a repeat (another event id) would write over what flags added since
                # (a refund of this money contradicted, the member paid back twice), and its amount may differ
                # from what was recorded taken.
                taken = f" ({amount})" if amount is not None else ""
                said = f"provider reported success{taken} after the payment had failed"
                payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
            if provider_transaction_id and payment.provider_transaction_id in (None, provisional_transaction_id):
                # What a refund of the money needs (and what finds it at the provider): the callback's final id
                # over a provisional one (M-Pesa's CheckoutRequestID; its reversal needs the receipt number).
                payment.provider_transaction_id = provider_transaction_id
            if first:
                # The money the payer lost stays FAILED but is money held: what was taken (nothing we can send
                # back automatically in another currency) and when, so it can be refunded through the API
                # (core.refunds.refundable) and counted where the provider's statement counts it (reports).
                # (A negative amount, a reversal's sign or the provider's bug, is nothing taken either: a person looks.)
                same = amount is None or amount.currency == payment.currency
                payment.collected_minor = (max(amount.minor, 0) if amount is not None else payment.amount_minor) \
                    if same else 0
                if holder is not None and kept:
                    # The same money as another payment's of the cooperative (_flag_held_twice): counted and
                    # refunded there. Another cooperative's recording moves nothing here (_same_money).
                    if _same_money(payment, holder):
                        payment.collected_minor = 0
                    # Not flushed by the flag's audit row: her payment's changes are written in one UPDATE (by the
                    # queueing below). A second one has PostgreSQL check the row version this transaction wrote
                    # against her member row again, a KEY SHARE lock taken after the payment's, which her erasure
                    # (core.members.erase_member) holds FOR UPDATE while it waits for the payment: a deadlock.
                    with session.no_autoflush:
                        twice = await _flag_held_twice(session, payment, kept, holder, actor=actor,
                                                       collected=payment.collected_minor)
                    payment.mismatch_detail = add_flag(payment.mismatch_detail, twice)
                payment.completed_at = money_moved_at(payment.created_at, occurred_at)
                payment.updated_at = changed_at(payment.updated_at)  # the event's updatedAt: after the failure's
                # The cooperative's system was told it failed: tell it the money is held (once; a second report
                # of the same money changes nothing). A zero or negative amount in the payment's currency holds
                # nothing (taken_after_failure() is false, the reconciliation counts nothing): "money is held" would
                # be false, and payment.failed stands; the flag and the audit row below are for a person. Another
                # currency's amount is money taken that a person must look at: told, flagged.
                if not (same and amount is not None and amount.minor <= 0):
                    # The payer was texted that it failed, and to try again: with the event, that the money was taken
                    # after all, not to pay again, and that her cooperative counts it or refunds it. Only for money
                    # held here (taken_after_failure): not another currency's (counted nowhere, not refundable), nor
                    # money counted on another payment of the cooperative (_flag_held_twice), whose receipt is hers.
                    notices = _notices(rt, payment, "payment_taken_after_failure", "payment.taken_after_failure")
                    if not taken_after_failure(payment):
                        notices = [job for job in notices if job.kind != "sms.send"]
                    await enqueue_many(session, notices)
                else:
                    # No payment.taken_after_failure (nothing held): the flag is told on its own.
                    await emit_flagged(session, payment, "success_after_failure", said)
            # Written after the fields it reports: from the audit log alone an auditor rebuilds what this FAILED
            # payment holds and in which period it counts (a repeat report's row shows them unchanged).
            await record(session, actor=actor, action="payment.success_after_failure", entity_type="payment",
                         entity_id=payment.id, before=before,
                         after={"providerTransactionId": provider_transaction_id, "mismatch": bool(payment.mismatch),
                                "collected": payment.collected_minor, "currency": payment.currency,
                                "completedAt": iso_z(payment.completed_at), "first": first},
                         cooperative_id=payment.cooperative_id)
            return "flagged_success_after_failure"
        # updated_at chosen here (changed_at) so that the event built before the move carries what it writes.
        values: dict[str, Any] = {"completed_at": money_moved_at(payment.created_at, occurred_at),
                                  "updated_at": changed_at(payment.updated_at)}
        if payment.provider_transaction_id is not None and (
                not provider_transaction_id or provider_transaction_id == provisional_transaction_id):
            # Only a provisional id so far: a callback whose status query said "pending" then may have
            # left the final one.
            provider_transaction_id = await _kept_transaction_id(_orm(db), payment) or provider_transaction_id
        if provider_transaction_id:
            values["provider_transaction_id"] = provider_transaction_id
        held = provider_transaction_id or payment.provider_transaction_id
        holder = (await _held_elsewhere(_writer(db), payment, held, _locked(settle))
                  if held and held not in (provisional_transaction_id, checked_transaction_id) else None)
        if PAYMENT.is_exceptional(current, P.COMPLETED):
            values["late"] = True
        if payment.failure_reason is not None:
            values["failure_reason"] = None  # "not approved in time" no longer holds (the audit log keeps it)
        if payment.mismatch_detail == UNCONFIRMED_FLAG:
            values.update(mismatch=False, mismatch_detail=None)  # the outcome is known now (late says the rest)
        expected = Money(payment.amount_minor, payment.currency)
        flags: dict[str, str] = {}  # kind -> what each flag written with the completion says (payment.flagged)
        if amount is not None and amount != expected:
            values["mismatch"] = True
            values["mismatch_detail"] = flags["amount_mismatch"] = f"provider reported {amount}, expected {expected}"
            # Another currency, or a negative amount (a reversal's sign, the provider's bug): nothing we can count or
            # refund automatically (a negative one would be subtracted from what other payments collected); a person
            # must look.
            values["collected_minor"] = max(amount.minor, 0) if amount.currency == expected.currency else 0
            await record(_orm(db), actor=actor, action="payment.amount_mismatch", entity_type="payment",
                         entity_id=payment.id, after={"reported": amount.minor, "reportedCurrency": amount.currency,
                                                      "expected": expected.minor},
                         cooperative_id=payment.cooperative_id)
        counted_there = holder is not None and _same_money(payment, holder)
        if holder is not None and held:
            # The provider says the money moved: completed, never dropped; but it is the money another payment of
            # the cooperative holds (a retry after a restore completing with the statement line an admin recorded):
            # counted and refundable there, not here (collected 0: the reconciliation's `settled` counts it once,
            # and a refund of it is refused here), flagged for a person. Another cooperative's recording of the id
            # moves nothing here (_same_money): flagged only.
            if counted_there:
                values["collected_minor"] = 0
            said = await _flag_held_twice(_orm(db), payment, held, holder, actor=actor,
                                          collected=values.get("collected_minor", payment.collected_minor))
            earlier = values.get("mismatch_detail", payment.mismatch_detail if payment.mismatch else None)
            values.update(mismatch=True, mismatch_detail=add_flag(earlier, said))
            flags["transaction_id_held_twice"] = said
        result = "late_completed" if values.get("late") else "completed"
        # The receipt, the webhook event and the stored callback's outcome are written with the move.
        # Late (after a cancel or a timeout), the payer was told it failed and to pay again: her receipt says the
        # money was taken after all, so that she does not.
        moved = _Moved(payment, {"status": P.COMPLETED.value, **values})
        notices = _notices(rt, moved, "payment_late_receipt" if values.get("late") else "payment_receipt",
                           "payment.completed")
        # Each flag told too, in the move's statement (none on an unflagged completion).
        notices += [flagged_job(moved, kind, said) for kind, said in flags.items()]
        if counted_there:
            # Her money is the other payment's (its receipt is hers): no second receipt for one payment. The
            # cooperative's system is told (payment.completed, flagged, collected 0).
            notices = [job for job in notices if job.kind != "sms.send"]
        await transition(_writer(db), PAYMENT, payment.id, current, P.COMPLETED, actor=actor, values=values,
                         jobs=notices, alongside=settle.write(result) if settle else None)
        if settle is not None:
            settle.moved()
        metrics.payment_moved("COMPLETED", payment.method).inc()
        return result
    target, template, event_type = _FAILED_TARGET[outcome]
    if current not in OPEN:
        return "ignored_final"
    result = target.value.lower()
    values = {"failure_reason": (reason or outcome.value.lower())[:200], "updated_at": changed_at(payment.updated_at)}
    if reason == UNCONFIRMED:
        template = "payment_unconfirmed"
        values.update(mismatch=True, mismatch_detail=UNCONFIRMED_FLAG)
    moved = _Moved(payment, {"status": target.value, **values})
    jobs = _notices(rt, moved, template, event_type)
    if reason == UNCONFIRMED:
        jobs.append(flagged_job(moved, "unconfirmed", UNCONFIRMED_FLAG))
    await transition(_writer(db), PAYMENT, payment.id, current, target, actor=actor, values=values, audit=audit,
                     jobs=jobs, alongside=settle.write(result) if settle else None)
    if settle is not None:
        settle.moved()
    metrics.payment_moved(target.value, payment.method).inc()
    return result


async def _flag_other_transaction_id(session: AsyncSession, payment: Payment, reported: str, *, actor: Actor) -> None:
    """The provider reports the money of a payment that holds money already under another final transaction id than
    the one it holds: an admin recorded it from the statement (POST /v1/payments/{id}/outcome, after a TIMEOUT) with
    another line's id before the provider's late word came, or it completed by a status query and this is another
    payment of the same request. Dropped as "already completed", nothing said it: the payment kept a transaction id
    the provider never gave it (a refund naming it, Airtel's or M-Pesa's, goes to that line), and the provider's own
    line matched no payment in the reconciliation. Nothing is changed (which line is right is a person's call, from
    the statement): flagged (mismatch) and audited, once per id reported."""
    stored = payment.provider_transaction_id or ""
    said = (f"provider reported this payment's money under transaction {reported[:64]}, not {stored[:64]}, the one "
            "it holds: check the provider's statement")
    report = {"reportedTransactionId": reported[:128]}
    if await flagged_before(session, payment, said, "payment.transaction_id_differs", report):
        return  # said already (a repeat of the report), or reviewed since
    await record(session, actor=actor, action="payment.transaction_id_differs", entity_type="payment",
                 entity_id=payment.id, before={"providerTransactionId": stored},
                 after={**report, "status": payment.status},
                 cooperative_id=payment.cooperative_id)
    payment.mismatch = True
    payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
    payment.updated_at = changed_at(payment.updated_at)
    await emit_flagged(session, payment, "transaction_id_differs", said)
    log.error("provider reported a collected payment's money under another transaction id than it holds",
              extra={"payment_id": payment.id, "provider": payment.provider})


async def _find_payment(session: AsyncSession, event: ProviderEventData, *, lock: bool = False,
                        by_transaction: bool | None = None, reference: str | None = None) -> Payment | None:
    by_transaction = _by_transaction(event) if by_transaction is None else by_transaction
    column = Payment.provider_transaction_id if by_transaction else Payment.provider_reference
    query = select(Payment).where(Payment.provider == event.provider, column == (reference or event.reference))
    if lock:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def _find_by_our_reference(session: AsyncSession, event: ProviderEventData) -> Payment | None:
    """A callback matched by the provider's id that we never received (the request's answer was lost),
    found by our own reference when the adapter read one from the callback (raw "provider_reference")."""
    ours = event.raw.get("provider_reference")
    if not _by_transaction(event) or not isinstance(ours, str) or not ours:
        return None
    return await _find_payment(session, event, by_transaction=False, reference=ours)


# Where a stored callback keeps the final id it claimed while its status query still said "pending".
KEPT_TRANSACTION_ID = "gatewayKeptTransactionId"


async def already_stored(session: AsyncSession, event: ProviderEventData) -> bool:
    """This callback (provider, event id) was stored before: applied already, or being applied."""
    seen = (await session.execute(select(ProviderEvent.id).where(
        ProviderEvent.provider == event.provider, ProviderEvent.event_id == event.event_id[:200]))
    ).scalar_one_or_none()
    return seen is not None


async def handle_provider_event(rt: Runtime, event: ProviderEventData) -> str:
    """Store the raw callback once, confirm it if unsigned, and apply it. Returns the outcome."""
    if event.kind is EventKind.REFUND:
        from core.refunds import handle_refund_event

        return await handle_refund_event(rt, event)
    outcome, amount, txn, reason = event.outcome, event.amount, event.provider_transaction_id, event.reason
    occurred = event.occurred_at
    payload = dict(event.raw)
    found: Payment | None = None  # the payment the confirmation found (then locked by our reference)
    query_error: str | None = None  # why the confirming status query failed, for a callback kept unconfirmed
    adopted: str | None = None  # the provider's id for it, learnt from this callback
    if event.needs_confirmation:
        async with rt.sessionmaker() as session:
            if await already_stored(session, event):
                return "duplicate"  # no status query for a callback we already applied
            found = await _find_payment(session, event)
            query_id = found.provider_transaction_id if found is not None else None
            if found is None:
                found = await _find_by_our_reference(session, event)
                if found is not None:
                    # This callback's own id is the one to ask about; one the payment lacks is kept.
                    query_id = event.reference
                    adopted = event.reference if found.provider_transaction_id is None else None
        if found is None:
            return await store_unmatched(rt, event)
        provider = rt.providers[found.provider]
        try:
            status = await provider.collection_status(found.provider_reference, query_id, found.currency)
        except ProviderError as exc:
            status = _unconfirmed(found, event, exc)
            query_error = str(exc)[:200]
        outcome, amount = status.outcome, status.amount or amount
        txn, reason = status.provider_transaction_id or txn, status.reason or reason
        occurred = status.occurred_at or occurred
        if (outcome in (ProviderOutcome.PENDING, ProviderOutcome.AMBIGUOUS)
                and event.outcome is ProviderOutcome.SUCCEEDED and event.provider_transaction_id):
            # The query lags the callback: keep the final id it brought for when the payment completes.
            payload[KEPT_TRANSACTION_ID] = event.provider_transaction_id

    provisional = event.reference if _by_transaction(event) else None
    actor = Actor(f"provider:{event.provider}", "provider")
    if outcome is ProviderOutcome.SUCCEEDED and not payload.get(MONEY_REFERENCE) and txn and txn != provisional:
        payload[MONEY_REFERENCE] = txn
    # A success under the provider's final id: that id's lock (which the completion's probe for another payment
    # holding it takes: _held_elsewhere) is taken in the statement that locks the payment, and the probe made under
    # it there: two round trips fewer.
    id_lock = txn if outcome is ProviderOutcome.SUCCEEDED and txn and txn != provisional else None
    for _ in range(3):
        try:
            async with _callback_transaction(rt) as db:
                if adopted is not None and found is not None:
                    # Her row first (FOR KEY SHARE), before the payment's: the id it lacks is written, then the
                    # outcome moves or flags it, and PostgreSQL checks that second row version's key to her member
                    # row again, a KEY SHARE lock taken after the payment's, which her erasure holds FOR UPDATE while
                    # it waits for the payment (core.members.erase_member): a deadlock. A round trip only for a
                    # payment whose request's answer was lost (core.refunds._her_row_first; none of no member).
                    from core.refunds import _her_row_first  # local: core.refunds imports this module

                    await _her_row_first(_writer(db), [found.id])
                stored = {"id": str(uuid.uuid4()), "provider": event.provider, "event_id": event.event_id[:200],
                          "kind": event.kind.value, "status": outcome.value, "payload": payload,
                          "received_at": utcnow()}
                event_row_id, payment, id_locked = await _store_event_and_lock(db, event, stored, found, id_lock)
                if event_row_id is None:
                    return "duplicate"
                if payment is not None and _names_another_request(rt, payment, txn):
                    payment = None  # kept for a person below, as a callback naming no payment of ours is
                if payment is not None:
                    # (Not a voided recording's: its ids were released for the right line, and it takes none back.)
                    if (adopted is not None and payment.provider_transaction_id is None
                            and payment.status != P.VOIDED.value):
                        await _adopt_transaction_id(_orm(db), payment, adopted)
                    if (query_error is not None and event.outcome is ProviderOutcome.SUCCEEDED
                            and unconfirmed_success_over(payment)):
                        return await _flag_unconfirmed_success(_orm(db), payment, event, query_error, actor=actor,
                                                               event_row_id=event_row_id)
                    if outcome is ProviderOutcome.SUCCEEDED and holds_money(payment):
                        second = await _second_payment(_orm(db), payment, payload, event_row_id)
                        if second is not None:
                            return await _flag_paid_twice(_orm(db), payment, second, amount, actor=actor,
                                                          event_row_id=event_row_id)
                    return await apply_collection_outcome(db, rt, payment, outcome, actor=actor,
                                                          amount=amount, provider_transaction_id=txn,
                                                          reason=reason, event_row_id=event_row_id,
                                                          provisional_transaction_id=provisional,
                                                          occurred_at=occurred,
                                                          id_locked=id_locked)
                await keep_unmatched(_orm(db), event_row_id, event)
        except StaleTransition:
            continue  # the row moved under us (a poll or a parallel callback): re-read and re-apply
        report_unmatched(event)  # once stored: a store that failed is sent again by the provider
        return UNMATCHED
    return "conflict"


def _callback_transaction(rt: Runtime) -> AbstractAsyncContextManager[Db]:
    """A callback's transaction: on PostgreSQL a Core connection's, BEGIN and COMMIT straight on asyncpg, an ORM
    session joined only for a branch that needs one (core.pgraw.transaction; a callback's common path is raw
    statements only, and the session around them was about 200 us of its 1.4 ms of CPU); elsewhere a session's."""
    if rt.engine.dialect.name == "postgresql":
        return pgraw.transaction(rt.engine)
    return rt.sessionmaker.begin()


def _names_another_request(rt: Runtime, payment: Payment, transaction_id: str | None) -> bool:
    """Whether a callback found by our reference names another request than the payment's, at a provider whose
    transaction id is the request's own (transaction_id_is_request: IremboPay's invoice number, one per transactionId
    of ours). Such a callback is about another invoice: it neither settles this payment nor replaces its id."""
    provider = rt.providers.get(payment.provider)
    return (bool(getattr(provider, "transaction_id_is_request", False)) and payment.gateway_reference is not None
            and transaction_id is not None and transaction_id != payment.gateway_reference)


def _unconfirmed(payment: Payment, event: ProviderEventData, exc: ProviderError) -> StatusResult:
    """What an unsigned callback counts for when its confirming status query failed (rate limit, 5xx, timeout).

    By default nothing: the error propagates, nothing is stored, and the route asks the provider to send it again.
    A callback its provider sends once and that carries what a status query cannot give (`sent_once`; M-Pesa: the
    receipt number a reversal needs) is stored as "pending" instead (a success's
    final id kept, KEPT_TRANSACTION_ID) and the payment's poll settles the outcome, which then takes the kept id.
    Nothing moves on the callback's word; a payment already collected only takes the final id it lacks, as it
    would from a confirmed one, and one that is over (unconfirmed_success_over) is flagged for a person when the
    callback is stored (_flag_unconfirmed_success)."""
    if not event.sent_once:
        raise exc
    current = P(payment.status)
    collected = current in COLLECTED and event.outcome is ProviderOutcome.SUCCEEDED
    fields = {"provider": event.provider, "event_id": event.event_id[:200], "payment_id": payment.id,
              "status": current.value, "outcome": event.outcome.value, "error": str(exc)[:200]}
    if current in OPEN or collected or event.outcome is not ProviderOutcome.SUCCEEDED:
        log.warning("provider callback not confirmed (status query failed): kept for the payment's poll",
                    extra=fields)
    # Else given up (TIMEOUT, CANCELLED) or FAILED, and no poll left to ask: a person must look. The payment is
    # flagged where the callback is stored, under its lock (_flag_unconfirmed_success), which logs it.
    return StatusResult(ProviderOutcome.SUCCEEDED if collected else ProviderOutcome.PENDING)


async def _second_payment(session: AsyncSession, payment: Payment, payload: dict[str, Any],
                          event_row_id: str) -> str | None:
    """The money reference of a success reported for a payment that holds money already, when it names another
    payment than the success(es) stored before it (MONEY_REFERENCE): the payer paid twice. None when it is the
    same money (another report of it), or nothing says (no reference; the payment completed by a status query or
    by a person, so no earlier success to compare with)."""
    reference = payload.get(MONEY_REFERENCE)
    if not isinstance(reference, str) or not reference:
        return None
    earlier = (await session.execute(
        select(ProviderEvent.payload).where(ProviderEvent.payment_id == payment.id,
                                            ProviderEvent.kind == EventKind.COLLECTION.value,
                                            ProviderEvent.status == ProviderOutcome.SUCCEEDED.value,
                                            ProviderEvent.id != event_row_id))).scalars().all()
    known = {kept.get(MONEY_REFERENCE) for kept in earlier if isinstance(kept, dict)} - {None, ""}
    return reference if known and reference not in known else None


async def _flag_paid_twice(session: AsyncSession, payment: Payment, reference: str, amount: Money | None, *,
                           actor: Actor, event_row_id: str) -> str:
    """A second payment reported for one that holds money already: never dropped, never credited as this
    payment (its status stays), but flagged (mismatch) with an audit entry, so that a person finds the extra
    money on the provider's statement and refunds it (or credits it) - as for a success after a failure."""
    said = f"paid twice: provider reported another payment{f' ({amount})' if amount is not None else ''}, " \
           f"reference {reference[:100]}"
    await record(session, actor=actor, action="payment.paid_twice", entity_type="payment", entity_id=payment.id,
                 before={"status": payment.status},
                 after={"moneyReference": reference[:100], "amount": None if amount is None else amount.minor,
                        "currency": None if amount is None else amount.currency},
                 cooperative_id=payment.cooperative_id)
    payment.mismatch = True
    payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
    payment.updated_at = changed_at(payment.updated_at)
    # The cooperative's system reconciles from webhooks: it must learn there that money is to be given back.
    await _emit_reported(session, payment, "payment.paid_twice", reference[:100], amount)
    log.error("provider reported a second payment for a payment that holds money already: refund or credit it",
              extra={"payment_id": payment.id, "provider": payment.provider, "money_reference": reference[:100]})
    await _set_outcome(session, event_row_id, "flagged_paid_twice", payment.id)
    return "flagged_paid_twice"


def reported_event_id(event_type: str, payment_id: str, reference: str | None) -> str:
    """The id of an event about money a provider reported for a payment (payment.paid_twice,
    payment.unconfirmed_success, payment.taken_after_void): one per payment and money reference, so a repeat of the
    same report queues nothing (the outbox's dedupe key) and another report is another event. The reference is
    digested: it is the provider's text, of any length and characters, and the event id is sent in a header
    (X-Gateway-Event-Id)."""
    digest = hashlib.sha256((reference or "").encode()).hexdigest()[:16]
    return f"evt_{event_type.replace('.', '_')}_{payment_id}_{digest}"


async def _emit_reported(session: AsyncSession, payment: Payment, event_type: str, reference: str | None,
                         amount: Money | None) -> None:
    """Queue `event_type` about money a provider reported for `payment` without it moving the payment: the payment
    as webhooks show it (flagged, its `updatedAt` the flag's) and `reportedPayment`, what the provider reported."""
    reported = {"moneyReference": reference, "amount": None if amount is None else amount.to_api(),
                "currency": None if amount is None else amount.currency}
    await emit_event(session, cooperative_id=payment.cooperative_id, event_type=event_type,
                     event_id=reported_event_id(event_type, payment.id, reference),
                     data={**event_data(payment), "reportedPayment": reported}, follows=(_told(payment),))


# payment.flagged's `flag.kind`: what each flag with no event of its own says was found.
FLAG_KINDS = {
    "amount_mismatch": "the provider reported another amount (or currency) taken than was asked",
    "success_after_failure": "the provider reported success for a FAILED payment, nothing held (zero or less taken)",
    "transaction_id_held_twice": "the provider's transaction id is held by another payment too",
    "transaction_id_differs": "the provider reported the payment's money under another transaction id than it holds",
    "transaction_id_contested": "another cooperative's payment completed with the transaction id this one holds",
    "unconfirmed": "given up without the provider ever confirming the outcome: money may have been taken",
    "beyond_collected": "more has gone back to the payer (chargebacks, refunds) than was collected",
    "refund_sent_after_failure": "a refund reported sent back after it had failed",
    "refund_withdrawn_unsent": "a refund withdrawn unsent, part of it still the member's",
    "refund_failed_beyond_collected": "a refund counted in an over-return failed",
    "refund_amount_mismatch": "a refund reported sent back for another amount than asked",
    "refund_failed_after_completion": "a refund reported failed after it was completed",
}


def flagged_job(payment: Any, kind: str, said: str) -> NewJob:
    """payment.flagged: `payment` (or a _Moved one) as webhooks show it once flagged, and `flag`, the flag just added
    (`detail`, as mismatchDetail ends with it) and its `kind`. For the flags with no event of their own (core.webhooks
    FLAG_EVENTS have theirs, and go to payment.flagged's endpoints too). Queued in the flag's transaction, with the
    flag's updatedAt; one event per payment, flag and change (the outbox's dedupe key), so a repeat queues nothing
    and the same flag raised again after a review is another event. The id is digested as reported_event_id's."""
    assert kind in FLAG_KINDS, kind
    digest = hashlib.sha256(f"{kind}\n{said}\n{iso_ms(payment.updated_at)}".encode()).hexdigest()[:16]
    return event_job(cooperative_id=payment.cooperative_id, event_type=FLAGGED,
                     event_id=f"evt_payment_flagged_{payment.id}_{digest}",
                     data={**event_data(payment), "flag": {"kind": kind, "detail": said}})


async def emit_flagged(session: AsyncSession, payment: Any, kind: str, said: str) -> None:
    """Queue payment.flagged (flagged_job) in the caller's transaction, after the flag is written on `payment`."""
    await enqueue_job(session, flagged_job(payment, kind, said))


def flag_cleared_job(payment: Payment) -> NewJob:
    """payment.flag_cleared: `payment` as webhooks show it once a person cleared its flags (core.payments.review_flags:
    mismatch false, mismatchDetail null, its updatedAt the review's) and `review`, as GET /v1/payments/{id} shows it:
    what the flags said, who cleared them, when, and the note. So a system told payment.flagged learns the flag was
    dealt with. Queued in the review's transaction; one event per review (the outbox's dedupe key: the payment flagged
    and reviewed again is another). The id is digested as flagged_job's."""
    digest = hashlib.sha256(f"{iso_ms(payment.updated_at)}".encode()).hexdigest()[:16]
    review = {"mismatchDetail": payment.reviewed_detail, "note": payment.review_note, "by": payment.reviewed_by,
              "at": iso_z(payment.reviewed_at)}
    return event_job(cooperative_id=payment.cooperative_id, event_type=FLAG_CLEARED,
                     event_id=f"evt_payment_flag_cleared_{payment.id}_{digest}",
                     data={**event_data(payment), "review": review})


def _told(payment: Payment) -> str:
    """The event the cooperative's system was last told of the payment's outcome (events about money reported
    after it follow it, core.webhooks.subscribed): paid (payment.completed, also for a late completion and
    after refunds), money taken after a failure, failed (CANCELLED is told as payment.failed), timed out."""
    current = P(payment.status)
    if current in COLLECTED:
        return "payment.completed"
    if current is P.FAILED:
        return "payment.taken_after_failure" if holds_money(payment) else "payment.failed"
    if current is P.VOIDED:
        return "payment.voided"
    return "payment.timeout" if current is P.TIMEOUT else "payment.failed"


def unconfirmed_success_over(payment: Payment) -> bool:
    """A success callback that could not be confirmed (its status query failed) must be flagged for a person on
    this payment: given up (TIMEOUT, CANCELLED) or FAILED with no money held, so no poll is left to ask again and
    nothing else will ever say the money was taken. An open payment's poll settles it; a collected one (or one
    whose money taken after a failure is held) has its money on record."""
    current = P(payment.status)
    return current in GIVEN_UP or current is P.VOIDED or (current is P.FAILED and not holds_money(payment))


async def _flag_unconfirmed_success(session: AsyncSession, payment: Payment, event: ProviderEventData, error: str,
                                    *, actor: Actor, event_row_id: str) -> str:
    """A provider's success callback, sent once, for a payment that is over (unconfirmed_success_over), whose
    confirming status query failed: the payment does not move on its unconfirmed word, but it is flagged
    (mismatch), audited and told to the cooperative's system (payment.unconfirmed_success), so that a person
    checks the provider's statement. The callback stays "pending" (its receipt kept, KEPT_TRANSACTION_ID, for a
    completion recorded later). Called under the payment's lock, in the transaction that stored the callback: a
    repeat of it (its event id) is a duplicate before it gets here."""
    receipt = (event.provider_transaction_id or "")[:100] or None
    amount = event.amount
    current = P(payment.status)
    todo = ("a FAILED payment is not reopened: have the provider reverse it" if current is P.FAILED
            else _AFTER_VOID if current is P.VOIDED else "record with POST /v1/payments/{id}/outcome")
    said = f"provider says money was taken{f' (receipt {receipt})' if receipt else ''} but its status query " \
           f"failed: check the statement, {todo}"
    await record(session, actor=actor, action="payment.unconfirmed_success", entity_type="payment",
                 entity_id=payment.id, before={"status": current.value},
                 after={"providerTransactionId": receipt, "amount": None if amount is None else amount.minor,
                        "currency": None if amount is None else amount.currency, "error": error},
                 cooperative_id=payment.cooperative_id)
    payment.mismatch = True
    payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
    payment.updated_at = changed_at(payment.updated_at)
    # It was told the payment failed or timed out: the money may be the payer's to get back, or a late completion.
    await _emit_reported(session, payment, "payment.unconfirmed_success", receipt, amount)
    log.error("provider says money was taken for a payment that is over, and its status query failed: check the "
              "provider's statement (the payment is flagged)",
              extra={"provider": event.provider, "event_id": event.event_id[:200], "payment_id": payment.id,
                     "status": current.value, "error": error})
    await _set_outcome(session, event_row_id, "pending", payment.id)
    return "flagged_unconfirmed_success"


async def _adopt_transaction_id(session: AsyncSession, payment: Payment, transaction_id: str) -> None:
    """Save the provider's id for a payment that had none (its request's answer never arrived), so that
    status polling can ask about it."""
    table = table_of(Payment)
    await session.execute(update(table).where(table.c.id == payment.id, table.c.provider_transaction_id.is_(None))
                          .values(provider_transaction_id=transaction_id, updated_at=utcnow()))
    set_committed_value(payment, "provider_transaction_id", transaction_id)


async def _record_transaction_id(session: AsyncSession, payment: Payment, transaction_id: str, *,
                                 actor: Actor, flag: dict[str, Any]) -> None:
    """A completed payment takes the provider's final id (a receipt number), audited. `flag`: the columns of a flag
    raised with it (the id held by another payment), written in the same UPDATE. Written after it, her payment was
    written twice in the transaction, and PostgreSQL checks the second row version's key to her member row again: a
    KEY SHARE lock on her row, taken after the payment's, which her erasure (core.members.erase_member) holds FOR
    UPDATE while it waits for the payment: a deadlock, one of the two rolled back."""
    before = payment.provider_transaction_id
    table = table_of(Payment)
    same = (table.c.provider_transaction_id.is_(None) if before is None
            else table.c.provider_transaction_id == before)
    values = {"provider_transaction_id": transaction_id, "updated_at": utcnow(), **flag}
    await session.execute(update(table).where(table.c.id == payment.id, same).values(**values))
    for key, value in values.items():
        set_committed_value(payment, key, value)
    await record(session, actor=actor, action="payment.transaction_id_recorded", entity_type="payment",
                 entity_id=payment.id, before={"providerTransactionId": before},
                 after={"providerTransactionId": transaction_id}, cooperative_id=payment.cooperative_id)


async def _kept_transaction_id(session: AsyncSession, payment: Payment) -> str | None:
    """The final id a callback brought while its status query still said "pending" (see KEPT_TRANSACTION_ID)."""
    payloads = (await session.execute(
        select(ProviderEvent.payload).where(ProviderEvent.payment_id == payment.id,
                                            ProviderEvent.kind == EventKind.COLLECTION.value,
                                            ProviderEvent.outcome == "pending")
        .order_by(ProviderEvent.received_at.desc()))).scalars().all()
    for kept in payloads:
        value = kept.get(KEPT_TRANSACTION_ID) if isinstance(kept, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


async def _store_event_and_lock(
    db: Db, event: ProviderEventData, stored: dict[str, Any], found: Payment | None = None,
    id_lock: str | None = None,
) -> tuple[str | None, Payment | None, IdLocked | None]:
    """Store the callback once and lock its payment: (the stored row's id or None for a duplicate, the
    payment or None, the transaction id locked and probed, or None). On PostgreSQL one statement: WITH e AS (INSERT
    ... ON CONFLICT DO NOTHING RETURNING id) SELECT payment, (SELECT id FROM e) ... FOR UPDATE OF payments.

    `found`: the payment a confirmation already identified; it is locked by our reference.
    `id_lock`: a provider transaction id whose lock (_ID_LOCK) the same statement takes once the payment's row is
    locked, then probes for another payment holding it (the database's gateway_id_holder; PostgreSQL, a payment
    found: else none is taken and None is returned for it).

    `db`: on PostgreSQL a callback's Core transaction (core.pgraw.Transaction, begun), the payment attached to it;
    elsewhere a session."""
    by_transaction = _by_transaction(event) if found is None else False
    reference = event.reference if found is None else found.provider_reference
    if isinstance(db, AsyncSession):
        session = db
        stmt = row_insert(session.get_bind().dialect.name, ProviderEvent, ignore_conflict=("provider", "event_id"),
                          returning="id")
        event_row_id = (await session.execute(stmt, stored)).scalar_one_or_none()
        if event_row_id is None:
            return None, None, None
        return event_row_id, await _find_payment(session, event, lock=True, by_transaction=by_transaction,
                                                 reference=reference), None
    # (Its callers on SQLite pass a session, as the row_insert above needs; on PostgreSQL a Core transaction.)
    params = {f"e_{k}": v for k, v in stored.items()}
    params.update(provider=event.provider, reference=reference)
    if id_lock is not None:
        params.update(id_key=_id_lock_key(event.provider, id_lock), id_txn=id_lock)
    # The transaction's first statement, straight on asyncpg (BEGIN sent already: pgraw.transaction), the payment
    # built from its row as a load builds one (_loaded): through the ORM, the statement and the instance's loading
    # were about a fifth of a callback's CPU (1.33-1.39 against 1.03-1.08 ms in alternating benchmark runs).
    row = await pgraw.fetchrow(db.conn, pgraw.compiled(stored_and_locked(by_transaction, id_lock is not None)), params)
    if row is not None:
        # (A duplicate's statement took the id's lock too: it is held to the rollback, which follows at once.)
        # The payment's columns in the table's order (as its SELECT lists them), then the stored event's id, then
        # (with the id's lock) the payment holding the id.
        keys = _attr_keys(Payment)
        event_row_id = row[len(keys)]
        if event_row_id is None:
            return None, None, None
        payment = _loaded(dict(zip(keys, row, strict=False)))
        db.attach(payment)
        return event_row_id, payment, None if id_lock is None else IdLocked(id_lock, row[len(keys) + 1])
    # No such payment: the event row (if it is new) is found by its id, which only this call knows.
    event_row_id = (await db.conn.execute(select(ProviderEvent.id).where(ProviderEvent.id == stored["id"])
                                          )).scalar_one_or_none()
    return event_row_id, None, None


_SET_OUTCOME = (update(table_of(ProviderEvent))
                .where(table_of(ProviderEvent).c.id == bindparam("b_id"))
                .values(outcome=bindparam("b_outcome"), payment_id=bindparam("b_payment_id")))


async def _set_outcome(session: AsyncSession | AsyncConnection, event_row_id: str, outcome: str,
                       payment_id: str | None) -> None:
    # One UPDATE built once: loading the row just inserted to change two columns cost a SELECT and a flush.
    params = {"b_id": event_row_id, "b_outcome": outcome, "b_payment_id": payment_id}
    if pgraw.dialect_name(session) == "postgresql" and await pgraw.in_transaction(session):
        await pgraw.fetchrow(session, pgraw.compiled(_SET_OUTCOME), params)
    else:
        await session.execute(_SET_OUTCOME, params)


GIVEN_UP = (P.TIMEOUT, P.CANCELLED)

# How a payment's failure_reason starts once its cooperative's support desk cancelled it (cancel_payment), the
# admin's note after it. channels.sms.templates.reason_key tells the member "your cooperative cancelled it".
CANCELLED_BY_COOPERATIVE = "cancelled by the cooperative: "
# The poll job that keeps asking the provider about a cancelled payment (core.jobs: payload `cancelled`).
WATCH_AFTER_CANCEL = "cancelled"
# Its kind: one of its own, not payment.poll, so a worker of the previous release (a rolling deploy) has no handler
# for it and hands it back (core.outbox) rather than ending it as the poll of a payment no longer open.
WATCH_JOB = "payment.watch"


async def cancel_payment(session: AsyncSession, rt: Runtime, *, payment_id: str, cooperative_id: str | None,
                         note: str, actor: Actor) -> Payment:
    """The cooperative's support desk cancels an open payment (PENDING, PROCESSING) a member asked for by mistake
    or whose prompt never came: CANCELLED as a payer's decline ends one (the member's payment_failed SMS, the
    payment.failed webhook event), failure_reason "cancelled by the cooperative: <note>", audited
    payment.cancelled (the move's own audit row) with the note whole.

    No provider has a cancel the gateway can send (MTN's request to pay, Airtel's and M-Pesa's pushes, an
    IremboPay invoice: none can be withdrawn), so the prompt already on the member's phone, or the bank invoice,
    may still be paid. A collect job not yet sent finds the payment closed and sends nothing (core.jobs collect
    checks its status first); one already sending, or a request the provider holds, may still take the money:
    the payment is then asked about after the cancel (a payment.watch job, `cancelled` in its payload) as an open one
    is, until the provider's answer is final or the approval window and the grace an open payment is given after
    it are over, and a success then (that poll, the provider's callback, or an admin recording it from the
    statement) completes it late, flagged, with its receipt: money taken after the cancel is never dropped."""
    note = admin_note(note, "why the payment is cancelled")
    payment = await _locked_payment(session, payment_id, cooperative_id)
    current = P(payment.status)
    if current not in OPEN:
        why = f" ({payment.failure_reason})" if payment.failure_reason else ""  # e.g. who cancelled it, and why
        raise Conflict(f"payment is {current.value}{why}: only an open payment (PENDING or PROCESSING) can be "
                       "cancelled" + _closed_hint(current), field="status", code=INVALID_STATE)
    reason = f"{CANCELLED_BY_COOPERATIVE}{note}"
    await apply_collection_outcome(session, rt, payment, ProviderOutcome.CANCELLED, actor=actor, reason=reason,
                                   audit={"note": note})
    # Its status keeps being asked: the provider may still take the money (the prompt stays open at it).
    await enqueue_many(session, [NewJob(
        WATCH_JOB, {"payment_id": payment.id, WATCH_AFTER_CANCEL: current.value},
        dedupe_key=f"poll:{payment.id}:{WATCH_AFTER_CANCEL}", cooperative_id=payment.cooperative_id,
        run_at=utcnow() + timedelta(seconds=rt.settings.poll_after_seconds), max_attempts=30)])
    log.warning("payment cancelled by its cooperative",
                extra={"payment": payment.reference, "payment_id": payment.id, "actor": actor.id,
                       "was": current.value})
    await session.flush()
    await session.refresh(payment)
    return payment


def _closed_hint(status: PaymentStatus) -> str:
    """What to do instead, for a payment no longer open."""
    if status in COLLECTED:
        return "; its money is taken: refund it (POST /v1/payments/{id}/refunds)"
    return ""


# What to do with money taken for a voided payment (it is never reopened).
_AFTER_VOID = "record the statement line as a payment (POST /v1/payments/recorded)"


async def _flag_success_after_void(session: AsyncSession, payment: Payment, provider_transaction_id: str | None,
                                   amount: Money | None, *, actor: Actor) -> str:
    """The provider reports a voided payment's request paid after all (a recording voided, void_recording, of a
    payment the gateway had asked for): the money was taken, so it is never dropped, but a voided payment is not
    reopened (its transaction id may be recorded on the right payment since): flagged (mismatch) and audited
    for a person, who records the statement line (POST /v1/payments/recorded). The stored callback keeps the
    provider's id. The cooperative's system, told payment.voided (nothing collected), is told the money was taken
    after all (payment.taken_after_void, with what the provider reported): once per report, a repeat (the
    provider's retry under another event id) is audited only."""
    said = (f"provider reported success{f' ({amount})' if amount is not None else ''}"
            f"{f', transaction {provider_transaction_id[:64]}' if provider_transaction_id else ''} after the "
            f"recording was voided: check the statement, {_AFTER_VOID}")
    # The same report again (a provider's retry): audited only, also once a person reviewed its flag.
    report = {"providerTransactionId": provider_transaction_id, "amount": None if amount is None else amount.minor,
              "currency": None if amount is None else amount.currency}
    repeat = await flagged_before(session, payment, said, "payment.success_after_void", report)
    await record(session, actor=actor, action="payment.success_after_void", entity_type="payment",
                 entity_id=payment.id, before={"status": payment.status, "mismatch": payment.mismatch},
                 after={**report, "mismatch": bool(payment.mismatch) or not repeat},
                 cooperative_id=payment.cooperative_id)
    if not repeat:
        payment.mismatch = True
        payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
    payment.updated_at = changed_at(payment.updated_at)
    if not repeat:
        # Told payment.voided (collectedAmount 0): it must learn the money was taken after all, and is nowhere
        # counted until a person records the statement line. (One event per transaction id, too: a repeat whose
        # flag was cut from mismatch_detail (fit_detail) queues nothing more either.)
        await _emit_reported(session, payment, "payment.taken_after_void", provider_transaction_id, amount)
    log.error("provider reported a voided payment paid: record the statement line (the payment is flagged)",
              extra={"payment_id": payment.id, "provider": payment.provider})
    return "flagged_success_after_void"
