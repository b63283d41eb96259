"""Refunds: never more than was collected, checked under a row lock; sent through the outbox. A chargeback (money
the provider sent back itself) is recorded whatever the refunds hold, up to what was collected; what then goes back
beyond it is flagged for a person."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core import metrics
from core.audit import Actor, done_by, record
from core.db import ADVISORY_XACT_LOCK, insert_ignore, iso_ms, iso_z, lock_row, table_of, utcnow
from core.errors import (
    CONCURRENT_CHANGE,
    DUPLICATE_REFERENCE,
    IDEMPOTENCY_KEY_REUSED,
    INVALID_STATE,
    MEMBER_ERASED,
    PARTIAL_REFUND_UNSUPPORTED,
    PAYING_NUMBER_CHANGED,
    PAYING_NUMBER_UNKNOWN,
    PAYMENT_METHOD_NOT_AVAILABLE,
    PROVIDER_REFUSED,
    REFUND_EXCEEDS_REFUNDABLE,
    BusinessRuleError,
    Conflict,
    NotFound,
    ValidationError,
)
from core.members import ACCOUNT_NOT_KNOWN, disputes_free_since, number_came_since, number_history
from core.models import AuditEvent, Dispute, Member, OutboxJob, Payment, ProviderEvent, Refund
from core.money import Money
from core.notify import changed_at, notice_jobs
from core.outbox import CALL_SENT, CALL_STARTED, INTERRUPTED, end_waiting, enqueue, enqueue_many, raised_sqlstate
from core.ports import (
    AWAITING_CONFIGURATION,
    AWAITING_CONFIGURATION_NOTE,
    PaymentProvider,
    ProviderOutcome,
    amount_rule_refusal,
)
from core.ports import ProviderEvent as ProviderEventData
from core.references import cooperative_reference
from core.state import StaleTransition, transition
from core.state.dispute import OPEN_VALUES as OPEN_DISPUTES
from core.state.payment import PAYMENT, PaymentStatus, holds_money, taken_after_failure
from core.state.refund import OPEN_VALUES, REFUND, RefundStatus
from core.text import admin_note

if TYPE_CHECKING:
    from core.crypto import PiiCipher
    from core.phone import Phone
    from core.runtime import Runtime

log = logging.getLogger("gateway.refunds")
R = RefundStatus
HOLDING = (R.PENDING.value, R.PROCESSING.value, R.COMPLETED.value)
# The member's notices of a refund's outcome, keyed "<template>:<refund id>" (core.notify.sms_dedupe): the SMS a
# payment's messages list for its refunds (admin_api.messages).
REFUND_TEMPLATES = ("refund_completed", "refund_failed")
# How a refund's failure_reason starts when a person wrote the rest: their free text, never read as a provider's
# code for the member's SMS (channels.sms.templates.refund_reason_key).
RECORDED_BY_ADMIN = "recorded by an admin: "
WITHDRAWN_BY_ADMIN = "withdrawn by an admin: "
BY_A_PERSON = (RECORDED_BY_ADMIN, WITHDRAWN_BY_ADMIN)


async def refundable(session: AsyncSession, payment: Payment) -> Money:
    """Collected amount minus every refund not failed (pending ones hold their amount).

    When the provider reported less than the payment's amount, only what it reported can go back.
    """
    return Money(max(0, collected(payment) - await refunds_holding(session, payment)), payment.currency)


async def refunds_holding(session: AsyncSession, payment: Payment) -> int:
    """What the payment's refunds not failed hold: sent back, being sent, or to be sent."""
    return int((await session.execute(
        select(func.coalesce(func.sum(Refund.amount_minor), 0))
        .where(Refund.payment_id == payment.id, Refund.status.in_(HOLDING)))).scalar_one())


@dataclass(frozen=True)
class ReturnedByProvider:
    """Money the provider already sent back on its own: a chargeback, or a reversal its customer care made. The
    refund that records it is never sent (that would pay the member a second time): it completes at once with
    the provider's id for it and the time its statement shows."""

    provider_transaction_id: str
    completed_at: datetime | None = None


def _request_hash(amount: Money | None, reason: str | None, dispute_id: str | None,
                  returned: ReturnedByProvider | None = None, to_paying_number: bool = False) -> str:
    fields: dict[str, Any] = {"amount": None if amount is None else amount.minor,
                              "currency": None if amount is None else amount.currency,
                              "reason": reason, "dispute": dispute_id}
    if returned is not None:  # absent otherwise: the digests stored before it existed still match
        fields["returned"] = [returned.provider_transaction_id, iso_z(returned.completed_at)]
    if to_paying_number and returned is None:  # the same: only when asked (and only where it means something)
        # Part of the request: a refund FAILED because the number changed (paying_number_changed), sent again
        # with its key and toPayingNumber, is refused as another request, not answered with the FAILED one.
        fields["toPayingNumber"] = True
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def collected(payment: Payment) -> int:
    """Minor units actually taken: the amount, or what the provider reported when it differs (less: only that can
    go back; more, an overpayment: all of it is the payer's money, and can go back)."""
    if payment.collected_minor is None:
        return payment.amount_minor
    return payment.collected_minor


async def request_refund(
    session: AsyncSession,
    rt: Runtime,
    *,
    payment_id: str,
    cooperative_id: str | None,
    amount: Money | None,
    reason: str | None,
    idempotency_key: str,
    actor: Actor,
    dispute_id: str | None = None,
    returned: ReturnedByProvider | None = None,
    to_paying_number: bool = False,
) -> tuple[Refund, bool]:
    """A refund of (part of) a collected payment, queued to its provider; with `returned`, one the provider already
    made, recorded COMPLETED and never sent. `to_paying_number`: sent all the same when the number that paid is no
    longer its member's (_paying_number_still_hers)."""
    key = (idempotency_key or "").strip()
    if not 8 <= len(key) <= 128:
        raise ValidationError("idempotencyKey must be 8 to 128 characters", field="idempotencyKey")
    if amount is not None and not amount.is_positive():
        # A mistake in the request whatever the payment holds (400, as a payment's or a type's amount is),
        # unlike the refusals below, which depend on what is left to refund (422).
        raise ValidationError("amount must be a positive number", field="amount")
    # A refund while the payment is disputed is noted on the dispute (_note_refund_on_disputes), whose lock comes
    # first: a resolution locks its dispute, then the payment (core.disputes.move_dispute), so the other order
    # deadlocks against it. The dispute's own refund (dispute_id) comes with its dispute locked already.
    if returned is not None and dispute_id is None:
        # A chargeback completes at once, a success that may write the payment twice (its flag beyond collected):
        # her row first, as for any refund's success (_her_row_first). (A resolution's took it before its dispute's
        # lock, which an erasure takes after her row: core.disputes._her_row_before_dispute.)
        await _her_row_first(session, [payment_id])
    if returned is not None:
        # A chargeback may withdraw the payment's refunds not yet sent (_withdraw_unsent), noting each on its
        # dispute: every dispute of the payment locked first, then the payment, none waited for once it is held, as
        # a late success locks them (_lock_disputes_then_payment). Locked by what they were (open, or of a refund
        # then PENDING), one of a refund withdrawable only since was locked after the payment, against a late
        # success holding it and waiting for the payment (a deadlock, one rolled back): a refund then at the
        # provider whose credentials it refused (PENDING again: _awaiting_configuration), or a dispute opened and
        # resolved on the refund waiting (core.disputes._rely_on_unsettled) between the two locks.
        payment = await _lock_disputes_then_payment(session, payment_id, cooperative_id, about="a chargeback")
        locked = [] if payment is None else list((await session.execute(
            select(Dispute).where(Dispute.payment_id == payment_id, Dispute.status.in_(OPEN_DISPUTES))
            .order_by(Dispute.id).execution_options(populate_existing=True))).scalars().all())
    else:
        locked = [] if dispute_id is not None else await _lock_open_disputes(session, payment_id, cooperative_id)
        payment = await lock_row(session, Payment, payment_id, cooperative_id)
    disputes = [] if dispute_id is not None else locked
    if payment is None:
        raise NotFound("payment not found")

    if returned is not None:
        returned = _checked_return(returned, payment)
    request_hash = _request_hash(amount, reason, dispute_id, returned, to_paying_number)
    existing = (await session.execute(select(Refund).where(Refund.payment_id == payment.id,
                                                           Refund.idempotency_key == key))).scalar_one_or_none()
    if existing is not None:
        if existing.request_hash is not None and existing.request_hash != request_hash:
            # Another amount, "everything" instead of a sum (or the reverse), another reason: not a retry.
            raise Conflict("Refund with this idempotency key already exists with a different request",
                           field="idempotencyKey", code=IDEMPOTENCY_KEY_REUSED)
        if amount is not None and amount.minor != existing.amount_minor:  # (refunds made before the digest)
            raise Conflict("Refund with this idempotency key already exists with a different amount",
                           field="idempotencyKey", code=IDEMPOTENCY_KEY_REUSED)
        return existing, False

    if not holds_money(payment):
        raise BusinessRuleError(f"only collected payments can be refunded; this one is {payment.status}",
                                code=INVALID_STATE)
    available: Money | None = None  # what is left to refund, read once
    if returned is None:
        if amount is not None and amount.currency != payment.currency:
            raise ValidationError(f"refund must be in {payment.currency}", field="amount")
        available = await refundable(session, payment)
        if not available.is_positive():
            # Whatever the amount asked for (or all that is left), and before the refusals below that tell how to
            # get the money back (the paying number not known, the member erased, a request the provider never
            # had): all of it is back, or on its way, and those sent the admin to have it sent back again.
            raise BusinessRuleError(await _nothing_left(session, payment), field="amount",
                                    code=REFUND_EXCEEDS_REFUNDABLE)
    if returned is None and not payment.payment_account_enc and payment.payment_account_masked == ACCOUNT_NOT_KNOWN:
        # Recorded from a statement line naming its member alone, from before her number changed or was released.
        raise Conflict("the payment was recorded without the number that paid it (its member's number changed, "
                       "or was released, since): the account to refund is not known; have the provider send the "
                       "money back and record that with returnedByProvider", code=PAYING_NUMBER_UNKNOWN)
    if returned is None and not payment.payment_account_enc:  # core.members.erase_member cleared it
        raise Conflict("the payment's member was erased: the account to refund is no longer known; record a "
                       "refund the provider made with returnedByProvider", code=MEMBER_ERASED)
    provider = rt.providers.get(payment.provider)
    if returned is None and provider is None:
        # Its provider was left out of PROVIDERS since the payment: there is no adapter to send a refund with.
        raise ValidationError(f"payment {payment.reference} was made with {payment.method}, whose provider "
                              f"{payment.provider} is not in PROVIDERS (this deployment does not use it): no refund "
                              "can be sent to it", code=PAYMENT_METHOD_NOT_AVAILABLE)
    if returned is None and provider is not None:
        _request_to_refund_known(payment, provider)
    if returned is None:
        await _recording_not_contested(session, payment)
    else:
        # First: one reversal recorded twice is that (409), whatever is left to record of the payment.
        await _reversal_not_recorded(session, payment, returned)
    if available is None:
        available = await refundable(session, payment)
    amount = amount or available
    if amount.currency != payment.currency:
        raise ValidationError(f"refund must be in {payment.currency}", field="amount")
    if not amount.is_positive():  # (a chargeback of everything still refundable, asked for when nothing is)
        raise BusinessRuleError("nothing left to refund: give the amount the provider sent back",
                                field="amount", code=REFUND_EXCEEDS_REFUNDABLE)
    if returned is not None:
        # A chargeback is the provider's statement, not a request: recorded even beyond what the refunds leave (one
        # at the provider, or made already: the money then left twice, flagged by apply_refund_outcome), never
        # beyond what the provider took, which is all it can take back.
        await _within_collected(session, payment, amount)
    elif amount.minor > available.minor:
        raise BusinessRuleError(f"refund of {amount} exceeds the refundable {available}"
                                f"{await _held_by_unsettled(session, payment)}", field="amount",
                                code=REFUND_EXCEEDS_REFUNDABLE)
    whole = Money(collected(payment), payment.currency)
    if returned is None and provider is not None and not provider.supports_partial_refund \
            and amount.minor != whole.minor:  # (one the provider made itself is what it made)
        # Part of it already back (a chargeback recorded): the whole is no longer refundable either, so say so,
        # or each refusal sends the officer to the other.
        rest = "" if available.minor >= whole.minor else (
            f", and {available} of it is left to refund: have the provider send that back and record it with "
            "returnedByProvider")
        raise BusinessRuleError(f"{payment.method} refunds only the full amount ({whole}){rest}",
                                field="amount", code=PARTIAL_REFUND_UNSUPPORTED)
    if reason is not None and len(reason) > 300:
        raise ValidationError("reason must be at most 300 characters", field="reason")
    if returned is not None:
        # An amount its provider never moves (M-Pesa: cents) is no reversal's but a typo, as a recorded payment's
        # (core.recorded_payments): recorded, it left a balance of cents to pay that no M-Pesa payment could take.
        problem = amount_rule_refusal(provider, amount)
        if problem:
            raise ValidationError(f"returnedByProvider: {problem}", field="amount", code=PROVIDER_REFUSED)
    elif not to_paying_number:  # last: asked where the money goes only of a refund that can be made
        await _paying_number_still_hers(session, payment)
    if dispute_id is None:
        disputes = await _still_open_disputes(session, payment, disputes)
        # Linked to the dispute it was made during (the oldest, if an earlier race left two): its failure or
        # withdrawal is noted there too (_note_on_dispute), as a resolution's refund's is.
        dispute_id = disputes[0].id if disputes else None

    refund = Refund(
        id=str(uuid.uuid4()), cooperative_id=payment.cooperative_id, payment_id=payment.id,
        reference=await cooperative_reference(session, "RFD", payment.cooperative_id), amount_minor=amount.minor,
        currency=amount.currency,
        status=R.PENDING.value, reason=reason, idempotency_key=key, request_hash=request_hash,
        # Never sent when the provider returned it: random. Sent, derived from its key (derived_refund_reference).
        provider_reference=str(uuid.uuid4()) if returned is not None else derived_refund_reference(
            rt.cipher, payment, key, request_hash),
        returned_by_provider=returned is not None,
        dispute_id=dispute_id, created_by=actor.id,
    )
    session.add(refund)
    await session.flush()
    await record(session, actor=actor, action="refund.requested", entity_type="refund", entity_id=refund.id,
                 after={"paymentId": payment.id, "amount": amount.minor, "currency": amount.currency,
                        "reason": reason,
                        # The admin's word that it goes to the number that paid, read again when it is sent
                        # (paying_number_changed).
                        **({"toPayingNumber": True} if to_paying_number and returned is None else {})},
                 cooperative_id=payment.cooperative_id)
    await _note_refund_on_disputes(session, disputes, refund, actor=actor, returned=returned is not None)
    if returned is not None:
        await record(session, actor=actor, action="refund.returned_by_provider", entity_type="refund",
                     entity_id=refund.id, after={"providerTransactionId": returned.provider_transaction_id,
                                                 "completedAt": iso_z(returned.completed_at)},
                     cooperative_id=payment.cooperative_id)
        await apply_refund_outcome(session, rt, refund, ProviderOutcome.SUCCEEDED, actor=actor,
                                   provider_transaction_id=returned.provider_transaction_id,
                                   occurred_at=returned.completed_at,
                                   not_before=payment.completed_at or payment.created_at)
        await session.refresh(refund)
        return refund, True
    await enqueue(session, "refund.submit", {"refund_id": refund.id}, dedupe_key=f"refund:{refund.id}",
                  cooperative_id=payment.cooperative_id)
    return refund, True


