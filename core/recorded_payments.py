"""Money recorded from a provider's statement: a payment the gateway lacks, a given-up one's, a void."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core import metrics
from core.audit import Actor, record
from core.cooperatives import zone_of
from core.db import insert_ignore, iso_ms, iso_z, table_of, utcnow
from core.errors import DUPLICATE_REFERENCE, INVALID_STATE, PROVIDER_REFUSED, Conflict, NotFound, ValidationError
from core.members import (
    ACCOUNT_NOT_KNOWN,
    ERASED_MASK,
    NUMBER_MARGIN,
    holds_number_since,
    number_holder_at,
    number_of_at,
)
from core.models import AuditEvent, Dispute, Member, Payment, ProviderEvent, ReferenceCounter, Refund
from core.money import Money
from core.notify import changed_at, event_job, notice_jobs
from core.outbox import NewJob, db_now, enqueue_many
from core.payments import (
    METHOD_OPERATOR,
    METHODS,
    NOT_REVIEWED,
    NewPayment,
    _found_by_account,
    _locked_payment,
    _mask_account,
    _normalise_account,
    _persistent,
    _reference_holder,
    _refusal,
    _same_or_refused,
    account_context,
    check_idempotency_key,
    find_by_key,
    get_by_reference,
    keyed_request_hash,
    load_context,
)
from core.ports import REQUEST_UNKNOWN, EventKind, ProviderOutcome, amount_rule_refusal
from core.provider_events import _AFTER_VOID, GIVEN_UP, _apply_outcome, _closed_hint, _Moved, _notices, event_data
from core.reference_mark import ISSUED
from core.references import REFERENCE_SHAPE, next_reference
from core.state import transition
from core.state.dispute import DisputeStatus
from core.state.payment import OPEN, PAYMENT, PaymentStatus, holds_money
from core.state.refund import RefundStatus
from core.text import admin_note, is_uuid
from core.transaction_ids import _lock_transaction_id, transaction_id_free
from core.unmatched_callbacks import CALLBACK_REFERENCE, UNMATCHED, UNMATCHED_RESOLVED, resolve_unmatched

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.payments")
P = PaymentStatus
# A FAILED payment whose money a statement shows taken (the member's "MoMo took it, you say FAILED"): the provider said
# it failed, so it is not completed here (the provider's own late success holds the money on it:
# core.provider_events); what the desk does instead, or its refusal was a dead end.
_FAILED_NOT_REOPENED = ("a final payment is not reopened: have the provider send the money back, or record its "
                        "statement line as a payment (POST /v1/payments/recorded)")


def check_statement_time(when: datetime | None, since: datetime | None, what: str = "",
                         field: str = "completedAt") -> None:
    """An admin's `completedAt` read on a provider's statement: not before `since` (`what`: e.g. "the payment was
    asked for"; None: no such bound), not in the future."""
    if when is None:
        return
    if when > utcnow():
        raise ValidationError(f"{field} is in the future: give the time the provider's statement shows", field=field)
    if since is not None and when < since:
        raise ValidationError(f"{field} is before {what} ({iso_z(since)})", field=field)


def check_recorded_age(when: datetime, max_age_days: int, field: str = "completedAt") -> None:
    """A recorded payment's `completedAt` (record_payment) not older than `max_age_days`
    (RECORDED_PAYMENT_MAX_AGE_DAYS): no payment bounds it from below, and a date of 1970 or a wrong year would date
    the money into a month reported on long ago. Not the cooperative's creation: one created again after a restore
    lost it has lost payments made before its new row."""
    oldest = utcnow() - timedelta(days=max_age_days)
    if when < oldest:
        raise ValidationError(f"{field} is before {iso_z(oldest)}, {max_age_days} days ago: money is not recorded "
                              "from an older statement line (check the year; an operator sets the limit with "
                              "RECORDED_PAYMENT_MAX_AGE_DAYS)", field=field)


async def record_collected(session: AsyncSession, rt: Runtime, *, payment_id: str, cooperative_id: str | None,
                           provider_transaction_id: str, note: str, actor: Actor,
                           amount: Money | None = None, completed_at: datetime | None = None) -> Payment:
    """An admin records money the provider's statement shows taken, for a payment the gateway gave up on
    (TIMEOUT: not approved in time or its outcome never confirmed; CANCELLED) whose success never reached us,
    or one still open past its approval window (the provider's status query failing, the payment kept open for
    PAYMENT_SETTLE_GRACE_SECONDS while the member who paid waits for a receipt). It completes as a late provider
    answer would (TIMEOUT/CANCELLED/PENDING/PROCESSING -> COMPLETED: the receipt SMS, the webhook event, then
    refundable), with the admin's note in the audit log; the payment's status polls then find it closed.

    Refused for an open payment inside its approval window (the payer may be approving it: the provider answers
    soon), one already collected, and a FAILED one: the provider itself said it failed, and a final state is
    never reopened (money reported taken after that is flagged for the provider's statement, not completed); and
    for a transaction id another payment of the provider holds (transaction_id_free: recorded there already).

    `completed_at`: when the statement shows the money taken (default: now); the reports date it so."""
    note = admin_note(note, "what the provider's statement shows")
    txn = _statement_transaction_id(provider_transaction_id)
    payment = await _locked_payment(session, payment_id, cooperative_id)
    current = P(payment.status)
    if current in OPEN and await db_now(session) < payment.expires_at:  # (the clock the polls judge it by)
        raise Conflict("payment is still open inside its approval window: the payer may be approving it and the "
                       "provider will answer; record it once the window is over", code=INVALID_STATE)
    if current not in GIVEN_UP and current not in OPEN:
        why = (f"the provider said it failed; {_FAILED_NOT_REOPENED}" if current is P.FAILED
               else f"its recording was voided; {_AFTER_VOID}" if current is P.VOIDED
               else "its money is recorded already")
        raise Conflict(f"payment is {current.value}: {why}", code=INVALID_STATE)
    if amount is not None:
        if amount.currency != payment.currency:
            raise ValidationError(f"amount must be in {payment.currency}", field="amount")
        if not amount.is_positive():
            raise ValidationError("amount must be a positive number", field="amount")
        # An amount its provider never takes (M-Pesa: cents) is no statement's line but a typo, as record_payment
        # refuses it: recorded, the payment held money no refund could send back (the worker's M-Pesa reversal
        # refused the cents after the refund was accepted).
        problem = amount_rule_refusal(rt.providers.get(payment.provider), amount)
        if problem:
            raise ValidationError(problem, field="amount", code=PROVIDER_REFUSED)
    check_statement_time(completed_at, payment.created_at, "the payment was asked for")
    await _lock_transaction_id(session, payment.provider, txn)
    await transaction_id_free(session, payment.provider, txn, payment.cooperative_id, exclude=payment.id)
    await record(session, actor=actor, action="payment.outcome_recorded", entity_type="payment",
                 entity_id=payment.id, before={"status": current.value},
                 after={"status": P.COMPLETED.value, "note": note, "providerTransactionId": txn,
                        "amount": None if amount is None else amount.minor,
                        "completedAt": iso_z(completed_at)},
                 cooperative_id=payment.cooperative_id)
    await _apply_outcome(session, rt, payment, ProviderOutcome.SUCCEEDED, actor=actor, amount=amount,
                         provider_transaction_id=txn, reason=None, settle=None, occurred_at=completed_at,
                         checked_transaction_id=txn)
    await session.flush()
    await session.refresh(payment)
    return payment


def _statement_transaction_id(value: str | None) -> str:
    """The provider's id of money taken, as an admin copies it from the provider's statement."""
    txn = (value or "").strip()
    if not 1 <= len(txn) <= 128:
        raise ValidationError("providerTransactionId must be 1 to 128 characters: the provider's id of the money "
                              "taken (a refund needs it)", field="providerTransactionId")
    return txn


# The channel of a payment recorded from a provider's statement (record_payment): the gateway never asked for it.
RECORDED = "recorded"
# A recorded payment whose request is not known (no gatewayReference, no callback naming it) holds REQUEST_UNKNOWN
# and a UUID as its provider reference: unique as every payment's, never sent, and telling a refund that must name
# that request (MTN's referenceIdToRefund) to refuse before anything is sent (core.refunds).


def request_unknown(payment: Payment) -> bool:
    """Whether no request of ours at the provider is known for the payment (recorded without its reference)."""
    return payment.provider_reference.startswith(REQUEST_UNKNOWN)


@dataclass(frozen=True)
class StatementLine:
    """Money a provider's statement shows taken that no payment of the gateway holds: a payment lost with a restore of
    PostgreSQL (its receipt with the member, its payment.completed webhook with the cooperative's system), or money
    a provider took that no request of ours asked for. `payment`: the cooperative, type, method, amount, idempotency
    key, member and paying account as POST /v1/payments gives them (an empty account with a member: her registered
    number), and the reference to give it (the lost payment's, from the receipt or the webhook log; None: a new
    one)."""

    payment: NewPayment
    provider_transaction_id: str
    completed_at: datetime | None  # when the statement shows the money taken: `settled` dates it so (required)
    note: str
    payment_id: str | None = None  # the lost payment's id (the webhook log), for the cooperative's records
    callback_id: str | None = None  # the stored callback of no payment that this money accounts for
    send_receipt: bool = False  # the payer's receipt SMS (she may hold one already)
    # The lost payment's request id at the provider (its gatewayReference; MTN's X-Reference-Id, the externalId its
    # statement shows): a refund through MTN names it.
    gateway_reference: str | None = None


def _line_digest(line: StatementLine, amount: Money, account: str | None, txn: str, note: str) -> str:
    """The digest of a recorded payment's request, as _request_digest is of a payment's (keyed the same way, so
    a key sent again with another body is refused, and neither kind of request replays the other)."""
    new = line.payment
    canonical = json.dumps({
        "recorded": True, "paymentTypeId": new.payment_type_id, "amount": amount.minor, "currency": amount.currency,
        "method": new.method, "account": account, "member": new.member_id, "providerTransactionId": txn,
        "completedAt": iso_ms(line.completed_at), "note": note, "reference": new.reference, "id": line.payment_id,
        "callbackId": line.callback_id, "sendReceipt": line.send_receipt,
        # Absent without one: the digests stored before it could be given still match.
        **({} if line.gateway_reference is None else {"gatewayReference": line.gateway_reference}),
    }, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _request_reference(value: str | None) -> str | None:
    """The gatewayReference given with a recorded payment: a UUID, as every request id of ours at a provider is."""
    if value is None:
        return None
    if not is_uuid(value.strip()):
        raise ValidationError("gatewayReference must be a UUID: the lost payment's gatewayReference (MTN's statement "
                              "shows it as the externalId)", field="gatewayReference")
    return value.strip().lower()


def _known_request(given: str | None, callback_reference: str | None) -> str | None:
    """The request a recorded payment's money was taken by: the one given, or the one its callback named; both
    given, they must agree (a statement line is one request's money)."""
    if given is not None and callback_reference is not None and given != callback_reference:
        raise Conflict(f"gatewayReference {given} is not the request the callback names ({callback_reference}): "
                       "check both against the provider's statement", field="gatewayReference")
    return given or callback_reference


async def _request_free(session: AsyncSession, provider: str, reference: str, cooperative_id: str, *,
                        given: bool = False) -> None:
    """A Conflict when a payment of `provider` holds `reference` as its provider reference ((provider, provider
    reference) is unique: a request is one payment's), saying what that payment's status makes true of the request's
    money and what to do (_held_request): for a line being recorded (record_payment), or given to a payment recorded
    already (`given`: set_gateway_reference). Another cooperative's payment is neither named nor described."""
    held = await _reference_holder(session, provider, reference)
    if held is None:
        return
    said = f"gatewayReference {reference} is held already "
    if held.cooperative_id != cooperative_id:
        said += ("by another cooperative's payment: a request is one payment's (check it against the provider's "
                 "statement)")
    else:
        said += f"by payment {held.reference}, which is {held.status}: {_held_request(held, given)}"
    raise Conflict(said, field="gatewayReference", code=DUPLICATE_REFERENCE)


# A refund through a provider that names the request that took the money (MTN's referenceIdToRefund) of a payment
# that keeps no request (core.refunds._request_to_refund_known), said where a payment is left without one.
_NO_REQUEST_REFUND = ("an MTN refund of it, which names the request, is then refused: have the provider send the "
                      "money back and record that with returnedByProvider")


def _held_request(held: Any, given: bool) -> str:
    """What is true of the money of a request a payment holds (`held`: _reference_holder's row), and what to do,
    when the same request is named for a statement line: recorded as a new payment (POST /v1/payments/recorded),
    or, `given`, for a payment recorded already (POST /v1/payments/{id}/gateway-reference), whose money is then
    recorded here. A request's money is recorded there only when that payment holds money (collected, or taken after
    it failed: holds_money); a FAILED or VOIDED one keeps its request but holds none, and a given-up or open one is
    the gateway's own request whose outcome has not been recorded (POST /v1/payments/{id}/outcome records it)."""
    status = P(held.status)
    if holds_money(held):
        where = "that request's money is recorded there" + (
            " (taken after the payment had failed)" if status is P.FAILED else "")
        return (f"{where}, and this payment records money too: if both are the same statement line, void this "
                "recording (POST /v1/payments/{id}/void)" if given else
                f"{where}, and is not recorded twice (check that payment against the provider's statement)")
    if status in (P.FAILED, P.VOIDED):
        why = ("the provider said that request failed" if status is P.FAILED
               else "that payment's recording was voided")
        return (f"{why}, so its money is recorded only here; the request stays that payment's, and this one keeps "
                f"none ({_NO_REQUEST_REFUND})" if given else
                f"{why}, so its money is not recorded there; the request stays that payment's: record the statement "
                f"line without gatewayReference ({_NO_REQUEST_REFUND})")
    if status in GIVEN_UP:
        return ("its outcome never reached the gateway, so its money is recorded only here; the request stays that "
                f"payment's: to refund by it, void this recording (POST /v1/payments/{{id}}/void) and record the "
                f"money on payment {held.reference} instead (POST /v1/payments/{{id}}/outcome)" if given else
                "its outcome never reached the gateway, so its money is not recorded: record it on that payment "
                "(POST /v1/payments/{id}/outcome), not as a new one")
    return ("the provider has not answered for it yet: if it answers paid, this payment and that one record the same "
            "money: void this recording then (POST /v1/payments/{id}/void)" if given else
            "the provider has not answered for it yet, and its money is recorded there when it does (or, once its "
            "approval window is over, with POST /v1/payments/{id}/outcome): it is not recorded as a new payment")


async def set_gateway_reference(session: AsyncSession, *, payment_id: str, cooperative_id: str | None,
                                gateway_reference: str, actor: Actor) -> Payment:
    """An admin gives a payment recorded from the provider's statement without its request (request_unknown) the
    request that took its money, found since (the provider's statement export, the member's SMS): a refund through
    MTN, which names that request (referenceIdToRefund), can then be sent. Checked as record_payment checks a
    gatewayReference given with the line (_request_reference, _request_free), on the payment's locked row; audited
    payment.gateway_reference_set.

    Refused: a payment not recorded (its reference is the request the gateway sent), one whose request is known
    already, a voided one (final, no money of it to refund: the request its void released is the right line's), and
    a reference a payment of the provider holds. One that a payment takes while this runs (a lost
    payment's retry, whose derived reference it is: create_payment) is found by the (provider, provider_reference)
    unique index, and refused the same way, with nothing written."""
    reference = _request_reference(gateway_reference)
    payment = await _locked_payment(session, payment_id, cooperative_id)
    if payment.channel != RECORDED:
        raise Conflict(f"payment {payment.reference} was not recorded from a provider's statement (channel "
                       f"{payment.channel}): its gatewayReference is the request the gateway sent, and is not "
                       "changed", field="gatewayReference")
    if payment.status == P.VOIDED.value:
        # Its void released the request it named (void_recording) for the right line; taken here, that line could
        # not be recorded with it, and nothing could take it back.
        raise Conflict(f"payment {payment.reference} is VOIDED: its recording was voided; {_AFTER_VOID} with "
                       "the gatewayReference", field="status", code=INVALID_STATE)
    if not request_unknown(payment):
        raise Conflict(f"payment {payment.reference} has its gatewayReference already ({payment.provider_reference}"
                       "): it is not changed", field="gatewayReference")
    assert reference is not None  # the body requires it; _request_reference answers None only for None
    provider, coop_id, unknown = payment.provider, payment.cooperative_id, payment.provider_reference  # (a rollback
    # below expires the row)
    await _request_free(session, provider, reference, coop_id, given=True)
    payment.provider_reference = reference
    payment.updated_at = changed_at(payment.updated_at)  # changed: a cooperative's sync lists it again
    try:
        await session.flush()
    except IntegrityError as exc:
        if "provider_reference" not in str(exc.orig):
            raise
        await session.rollback()
        await _request_free(session, provider, reference, coop_id, given=True)
        raise Conflict(f"gatewayReference {reference} was taken by another payment at the same moment: look it up "
                       "(GET /v1/payments)", field="gatewayReference", code=DUPLICATE_REFERENCE) from None
    await record(session, actor=actor, action="payment.gateway_reference_set", entity_type="payment",
                 entity_id=payment.id, before={"gatewayReference": unknown},
                 after={"gatewayReference": reference}, cooperative_id=coop_id)
    return payment


async def record_payment(session: AsyncSession, rt: Runtime, line: StatementLine, *,
                         actor: Actor) -> tuple[Payment, bool]:
    """An admin records money a provider's statement shows taken that no payment holds: a COMPLETED payment, made
    so at once (nothing is asked of the provider: no collect job, no poll), collected at its amount and dated at the
    statement's time (the reconciliation's `settled` counts it there, as a collected payment), audited with the
    admin's note (payment.recorded, then payment.completed as any completion), the cooperative's system told
    (payment.completed: a recorded payment is news to it too) and, if asked, the payer sent the receipt. With a
    callback that matched no payment (`callback_id`), that callback is resolved with the note in the same
    transaction. A replayed idempotency key answers the payment it made; another request under it is a Conflict.
    Naming no member, a wallet number's line is the payment of the member who held the number when the money was
    taken (core.members.number_holder_at), not of its holder now.

    Refused: what create_payment refuses for the same fields, a statement time in the future or older than
    RECORDED_PAYMENT_MAX_AGE_DAYS (check_recorded_age), a transaction id a payment of the provider holds
    (transaction_id_free), a reference or an id taken or malformed, and a callback that is not a money-taken
    collection of this provider still unresolved. Without a reference, a new one dated the day the money was taken
    in the cooperative's time zone, as the payment is (its created_at): the member's receipt and the USSD "My
    payments" show that day, not the day it was recorded."""
    new = line.payment
    key = check_idempotency_key(new.idempotency_key)
    note = admin_note(line.note, "what the provider's statement shows")
    txn = _statement_transaction_id(line.provider_transaction_id)
    line = replace(line, gateway_reference=_request_reference(line.gateway_reference))
    if new.method not in METHODS:
        raise ValidationError(f"paymentMethod must be one of {', '.join(METHODS)}", field="paymentMethod")
    if new.amount is None:
        raise ValidationError("amount is required: what the statement shows taken", field="amount")
    if not new.account and new.member_id is None:
        raise ValidationError("paymentAccount is required without a memberId", field="paymentAccount")
    if line.completed_at is None:
        raise ValidationError("completedAt is required: when the statement shows the money taken", field="completedAt")
    check_statement_time(line.completed_at, None)
    context = await load_context(session, new.cooperative_id, new.payment_type_id, new.member_id)
    coop, ptype = context.coop, context.ptype
    if coop is None or coop.status != "ACTIVE":
        raise NotFound("cooperative not found")
    if ptype is None:
        raise NotFound("payment type not found", field="paymentTypeId")
    amount = new.amount
    account, account_refused = _normalise_account(new.method, new.account, coop.country) if new.account \
        else (None, None)
    provider = rt.provider_for(new.method)
    digest = _line_digest(line, amount, account, txn, note)
    member_id, erased = new.member_id, False
    locked_id = member_id  # the member whose row is taken (below)
    if account is not None and _found_by_account(new):
        # The number's holder when the money was taken, not now: a line from before a NEW_SIM or SWAP gave the number
        # to her is not hers (it counted her period paid, and left unpaid the member who paid), whatever the status
        # of the one who held it (suspended since, erased: below).
        index = rt.cipher.blind_index(account)
        member_id = locked_id = await number_holder_at(session, coop.id, index, line.completed_at)
        if member_id is None:
            # Nobody's then (a NEW_SIM gave it to its holder since): a line of no member her number paid from just
            # before she got it is still hers to erase (core.members._Hers, NUMBER_MARGIN). Her row is taken too,
            # so that her erasure and this recording take turns: run while this one was on its way, her erasure
            # scrubbed her payments before this one was there to scrub.
            locked_id = (await session.execute(select(Member.id).where(
                Member.cooperative_id == coop.id, Member.phone_index == index))).scalar_one_or_none()
    if locked_id is not None:
        # Her row first (FOR KEY SHARE, which the payment's insert takes for its member_id anyway), before the id's
        # lock: the order a callback completing a payment of hers takes them in (her row when it takes any, her
        # payment's, then the id's: core.provider_events), and her erasure (her row, then her payments). Taken at
        # the insert, under the id's lock, a callback holding her payment and waiting for the id, and her erasure
        # holding her row and waiting for that payment, made a deadlock of three, and PostgreSQL rolled one back.
        # Read under that lock: erased (core.members.erase_member), before or while this waited, her payment keeps no
        # number, as her other payments keep none (the account the admin typed, or her number that found her); nor
        # does a line of no member that her erasure counted hers (_Hers: made since she got the number, less
        # NUMBER_MARGIN), as it would have scrubbed it had this one come first.
        her = (await session.execute(select(Member).where(Member.id == locked_id)
                                     .with_for_update(read=True, key_share=True)
                                     .execution_options(populate_existing=True))).scalar_one_or_none()
        erased = her is not None and her.phone_enc is None and her.phone_masked == ERASED_MASK
        if erased and member_id is None:
            assert her is not None
            erased = line.completed_at >= await holds_number_since(session, her) - NUMBER_MARGIN
    # Before the key is looked for: the same request sent twice at once finds the first one's payment.
    await _lock_transaction_id(session, provider.name, txn)
    existing = await find_by_key(session, coop.id, key)
    if existing is not None:
        return _same_or_refused(rt.cipher, existing, digest)
    # After the key: the same request sent again once its line has aged past the limit still answers its payment.
    check_recorded_age(line.completed_at, rt.settings.recorded_payment_max_age_days)
    refused = _refusal(rt, new, context, ptype, amount, account_refused, taken=True)
    if refused is not None:
        raise refused
    if account is None and not erased:
        number = await _members_number(session, rt, new, line.completed_at)
        if number is not None:
            account, account_refused = _normalise_account(new.method, number, coop.country)
            if account_refused is not None:
                raise ValidationError(f"{account_refused.message} (the member's number at completedAt): give "
                                      "paymentAccount", field="paymentAccount")
    await transaction_id_free(session, provider.name, txn, coop.id)
    payment_id = await _free_payment_id(session, line.payment_id)
    reference = await _free_reference(session, new.reference)
    callback_reference = None
    if line.callback_id is not None:
        callback_reference = await _callback_to_account_for(session, line.callback_id, provider.name)
    request = _known_request(line.gateway_reference, callback_reference)
    if request is not None:
        await _request_free(session, provider.name, request, coop.id)
    await session.connection()  # then the stamp (see core.state.transition): the payment sync's horizon
    now = utcnow()
    values: dict[str, Any] = {
        "id": payment_id, "cooperative_id": coop.id, "member_id": member_id, "payment_type_id": ptype.id,
        "reference": reference or await next_reference(session, "PAY", zone_of(coop.timezone), line.completed_at),
        "amount_minor": amount.minor,
        "currency": amount.currency, "fee_minor": 0, "refunded_minor": 0, "collected_minor": amount.minor,
        "status": P.COMPLETED.value, "method": new.method, "provider": provider.name,
        # The request that took the money when it is known (a refund through MTN names it); else a value never sent
        # to the provider, unique as every payment's is.
        "provider_reference": request or f"{REQUEST_UNKNOWN}{uuid.uuid4()}", "provider_transaction_id": txn,
        "gateway_reference": None,
        "payment_url": None, "idempotency_key": key,
        # Her number's ciphertext, blind index and mask, and the request's hash (a digest of the account): for an
        # erased member, what her erasure leaves on her payments (core.members._erase_payments); her key alone
        # answers with it again (core.payments._same_or_refused).
        **({"payment_account_enc": "", "payment_account_index": "", "payment_account_masked": ERASED_MASK,
            "request_hash": ""} if erased else
           # Naming her alone, a line from before her number changed (_members_number): no number, none guessed.
           {"payment_account_enc": "", "payment_account_index": "", "payment_account_masked": ACCOUNT_NOT_KNOWN,
            "request_hash": keyed_request_hash(rt.cipher, digest)} if account is None else
           {"payment_account_enc": rt.cipher.encrypt(account, context=account_context(coop.id)),
            "payment_account_index": rt.cipher.blind_index(account), "payment_account_masked": _mask_account(account),
            "request_hash": keyed_request_hash(rt.cipher, digest)}),
        "description": None, "due_date": None, "channel": RECORDED, "failure_reason": None,
        "mismatch": False, "mismatch_detail": None, **NOT_REVIEWED, "late": False, "next_poll_at": None,
        "created_by": actor.id,
        # Made when its money was taken, as the lost payment was moments before (the period it was asked for in the
        # reports, the one it pays for the reminders); changed now (the payment sync lists it from now).
        "created_at": line.completed_at, "expires_at": line.completed_at, "updated_at": now,
        "completed_at": line.completed_at,
    }
    # Whichever unique value a request at the same moment took (the key, the id, the reference): nothing written.
    inserted = (await session.execute(
        insert_ignore(session.get_bind().dialect.name, table_of(Payment)).values(values).on_conflict_do_nothing()
        .returning(table_of(Payment).c.id))).scalar_one_or_none()
    if inserted is None:
        existing = await find_by_key(session, coop.id, key)
        if existing is not None:
            return _same_or_refused(rt.cipher, existing, digest)
        raise Conflict("the id, reference or gatewayReference was taken by another payment at the same moment: "
                       "look it up (GET /v1/payments)",
                       field="id" if line.payment_id else "reference" if new.reference else "gatewayReference",
                       code=DUPLICATE_REFERENCE)
    payment = _persistent(session, values)
    await _audit_recorded(session, payment, line, note, actor)
    await enqueue_many(session, _recorded_notices(rt, payment, line.send_receipt))
    if line.callback_id is not None:
        await resolve_unmatched(session, line.callback_id, note, actor=actor, payment_id=payment.id)
    return payment, True


async def _members_number(session: AsyncSession, rt: Runtime, new: NewPayment, completed_at: datetime) -> str | None:
    """The paying account of a recorded payment that names only its member, for a wallet method (a bank account is
    never a member's): the number she held when the money was taken (core.members.number_of_at: her number now, or
    the one a SWAP since gave the other member), not her number now, which a NEW_SIM or SWAP since gave her (a line
    with it showed a number she did not pay from, and ?paymentAccount= of it found the line). None when the audit
    does not tell it (a NEW_SIM since: only its mask is kept): the payment keeps no number (ACCOUNT_NOT_KNOWN).
    A member whose number was released since (she left) is asked the same: her release kept her number as a mask
    alone, as a NEW_SIM does (no number, unless she gave it in a SWAP before leaving: the other member's now). Refused
    for that, a line of money she paid could not be recorded naming her. (An erased member never comes here.)"""
    if new.method not in METHOD_OPERATOR:
        raise ValidationError(f"paymentAccount is required for {new.method}: the account the statement shows",
                              field="paymentAccount")
    member = await session.get(Member, new.member_id)
    if member is None:
        raise ValidationError("paymentAccount is required: the member has no registered number",
                              field="paymentAccount")
    number = await number_of_at(session, rt.cipher, member, completed_at)
    return None if number is None else number.e164


async def _free_payment_id(session: AsyncSession, wanted: str | None) -> str:
    """The recorded payment's id: the lost payment's (the cooperative's system knows it from its webhooks) when it is
    a UUID no payment has, else a new one."""
    if wanted is None:
        return str(uuid.uuid4())
    if not is_uuid(wanted):
        raise ValidationError("id must be a UUID: the payment's id as the webhook log gives it", field="id")
    wanted = wanted.lower()
    if (await session.execute(select(Payment.id).where(Payment.id == wanted))).first() is not None:
        raise Conflict("id is taken: a payment has it (GET /v1/payments/{id})", field="id", code=DUPLICATE_REFERENCE)
    return wanted


async def _free_reference(session: AsyncSession, wanted: str | None) -> str | None:
    """The recorded payment's reference: the lost payment's (on the member's receipt and her STATUS SMS) when it has
    a payment reference's shape and no payment has it; None without one (a new one is given)."""
    if wanted is None:
        return None
    wanted = wanted.strip().upper()
    if not (REFERENCE_SHAPE.match(wanted) and wanted.startswith("PAY_")):
        raise ValidationError("reference must be a payment reference as receipts give it, e.g. PAY_20261201_001",
                              field="reference")
    _, day, digits = wanted.split("_")
    try:
        date(int(day[:4]), int(day[4:6]), int(day[6:]))
    except ValueError:
        raise ValidationError(f"reference {wanted} is not dated with a day (PAY_YYYYMMDD_NNN, as receipts give it): "
                              "check it against the receipt", field="reference") from None
    number = int(digits)
    if number == 0:
        raise ValidationError(f"reference {wanted} was never handed out (numbers start at 001): check it against "
                              "the receipt", field="reference")
    # As references are written (core.references: zero-padded to three digits, no more): PAY_20261130_1 or _0001
    # typed from PAY_20261130_001 on her receipt is that reference, and her receipt and STATUS SMS find it.
    wanted = f"PAY_{day}_{number:03d}"
    if await get_by_reference(session, wanted) is not None:
        raise Conflict(f"reference {wanted} is taken: a payment has it", field="reference", code=DUPLICATE_REFERENCE)
    if session.get_bind().dialect.name != "postgresql":
        # SQLite numbers each day from its own counter (core.references): a number past the day's is no lost
        # payment's, and taken it would make the day's payment that draws it later fail on the unique reference (a
        # recording dated that day draws from it too).
        reached = (await session.execute(select(ReferenceCounter.value).where(ReferenceCounter.key == f"PAY_{day}"))
                   ).scalar_one_or_none() or 0
        if number > reached:
            raise ValidationError(f"reference {wanted} was never handed out (no reference of that day reached "
                                  "its number): check it against the receipt", field="reference")
    else:
        # A number the sequence has not handed out yet is no lost payment's (after a restore `advance-references`
        # moves the sequence past every lost one), and taking it would make the payment that draws it later fail
        # on the unique reference (a 500 to a member or a cooperative's system).
        # (not last_value alone: after `setval(n, false)`, as a restore's tools leave it, n is still to hand out)
        issued = (await session.execute(ISSUED)).scalar_one()
        if number > issued:
            raise ValidationError(f"reference {wanted} was never handed out (the references' sequence is at "
                                  f"{issued}): check it against the receipt, and run `main.py advance-references` "
                                  "after a restore before recording", field="reference")
    return wanted


async def _callback_to_account_for(session: AsyncSession, callback_id: str, provider: str) -> str | None:
    """The stored callback a recorded payment accounts for (resolved with it, resolve_unmatched): one that matched
    no payment, unresolved, of the payment's provider, saying money was taken. Returns the reference of ours it
    named (CALLBACK_REFERENCE: the request that took the money), when it kept one."""
    row = (await session.execute(
        select(ProviderEvent).where(ProviderEvent.id == callback_id, ProviderEvent.payment_id.is_(None),
                                    ProviderEvent.outcome.in_((UNMATCHED, UNMATCHED_RESOLVED)))
        .with_for_update())).scalar_one_or_none()
    if row is None:
        raise NotFound("provider callback not found: a callback that matched no payment "
                       "(GET /v1/provider-callbacks?unmatched=true&kind=collection)", field="callbackId")
    if row.outcome == UNMATCHED_RESOLVED:
        raise Conflict("provider callback is resolved already", field="callbackId")
    if row.provider != provider:
        raise Conflict(f"provider callback is {row.provider}'s; this payment's provider is {provider}",
                       field="callbackId")
    if row.status != ProviderOutcome.SUCCEEDED.value:
        raise Conflict(f"provider callback says {row.status}, not that money was taken", field="callbackId")
    ours = row.payload.get(CALLBACK_REFERENCE) if isinstance(row.payload, dict) else None
    return ours if isinstance(ours, str) and is_uuid(ours) else None


async def _audit_recorded(session: AsyncSession, payment: Payment, line: StatementLine, note: str,
                          actor: Actor) -> None:
    """payment.recorded (the statement line, the member it was recorded for and the admin's note: named, or the
    number's holder at completedAt), then payment.completed, which every payment's completion writes (the
    reconciliation reads when a completion was recorded from it: core.reports)."""
    money = {"amount": payment.amount_minor, "currency": payment.currency, "method": payment.method,
             "providerTransactionId": payment.provider_transaction_id, "completedAt": iso_z(payment.completed_at)}
    await record(session, actor=actor, action="payment.recorded", entity_type="payment", entity_id=payment.id,
                 after={"status": P.COMPLETED.value, "reference": payment.reference, "note": note, **money,
                        "memberId": payment.member_id, "callbackId": line.callback_id,
                        "sendReceipt": line.send_receipt,
                        "gatewayReference": None if request_unknown(payment) else payment.provider_reference},
                 cooperative_id=payment.cooperative_id)
    await record(session, actor=actor, action=f"{PAYMENT.name}.{P.COMPLETED.value.lower()}", entity_type="payment",
                 entity_id=payment.id, before={"status": None},
                 after={"status": P.COMPLETED.value, "recorded": True, **money},
                 cooperative_id=payment.cooperative_id)


def _recorded_notices(rt: Runtime, payment: Payment, send_receipt: bool) -> list[NewJob]:
    """A recorded payment's payment.completed webhook event (the cooperative's system lost it with the restore, or
    never had it), and the payer's receipt SMS only when asked (she may hold the lost payment's already)."""
    if send_receipt:
        return _notices(rt, payment, "payment_receipt", "payment.completed")
    return notice_jobs(template="payment_receipt", event_type="payment.completed",
                       cooperative_id=payment.cooperative_id, key=payment.id, context={"payment_id": payment.id},
                       data=event_data(payment), cipher=rt.cipher)


# How a voided recording's failure_reason starts (void_recording), the admin's note after it.
VOIDED_RECORDING = "recording voided: "
# The audit actions of an admin's recording of money taken: a payment recorded from a statement line
# (record_payment), or a given-up payment's money (record_collected).
RECORDING_ACTIONS = ("payment.recorded", "payment.outcome_recorded")
# A dispute still being handled: it may end in a refund of the payment, which a voided one no longer allows.
OPEN_DISPUTES = (DisputeStatus.OPEN.value, DisputeStatus.UNDER_REVIEW.value)


async def void_recording(session: AsyncSession, *, payment_id: str, cooperative_id: str | None, note: str,
                         actor: Actor) -> Payment:
    """An admin voids a recording of money taken made in error (the wrong statement line, member, transaction id,
    or another cooperative's line): the only undo there is, a refund, would send real money to someone. The
    payment becomes VOIDED (final): nothing collected (collected_minor 0, so neither the reconciliation nor a refund
    counts it: core.state.payment.HELD), its provider transaction id released (and a recorded payment's request,
    its gatewayReference) so the right line can be recorded (POST /v1/payments/recorded), both kept in the move's
    audit row (payment.voided, its before) with the note; failure_reason "recording voided: <note>". The
    cooperative's system is told (payment.voided, which an endpoint of payment.completed gets too:
    core.webhooks.FOLLOWS); the member is not texted (no money of hers moved through us).

    Only a payment whose money an admin's recording gave (RECORDING_ACTIONS; record_collected's payment may have
    been asked for by the gateway, its request kept), never one the provider itself reported paid: a success
    callback stored for it, or the callback a recorded payment accounts for. Refused (Conflict) too while a refund
    of it is not FAILED (money may be on its way back) or a dispute of it is open. Under the payment's lock, which
    a refund's request and a dispute's opening take too: neither can slip in between the checks and the move."""
    note = admin_note(note, "why the recording is voided, e.g. which statement line it was")
    payment = await _locked_payment(session, payment_id, cooperative_id)
    current = P(payment.status)
    if current is P.VOIDED:
        raise Conflict(f"payment is VOIDED already: {payment.failure_reason}", field="status", code=INVALID_STATE)
    recorded = (await session.execute(
        select(AuditEvent.action, AuditEvent.after).where(
            AuditEvent.entity_type == PAYMENT.name, AuditEvent.entity_id == payment.id,
            AuditEvent.action.in_(RECORDING_ACTIONS)).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1)
    )).first()
    if recorded is None:
        raise Conflict(f"payment is {current.value} on the provider's own word, not recorded by an admin: only a "
                       "recording made in error is voided" + _closed_hint(current), field="status")
    callback = (recorded.after or {}).get("callbackId") if recorded.action == "payment.recorded" else None
    said = (await session.execute(
        select(ProviderEvent.received_at).where(
            ProviderEvent.payment_id == payment.id, ProviderEvent.kind == EventKind.COLLECTION.value,
            ProviderEvent.status == ProviderOutcome.SUCCEEDED.value).limit(1))).first()
    if said is not None or callback is not None:
        which = (f"its callback received {iso_z(said.received_at)}" if said is not None
                 else f"the provider's callback {callback} it accounts for")
        raise Conflict(f"the provider itself reported this payment's money taken ({which}): it is not voided"
                       + _closed_hint(current), field="status")
    refund = (await session.execute(
        select(Refund.reference, Refund.status).where(Refund.payment_id == payment.id,
                                                      Refund.status != RefundStatus.FAILED.value).limit(1))).first()
    if refund is not None:
        raise Conflict(f"refund {refund.reference} of this payment is {refund.status}: money may be on its way "
                       "back to the payer, so the recording is not voided", field="status", code=INVALID_STATE)
    dispute = (await session.execute(
        select(Dispute.reference, Dispute.status).where(Dispute.payment_id == payment.id,
                                                        Dispute.status.in_(OPEN_DISPUTES)).limit(1))).first()
    if dispute is not None:
        raise Conflict(f"dispute {dispute.reference} of this payment is {dispute.status}: close it before voiding "
                       "the recording", field="status", code=INVALID_STATE)
    if current is not P.COMPLETED:  # (a refund, which the checks above refuse, moves it on)
        raise Conflict(f"payment is {current.value}: only a COMPLETED recording is voided", field="status",
                       code=INVALID_STATE)
    txn = payment.provider_transaction_id
    if txn:
        # A payment of the cooperative the provider itself reported paid with this transaction id after it was
        # recorded (the retry of a payment a restore lost) counts nothing (_flag_held_twice: collected 0, "counted
        # there, not here"): voided, the money the provider reported taken would be counted nowhere. Under the id's
        # lock, taken after the payment's (the order a completion takes them in): a completion probing the id now
        # waits for this void, and then finds it released and counts the money itself.
        await _lock_transaction_id(session, payment.provider, txn)
        counted_here = (await session.execute(
            select(Payment.reference).where(Payment.provider == payment.provider,
                                            Payment.provider_transaction_id == txn, Payment.id != payment.id,
                                            Payment.cooperative_id == payment.cooperative_id,
                                            Payment.collected_minor == 0).limit(1))).first()
        if counted_here is not None:
            raise Conflict(f"payment {counted_here.reference} completed with the same provider transaction "
                           f"{txn[:64]} on the provider's own word, its money counted on this recording: voided, "
                           "it would be counted nowhere", field="status")
    values: dict[str, Any] = {"collected_minor": 0, "provider_transaction_id": None,
                              "failure_reason": f"{VOIDED_RECORDING}{note}"[:200],
                              "updated_at": changed_at(payment.updated_at)}
    was: dict[str, Any] = {"collected": payment.collected_minor, "providerTransactionId":
                           payment.provider_transaction_id, "completedAt": iso_z(payment.completed_at)}
    if payment.channel == RECORDED and not request_unknown(payment):
        # The request it named: the right line may be the same request's money (an MTN refund names it).
        was["gatewayReference"] = payment.provider_reference
        values["provider_reference"] = f"{REQUEST_UNKNOWN}{uuid.uuid4()}"
    moved: Any = _Moved(payment, {"status": P.VOIDED.value, **values})  # the event is built before the move
    event = event_job(cooperative_id=payment.cooperative_id, event_type="payment.voided",
                      event_id=f"evt_payment_voided_{payment.id}", data=event_data(moved))
    await transition(session, PAYMENT, payment.id, current, P.VOIDED, actor=actor, values=values,
                     audit={"note": note, "recordedBy": recorded.action}, was=was, jobs=[event])
    metrics.payment_moved(P.VOIDED.value, payment.method).inc()
    log.warning("a recording of money taken voided by its cooperative",
                extra={"payment": payment.reference, "payment_id": payment.id, "actor": actor.id})
    await session.flush()
    await session.refresh(payment)
    return payment