async def _lock_open_disputes(session: AsyncSession, payment_id: str, cooperative_id: str | None) -> list[Dispute]:
    """The payment's open disputes, locked (in id order) before the payment is: one indexed probe, nothing
    locked when there is none. One being resolved is waited for, then left out once it is closed. (A chargeback
    locks every dispute of the payment instead: _lock_disputes_then_payment.)"""
    query = (select(Dispute).where(Dispute.payment_id == payment_id, Dispute.status.in_(OPEN_DISPUTES))
             .order_by(Dispute.id).with_for_update())
    if cooperative_id is not None:
        query = query.where(Dispute.cooperative_id == cooperative_id)
    found = (await session.execute(query.execution_options(populate_existing=True))).scalars().all()
    return [d for d in found if d.status in OPEN_DISPUTES]


async def _still_open_disputes(session: AsyncSession, payment: Payment, locked: list[Dispute]) -> list[Dispute]:
    """The payment's open disputes, read under its lock: those locked before it (_lock_open_disputes), and one
    opened since (core.disputes.open_dispute committed while this waited for the payment). That one is taken only
    if it is free (SKIP LOCKED): waiting for it while holding the payment is the deadlock the order avoids; one held
    is being moved by an officer right now, and the refund is refused for her to send again."""
    opened = set((await session.execute(select(Dispute.id).where(
        Dispute.payment_id == payment.id, Dispute.status.in_(OPEN_DISPUTES)))).scalars().all())
    if locked and session.get_bind().dialect.name == "sqlite":
        # SQLite ignores FOR UPDATE: they were read before this transaction took the write lock (lock_row), and one
        # may have been resolved or noted since. Read again, those still open: noted as read, the refund was linked
        # to a dispute just resolved, "while this dispute is OPEN", and its notes written back without the
        # resolution's. (PostgreSQL holds them locked since: as they are.)
        locked = list((await session.execute(
            select(Dispute).where(Dispute.id.in_([dispute.id for dispute in locked]),
                                  Dispute.status.in_(OPEN_DISPUTES))
            .execution_options(populate_existing=True))).scalars().all())
    new = opened - {dispute.id for dispute in locked}
    taken = [] if not new else (await session.execute(
        select(Dispute).where(Dispute.id.in_(new), Dispute.status.in_(OPEN_DISPUTES)).order_by(Dispute.id)
        .with_for_update(skip_locked=True).execution_options(populate_existing=True))).scalars().all()
    if len(taken) < len(new):
        raise Conflict("a dispute on this payment was opened and is being changed right now: nothing was "
                       "refunded; send the refund again", code=CONCURRENT_CHANGE)
    return sorted([*locked, *taken], key=lambda dispute: (dispute.created_at, dispute.id))  # the oldest first


async def _note_refund_on_disputes(session: AsyncSession, disputes: list[Dispute], refund: Refund, *, actor: Actor,
                                   returned: bool) -> None:
    """A refund made on a disputed payment, noted on its open disputes (locked: _lock_open_disputes) where the
    officer resolving one looks: without it, her resolution's refund paid the member a second time."""
    if not disputes:
        return
    from core.disputes import add_note  # local: core.disputes asks this module for refunds

    amount = Money(refund.amount_minor, refund.currency)
    made = "recorded as sent back by the provider" if returned else "requested"
    for dispute in disputes:
        await add_note(session, dispute, actor=actor, action="dispute.refund_made",
                       text=f"refund {refund.reference} of {amount} {made} on the payment while this dispute is "
                            f"{dispute.status}: count it before resolving with a refund",
                       audit={"refundId": refund.id, "amount": refund.amount_minor, "currency": refund.currency})


async def _held_by_unsettled(session: AsyncSession, payment: Payment) -> str:
    """What the payment's refunds not settled yet hold, for a refusal of more than is left: without it, a refund
    queued while the provider is down read as money the member already has ("exceeds the refundable 0")."""
    rows = (await session.execute(
        select(Refund.reference, Refund.amount_minor, Refund.status)
        .where(Refund.payment_id == payment.id, Refund.status.in_(OPEN_VALUES))
        .order_by(Refund.created_at, Refund.id))).all()
    if not rows:
        return ""
    held = Money(sum(minor for _, minor, _ in rows), payment.currency)

    def listed(references: list[str]) -> str:
        return ", ".join(references[:5]) + (", ..." if len(references) > 5 else "")

    unsent = [reference for reference, _, status in rows if status == R.PENDING.value]
    # One sent to the provider (PROCESSING) cannot be withdrawn (cancel_refund: 409): told to, the admin was refused.
    if len(unsent) == len(rows):
        what = ": withdraw one not yet sent with POST /v1/refunds/{id}/cancel"
    elif unsent:
        what = (f": withdraw one not yet sent ({listed(unsent)}) with POST /v1/refunds/{{id}}/cancel; the others are "
                "at the provider: wait for their outcome")
    else:
        what = (": sent to the provider, none can be withdrawn: wait for "
                f"{'its' if len(rows) == 1 else 'their'} outcome (one that fails frees its amount)")
    return f"; refunds not settled yet hold {held} ({listed([reference for reference, _, _ in rows])}){what}"


async def _nothing_left(session: AsyncSession, payment: Payment) -> str:
    """Why nothing is left to refund of the payment, for the refusal of any refund of it: refunded in full (the
    refunds and chargebacks that went back, their total), held by refunds not settled yet (withdraw one), or nothing
    collected. Without it an admin read "refund of 1,000 RWF exceeds the refundable 0 RWF", as if she had asked for
    too much, of a payment whose money had all gone back, or was on its way back."""
    rows = (await session.execute(
        select(Refund.reference, Refund.amount_minor, Refund.returned_by_provider)
        .where(Refund.payment_id == payment.id, Refund.status == R.COMPLETED.value)
        .order_by(Refund.completed_at, Refund.created_at, Refund.id))).all()
    back = sum(int(minor) for _, minor, _ in rows)
    taken = Money(collected(payment), payment.currency)
    if back and back >= taken.minor:
        head = "the payment has been refunded in full: nothing is left to refund"
    elif taken.minor <= 0:
        head = f"nothing is left to refund: the provider collected {Money(0, payment.currency)} on this payment"
    else:
        head = "nothing is left to refund"
    named = ", ".join(("chargeback " if returned else "refund ") + reference
                      for reference, _, returned in rows[:5]) + (", ..." if len(rows) > 5 else "")
    went = "" if not rows else f" ({Money(back, payment.currency)} back of {taken} collected: {named})"
    return head + went + await _held_by_unsettled(session, payment)


async def _within_collected(session: AsyncSession, payment: Payment, amount: Money) -> None:
    """A chargeback (and those recorded before it: each a reversal of the same payment) takes back at most what the
    provider took: more is a typo, or another payment's reversal. What the payment's refunds hold does not limit it
    (request_refund)."""
    rows = (await session.execute(
        select(Refund.reference, Refund.amount_minor)
        .where(Refund.payment_id == payment.id, Refund.returned_by_provider.is_(True), Refund.status.in_(HOLDING))
        .order_by(Refund.created_at, Refund.id))).all()
    before = sum(int(minor) for _, minor in rows)
    if before + amount.minor <= collected(payment):
        return
    whole = Money(collected(payment), payment.currency)
    named = ", ".join(reference for reference, _ in rows[:5]) + (", ..." if len(rows) > 5 else "")
    recorded = "" if not rows else (f", and {Money(before, payment.currency)} of it is recorded as sent back by "
                                    f"the provider already ({named})")
    raise BusinessRuleError(f"returnedByProvider: {amount} is more than the provider can have sent back: it "
                            f"collected {whole} on this payment{recorded}", field="amount",
                            code=REFUND_EXCEEDS_REFUNDABLE)


def _request_to_refund_known(payment: Payment, provider: PaymentProvider) -> None:
    """A Conflict, before anything is queued, for a refund its provider cannot be sent: one its provider's optional
    `refund_rule` refuses for the payment's transaction id (M-Pesa: no receipt number yet), and one whose refund names
    the request that took the money (`refund_names_request`: MTN's referenceIdToRefund), of a payment recorded from
    the statement without that request's reference (core.recorded_payments.request_unknown). Sent, the provider would
    refuse it (it never had the value the payment holds) and the refund would fail at the provider."""
    from core.recorded_payments import request_unknown  # local: the payment modules reach back into this module

    rule = getattr(provider, "refund_rule", None)
    problem = rule(payment.provider_transaction_id) if callable(rule) else None
    if problem:
        raise Conflict(f"payment {payment.reference}: {problem}", code=PROVIDER_REFUSED)
    if provider.refund_names_request and request_unknown(payment):
        raise Conflict(f"payment {payment.reference} was recorded from the provider's statement without the "
                       f"reference of the request that took its money, and a {payment.method} refund names that "
                       "request: nothing was sent. Have the provider send the money back (its customer care) and "
                       "record that refund with returnedByProvider; record such payments with gatewayReference "
                       "(our request's reference, as the provider's statement shows it) so that they can be refunded",
                       code=PROVIDER_REFUSED)


# Why a refund's paying number is asked about (_paying_number_change): its member no longer holds it, or another member
# got it since the payment.
NUMBER_LEFT_HER, NUMBER_WENT_TO_ANOTHER = "left_her", "went_to_another"
# Why the number that paid a payment of no member is not texted about it (payer_to_tell), besides those: the payment
# is older than SMS_PAYER_ANSWER_DAYS.
OLDER_THAN_ANSWER_DAYS = "older_than_answer_days"


async def _paying_number_change(session: AsyncSession, payment: Payment) -> str | None:
    """Whether a refund of a mobile-money payment, which the provider sends back to the wallet that paid, would go
    to a number that is no longer its payer's: NUMBER_LEFT_HER when it was her member's own and her number was
    corrected since (a new SIM, PATCH /v1/members: the operator gives an abandoned number to someone else);
    NUMBER_WENT_TO_ANOTHER when another member got it by a correction after the payment (a sister's it paid from,
    swapped since; the number of a payment of no member, or of a member whose number was released, given since to
    a member: core.members.number_came_since). None otherwise: a number that was never hers (her husband paying for
    her, or the number a TYPO correction replaced: its holder paid) gets its money back as before, as does one no
    correction has given to anyone since. Her own: the payment's masked number is one of those she held
    (core.members.number_history; two numbers masked alike are asked about, the safe side)."""
    from core.payments import METHOD_NAMES  # local: the payment modules reach back into this module

    if payment.method not in METHOD_NAMES or payment.payment_account_index is None:
        return None
    member = None if payment.member_id is None else await session.get(Member, payment.member_id)
    if member is not None and member.phone_index == payment.payment_account_index:
        return None
    if member is not None and member.phone_index is not None:
        since, held = await number_history(session, member)
        if payment.created_at < since and payment.payment_account_masked in held:
            return NUMBER_LEFT_HER
    if await number_came_since(session, payment.payment_account_index, payment.created_at, but=payment.member_id):
        return NUMBER_WENT_TO_ANOTHER
    return None


async def _paying_number_still_hers(session: AsyncSession, payment: Payment) -> None:
    """A Conflict, before anything is queued, for a refund that would go to a number no longer its payer's
    (_paying_number_change). The admin says it goes there all the same (`toPayingNumber`), or pays her another way
    and records that."""
    from core.payments import METHOD_NAMES  # local: the payment modules reach back into this module

    change = await _paying_number_change(session, payment)
    if change is None:
        return
    if change == NUMBER_WENT_TO_ANOTHER:
        raise Conflict(f"this payment was paid from {payment.payment_account_masked}, which another member got "
                       f"since (a swap, a new SIM): {METHOD_NAMES[payment.method]} sends a refund back to the number "
                       "that paid. Send it there only if its payer still holds that wallet (toPayingNumber: true); "
                       "else pay the payer another way and record it with returnedByProvider", field="toPayingNumber",
                       code=PAYING_NUMBER_CHANGED)
    raise Conflict(f"this payment was paid from {payment.payment_account_masked}, which is no longer its member's "
                   f"number (changed since): {METHOD_NAMES[payment.method]} sends a refund back to the number that "
                   "paid, which the operator may have given to someone else. Send it there only if the member still "
                   "holds that wallet (toPayingNumber: true); else pay her another way and record it with "
                   "returnedByProvider", field="toPayingNumber", code=PAYING_NUMBER_CHANGED)


async def paying_number_changed(session: AsyncSession, refund: Refund, payment: Payment) -> str | None:
    """At its submission (core.jobs.submit_refund), the failure reason of a refund asked for without
    `toPayingNumber` whose payment's number is no longer its payer's (_paying_number_change): it passed that check
    when it was asked for, so her number changed (or another member got it) since, while it waited to be sent (the
    provider down, the outbox behind). Sent, the money went to the number's new holder. None: send it (one the
    admin asked to go there all the same, whose refund.requested audit row says so, is sent as asked)."""
    if refund.returned_by_provider:
        return None
    change = await _paying_number_change(session, payment)
    if change is None:
        return None
    asked = (await session.execute(select(AuditEvent.after).where(
        AuditEvent.entity_type == "refund", AuditEvent.entity_id == refund.id,
        AuditEvent.action == "refund.requested"))).scalars().all()
    if any(isinstance(after, dict) and after.get("toPayingNumber") is True for after in asked):
        return None
    whose = ("is no longer its member's (changed since the refund was asked): make it again with toPayingNumber "
             "if she still holds that wallet") if change == NUMBER_LEFT_HER else (
        "went to another member since the refund was asked: make it again with toPayingNumber if its payer still "
        "holds that wallet")
    return f"{PAYING_NUMBER_CHANGED}: not sent: {payment.payment_account_masked}, the number that paid, {whose}"


async def payer_to_tell(session: AsyncSession, cipher: PiiCipher, payment: Payment, *, about: Refund | Dispute,
                        kind: Literal["refund", "dispute"], template: str, actor: Actor, answer_days: int
                        ) -> Phone | None:
    """Where the SMS `template` about a payment of no member (a refund's outcome, a dispute's change) goes: the
    number that paid it (core.payments.payer_phone), while that number is still likely its payer's. Not once the
    payment is older than `answer_days` (SMS_PAYER_ANSWER_DAYS; 0: no limit), as the RECEIPT keyword
    (channels.sms.routes._owns) and the support desk's resend (admin_api.messages) judge it: operators give a number
    left unused for months to someone else, and no correction of ours says so. Nor once a member got it by a
    correction since the payment (a new SIM, a swap: _paying_number_change). Then "your refund was sent" or "your
    dispute is closed" told the number's new holder of another's payment: not sent (None), the cooperative's
    system told all the same (the caller's webhook event), audited (refund.payer_not_told, dispute.payer_not_told,
    with the reason: OLDER_THAN_ANSWER_DAYS, or _paying_number_change's) and logged. Asked when each SMS is queued:
    the number may have moved while the provider settled a refund or a dispute stayed open; and a refund sent there
    on the admin's word (toPayingNumber) or recorded as the provider's (returnedByProvider) is where the money went,
    not who holds the number now (the cooperative's records say who does). One probe of the number's corrections
    (none past the age limit), for a payment of no member only (None for any other: a member's SMS goes to her, a
    bank payment has no number). `kind`: what `about` is, the audit row's entity type."""
    from core.payments import payer_phone  # local: the payment modules reach back into this module

    phone = payer_phone(cipher, payment)
    if phone is None:
        return None
    old = bool(answer_days) and payment.created_at < utcnow() - timedelta(days=answer_days)
    change = OLDER_THAN_ANSWER_DAYS if old else await _paying_number_change(session, payment)
    if change is None:
        return phone
    await record(session, actor=actor, action=f"{kind}.payer_not_told", entity_type=kind, entity_id=about.id,
                 after={"template": template, "paymentAccount": payment.payment_account_masked, "reason": change},
                 cooperative_id=about.cooperative_id)
    why = "the payment is older than SMS_PAYER_ANSWER_DAYS" if old else "the number that paid is no longer its payer's"
    log.warning(f"{kind} SMS not sent: {why}", extra={
        kind: about.reference, "payment": payment.reference, "template": template, "actor": actor.id})
    return None


async def _recording_not_contested(session: AsyncSession, payment: Payment) -> None:
    """A Conflict, before anything is queued, for a refund sent to the provider of a payment recorded from the
    statement whose transaction id a payment of another cooperative holds too (core.transaction_ids._contest): the
    provider reported that id for the other cooperative's own request, so the money is not this recording's, and a
    refund naming it (Airtel's, M-Pesa's reversal) would give the other cooperative's member her money back while her
    payment keeps counting it. One probe of ix_payments_transaction_id; refunds are no hot path."""
    from core.recorded_payments import RECORDED
    from core.transaction_ids import held_by_another_cooperative  # local: the payment modules import this module

    txn = payment.provider_transaction_id
    if payment.channel != RECORDED or not txn or not await held_by_another_cooperative(session, payment, txn):
        return
    raise Conflict(f"payment {payment.reference} was recorded from the provider's statement with transaction "
                   f"{txn[:64]}, which the provider reported for another cooperative's payment too (its flag, "
                   "mismatchDetail or review.mismatchDetail, says so): a refund through the provider would pay "
                   "back that payment's money. Nothing was sent; check the provider's statement, and record money "
                   "it sent back with returnedByProvider")


# Why a sent refund's provider reference is derived (derived_refund_reference): a refund's idempotency key names one
# request for ever within its payment (refunds hold (payment, key) unique; an API caller's key is its own, a dispute's
# refund is keyed by the dispute's id), so the gateway that lost the refund (PostgreSQL restored from a backup) and is
# sent it again sends the provider the same request id as the first time: MTN answers 409, it has it, and the refund
# takes the first one's outcome (its status query): the member is paid back once.
_REFUND_REFERENCE_PURPOSE = "refund-provider-reference"


def derived_refund_reference(cipher: PiiCipher, payment: Payment, key: str, request_hash: str) -> str:
    """The provider reference of a refund sent to the provider (our request id: MTN's X-Reference-Id, the `ref` of
    M-Pesa's Result URL), derived from the payment's cooperative and id, the refund's idempotency key and its
    request's digest (_request_hash) under BLIND_INDEX_KEY, in uuid4's form as core.payments.
    derived_provider_reference gives a payment's (MTN takes only those). The digest is in it so that a key sent
    again with another amount or reason after the loss is another request at the provider."""
    return cipher.request_id([payment.cooperative_id, payment.id, key, request_hash], purpose=_REFUND_REFERENCE_PURPOSE)


async def _reversal_not_recorded(session: AsyncSession, payment: Payment, returned: ReturnedByProvider,
                                 exclude: str | None = None, field: str = "returnedByProvider") -> None:
    """One reversal of the provider's (its id on the statement) is recorded once, whichever payment of that
    provider it is recorded on: two admins recording one chargeback (a dispute's resolution and a refund), or a
    retry with a fresh idempotency key, doubled the money counted back, and one statement line could cover a
    fabricated second refund. Two recordings at once take turns on PostgreSQL (a lock on the id for the
    transaction); the embedded default has one writer at a time."""
    txn = returned.provider_transaction_id
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(ADVISORY_XACT_LOCK, {"key": f"reversal:{payment.provider}:{txn}"})
    taken = (await session.execute(
        select(Refund.reference, Refund.cooperative_id).join(Payment, Payment.id == Refund.payment_id)
        .where(Payment.provider == payment.provider, Refund.provider_transaction_id == txn,
               Refund.status != R.FAILED.value, Refund.id != (exclude or "")).limit(1))).first()
    if taken is not None:
        # Another cooperative's refund is not named (its references are its own business).
        where = (f"by refund {taken[0]}" if taken[1] == payment.cooperative_id
                 else "on another payment of this provider: check the id on the statement")
        what = "reversal" if field == "returnedByProvider" else "transaction"
        raise Conflict(f"the provider's {what} {txn} is already recorded, {where}", field=field,
                       code=DUPLICATE_REFERENCE)


def _checked_return(returned: ReturnedByProvider, payment: Payment) -> ReturnedByProvider:
    """The provider's id for the money it sent back (1 to 128 characters), and its time: after the payment's
    money was taken, not in the future."""
    txn = (returned.provider_transaction_id or "").strip()
    if not 1 <= len(txn) <= 128 or not txn.isprintable():
        raise ValidationError("returnedByProvider.providerTransactionId must be 1 to 128 printable characters: the "
                              "provider's id of the reversal", field="returnedByProvider")
    from core.recorded_payments import check_statement_time  # local: the payment modules reach back into this module

    check_statement_time(returned.completed_at, payment.completed_at or payment.created_at,
                         "the payment's money was taken", "returnedByProvider.completedAt")
    return ReturnedByProvider(txn, returned.completed_at)


async def apply_refund_outcome(session: AsyncSession, rt: Runtime, refund: Refund, outcome: ProviderOutcome, *,
                               actor: Actor, provider_transaction_id: str | None = None,
                               reason: str | None = None, occurred_at: datetime | None = None,
                               not_before: datetime | None = None, tell_paying_number: bool = True,
                               amount: Money | None = None) -> str:
    """`occurred_at`: when the provider (or an admin, from its statement) says the money went back; the refund's
    completion is dated so, within its request (`not_before`: another floor, as a chargeback recorded after it
    happened) and now (core.provider_events.money_moved_at). `tell_paying_number`: False when the number that paid is no
    longer its payer's (paying_number_changed): a payment of no member's SMS is not sent to its new holder.
    `amount`: what the provider says it sent back, when it says: a success for another amount (or currency) than
    the refund's completes it all the same (the provider says the money moved) with the payment flagged, audited
    and logged for a person (_amount_differs); the refund's amount is what is counted until that person corrects
    it with the provider."""
    from core.provider_events import money_moved_at  # local: the payment modules reach back into this module

    current = R(refund.status)
    final = current in (R.COMPLETED, R.FAILED)
    if outcome in (ProviderOutcome.PENDING, ProviderOutcome.AMBIGUOUS):
        return "ignored" if final else "pending"
    if current is R.COMPLETED:
        if outcome is not ProviderOutcome.SUCCEEDED:
            await _failed_after_completion(session, refund, reason or outcome.value.lower(), actor=actor)
            await _tell_flags(session)
            return "flagged_failed_after_completion"
        return "ignored"
    if current is R.FAILED and outcome is not ProviderOutcome.SUCCEEDED:
        return "ignored"
    # (FAILED and now SUCCEEDED: the provider sent the money back after all; it completes, flagged below.)
    if outcome is ProviderOutcome.SUCCEEDED:
        values: dict[str, Any] = {"completed_at": money_moved_at(not_before or refund.created_at, occurred_at)}
        if provider_transaction_id:
            values["provider_transaction_id"] = provider_transaction_id
        if refund.failure_reason is not None:
            values["failure_reason"] = None  # no longer true (a FAILED one sent after all; the audit log keeps it)
        updated = await transition(session, REFUND, refund.id, current, R.COMPLETED, actor=actor, values=values)
        # Read fresh under the lock: an instance the session already holds (loaded before another refund of this
        # payment completed and committed) would count from a stale total, and a second outcome recorded at the
        # same moment lost the first one's amount (PARTIALLY_REFUNDED -> PARTIALLY_REFUNDED passes the CAS).
        # A late one's: its dispute, and those of the refunds it may withdraw (_withdraw_unsent), are noted below,
        # after the payment is locked: locked first, as a refund made during the dispute (_lock_open_disputes) and a
        # resolution lock it before the payment, or a late success deadlocks against them (record_refund_outcome
        # locks them so too). Every dispute of the payment: one being resolved is waited for.
        payment = await (_lock_disputes_then_payment(session, refund.payment_id,
                                                     about=f"late success of refund {refund.reference}")
                         if current is R.FAILED else lock_row(session, Payment, refund.payment_id))
        assert payment is not None
        refunded = payment.refunded_minor + refund.amount_minor
        if amount is not None and amount != Money(refund.amount_minor, refund.currency):
            await _amount_differs(session, refund, payment, amount, actor=actor)
        if current is R.FAILED:
            await _sent_after_failure(session, refund, payment, refunded, actor=actor)
            await _withdraw_unsent(session, rt, payment, refund, actor=actor)
            # What still goes back beyond what was collected (made, or at the provider and no longer withdrawable):
            # the payment's one flag for it, after that one. (FAILED, it held nothing: all of it is added.)
            await _beyond_collected(session, refund, payment, refunded, actor=actor, added=refund.amount_minor,
                                    said=None)  # (_sent_after_failure logged it)
        elif refund.returned_by_provider:
            # A chargeback, recorded whatever the payment's refunds hold (request_refund): those not yet sent that
            # would now give back more than was collected are not sent; what is left beyond it is flagged once.
            await _withdraw_unsent(session, rt, payment, refund, actor=actor,
                                   reason=f"not sent: the provider sent the money back itself (refund "
                                          f"{refund.reference}, its chargeback)")
            await _returned_beyond_collected(session, refund, payment, refunded, actor=actor)
        elif refunded > collected(payment) and not await _over_return_flagged(session, refund, payment):
            # Another refund of this payment went through after failing while this one was in flight: with this
            # one the member has been paid back more than was collected. (It was held while in flight: it adds
            # nothing to what the refunds hold, so an open flag beyond collected is replaced.)
            await _beyond_collected(session, refund, payment, refunded, actor=actor, added=0,
                                    said="member paid back more than was collected")
        voided = payment.status == PaymentStatus.VOIDED.value
        if taken_after_failure(payment) or payment.status == PaymentStatus.REFUNDED.value or voided:
            # Money taken after the payment failed, given back: the payment stays FAILED (a final state is
            # never reopened); what went back is counted on it. (Or a payment already REFUNDED whose failed
            # refund went through after all: the member was paid back twice; flagged by _sent_after_failure.
            # Or a voided recording's (core.recorded_payments.void_recording, allowed once its refunds had FAILED): it
            # stays VOIDED, the money that left is counted on it, flagged by _sent_after_failure.)
            # Stamped as a told change (changed_at): a flag written here is told as payment.flagged with it.
            await session.execute(update(Payment).where(Payment.id == payment.id)
                                  .values(refunded_minor=refunded, updated_at=changed_at(payment.updated_at)))
            action = ("payment.refunded_after_failure" if taken_after_failure(payment)
                      else "payment.refunded_after_void" if voided else "payment.refunded_beyond_collected")
            await record(session, actor=actor, action=action, entity_type="payment",
                         entity_id=payment.id, after={"refundId": refund.id, "refunded": refunded},
                         cooperative_id=payment.cooperative_id)
        else:
            target = PaymentStatus.REFUNDED if refunded >= collected(payment) else PaymentStatus.PARTIALLY_REFUNDED
            # updated_at as a told change's (changed_at): the payment.flagged of a flag written above carries it, and
            # it must read later than the payment's last event (its completion's, stamped ahead of this host's clock
            # by another host's, or in the same millisecond), or a receiver ignores it as older.
            await transition(session, PAYMENT, payment.id, PaymentStatus(payment.status), target, actor=actor,
                             values={"refunded_minor": refunded, "updated_at": changed_at(payment.updated_at)},
                             audit={"refundId": refund.id})
        template, event_type = "refund_completed", "refund.completed"
    else:
        updated = await transition(session, REFUND, refund.id, current, R.FAILED, actor=actor,
                                   values={"failure_reason": (reason or outcome.value.lower())[:200]})
        template, event_type = "refund_failed", "refund.failed"
        if refund.dispute_id:
            why = updated.failure_reason or "failed"
            # A dispute resolved with this refund read as settled, with a refund that never reached the member.
            await _note_on_dispute(session, refund, actor=actor, action="dispute.refund_failed",
                                   text=f"refund {refund.reference} failed: {why}; the member has not been paid back",
                                   audit={"refundId": refund.id, "reason": why})
        # After its dispute is noted (locked before the payment, as a resolution locks them).
        await _over_return_failed(session, refund, actor=actor)
    await _tell_flags(session)  # after the payment's move: the events show it as committed
    paid = await session.get(Payment, refund.payment_id)
    assert paid is not None
    # Without a member, the phone that paid is told (a mobile-money payment's), as of the receipt: while it is still
    # its payer's (payer_to_tell).
    phone = await payer_to_tell(session, rt.cipher, paid, about=updated, kind="refund", template=template, actor=actor,
                                answer_days=rt.settings.sms_payer_answer_days) if tell_paying_number else None
    jobs = notice_jobs(template=template, event_type=event_type, cooperative_id=refund.cooperative_id, key=refund.id,
                       context={"refund_id": refund.id}, data=refund_data(updated), cipher=rt.cipher,
                       member_id=paid.member_id or None, phone=phone)
    if refund.dispute_id:
        from core.disputes import after_dispute_sms  # local: core.disputes asks this module for refunds

        # After the dispute's SMS still waiting (its resolution's, spaced after an earlier move's).
        jobs = await after_dispute_sms(session, refund.dispute_id, jobs)
    await enqueue_many(session, jobs)  # the SMS and the webhook event in one round trip
    return updated.status.lower()


async def _lock_disputes_noted(session: AsyncSession, payment_id: str, cooperative_id: str | None = None) -> list[str]:
    """Every dispute of the payment, locked in id order before the payment: those a late success or a chargeback
    notes (a late success's own refund's, and those of the payment's refunds waiting to be sent, which
    _withdraw_unsent may withdraw), and one being resolved right now. A resolution in the member's favour without a
    refund of its own links, and so locks, the payment's refunds not yet settled after its dispute (core.disputes.
    _rely_on_unsettled): _withdraw_unsent, which skips a refund another transaction holds, left the one it held
    PENDING, to be sent, and the member was paid back twice (flagged only once that one completed). Waiting here for
    the dispute, the late success then finds it linked and free, and withdraws it. All of them, whatever their status
    or their refunds': read by status, a dispute resolved while this waited for it would be left out, and locked
    later, after the payment (its note); read by its refunds', one whose refund is withdrawable only since (PENDING
    again once the provider refused the gateway's credentials for it: _awaiting_configuration) too. One probe of the
    payment's few disputes; a late success and a chargeback are rare. Returns their ids."""
    query = select(Dispute.id).where(Dispute.payment_id == payment_id).order_by(Dispute.id).with_for_update()
    if cooperative_id is not None:
        query = query.where(Dispute.cooperative_id == cooperative_id)
    return list((await session.execute(query)).scalars().all())


async def _lock_disputes_then_payment(session: AsyncSession, payment_id: str, cooperative_id: str | None = None, *,
                                      about: str) -> Payment | None:
    """The payment (None if there is none, or it is another cooperative's), locked after all its disputes
    (_lock_disputes_noted), and none of them waited for once the payment is held: for a late success of a refund,
    and a chargeback (`about` says which, for the log). A dispute opened and committed in the instant between the two
    locks (core.disputes.open_dispute locks the payment, so none can be opened once this holds it) is not among those
    locked: noted later (its resolution linked a refund this withdraws) it was locked after the payment, against a
    resolution, or a late success, holding it and waiting for the payment (a deadlock, one rolled back); and a
    resolution holding it, and the refunds waiting it relies on (core.disputes._rely_on_unsettled), made
    _withdraw_unsent skip those, left PENDING and sent (the member paid back twice). Such a dispute is taken if it is
    free (SKIP LOCKED: taken without waiting, so the order holds); if another holds it, the two locks are let go (their
    savepoint rolled back: PostgreSQL releases the row locks taken in it) and taken again in order, waiting for that
    dispute this time. Only PostgreSQL locks rows (on SQLite the write lock serialises every writer): there, the two
    locks as they are."""
    if session.get_bind().dialect.name == "sqlite":
        await _lock_disputes_noted(session, payment_id, cooperative_id)
        return await lock_row(session, Payment, payment_id, cooperative_id)  # type: ignore[no-any-return]
    for _ in range(3):
        savepoint = await session.begin_nested()
        locked = await _lock_disputes_noted(session, payment_id, cooperative_id)
        payment = await lock_row(session, Payment, payment_id, cooperative_id)
        if payment is None or await disputes_free_since(
                session, select(Dispute.id).where(Dispute.payment_id == payment_id), locked):
            await savepoint.commit()
            return payment  # type: ignore[no-any-return]
        await savepoint.rollback()
        log.info("a dispute opened on the payment between the locks of its disputes and its own is being changed: "
                 "the locks let go and taken again in order", extra={"payment_id": payment_id, "about": about})
    raise Conflict("disputes on this payment were opened and changed while this was recorded: nothing was "
                   "recorded; send it again", code=CONCURRENT_CHANGE)


async def _her_row_first(session: AsyncSession | AsyncConnection, payments: Any) -> None:
    """The row of the member whose payment (`payments`: a query of payment ids) has a refund about to be locked for its
    success, FOR KEY SHARE, before that refund is: a success writes her payment more than once (a late one: its flag,
    then its refunded amount), and PostgreSQL checks a row version this transaction wrote against her row again, a KEY
    SHARE lock taken then, after the refund. An erasure (core.members.erase_member) locks her row, then her refunds:
    the two deadlocked, and the erasure was rolled back. Taken first (as core.disputes._lock_payment takes it), one
    waits for the other. Nothing is locked for a payment of no member. (`payments` may be a list of ids too: a payment
    callback's, core.provider_events.handle_provider_event, on its Core connection.)"""
    await session.execute(select(Member.id).where(Member.id.in_(select(Payment.member_id).where(Payment.id.in_(
        payments)))).with_for_update(read=True, key_share=True))


async def lock_for_outcome(session: AsyncSession, refund_id: str, outcome: ProviderOutcome) -> Refund:
    """The refund a worker applies the provider's `outcome` to (core.jobs), locked; for a success, her row first
    (_her_row_first): a success for another amount flags her payment, then moves it."""
    if outcome is ProviderOutcome.SUCCEEDED:
        await _her_row_first(session, select(Refund.payment_id).where(Refund.id == refund_id))
    return (await session.execute(select(Refund).where(Refund.id == refund_id).with_for_update())).scalar_one()


async def _sent_after_failure(session: AsyncSession, refund: Refund, payment: Payment, refunded: int, *,
                              actor: Actor) -> None:
    """A FAILED refund the provider now reports sent back (its late answer, or a person recorded FAILED too soon):
    audited, the payment flagged for a person; when another refund has been made since, the member is paid back
    more than was collected, which the payment's flag beyond collected says (_beyond_collected, once the refunds
    not yet sent are withdrawn)."""
    over = refunded - collected(payment)
    await record(session, actor=actor, action="refund.sent_after_failure", entity_type="refund", entity_id=refund.id,
                 before={"status": R.FAILED.value}, after={"status": R.COMPLETED.value, "refunded": refunded,
                                                             "overRefunded": max(over, 0)},
                 cooperative_id=refund.cooperative_id)
    await _flag(session, payment, f"refund {refund.reference} reported sent back after it had failed",
                "refund_sent_after_failure")
    metrics.REFUND_ANOMALIES.labels(kind="sent_after_failure").inc()
    # ERROR when the member now has more back than was collected (a person must act); else a WARNING: the money
    # went back once, as asked (an admin correcting a FAILED refund from the statement is this case).
    log.log(logging.ERROR if over > 0 else logging.WARNING, "refund reported sent back after it had failed",
            extra={"refund": refund.reference, "payment": payment.reference, "over_refunded_minor": max(over, 0),
                   "actor": actor.id})
    await _note_on_dispute(session, refund, actor=actor, action="dispute.refund_sent_after_failure",
                           text=f"refund {refund.reference} went through after all: the member has been paid back",
                           audit={"refundId": refund.id})


async def _withdraw_unsent(session: AsyncSession, rt: Runtime, payment: Payment, sent: Refund, *,
                           actor: Actor, reason: str | None = None) -> None:
    """`sent` (FAILED) went through after all, or is a chargeback just recorded (`reason` says so), and the refunds
    asked for since would now give back more than was collected: those not yet sent are withdrawn, newest first,
    until the rest fit. Each FAILED ("not sent"),
    audited, its submission ended and the cooperative's system told (refund.failed); the member, paid back by
    `sent`, gets no SMS about it. One whose submission has started (or a try of which may have reached the
    provider) is left to go; if it completes, the member has more back than collected and it is flagged then.

    The submission is ended only while no try of it may have reached the provider (_end_unsent_submission, as
    cancel_refund ends it): a worker claiming it at the same moment either finds it ended or holds it RUNNING, and
    then it is left."""
    over = await refunds_holding(session, payment) - collected(payment)
    if over <= 0:
        return
    # SKIP LOCKED: a refund another transaction holds is being moved by it (its own outcome, its submission
    # answered), and that transaction waits for this payment's lock, which this one holds: waiting for it was a
    # deadlock (callbacks on one payment's refunds rolled back, answered 500). It is left to go, as one being sent.
    waiting = (await session.execute(
        select(Refund).where(Refund.payment_id == payment.id, Refund.status == R.PENDING.value, Refund.id != sent.id)
        .order_by(Refund.created_at.desc(), Refund.id.desc()).with_for_update(skip_locked=True))).scalars().all()
    reason = reason or f"not sent: refund {sent.reference} went through after all"
    for refund in waiting:
        if over <= 0:
            break
        # Ended as an admin's withdrawal ends it (cancel_refund), by its marks (_untried_or_refused), not its
        # attempts: a parked submission replayed (POST /v1/jobs/replay), or one handed back uncounted, starts again
        # at 0 attempts with its try's CALL_SENT (a 504) kept, and that try may have been carried out (withdrawn, the
        # member was paid back twice unflagged); one retried after tries refused unprocessed (the provider's 401 on
        # the gateway's credentials, a 429), or parked so until its configuration is fixed, sent nothing (left at 1
        # attempt or more, it went out at its next try or once replayed, and the member was paid back twice).
        if not await _end_unsent_submission(session, refund.id, f"withdrawn: {reason}"):
            continue  # being sent, or a try of it may have arrived
        updated = await transition(session, REFUND, refund.id, R.PENDING, R.FAILED, actor=actor,
                                   values={"failure_reason": reason})
        # Withdrawn whole, though only `over` of it had to go (a partial chargeback, a late success smaller than
        # it): the rest was the member's, decided by an officer, and nobody but the cooperative's system (the
        # webhook) heard it was not sent. Flagged, so that it is refunded again rather than lost.
        short = refund.amount_minor - over
        if short > 0:
            await _flag(session, payment, f"refund {refund.reference} of {Money(refund.amount_minor, refund.currency)}"
                                          f" withdrawn unsent: {Money(short, refund.currency)} of it is still the "
                                          "member's: refund it again", "refund_withdrawn_unsent")
        over -= refund.amount_minor
        await record(session, actor=actor, action="refund.withdrawn", entity_type="refund", entity_id=refund.id,
                     before={"status": R.PENDING.value}, after={"status": R.FAILED.value, "sentRefundId": sent.id},
                     cooperative_id=refund.cooperative_id)
        metrics.REFUND_ANOMALIES.labels(kind="withdrawn_unsent").inc()
        log.warning("refund withdrawn before it was sent: " + ("the provider sent the money back itself"
                                                               if sent.returned_by_provider else
                                                               "an earlier one went through after all"),
                    extra={"refund": refund.reference, "sent_refund": sent.reference, "payment": payment.reference,
                           "actor": actor.id})
        await enqueue_many(session, notice_jobs(  # the webhook only: the member has her money back
            template="refund_failed", event_type="refund.failed", cooperative_id=refund.cooperative_id,
            key=refund.id, context={"refund_id": refund.id}, data=refund_data(updated), cipher=rt.cipher))
        await _note_on_dispute(session, refund, actor=actor, action="dispute.refund_withdrawn",
                               text=f"refund {refund.reference} {reason}: the member has been paid back by it"
                                    + ("" if short <= 0 else f", but for {Money(short, refund.currency)}: refund "
                                                             "that again"),
                               audit={"refundId": refund.id, "sentRefundId": sent.id})


# The audit action of a chargeback that took what the payment's refunds give back beyond what was collected
# (_returned_beyond_collected); its `inFlight` names the refunds at the provider it counted, `chargebacks` and
# `refunds` those its flag names (chargebacks, and other refunds that went through beyond it), `flag` the flag's
# text, `detail` the payment's mismatch_detail as it wrote it, `replaced` the open flag it replaced (None: a new flag)
# and `updated` that flag's latest chargeback (None: a new flag, or one no chargeback wrote).
RETURNED_BEYOND_COLLECTED = "refund.returned_beyond_collected"
# The same for another refund of the payment that went through beyond what was collected (one that failed and
# went through after all, or one completing that no flag counted): audited on the payment (`refundId`: that refund),
# its flag the same one open flag (_beyond_collected).
PAYMENT_BEYOND_COLLECTED = "payment.beyond_collected"


async def _returned_beyond_collected(session: AsyncSession, refund: Refund, payment: Payment, refunded: int, *,
                                     actor: Actor) -> None:
    """A chargeback (`refund`, just COMPLETED) recorded beyond what the payment's refunds left: with the refunds made
    (`refunded` counts them and it) and those still at the provider, which can no longer be withdrawn (sent, or a try
    of them may have arrived: _withdraw_unsent left them), more than was collected goes back to the payer. The
    provider's statement stands, and so do the refunds: the payment is flagged for a person to recover the rest from
    the member (or to see the refund at the provider fail), audited (RETURNED_BEYOND_COLLECTED) and logged ERROR;
    that refund's completion is not flagged again (_over_return_flagged). Counted once per open flag
    (_beyond_collected)."""
    await _beyond_collected(session, refund, payment, refunded, actor=actor, added=refund.amount_minor,
                            said="chargeback recorded beyond what the refunds left: the member is paid back more "
                                 "than was collected")


async def _beyond_collected(session: AsyncSession, refund: Refund, payment: Payment, refunded: int, *,
                            actor: Actor, added: int, said: str | None) -> bool:
    """`refund` (just COMPLETED: a chargeback, a refund that failed and went through after all, or one completing
    that no flag counted) leaves the payment's refunds (made, and at the provider) giving back more than was
    collected: flagged for a person, with the total beyond collected now and what to do, and logged ERROR (`said`;
    None: the caller logs it). False when they do not, or when another refund than a chargeback has sent nothing
    beyond collected yet and no such flag is open (a refund at the provider would: its completion is flagged).

    One flag per payment, stating what is beyond collected now: while an earlier such flag is open (not reviewed,
    and the payment already beyond collected before `added`, what this refund adds to what its refunds hold) it is
    replaced, naming the chargebacks and refunds together (_flag_text), rather than adding a second whose sum overlaps
    the first (30,000 then 50,000 "more than collected" read as 80,000 to recover when 50,000 is). Counted
    (gateway_refund_anomalies_total{kind="beyond_collected"}) when the payment newly goes beyond collected, once per
    open flag: the alert a person acts on is the payment, and one already flagged is already hers to deal with (its
    flag now says the new total); after the flag was reviewed, or after nothing was left to recover (a counted refund
    failed: _over_return_failed), it is a new flag, counted again. Each is audited (RETURNED_BEYOND_COLLECTED for a
    chargeback, else PAYMENT_BEYOND_COLLECTED), with the flag it wrote and the one it replaced."""
    over = await refunds_holding(session, payment) - collected(payment)
    if over <= 0:
        return False
    in_flight = (await session.execute(
        select(Refund.id, Refund.reference).where(Refund.payment_id == payment.id, Refund.status.in_(OPEN_VALUES))
        .order_by(Refund.created_at, Refund.id))).all()
    gone = max(0, refunded - collected(payment))
    # Beyond collected before this refund too: the excess an open flag states still stands.
    earlier = await _open_flag(session, payment) if over - added > 0 else None
    if earlier is None and gone <= 0 and not refund.returned_by_provider:
        # Another refund (not the provider's statement) with none gone beyond yet: flagged if a refund at the
        # provider completes beyond it (apply_refund_outcome), as before there was one flag.
        return False
    before = earlier.after if earlier is not None else {}
    chargebacks = [i for i in before.get("chargebacks") or [] if isinstance(i, str)]
    others = [i for i in before.get("refunds") or [] if isinstance(i, str)]
    if earlier is not None and not chargebacks and earlier.action == RETURNED_BEYOND_COLLECTED:
        chargebacks = [earlier.entity_id]  # (a row written before it named its chargebacks)
    if refund.returned_by_provider:
        chargebacks.append(refund.id)
    elif refund.id not in others:
        others.append(refund.id)
    detail = await _flag_text(session, payment, chargebacks, others, over, gone,
                              [reference for _, reference in in_flight])
    kept = (await _without_flag(session, payment.mismatch_detail, before)) if earlier is not None \
        else payment.mismatch_detail
    from core.payments import add_flag  # local: the payment modules reach back into this module

    written = add_flag(kept, detail)
    after = {"overReturned": over, "alreadyReturned": gone, "inFlight": [refund_id for refund_id, _ in in_flight],
             "chargebacks": chargebacks, "refunds": others, "flag": detail, "detail": written,
             "replaced": before.get("flag") if earlier is not None else None}
    if refund.returned_by_provider:
        prior = [i for i in before.get("chargebacks") or [] if isinstance(i, str)] or (
            [earlier.entity_id] if earlier is not None and earlier.action == RETURNED_BEYOND_COLLECTED else [])
        await record(session, actor=actor, action=RETURNED_BEYOND_COLLECTED, entity_type="refund",
                     entity_id=refund.id, after={"paymentId": payment.id, **after,
                                                 "updated": prior[-1] if prior else None},
                     cooperative_id=refund.cooperative_id)
    else:
        await record(session, actor=actor, action=PAYMENT_BEYOND_COLLECTED, entity_type="payment",
                     entity_id=payment.id, after={"refundId": refund.id, **after},
                     cooperative_id=payment.cooperative_id)
    if earlier is None:
        metrics.REFUND_ANOMALIES.labels(kind="beyond_collected").inc()
    await _write_flag(session, payment, written)
    _to_tell(session, payment.id, "beyond_collected", detail)
    if said:
        log.error(said, extra={"refund": refund.reference, "payment": payment.reference, "over_refunded_minor": over,
                               "in_flight": [reference for _, reference in in_flight], "actor": actor.id,
                               "flag_updated": earlier is not None})
    return True


async def _flag_text(session: AsyncSession, payment: Payment, chargebacks: list[str], others: list[str], over: int,
                     gone: int, pending: list[str]) -> str:
    """The one open flag beyond collected (_beyond_collected): who sent the money back (the chargebacks, with their
    total, and the other refunds that went through beyond it), what is beyond collected now (gone back, or going
    back if the refunds at the provider complete) and what to do. Short, however many there are: it must fit whole
    at the end of the column (core.payments.detail_tail), where fit_detail keeps the newest flag, so the latest are
    named and the rest counted (the audit rows name them all); none named, when even that is too long."""
    from core.payments import detail_tail  # local: the payment modules reach back into this module

    ids = [*chargebacks, *others]
    rows = {i: (reference, amount) for i, reference, amount in (await session.execute(
        select(Refund.id, Refund.reference, Refund.amount_minor).where(Refund.id.in_(ids)))).all()}
    back = [rows[i] for i in chargebacks if i in rows]
    went = [rows[i][0] for i in others if i in rows]
    total = Money(sum(amount for _, amount in back), payment.currency)

    def named(latest: bool, by_reference: bool = True) -> str:
        said = []
        if len(back) == 1:
            said.append(f"chargeback {back[0][0]} of {total}" if by_reference else f"a chargeback of {total}")
        elif len(back) == 2 and latest:
            said.append(f"chargebacks {back[0][0]}, {back[1][0]} of {total} in all")
        elif back:
            said.append(f"{len(back)} chargebacks of {total} in all"
                        + (f", the latest {back[-1][0]}" if latest else ""))
        if len(went) == 1 and not by_reference:
            said.append("a refund completed")
        elif len(went) == 1 or (len(went) == 2 and latest):
            said.append(f"refund{'s' if len(went) == 2 else ''} {', '.join(went)} completed")
        elif went:
            said.append(f"{len(went)} refunds completed" + (f", the latest {went[-1]}" if latest else ""))
        at_provider = ("the refund at the provider completes" if len(pending) == 1 and not by_reference else
                       f"refund {', '.join(pending)} completes" if len(pending) <= 1 or (len(pending) == 2 and latest)
                       else f"the {len(pending)} refunds at the provider" + (
                           f", the latest {pending[-1]}," if latest else "") + " complete")
        return " and ".join(said) + ": " + (
            f"{Money(over, payment.currency)} more than collected has gone back to the payer" if gone >= over
            else (f"{Money(gone, payment.currency)} more than collected has gone back, "
                  f"{Money(over, payment.currency)} " if gone else
                  f"{Money(over, payment.currency)} more than collected goes back ") + f"if {at_provider}"
        ) + ": recover it from the member"

    # Counted, the single ones still named, then none named: one chargeback, one refund completed and one at the
    # provider, each named, with part of it gone back, said 202 characters in RWF (211 in KES), and fit_detail, past
    # the column's 300, cut the flag's start ("… eback RFD_… of 40,000 RWF"); the next flag then found nothing whole
    # to replace and the cut one's end stayed before it.
    return next((text for text in (named(True), named(False)) if len(text) <= detail_tail()),
                named(False, by_reference=False))


async def _open_flag(session: AsyncSession, payment: Payment) -> Any:
    """The audit row (action, entity_id, after) of the payment's latest flag beyond collected (_beyond_collected)
    while it is open: the payment still flagged and not reviewed since (a review clears every flag:
    core.payments.review_flags). None otherwise. One probe of the payment's rows of them, rare."""
    if not payment.mismatch:
        return None
    chargebacks = select(Refund.id).where(Refund.payment_id == payment.id, Refund.returned_by_provider.is_(True))
    row = (await session.execute(
        select(AuditEvent.action, AuditEvent.entity_id, AuditEvent.after, AuditEvent.at).where(or_(
            and_(AuditEvent.entity_type == "refund", AuditEvent.action == RETURNED_BEYOND_COLLECTED,
                 AuditEvent.entity_id.in_(chargebacks)),
            and_(AuditEvent.entity_type == "payment", AuditEvent.action == PAYMENT_BEYOND_COLLECTED,
                 AuditEvent.entity_id == payment.id))).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1)
    )).first()
    if row is None or not isinstance(row.after, dict):
        return None
    reviewed = (await session.execute(select(AuditEvent.id).where(
        AuditEvent.entity_type == "payment", AuditEvent.entity_id == payment.id,
        AuditEvent.action == "payment.reviewed", AuditEvent.at >= row.at).limit(1))).first()
    return None if reviewed is not None else row


async def _without_flag(session: AsyncSession, detail: str | None, after: dict[str, Any]) -> str | None:
    """`detail` (a payment's mismatch_detail) without the open flag beyond collected a new one replaces (`after`:
    its audit row's), and what _over_return_failed added since about the refunds it counted (the new flag states
    what is beyond collected now, and which refunds are still at the provider): the other flags, in their order.

    Found by where it was written, not by its words (_other_flags): its row keeps the detail as it wrote it. Only for
    a row written before it kept the detail is the flag's text looked for (left when the column's cut took part of
    it)."""
    if not detail:
        return detail
    flag, written = after.get("flag"), after.get("detail")
    others = _other_flags(detail, written, flag) if isinstance(flag, str) and isinstance(written, str) else None
    if others is not None:
        detail = others
    elif isinstance(flag, str):
        detail = _cut(detail, re.escape(flag))
    counted = [i for i in after.get("inFlight") or [] if isinstance(i, str)]
    if counted and detail:
        for reference in (await session.execute(select(Refund.reference).where(Refund.id.in_(counted)))).scalars():
            detail = _cut(detail, re.escape(f"refund {reference} failed: ") + r"[^;]*")
    return detail or None


def _other_flags(detail: str, written: str, flag: str) -> str | None:
    """`detail` without `flag`, which ended `written` (the detail as it was once the flag was added): the flags before
    it, and those added since, which follow it. None when `detail` did not grow from `written` (not expected: every
    flag is added after the others, core.payments.add_flag, and a review clears them all).

    Flags added since may have passed the column's 300 characters: fit_detail then kept the start (the first 100
    characters: `written`'s) and the last 197 of everything written since `written` began, " … " between. The flag's
    place is known in that whole (it ends where `written` ends), so it is taken out of both kept parts; the end part
    is placed in the whole by how much of `written`'s end it starts with. " … " stays only where something else than
    the flag was cut."""
    from core.payments import detail_head, detail_tail  # local: the payment modules reach back into this module

    end = len(written)
    start = end - len(flag)
    if not flag or not written.endswith(flag):
        return None
    # What goes with the flag: the "; " before it, or, first, the one after it.
    cut_from, cut_to = (start - 2, end) if start >= 2 else (start, end + 2)
    head, tail = detail_head(), detail_tail()
    if detail == written or detail.startswith(written + "; "):
        if len(written) == head + 3 + tail and written[head:head + 3] == " … " and cut_from <= head + 3:
            # `written` was cut and the flag (195 to 197 characters) began right after its " … ": the "; " before
            # it, or the " … " itself, was taken with it ("<start>  ; <next flag>", or the start's cut end read as
            # whole). The " … " stays: what was between is cut.
            return f"{written[:head]} … {detail[cut_to:].removeprefix('; ')}".strip()
        return (detail[:cut_from] + detail[cut_to:]).removeprefix("; ") or ""
    shown = min(head, end)
    if len(detail) != head + 3 + tail or detail[head:head + 3] != " … " or detail[:shown] != written[:shown]:
        return None
    first, last = detail[:head], detail[head + 3:]
    # Where the kept end starts in the whole: after as much of `written`'s end as it starts with, then "; ".
    at = next((end - n for n in range(min(len(last), end), -1, -1)
               if written.endswith(last[:n]) and last[n:n + 2] == "; "), None)
    first = (first[:cut_from] + first[cut_to:]).removeprefix("; ")
    if at is not None:
        last = last[:max(0, cut_from - at)] + last[max(0, cut_to - at):]
    last = last.removeprefix("; ")
    if at is not None and cut_from <= head and at <= cut_to:  # nothing but the flag was cut between the two parts
        return "; ".join(part for part in (first, last) if part)
    return f"{first} … {last}".strip()


def _cut(detail: str, pattern: str) -> str:
    """`detail` without the flags matching `pattern` (flags are joined by "; ": core.payments.add_flag)."""
    return re.sub(rf"(?:^|; ){pattern}(?=;|$)", "", detail).removeprefix("; ")


async def _over_return_failed(session: AsyncSession, refund: Refund, *, actor: Actor) -> None:
    """`refund` (just FAILED) was one a flag beyond collected counted as at the provider (_beyond_collected: a
    chargeback's, or a refund's that went through beyond it): the flag said what to recover from the member if it
    completed, and it did not. Said on the payment, with what goes back beyond what was collected now, so that nobody
    recovers money the member never got. One probe of the payment's audit rows of such flags (_over_return_flagged);
    the payment is locked only when one counted it."""
    if not await _over_return_flagged(session, refund, None):
        return
    payment = await lock_row(session, Payment, refund.payment_id)
    assert payment is not None
    if not payment.mismatch:
        return  # dealt with already
    over = await refunds_holding(session, payment) - collected(payment)
    await _flag(session, payment, f"refund {refund.reference} failed: " + (
        f"{Money(over, payment.currency)} more than collected goes back" if over > 0 else "nothing to recover"),
        "refund_failed_beyond_collected")
    log.warning("a refund counted in a chargeback's over-return failed", extra={
        "refund": refund.reference, "payment": payment.reference, "over_refunded_minor": max(over, 0),
        "actor": actor.id})


async def _over_return_flagged(session: AsyncSession, refund: Refund, payment: Payment | None) -> bool:
    """Whether `refund`, completing beyond what was collected, was one a flag beyond collected already counted as at
    the provider (_beyond_collected: RETURNED_BEYOND_COLLECTED on a chargeback, PAYMENT_BEYOND_COLLECTED on the
    payment) while the payment (when given) is still flagged: the same money, flagged once. One probe of those audit
    rows; rare (the member paid back more than collected)."""
    if payment is not None and not payment.mismatch:
        return False  # the flag was dealt with (reviewed) since: the money now gone is said again
    chargebacks = select(Refund.id).where(Refund.payment_id == refund.payment_id,
                                          Refund.returned_by_provider.is_(True))
    rows = (await session.execute(select(AuditEvent.after).where(or_(
        and_(AuditEvent.entity_type == "refund", AuditEvent.action == RETURNED_BEYOND_COLLECTED,
             AuditEvent.entity_id.in_(chargebacks)),
        and_(AuditEvent.entity_type == "payment", AuditEvent.action == PAYMENT_BEYOND_COLLECTED,
             AuditEvent.entity_id == refund.payment_id))))).scalars().all()
    return any(isinstance(after, dict) and refund.id in (after.get("inFlight") or []) for after in rows)


async def _flag(session: AsyncSession, payment: Payment, detail: str, kind: str) -> None:
    """Flag the payment for a person (`mismatch`), keeping what an earlier flag said (an amount mismatch, a refund
    paid twice): the newest last, within the column (core.payments.add_flag). Told as payment.flagged (`kind`)."""
    from core.payments import add_flag  # local: the payment modules reach back into this module

    written = add_flag(payment.mismatch_detail, detail)
    await _write_flag(session, payment, written)
    _to_tell(session, payment.id, kind, detail)


async def _write_flag(session: AsyncSession, payment: Payment, written: str | None) -> None:
    """The payment's flag (`written`: its whole mismatch_detail) in one UPDATE, the loaded row given its values by it
    (synchronize_session). Set on the row before, it was flushed first (the UPDATE's autoflush): her payment written
    twice, and PostgreSQL checks the second row version's key to her member row again, a KEY SHARE lock on her row
    taken after the refund and the payment: an erasure (core.members.erase_member) holding her row, waiting for them,
    deadlocked with a COMPLETED refund reported failed (_failed_after_completion) or a failure a flag counted
    (_over_return_failed), which take no lock on her row first."""
    await session.execute(update(Payment).where(Payment.id == payment.id)
                          .values(mismatch=True, mismatch_detail=written, updated_at=changed_at(payment.updated_at))
                          .execution_options(synchronize_session="evaluate"))


# Where a transaction keeps the flags written on payments (payment id, kind, text) until they are told (_tell_flags).
_FLAGS_TO_TELL = "gateway_payment_flags_to_tell"


def _to_tell(session: AsyncSession, payment_id: str, kind: str, detail: str) -> None:
    """A flag to tell as payment.flagged once the refund's outcome has moved the payment (_tell_flags): written before
    that move (refunded_minor, REFUNDED), an event built now would show the payment as it never was committed."""
    session.info.setdefault(_FLAGS_TO_TELL, []).append((payment_id, kind, detail))


async def _tell_flags(session: AsyncSession) -> None:
    """Queue payment.flagged for each flag this transaction wrote (_to_tell), the payment read fresh under its lock
    (held already): nothing, no statement, when none was written."""
    flags = session.info.pop(_FLAGS_TO_TELL, None)
    if not flags:
        return
    from core.provider_events import emit_flagged  # local: core.provider_events reaches back into this module

    for payment_id, kind, detail in flags:
        payment = await lock_row(session, Payment, payment_id)
        await emit_flagged(session, payment, kind, detail)


async def _amount_differs(session: AsyncSession, refund: Refund, payment: Payment, reported: Money, *,
                          actor: Actor) -> None:
    """A refund the provider reports sent back for another amount (or currency) than was asked: the member may have
    less (or more) back than her SMS and the reconciliation say. Flagged on the payment, audited
    (refund.amount_mismatch) and logged for a person to check with the provider."""
    expected = Money(refund.amount_minor, refund.currency)
    await record(session, actor=actor, action="refund.amount_mismatch", entity_type="refund", entity_id=refund.id,
                 after={"reported": reported.minor, "reportedCurrency": reported.currency,
                        "expected": expected.minor}, cooperative_id=refund.cooperative_id)
    await _flag(session, payment, f"refund {refund.reference}: provider reported {reported} sent back, "
                                  f"expected {expected}", "refund_amount_mismatch")
    metrics.REFUND_ANOMALIES.labels(kind="amount_mismatch").inc()
    log.error("provider reported a refund for another amount", extra={
        "refund": refund.reference, "payment": payment.reference, "reported_minor": reported.minor,
        "reported_currency": reported.currency, "expected_minor": expected.minor, "actor": actor.id})


async def _failed_after_completion(session: AsyncSession, refund: Refund, reason: str, *, actor: Actor) -> None:
    """A COMPLETED refund (recorded by a person, or a provider's earlier answer) the provider now reports failed:
    money the member was told is back may not be. Never undone on this word alone: audited, the payment flagged
    for a person to check with the provider."""
    await record(session, actor=actor, action="refund.failed_after_completion", entity_type="refund",
                 entity_id=refund.id, before={"status": R.COMPLETED.value}, after={"reported": reason[:200]},
                 cooperative_id=refund.cooperative_id)
    payment = await session.get(Payment, refund.payment_id, with_for_update=True, populate_existing=True)
    assert payment is not None
    await _flag(session, payment, f"refund {refund.reference} reported failed after it was completed: {reason}",
                "refund_failed_after_completion")
    metrics.REFUND_ANOMALIES.labels(kind="failed_after_completion").inc()
    log.error("refund reported failed after it was completed", extra={"refund": refund.reference,
                                                                      "payment": payment.reference, "actor": actor.id})


async def _note_on_dispute(session: AsyncSession, refund: Refund, *, actor: Actor, action: str, text: str,
                           audit: dict[str, Any]) -> None:
    """What became of a refund, told on the dispute resolved with it (if any): a note where the admin who resolved
    it looks, and the audit log. The cooperative's system hears it from the refund's webhook."""
    if refund.dispute_id is None:
        return
    dispute = await lock_row(session, Dispute, refund.dispute_id)  # fresh: a note added meanwhile is kept
    if dispute is None:
        return
    from core.disputes import add_note  # local: core.disputes asks this module for refunds

    await add_note(session, dispute, actor=actor, action=action, text=text, audit=audit)


async def record_refund_outcome(session: AsyncSession, rt: Runtime, *, refund_id: str, cooperative_id: str | None,
                                succeeded: bool, note: str, actor: Actor,
                                provider_transaction_id: str | None = None,
                                completed_at: datetime | None = None) -> Refund:
    """An admin records what the provider settled, for a refund the gateway could not learn it for: one
    parked for manual review (the provider never settled it, or has no refund status query, as Airtel).
    Until then the refund holds its amount. The outcome goes the way a provider's would (the payment's
    refunded amount, the payer's SMS, the webhook), with the admin's note in the audit log.

    Refused for a final refund, for one not yet sent whose submission is still queued (the provider
    may be about to take it), and FAILED for one sent whose status poll is still live (not parked): the poll
    drops a refund no longer PROCESSING without asking, so the provider's payment of it would go unseen while
    its amount, released, went back a second time. A COMPLETED from the statement is taken at any time."""
    note = admin_note(note, "what the provider confirmed")
    if provider_transaction_id is not None and not 1 <= len(provider_transaction_id.strip()) <= 128:
        raise ValidationError("providerTransactionId must be 1 to 128 characters", field="providerTransactionId")
    if succeeded:
        await _her_row_first(session, select(Refund.payment_id).where(Refund.id == refund_id))
    refund = await lock_row(session, Refund, refund_id, cooperative_id)
    if refund is None:
        raise NotFound("refund not found")
    if R(refund.status) is R.COMPLETED or (R(refund.status) is R.FAILED and not succeeded):
        raise Conflict(f"refund is already {refund.status}", field="status", code=INVALID_STATE)
    if succeeded and R(refund.status) is R.FAILED:
        # A late success notes its own dispute and those of the refunds it may withdraw (_withdraw_unsent): the
        # payment's disputes, all locked now, then the payment (_lock_disputes_then_payment: locked here for the
        # statement line's id below), as apply_refund_outcome locks them for a provider's late word; else a refund
        # asked for on such a disputed payment at the same moment (its dispute, then the payment) deadlocks against
        # this, and a resolution linking a refund waiting to be sent held it while this withdrew the others.
        await _lock_disputes_then_payment(session, refund.payment_id,
                                          about=f"late success of refund {refund.reference}")
    elif refund.dispute_id is not None:
        # Its dispute is noted after the payment is locked (_note_on_dispute): locked first, as a resolution locks
        # its dispute before the payment (core.disputes.move_dispute; a refund made during an open dispute is
        # linked to it), or the two deadlock.
        await lock_row(session, Dispute, refund.dispute_id)
    # A FAILED refund the provider's statement shows sent back after all (its answer came late, or reached a
    # process of an earlier release that dropped it) is recorded COMPLETED: flagged as the provider's late word
    # is (apply_refund_outcome), so the same money cannot be refunded again.
    # Its submission and its polls (a resend's poll too: refund-poll:<id>:resent:<n>).
    its_jobs = or_(OutboxJob.dedupe_key == f"refund:{refund.id}", OutboxJob.dedupe_key == f"refund-poll:{refund.id}",
                   OutboxJob.dedupe_key.like(f"refund-poll:{refund.id}:%"))
    if R(refund.status) is R.PENDING and await _live(session, its_jobs, "refund.submit"):
        raise Conflict("refund has not been sent to the provider yet: wait for its submission; or withdraw it with "
                       "POST /v1/refunds/{id}/cancel", code=INVALID_STATE)
    if R(refund.status) is R.PROCESSING and not succeeded and await _live(session, its_jobs, "refund.poll"):
        raise Conflict("refund is still being settled with the provider (its status is still asked for): record "
                       "FAILED once it is parked for manual review, or COMPLETED if the statement shows it sent "
                       "back", field="status", code=INVALID_STATE)
    target = R.COMPLETED if succeeded else R.FAILED
    txn = (provider_transaction_id or "").strip() or None
    if succeeded and txn is not None:
        # The statement line it names is this refund's only: not one a chargeback or another refund already has.
        paid = await lock_row(session, Payment, refund.payment_id)  # (locked as apply_refund_outcome locks it)
        assert paid is not None
        await _reversal_not_recorded(session, paid, ReturnedByProvider(txn), exclude=refund.id,
                                     field="providerTransactionId")
    if completed_at is not None and not succeeded:
        raise ValidationError("completedAt is for a refund that went through (status COMPLETED)", field="completedAt")
    from core.recorded_payments import check_statement_time  # local: the payment modules reach back into this module

    check_statement_time(completed_at, refund.created_at, "the refund was asked for")
    await record(session, actor=actor, action="refund.outcome_recorded", entity_type="refund", entity_id=refund.id,
                 before={"status": refund.status},
                 after={"status": target.value, "note": note, "providerTransactionId": provider_transaction_id,
                        "completedAt": iso_z(completed_at)},
                 cooperative_id=refund.cooperative_id)
    await apply_refund_outcome(
        session, rt, refund, ProviderOutcome.SUCCEEDED if succeeded else ProviderOutcome.FAILED, actor=actor,
        provider_transaction_id=(provider_transaction_id or "").strip() or None,
        reason=None if succeeded else f"{RECORDED_BY_ADMIN}{note}", occurred_at=completed_at)
    # Its parked jobs are settled (left PARKED they would still read as work for a person).
    await end_waiting(session, its_jobs, status="PARKED", reason=f"settled: refund outcome recorded ({target.value})")
    await session.flush()
    await session.refresh(refund)
    return refund


async def cancel_refund(session: AsyncSession, rt: Runtime, *, refund_id: str, cooperative_id: str | None,
                        note: str, actor: Actor) -> Refund:
    """An admin withdraws a refund not yet sent: one queued while the provider is down (its submission waits to be
    tried again), or which was asked for by mistake (one the provider has meanwhile made itself is withdrawn by
    recording its chargeback: request_refund, _withdraw_unsent). FAILED ("withdrawn by an admin"), its submission
    ended, audited with the admin's note, the cooperative's system told (refund.failed) and the dispute resolved
    with it noted. The member gets no SMS: she was never told of a refund not sent.

    Only while its submission is PENDING and no try of it may have reached the provider (_untried_or_refused:
    every try failed before its call, or was refused unprocessed - a connection never made, an HTTP 429; one
    answered 5xx, cut off, or lost with its worker may be carried out), ended in this transaction by the guarded
    end_waiting _withdraw_unsent uses: a worker claiming it at the same moment either finds it ended or holds it
    RUNNING, and then the refund may be on its way (409: wait for its outcome, or record it once parked)."""
    note = admin_note(note, "why the refund is withdrawn")
    refund = await lock_row(session, Refund, refund_id, cooperative_id)
    if refund is None:
        raise NotFound("refund not found")
    if R(refund.status) is R.FAILED and (refund.failure_reason or "").startswith(WITHDRAWN_BY_ADMIN):
        # Another admin withdrew it first (two at once: this one waited on the lock above): said so, with who and
        # when, not "only one not yet sent can be withdrawn", which reads as if it had been sent.
        by = await done_by(session, "refund", refund.id, ("refund.cancelled",), viewer=actor)
        who = "" if by is None else f" by {by[0]} at {iso_z(by[1])}"
        raise Conflict(f"refund {refund.reference} was withdrawn already{who} ("
                       f"{refund.failure_reason.removeprefix(WITHDRAWN_BY_ADMIN)}): nothing of it was sent",
                       field="status", code=INVALID_STATE)
    if R(refund.status) is not R.PENDING:
        raise Conflict(f"refund is already {refund.status}: only one not yet sent to the provider can be withdrawn"
                       + ("" if R(refund.status) is not R.PROCESSING else
                          "; once the provider has settled it (or it is parked for manual review), record its "
                          "outcome"), field="status", code=INVALID_STATE)
    reason = f"{WITHDRAWN_BY_ADMIN}{note}"
    submission = (OutboxJob.kind == "refund.submit", OutboxJob.dedupe_key == f"refund:{refund.id}")
    if not await _end_unsent_submission(session, refund.id, reason):
        parked = (await session.execute(select(OutboxJob.id).where(*submission, OutboxJob.status == "PARKED")
                                        .limit(1))).first() is not None
        raise Conflict("the refund's submission is parked for manual review: check with the provider, then record "
                       "its outcome" if parked else
                       "the refund may already have reached the provider (its submission is being sent, or a try "
                       "of it may have arrived): wait for its outcome", field="status", code=INVALID_STATE)
    updated = await transition(session, REFUND, refund.id, R.PENDING, R.FAILED, actor=actor,
                               values={"failure_reason": reason[:200]})
    await record(session, actor=actor, action="refund.cancelled", entity_type="refund", entity_id=refund.id,
                 before={"status": R.PENDING.value}, after={"status": R.FAILED.value, "note": note},
                 cooperative_id=refund.cooperative_id)
    log.warning("refund withdrawn by an admin before it was sent",
                extra={"refund": refund.reference, "actor": actor.id})
    await enqueue_many(session, notice_jobs(  # the webhook only (no member, no phone: no SMS)
        template="refund_failed", event_type="refund.failed", cooperative_id=refund.cooperative_id, key=refund.id,
        context={"refund_id": refund.id}, data=refund_data(updated), cipher=rt.cipher))
    await _note_on_dispute(session, refund, actor=actor, action="dispute.refund_cancelled",
                           text=f"refund {refund.reference} withdrawn before it was sent: {note}; the member has "
                                "not been paid back by it",
                           audit={"refundId": refund.id})
    await _over_return_failed(session, refund, actor=actor)  # (one a flag beyond collected counted: parked, unsent)
    await _tell_flags(session)
    await session.flush()
    await session.refresh(refund)
    return refund


async def _end_unsent_submission(session: AsyncSession, refund_id: str, reason: str) -> bool:
    """End the refund's submission if none of its tries may have reached the provider (cancel_refund, and
    _withdraw_unsent): PENDING with every try untried or refused unprocessed (_untried_or_refused), or parked for the
    gateway's credentials, which sent nothing: by _awaiting_configuration (the provider took it and processed nothing:
    its Result refused the gateway's initiator), or by the outbox once its retries ran out on the provider refusing
    them at send time (core.jobs.awaiting_configuration: a 401), every try of it refused unprocessed
    (_untried_or_refused: one that may have arrived before keeps its CALL_SENT). True when it was ended."""
    submission = (OutboxJob.kind == "refund.submit", OutboxJob.dedupe_key == f"refund:{refund_id}")
    unsent_parked = or_(OutboxJob.last_error.startswith(f"{AWAITING_CONFIGURATION}: ", autoescape=True),
                        and_(_untried_or_refused(),
                             OutboxJob.last_error.endswith(AWAITING_CONFIGURATION_NOTE, autoescape=True)))
    return bool(await end_waiting(session, *submission, _untried_or_refused(), status="PENDING", reason=reason)
                or await end_waiting(session, *submission, unsent_parked, status="PARKED", reason=reason))


def _untried_or_refused() -> Any:
    """A refund submission none of whose tries may have reached the provider: never tried, or every try failed
    before its call (its token, say) or was refused before anything was processed (core.outbox.NOTHING_PROCESSED:
    a connection never made, an HTTP 429). The worker marks the others for the job's whole life, as it records
    each try: one that stamped its call and then failed otherwise (a 5xx - MTN's 504 is its back end not answering
    in time, and it may still carry the refund out -, an unreadable answer) leaves CALL_SENT; one cut off or lost
    with its worker leaves INTERRUPTED (or its CALL_STARTED stamp). Withdrawn then, and its amount refunded again
    under a new reference, the member could be paid back twice."""
    error = OutboxJob.last_error
    return or_(error.is_(None), and_(~error.startswith(INTERRUPTED, autoescape=True),
                                     ~error.startswith(CALL_SENT, autoescape=True), error != CALL_STARTED))


async def _live(session: AsyncSession, its_jobs: Any, kind: str) -> bool:
    """A job of `kind` among the refund's (`its_jobs`) that will still run: PENDING (waiting, or retrying later)
    or RUNNING. PARKED (for a person) or ended, it will not."""
    return (await session.execute(select(OutboxJob.id).where(
        its_jobs, OutboxJob.kind == kind, OutboxJob.status.in_(("PENDING", "RUNNING"))).limit(1))).first() is not None


_DEADLOCK = frozenset({"40P01"})


def _deadlocked(exc: BaseException) -> bool:
    """PostgreSQL's "deadlock detected": the transaction was rolled back, and may be run again."""
    return raised_sqlstate(exc, _DEADLOCK)


def refund_data(refund: Refund) -> dict[str, object]:
    """The refund as cooperatives' systems receive it in webhooks, read back from the move that ends it (a refund
    is told once, COMPLETED or FAILED): `updatedAt`, to the millisecond, is what that move wrote."""
    return {"id": refund.id, "reference": refund.reference, "paymentId": refund.payment_id,
            "amount": Money(refund.amount_minor, refund.currency).to_api(), "currency": refund.currency,
            "status": refund.status, "reason": refund.reason, "failureReason": refund.failure_reason,
            # What a cooperative's system needs to apply it: the dispute it belongs to (a refund made while the
            # payment was disputed is named by no dispute event), and, to match the provider's statement, its
            # line and whether the provider made it itself (a chargeback: the gateway sent nothing).
            "disputeId": refund.dispute_id, "providerTransactionId": refund.provider_transaction_id,
            "returnedByProvider": bool(refund.returned_by_provider),
            "createdAt": iso_z(refund.created_at), "completedAt": iso_z(refund.completed_at),
            "updatedAt": iso_ms(refund.updated_at)}


def _refund_of_event(event: ProviderEventData, ours: str | None = None) -> Any:
    """The refund a provider's callback names, among refunds of payments made through that provider only
    (a callback to one provider's endpoint can never touch another provider's refund); with `ours`, the
    refund of that reference of ours instead."""
    by_transaction = ours is None and event.raw.get("lookup") == "provider_transaction_id"
    column = Refund.provider_transaction_id if by_transaction else Refund.provider_reference
    return (select(Refund).join(Payment, Payment.id == Refund.payment_id)
            .where(Payment.provider == event.provider, column == (ours or event.reference)))


async def _find_refund(session: AsyncSession, event: ProviderEventData, outcome: ProviderOutcome, *,
                       lock: bool = False) -> Refund | None:
    """The refund of a callback: by the id the provider named, else (its request's answer never arrived,
    so that id was never stored) by our own reference when the adapter read one from the callback's URL.

    A refund found by our reference but stored under another id of the provider's was asked for more than
    once (a request whose answer was lost, then sent again): the provider calls back on the URL of the
    request it answers, so this callback is about an earlier request of the same refund. Its success is
    the member's money going back, and counts (dropping it would leave the later request's "already done"
    to speak for the refund); its failure says nothing of the request the refund now waits for."""

    async def one(ours: str | None) -> Refund | None:
        query = _refund_of_event(event, ours)
        if lock and outcome is ProviderOutcome.SUCCEEDED:
            await _her_row_first(session, query.with_only_columns(Refund.payment_id))
        return (await session.execute(query.with_for_update(of=Refund) if lock else query)).scalar_one_or_none()

    found = await one(None)
    ours = event.raw.get("provider_reference")
    if found is None and isinstance(ours, str) and ours and event.raw.get("lookup") == "provider_transaction_id":
        found = await one(ours)
        if found is not None and found.provider_transaction_id not in (None, event.reference) \
                and outcome is not ProviderOutcome.SUCCEEDED:
            return None  # an earlier request's failure: the refund's own request has not answered yet
    return found


async def _link_event(session: AsyncSession, event_row_id: str, refund: Refund, outcome: str,
                      payload: dict[str, Any] | None = None) -> None:
    """The stored callback names its refund and the refund's payment, with what applying it did (`outcome`), in the
    transaction that applied it, as a payment's callback does (core.provider_events._set_outcome): a refund's callbacks
    are found from it (by payment_id's index, then refund_id). Before, all three stayed NULL: nothing led from a
    refund to its callbacks."""
    events = table_of(ProviderEvent)
    await session.execute(update(events).where(events.c.id == event_row_id)
                          .values(refund_id=refund.id, payment_id=refund.payment_id, outcome=outcome,
                                  **({} if payload is None else {"payload": payload})))


# handle_refund_event's outcome for a refund taken by the provider, then refused for the gateway's credentials.
AWAITING_CONFIGURATION_OUTCOME = "awaiting_configuration"
# Its outcome for such a refusal that came before the worker wrote the refund PROCESSING (the provider's answer to
# the sending taken, the worker's commit not yet made): kept, with the sending's id and the reason in its payload,
# for that commit to apply (apply_kept_refusal).
REFUSAL_KEPT = "awaiting_configuration_kept"
_KEPT_SENDING, _KEPT_REASON = "gateway_kept_sending", "gateway_kept_reason"


async def _awaiting_configuration(session: AsyncSession, refund: Refund, *, actor: Actor, reason: str | None) -> str:
    """The provider took the refund, then refused it for the gateway's own credentials (ProviderEvent.
    credentials_refused: M-Pesa's reversal Result 2001 or 21, its initiator): nothing was processed. Never FAILED (a
    fault of ours is never a failed refund told to the member): as a call refused so when it is sent
    (core.jobs.awaiting_configuration), the refund is PENDING again, not sent, its submission parked with the reason
    (the operator told by gateway_provider_failing and the adapter's error line) and sent again when it is replayed
    once the configuration is fixed; or withdrawn by an admin (cancel_refund: nothing reached the member)."""
    why = (f"{AWAITING_CONFIGURATION}: {reason or 'the provider refused the gateway credentials'}; the refund was "
           "not sent back and waits for the provider's configuration to be fixed, then this job is replayed")[:2000]
    await transition(session, REFUND, refund.id, R.PROCESSING, R.PENDING, actor=actor,
                     values={"provider_transaction_id": None}, audit={"reason": why[:200]})
    submission = (OutboxJob.kind == "refund.submit", OutboxJob.dedupe_key == f"refund:{refund.id}")
    await enqueue(session, "refund.submit", {"refund_id": refund.id}, dedupe_key=f"refund:{refund.id}",
                  cooperative_id=refund.cooperative_id)  # (it has one: DONE since the provider took it)
    now = utcnow()
    await session.execute(update(OutboxJob).where(*submission).values(
        status="PARKED", locked_by=None, done_at=None, last_error=why, updated_at=now))
    # Its status polls have nothing to ask about until it is sent again.
    polls = or_(OutboxJob.dedupe_key == f"refund-poll:{refund.id}",
                OutboxJob.dedupe_key.like(f"refund-poll:{refund.id}:%"))
    await end_waiting(session, OutboxJob.kind == "refund.poll", polls, status="PENDING",
                      reason=f"superseded: {why}")
    log.error("provider refused the gateway's credentials for a refund it had taken; the refund waits for the "
              "configuration to be fixed (replay its parked job)",
              extra={"refund": refund.reference, "reason": (reason or "")[:200]})
    return AWAITING_CONFIGURATION_OUTCOME


async def apply_kept_refusal(session: AsyncSession, refund: Refund, provider_transaction_id: str | None) -> bool:
    """The refund just written PROCESSING, in this transaction, for the sending the provider answered with
    `provider_transaction_id` (core.jobs.await_refund_outcome): a callback refusing that very sending for the
    gateway's credentials that came first (REFUSAL_KEPT: M-Pesa's Result beating the worker's commit) is applied now,
    as it would have been after the commit. True when one was (the refund is PENDING again, its submission parked).
    Only that sending's: a refusal of an earlier one says nothing of it. With no id (its answer never came: a
    timeout, a cut-off attempt), any kept one: each sending's commit applies its own, so one still kept is this
    sending's, which never sends again (core.jobs.submit_refund asks once a call may have arrived)."""
    kept = (await session.execute(select(ProviderEvent.id, ProviderEvent.provider, ProviderEvent.payload).where(
        ProviderEvent.payment_id == refund.payment_id, ProviderEvent.refund_id == refund.id,
        ProviderEvent.outcome == REFUSAL_KEPT))).all()
    for row_id, provider, payload in kept:
        if not isinstance(payload, dict) or (provider_transaction_id is not None
                                             and payload.get(_KEPT_SENDING) != provider_transaction_id):
            continue
        reason = payload.get(_KEPT_REASON)
        result = await _awaiting_configuration(session, refund, actor=Actor(f"provider:{provider}", "provider"),
                                               reason=reason if isinstance(reason, str) else None)
        await _link_event(session, row_id, refund, result)
        return True
    return False


async def handle_refund_event(rt: Runtime, event: ProviderEventData) -> str:
    """Store a refund callback once, confirm it by the provider's refund status query when it is unsigned
    (as collection callbacks are), and apply it. Returns the outcome. One that matches no refund of ours is kept
    (outcome "unknown_refund", its body bounded), counted and logged as a payment's is (core.unmatched_callbacks.
    report_unmatched), for a super admin to list and resolve (GET /v1/provider-callbacks)."""
    # local: the payment modules reach back into this module
    from core.provider_events import already_stored
    from core.unmatched_callbacks import UNMATCHED_REFUND, keep_unmatched, report_unmatched, store_unmatched

    actor = Actor(f"provider:{event.provider}", "provider")
    outcome, txn, reason = event.outcome, event.provider_transaction_id, event.reason
    occurred, amount = event.occurred_at, event.amount
    if event.needs_confirmation:
        async with rt.sessionmaker() as session:
            if await already_stored(session, event):
                return "duplicate"  # no status query for a callback we already applied
            known = await _find_refund(session, event, outcome)
        if known is None:
            # As for a payment: there is no refund to ask the provider about, so its word is kept unconfirmed
            # (never applied: a refund that appears later is not settled by it), counted and reported.
            return await store_unmatched(rt, event)
        # Only what the provider answers counts; a ProviderError here leaves nothing recorded, so the
        # route asks the provider to send the callback again.
        status = await rt.providers[event.provider].refund_status(known.provider_reference, known.currency)
        outcome, txn, reason = status.outcome, status.provider_transaction_id or txn, status.reason or reason
        occurred, amount = status.occurred_at or occurred, status.amount  # the callback's own: unconfirmed
    for attempt in range(3):
        try:
            async with rt.sessionmaker.begin() as session:
                stmt = (insert_ignore(session.get_bind().dialect.name, ProviderEvent)
                        .values(id=str(uuid.uuid4()), provider=event.provider, event_id=event.event_id[:200],
                                kind=event.kind.value, status=outcome.value, payload=dict(event.raw),
                                received_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
                        .returning(ProviderEvent.id))
                event_row_id = (await session.execute(stmt)).scalar_one_or_none()
                if event_row_id is None:
                    return "duplicate"
                refund = await _find_refund(session, event, outcome, lock=True)
                if refund is not None and event.credentials_refused and R(refund.status) is R.PROCESSING:
                    result = await _awaiting_configuration(session, refund, actor=actor, reason=reason)
                    await _link_event(session, event_row_id, refund, result)
                    return result
                if refund is not None and event.credentials_refused and R(refund.status) is R.PENDING \
                        and event.raw.get("lookup") == "provider_transaction_id":
                    # It came before the worker wrote the refund PROCESSING for the sending it refuses (that
                    # sending's answer taken, its commit not yet made; the refund found by our reference): applied
                    # now it would be undone by that commit, and dropped ("pending") the refund waited a day for a
                    # Result already come. Kept for that commit to apply (apply_kept_refusal).
                    await _link_event(session, event_row_id, refund, REFUSAL_KEPT, payload={
                        **event.raw, _KEPT_SENDING: event.reference, _KEPT_REASON: reason})
                    log.warning("provider refused the gateway's credentials for a refund before its sending was "
                                "recorded; applied when it is", extra={"refund": refund.reference})
                    return REFUSAL_KEPT
                if refund is not None:
                    if outcome is ProviderOutcome.AMBIGUOUS and R(refund.status) is R.PROCESSING:
                        # e.g. M-Pesa's "already reversed": the refund keeps its amount and waits for a clearer
                        # answer, else its poll parks it for a person to check with the provider and record.
                        log.warning("provider cannot tell whether a refund went through",
                                    extra={"provider": event.provider, "refund": refund.reference,
                                           "reason": reason})
                    result = await apply_refund_outcome(session, rt, refund, outcome, actor=actor,
                                                        provider_transaction_id=txn, reason=reason,
                                                        occurred_at=occurred, amount=amount)
                    await _link_event(session, event_row_id, refund, result)
                    return result
                # No refund of ours (PostgreSQL restored to a point before it, say): a SUCCEEDED one is money
                # paid out of the cooperative's account that nothing here records. Kept as the payment side's.
                await keep_unmatched(session, event_row_id, event)
        except StaleTransition:
            continue
        except DBAPIError as exc:
            # Callbacks on refunds of one payment each lock their refund, then the payment, then maybe more (the
            # dispute resolved with it, for its note), while a dispute's resolution locks the dispute, then the
            # payment: PostgreSQL ends such a deadlock by rolling one back. That one is applied again (the other
            # has gone on by then), not answered 500 for the provider to send again.
            if attempt == 2 or not _deadlocked(exc):
                raise
            log.warning("refund callback rolled back in a deadlock; applied again",
                        extra={"provider": event.provider, "attempt": attempt + 1})
            continue
        report_unmatched(event)  # once stored: a store that failed is sent again by the provider
        return UNMATCHED_REFUND
    return "conflict"
