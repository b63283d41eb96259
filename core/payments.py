"""Payments: creation with idempotency, provider outcomes applied through the state machine."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

import phonenumbers
from phonenumbers import carrier
from sqlalchemy import BigInteger, String, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from core import metrics, pgraw
from core.audit import Actor, phone_changes, record
from core.cooperatives import zone_of
from core.db import insert_ignore, iso_ms, iso_z, lock_row, row_insert, table_of, utcnow
from core.errors import (
    DUPLICATE_REFERENCE,
    IDEMPOTENCY_KEY_IN_FLIGHT,
    IDEMPOTENCY_KEY_REUSED,
    INVALID_STATE,
    MEMBER_NOT_ACTIVE,
    MEMBER_NOT_FOUND,
    PAYMENT_ACCOUNT_NOT_ACCEPTED,
    PAYMENT_ALREADY_RECORDED,
    PAYMENT_METHOD_NOT_AVAILABLE,
    PROVIDER_REFUSED,
    BusinessRuleError,
    Conflict,
    DomainError,
    NotFound,
    ValidationError,
)
from core.models import AuditEvent, Dispute, Member, Payment, PaymentType, ProviderEvent, ReferenceCounter, Refund
from core.money import Money
from core.notify import changed_at, emit_event, event_job, notice_jobs
from core.outbox import NewJob, db_now, enqueue_many
from core.payment_statements import CONTEXT, create_statement, stored_and_locked
from core.phone import Phone, PhoneError, normalize, operator_of
from core.ports import (
    MONEY_REFERENCE,
    REQUEST_UNKNOWN,
    EventKind,
    ProviderError,
    ProviderOutcome,
    StatusResult,
    amount_refusal,
    refusal_for,
)
from core.ports import ProviderEvent as ProviderEventData
from core.reference_mark import ISSUED
from core.references import REFERENCE_SHAPE, next_reference, reference_prefix
from core.state import StaleTransition, transition
from core.state.dispute import DisputeStatus
from core.state.payment import COLLECTED, OPEN, PAYMENT, UNCONFIRMED, PaymentStatus, holds_money, taken_after_failure
from core.state.refund import RefundStatus
from core.text import admin_note, is_uuid

if TYPE_CHECKING:
    from core.crypto import PiiCipher
    from core.runtime import Runtime

log = logging.getLogger("gateway.payments")

# A payment given up after its settling grace with the provider never saying what became of it (core.jobs): the
# money may have been taken, so it ends TIMEOUT flagged for a person, and the payer is told "not confirmed",
# not "not approved".
UNCONFIRMED_FLAG = "the provider never confirmed the outcome: check its statement (record money taken with " \
    "POST /v1/payments/{id}/outcome)"
# A payment's review columns (review_flags) as a new payment has them: never reviewed.
NOT_REVIEWED = {"reviewed_detail": None, "reviewed_by": None, "reviewed_at": None, "review_note": None}
METHODS = ("MOBILE_MONEY_MTN", "MOBILE_MONEY_AIRTEL", "MPESA", "BANK_BK", "BANK_IM", "BANK_ECOBANK")
# Which mobile operator a mobile-money method collects from (checked against the payer's number).
METHOD_OPERATOR = {"MOBILE_MONEY_MTN": "MTN", "MOBILE_MONEY_AIRTEL": "AIRTEL", "MPESA": "SAFARICOM"}
# The wallets and operators by the names their subscribers know (USSD's method.* texts), in a person's message.
METHOD_NAMES = {"MOBILE_MONEY_MTN": "MTN MoMo", "MOBILE_MONEY_AIRTEL": "Airtel Money", "MPESA": "M-Pesa"}
_OPERATOR_NAMES = {"MTN": "MTN", "AIRTELTIGO": "AirtelTigo"}
# The wallet method of each mobile operator a cooperative's members pay with, by the cooperative's country
# (USSD offers the one of the payer's operator: channels.ussd.flows.methods_for). A method of no operator is a
# bank (IremboPay), which any cooperative's payment may name.
_KENYA_WALLETS = {"SAFARICOM": "MPESA", "AIRTEL": "MOBILE_MONEY_AIRTEL"}
# Tanzania has no MTN: of its operators only Airtel's wallet is one the gateway collects from (Vodacom's M-Pesa is
# not Safaricom's Daraja; Yas, formerly Tigo, and Halotel have no method). MTN counted as a Tanzanian method let a
# TZS type priced with cents Airtel cannot take be made (MTN's sandbox "could" collect it), and offered MTN MoMo to
# a number of a range nobody names.
_TANZANIA_WALLETS = {"AIRTEL": "MOBILE_MONEY_AIRTEL"}
# Ghana has no Airtel Money: Airtel's network there became AirtelTigo, now AT, whose wallet is not Airtel's Open API
# (nor is Telecel Cash a method): only MTN MoMo.
_GHANA_WALLETS = {"MTN": "MOBILE_MONEY_MTN"}
_WALLETS = {"MTN": "MOBILE_MONEY_MTN", "AIRTEL": "MOBILE_MONEY_AIRTEL"}
_COUNTRY_WALLETS = {"KE": _KENYA_WALLETS, "TZ": _TANZANIA_WALLETS, "GH": _GHANA_WALLETS}


def wallets_by_operator(country: str) -> dict[str, str]:
    """Operator -> the wallet method its subscribers pay with, for a cooperative of `country`."""
    return _COUNTRY_WALLETS.get(country, _WALLETS)


CHANNELS = ("ussd", "api", "sms")
P = PaymentStatus


@dataclass(frozen=True)
class NewPayment:
    cooperative_id: str
    payment_type_id: str
    method: str
    account: str
    idempotency_key: str
    channel: str
    amount: Money | None = None
    member_id: str | None = None
    description: str | None = None
    due_date: datetime | None = None
    reference: str | None = None  # reserved beforehand (USSD shows it on the confirmation); else allocated
    # No member named (an admin's or an API key's request, as seed 001 shapes it): the payment is the member's
    # whose registered number pays, if that member is one of the cooperative's ACTIVE members (paying_member).
    member_from_account: bool = False
    # The balance of a fixed-amount type's period the USSD offered her (core.reminders.balance_owed: the provider
    # took part of its price): paid as well as the price. Never from a request: an API payment states its amount.
    balance_minor: int | None = None
    # The operator the USSD aggregator reports `account` on now (core.phone.operator_on_network): a number ported to
    # another operator keeps its first operator's range. Only a USSD session sets it, and only for its own number
    # (the account); the account check then takes it over the range. None: the range decides (an API payment).
    account_operator: str | None = None


def account_context(cooperative_id: str) -> str:
    """The encryption context of a payment's account (bound to its cooperative)."""
    return f"payment:{cooperative_id}"


def payment_account(rt: Runtime, payment: Payment) -> str:
    return rt.cipher.decrypt(payment.payment_account_enc, context=account_context(payment.cooperative_id))


def payer_phone(cipher: PiiCipher, payment: Payment) -> Phone | None:
    """Where the payer's SMS about a payment without a member go (refunds, disputes): the paying phone of
    a mobile-money payment, as _notices does for its receipt. None with a member, for a bank payment, or once the
    account was erased (core.members.erase_member clears it on the payments her number made as she registered:
    a dispute of one still open moves on, and has no number to tell)."""
    if payment.member_id is not None or payment.method not in METHOD_OPERATOR or not payment.payment_account_enc:
        return None
    return Phone(cipher.decrypt(payment.payment_account_enc, context=account_context(payment.cooperative_id)))


# payments.request_hash is keyed: a plain digest of the request (the payer's full number among the fields, the
# others in clear on the same row) is recomputed from a backup for each of the 10,000 numbers the masked account
# leaves, naming the payer without any key. A stored hash starting with REQUEST_HASH_VERSION is the HMAC of the
# request's digest under BLIND_INDEX_KEY (through the cipher's blind index); one without it was written by a
# release before, as the plain digest, and is compared as such until `main.py rehash-requests` rewrites it (the
# HMAC of the stored digest: the same value a new row holds, so the rewrite needs no decryption).
REQUEST_HASH_VERSION = "v2:"
_REQUEST_HASH_PURPOSE = "payment-request"


def _request_digest(new: NewPayment, amount: Money, account: str) -> str:
    """The request's plain SHA-256 (what a release before this one stored): never stored now."""
    canonical = json.dumps({
        "paymentTypeId": new.payment_type_id, "amount": amount.minor, "currency": amount.currency,
        "method": new.method, "account": account, "description": new.description,
        "dueDate": new.due_date.isoformat() if new.due_date else None, "member": new.member_id,
    }, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def keyed_request_hash(cipher: PiiCipher, digest: str) -> str:
    """What a payment row stores for its request's digest: the version and the digest's HMAC, cut to the
    column's 64 characters (61 hex digits, 244 bits)."""
    keyed = cipher.blind_index(digest, purpose=_REQUEST_HASH_PURPOSE)
    return REQUEST_HASH_VERSION + keyed[: 64 - len(REQUEST_HASH_VERSION)]


def _same_request(cipher: PiiCipher, stored: str, digest: str) -> bool:
    """Whether a payment's stored request hash is of this request's digest: keyed, or a plain one of a row
    written before the hash was keyed and not rewritten yet."""
    if stored.startswith(REQUEST_HASH_VERSION):
        return stored == keyed_request_hash(cipher, digest)
    return stored == digest


# An idempotency key's longest (payments.idempotency_key).
KEY_SIZE = 128


def _check_key(key: str) -> str:
    key = (key or "").strip()
    if not 8 <= len(key) <= KEY_SIZE or not key.isprintable():
        raise ValidationError("idempotencyKey must be 8 to 128 printable characters", field="idempotencyKey")
    return key


async def find_by_key(session: AsyncSession, cooperative_id: str, key: str) -> Payment | None:
    """The cooperative's payment made with idempotency key `key`, if any."""
    return (await session.execute(
        select(Payment).where(Payment.cooperative_id == cooperative_id, Payment.idempotency_key == key)
    )).scalar_one_or_none()


def _replay(cipher: PiiCipher, existing: Payment, new: NewPayment, account: str) -> tuple[Payment, bool]:
    """The first payment made with a key, when this request is the same one again. A request that named no
    amount is compared with the amount its first time charged: the type's price may have changed since, and
    a retry of the same body must still find its payment (not a 409, nor a 400 about today's price)."""
    if not existing.request_hash:
        # Its payer was erased (core.members.erase_member): the request it was made with can no longer be compared,
        # and the key still names this payment; calling the retry "a different request" would be a lie.
        return existing, False
    amount = new.amount or Money(existing.amount_minor, existing.currency)
    return _same_or_refused(cipher, existing, _request_digest(new, amount, account))


def _same_or_refused(cipher: PiiCipher, existing: Payment, digest: str) -> tuple[Payment, bool]:
    """The payment a key made, when `digest` is of the request it was made with (or its payer was erased: see
    _replay); a Conflict otherwise."""
    if existing.request_hash and not _same_request(cipher, existing.request_hash, digest):
        raise Conflict("Payment with this idempotency key already exists with a different request",
                       field="idempotencyKey", code=IDEMPOTENCY_KEY_REUSED)
    return existing, False


# The channels whose idempotency key names one request for ever, so that the payment's provider reference is derived
# from it (derived_provider_reference): the API's, chosen by the cooperative's system, which never sends a key again
# for another payment (the gateway answers 409 to that while it holds the key's payment). Not USSD's: its key is the
# aggregator's session id, which aggregators give again on another day to another session (channels.ussd.flows._pay),
# the same member paying the same again included; had that earlier payment been lost with a restore, a derived
# reference would name its request at the provider, which would answer that it has it, and the new payment would
# take the earlier one's outcome (paid) without its money.
_DERIVED_REFERENCE_CHANNELS = frozenset({"api"})
_PROVIDER_REFERENCE_PURPOSE = "payment-provider-reference"


def derived_provider_reference(cipher: PiiCipher, cooperative_id: str, key: str, digest: str) -> str:
    """The provider reference (our request id at the provider: MTN's X-Reference-Id, Airtel's transaction id,
    IremboPay's transactionId) of the payment a cooperative's request makes, derived from the cooperative, its
    idempotency key and the request's digest (_request_digest) under BLIND_INDEX_KEY: a UUID version 4 in form, as
    uuid4() gave it (MTN takes only those). The gateway that lost the key's payment (PostgreSQL restored from a
    backup) and is sent the request again sends the provider the same request id as the first time: MTN and Airtel
    answer that they have it (the payment then takes the first request's outcome, its money once), IremboPay
    answers its invoice or refuses the id, and the adapter finds that invoice by it (collected with it, pushed only
    when it is the payment's own); never a second PIN prompt. The digest is in it so that a key sent again
    with another request (another payer, amount or type) is another request at the provider, never one whose
    outcome is another payment's."""
    return cipher.request_id([cooperative_id, key, digest], purpose=_PROVIDER_REFERENCE_PURPOSE)


def _provider_reference(cipher: PiiCipher, new: NewPayment, cooperative_id: str, key: str, digest: str) -> str:
    """A new payment's provider reference: derived for a key that names one request for ever, else random."""
    if new.channel in _DERIVED_REFERENCE_CHANNELS:
        return derived_provider_reference(cipher, cooperative_id, key, digest)
    return str(uuid.uuid4())


async def create_payment(session: AsyncSession, rt: Runtime, new: NewPayment, *, actor: Actor,
                         context: PaymentContext | None = None) -> tuple[Payment, bool]:
    """Create a PENDING payment and queue its collection; a replayed key returns the first payment.

    The provider reference (a UUID) is on the row before the provider is ever called, so every
    retry of the collection reuses it; an API request's is derived from its key (derived_provider_reference), so
    the same request sent again after a restore lost its payment reuses it too. On PostgreSQL the payment, its
    audit row and both outbox jobs are one statement; a replayed key is found by the INSERT's conflict, not by a
    SELECT before it.
    `context`: the cooperative, type and member as load_context read them, when the caller already did (with
    payer_index_guess's index when `new.member_from_account`: the paying member is then found in that read).
    """
    key = _check_key(new.idempotency_key)
    if new.method not in METHODS:
        raise ValidationError(f"paymentMethod must be one of {', '.join(METHODS)}", field="paymentMethod")
    if new.channel not in CHANNELS:
        raise ValidationError("unknown channel", field="channel")
    if new.description is not None and len(new.description) > 500:
        raise ValidationError("description must be at most 500 characters", field="description")

    if context is None:
        guess = payer_index_guess(rt.cipher, new.method, new.account) if _found_by_account(new) else None
        context = await load_context(session, new.cooperative_id, new.payment_type_id, new.member_id,
                                     payer_index=guess)
    coop, ptype = context.coop, context.ptype
    if coop is None or coop.status != "ACTIVE":
        raise NotFound("cooperative not found")
    if ptype is None:
        raise NotFound("payment type not found", field="paymentTypeId")

    amount = new.amount or Money(ptype.amount_minor, ptype.currency)
    if new.amount is not None and not amount.is_positive():
        raise ValidationError("amount must be a positive number", field="amount")
    on_network = new.account_operator if new.channel == "ussd" else None  # only a session's own number's
    account, account_refused = _normalise_account(new.method, new.account, coop.country, on_network=on_network)
    digest = _request_digest(new, amount, account)
    request_hash = keyed_request_hash(rt.cipher, digest)
    refused = _refusal(rt, new, context, ptype, amount, account_refused)
    if refused is None and new.due_date is not None:
        refused = await _due_date_refusal(session, coop, ptype, new.due_date)
    if refused is None and amount.minor != ptype.amount_minor and amount.minor == new.balance_minor:
        refused = await _balance_refusal(session, rt, new, coop, amount, open_checked=context.any_open_checked,
                                         payer=rt.cipher.blind_index(account))
    if refused is not None:
        # A replay of a key accepted before the type was deactivated still answers with its payment.
        existing = await find_by_key(session, coop.id, key)
        if existing is not None:
            return _replay(rt.cipher, existing, new, account)
        raise refused

    # The member found by the paying number is not in the request's digest (that has the member as sent): a
    # replay of the same body still matches, whoever holds the number by then.
    member_id = new.member_id
    account_index = rt.cipher.blind_index(account)
    if _found_by_account(new):
        member_id = await paying_member(session, context, coop.id, account_index)
    provider = rt.provider_for(new.method)
    now = utcnow()
    payment_id = str(uuid.uuid4())
    values: dict[str, Any] = {
        "id": payment_id,
        "cooperative_id": coop.id,
        "member_id": member_id,
        "payment_type_id": ptype.id,
        "reference": new.reference,
        "amount_minor": amount.minor,
        "currency": amount.currency,
        "fee_minor": 0,
        "refunded_minor": 0,
        "collected_minor": None,
        "status": P.PENDING.value,
        "method": new.method,
        "provider": provider.name,
        "provider_reference": _provider_reference(rt.cipher, new, coop.id, key, digest),
        "provider_transaction_id": None,
        "gateway_reference": None,
        "payment_url": None,
        "payment_account_enc": rt.cipher.encrypt(account, context=account_context(coop.id)),
        "payment_account_index": account_index,
        "payment_account_masked": _mask_account(account),
        "idempotency_key": key,
        "request_hash": request_hash,
        "description": new.description,
        "due_date": new.due_date,
        "channel": new.channel,
        "failure_reason": None,
        "mismatch": False,
        "mismatch_detail": None,
        **NOT_REVIEWED,
        "late": False,
        "expires_at": now + timedelta(seconds=approval_window(rt.settings, new.method)),
        "next_poll_at": now + timedelta(seconds=rt.settings.poll_after_seconds),
        "created_by": actor.id,
        "created_at": now,
        "updated_at": now,
        "completed_at": None,
    }
    audit_after = {"status": "PENDING", "amount": amount.minor, "currency": amount.currency, "method": new.method}
    if on_network is not None and new.method in METHOD_OPERATOR and on_network != operator_of(account):
        # A ported number: the network the aggregator reported, not the range, let it pay with this method (support
        # reads here why MTN was asked to collect from a number of Telecel's range).
        audit_after["operatorFrom"] = "network"
    jobs = [
        NewJob("payment.collect", {"payment_id": payment_id}, dedupe_key=f"collect:{payment_id}",
               cooperative_id=coop.id, run_at=now),
        NewJob("payment.poll", {"payment_id": payment_id}, dedupe_key=f"poll:{payment_id}",
               cooperative_id=coop.id, run_at=values["next_poll_at"], max_attempts=30),
    ]
    zone = zone_of(coop.timezone)  # the reference is dated by the cooperative's day, as its receipt is
    try:
        if session.get_bind().dialect.name == "postgresql":
            reference = await _insert_in_one_statement(session, values, actor, audit_after, jobs, zone)
        else:
            reference = await _insert_step_by_step(session, values, actor, audit_after, jobs, zone)
    except IntegrityError as exc:
        if "provider_reference" not in str(exc.orig):
            raise
        # The request id this request derives is held by another payment: after a restore, the lost payment recorded
        # from the statement with its gatewayReference (record_payment). Its money is that payment's.
        await session.rollback()
        held = await _reference_holder(session, values["provider"], values["provider_reference"])
        named = f"as payment {held.reference} " if held is not None and held.cooperative_id == coop.id else ""
        raise Conflict(f"this request's money is recorded already {named}(recorded from the provider's statement "
                       "after a restore): it is not collected again", field="idempotencyKey",
                       code=PAYMENT_ALREADY_RECORDED) from None
    if reference is None:  # the key was used before, or a concurrent request with it won
        existing = await find_by_key(session, coop.id, key)
        if existing is None:
            raise Conflict("a request with this idempotency key is in flight", field="idempotencyKey",
                           code=IDEMPOTENCY_KEY_IN_FLIGHT)
        return _replay(rt.cipher, existing, new, account)
    values["reference"] = reference
    metrics.PAYMENTS.labels(status="PENDING", method=new.method).inc()
    return _persistent(session, Payment(**values)), True


def _refusal(rt: Runtime, new: NewPayment, context: PaymentContext, ptype: TypeFacts, amount: Money,
             account_refused: DomainError | None, *, taken: bool = False) -> DomainError | None:
    """Why a payment of `amount` cannot be made as `new` asks, if so: what may have changed since a key was first
    accepted (the provider's account and rules, the type's price, currency or state, the member's status), so a
    replay of that request still answers with its payment rather than this. What the provider cannot collect
    (another currency than its account's, cents M-Pesa does not take) is a 400 now, not a 201 that the worker fails
    later with a "payment failed" SMS to the payer.

    `taken`: money a statement shows collected already (record_payment): only what holds whatever happened since is
    checked; the type's price or state and the member's status at the time of recording do not undo a payment made
    (a member suspended, a type repriced or closed since the restore point was still paid)."""
    unpaid_with = _not_the_countrys_wallet(new.method, context.coop.country if context.coop else "")
    if unpaid_with is not None:
        return unpaid_with
    cannot = amount_refusal(rt.provider_for(new.method), amount, new.method)
    if cannot is not None:
        return ValidationError(cannot[1], field=cannot[0], code=PROVIDER_REFUSED)
    if account_refused is not None:  # (_normalise_account's: a number of another country or operator)
        return account_refused
    if amount.currency != ptype.currency:
        return ValidationError(f"amount must be in {ptype.currency}", field="amount")
    if not amount.is_positive():
        return ValidationError("amount must be a positive number", field="amount")
    if taken:
        missing = new.member_id is not None and not context.member_found
        return NotFound("member not found", field="member", code=MEMBER_NOT_FOUND) if missing else None
    if amount.minor not in (ptype.amount_minor, new.balance_minor) and not ptype.allow_custom_amount:
        return ValidationError(f"{ptype.name} costs {Money(ptype.amount_minor, ptype.currency)}; "
                               "this payment type does not accept another amount", field="amount")
    if not ptype.is_active:
        return ValidationError("payment type is not active", field="paymentTypeId")
    if new.member_id is not None and not context.member_found:
        return NotFound("member not found", field="member", code=MEMBER_NOT_FOUND)
    if new.member_id is not None and context.member_status != "ACTIVE":
        return BusinessRuleError(f"member is {(context.member_status or 'not active').lower()}; "
                                 "only an active member can pay", field="memberId", code=MEMBER_NOT_ACTIVE)
    return None


async def _due_date_refusal(session: AsyncSession, coop: CoopFacts, ptype: TypeFacts, due: datetime
                            ) -> DomainError | None:
    """Why an API payment's dueDate names no period of its type, if so (core.reminders.due_date_refusal): read only
    for a payment that names one (the USSD's never do), and checked as _refusal's are, so a replay of a key accepted
    before the type's due day changed still answers with its payment."""
    from core.reminders import due_date_refusal

    row = await session.get(PaymentType, ptype.id)
    return None if row is None else due_date_refusal(row, zone_of(coop.timezone), due)


async def _balance_refusal(session: AsyncSession, rt: Runtime, new: NewPayment, coop: CoopFacts, amount: Money, *,
                           payer: str, open_checked: bool = False) -> DomainError | None:
    """Why `amount`, the balance the USSD offered (new.balance_minor), is not what the member owes of the period
    now (core.reminders.balance_owed), if so: the session offered it when she picked the type, and she may have
    paid the rest since (another session, the office), the type been repriced, or the period turned. Charged on
    the session's word, it overpaid again. Nor while a payment of the type is still open for her in the period,
    whatever its amount (the whole price, its PIN prompt on her phone: both taken, she paid 50,000 + 20,000 when
    20,000 was owed). One read of the type and two of the period's payments, only for a balance; the second not
    when the caller's context looked for those open payments already (`open_checked`: the USSD confirmation).
    `payer`: the blind index of the number paying (an open payment from a number she no longer holds:
    approvable_by)."""
    from core.reminders import balance_owed, current_period

    ptype = await session.get(PaymentType, new.payment_type_id)
    now, member_id = utcnow(), new.member_id
    period = None if ptype is None or member_id is None else current_period(ptype, now, zone_of(coop.timezone))
    owed = None if period is None or member_id is None else await balance_owed(session, member_id, ptype, *period)
    if owed != amount.minor or period is None or member_id is None:
        return BusinessRuleError(f"{amount} is no longer the balance owed of this period", field="amount")
    if open_checked:
        return None
    waiting = await _open_in_period(session, rt.settings, coop.id, member_id, new.payment_type_id, *period, now=now,
                                    payer=payer)
    if waiting is not None:
        return BusinessRuleError(f"payment {waiting} of this type is still open for this period (awaiting approval): "
                                 "its balance is not charged beside it", field="amount")
    return None


async def _open_in_period(session: AsyncSession, settings: Any, cooperative_id: str, member_id: str, type_id: str,
                          due: date, period: Any, *, now: datetime, payer: str) -> str | None:
    """The reference of the member's newest payment of the type that pays the period ending on `due` (`period`: its
    core.reminders.PaidFor) and is still open as OpenLike judges it (its prompt can still be approved by her paying
    from the number whose blind index is `payer`: approvable_by), if any."""
    from core.reminders import paid_clause, utc_midnight

    window, grace = open_window(settings)
    table = Payment.__table__
    query = (select(Payment.reference)
             .where(Payment.member_id == member_id, Payment.cooperative_id == cooperative_id,
                    Payment.payment_type_id == type_id, Payment.created_at > now - window - grace,
                    still_open(now, now - grace), approvable_by(member_id, payer),
                    paid_clause(table, period.since, period.due_from, period.due_until, utc_midnight(due)))
             .order_by(Payment.created_at.desc()).limit(1))
    return (await session.execute(query)).scalar_one_or_none()


def _not_the_countrys_wallet(method: str, country: str) -> ValidationError | None:
    """Why a wallet method is not one a cooperative of `country` is paid with (wallets_by_operator), if so: USSD
    never offers it (methods_for), and the number check alone lets it through for a range nobody names (M-Pesa
    from a Zambian number). First, before the account's operator or the provider's currency: another number or
    amount would not make it one. A bank method (no operator) any cooperative's payment may name."""
    wallets = wallets_by_operator(country).values()
    if method not in METHOD_OPERATOR or method in wallets:
        return None
    named = ", ".join(f"{m} ({METHOD_NAMES[m]})" for m in wallets)
    return ValidationError(f"paymentMethod {method} is not one a {country} cooperative's members pay with: "
                           f"{named}, or a bank method", field="paymentMethod", code=PAYMENT_METHOD_NOT_AVAILABLE)


BANK_METHODS = tuple(m for m in METHODS if m not in METHOD_OPERATOR)


def foreign_number_warning(phone: Phone, country: str, currency: str, routes: Mapping[str, str],
                           providers: Mapping[str, object]) -> str | None:
    """What an admin registering `phone` as a member of a `country` cooperative (paid in `currency`) is told
    when it is another country's number, or one of its country on a network none of its wallets collects from:
    registered all the same (she may live abroad, or change SIM), but no wallet method takes her number
    (methods_for, _not_the_countrys_wallet) and USSD offers her none; she can pay only by a bank method whose
    provider collects `currency` (`routes` and `providers` as Runtime's), or never. None for any other number of
    the cooperative's country."""
    if not country:
        return None
    region = phone.region
    by_operator = wallets_by_operator(country)
    if region == country:
        # A number of the country on a network none of its wallets collects from (Telecel or AT in Ghana, Telkom in
        # Kenya): USSD offers her no method either (methods_for). One of a range nobody names may be any wallet's.
        operator = phone.operator
        if operator is None or operator in by_operator:
            return None
        wallets = " or ".join(f"{METHOD_NAMES[m]} (from {_a(_operator_name(o))} number)"
                              for o, m in by_operator.items())
        head = (f"{phone.masked()} is {_a(_operator_name(operator, phone.e164))} number: this {country} cooperative's "
                f"members pay with {wallets}")
    else:
        wallets = " or ".join(dict.fromkeys(METHOD_NAMES[m] for m in by_operator.values()))
        head = (f"{phone.masked()} is a {region or 'foreign'} number, not {country}: this {country} cooperative's "
                f"members pay with {wallets} from a {country} number")
    # A bank the deployment routes to a provider that collects the currency (an amount rule is no matter here).
    banks = [m for m in BANK_METHODS
             if (refused := refusal_for(routes, providers, m, Money(1, currency))) is None
             or refused[0] != "paymentMethod"]
    if banks:
        return f"{head}; this member can pay only by bank ({', '.join(banks)})"
    return f"{head}, and no bank method collects {currency}; this member can never pay"


@dataclass(frozen=True)
class CoopFacts:
    """The cooperative's columns a new payment is checked against."""

    id: str
    status: str
    country: str
    timezone: str | None = None  # its payments' references are dated by its days (core.references)


@dataclass(frozen=True)
class TypeFacts:
    """The payment type's columns a new payment is checked against."""

    id: str
    cooperative_id: str
    name: str
    amount_minor: int
    currency: str
    allow_custom_amount: bool
    is_active: bool


@dataclass(frozen=True)
class PaymentContext:
    """What a new payment is checked against: its cooperative and payment type (None when not found; the
    type only when it is the cooperative's), and whether the member asked for is one of the cooperative's."""

    coop: CoopFacts | None
    ptype: TypeFacts | None
    member_found: bool = False
    member_status: str | None = None  # the member's, when found: only an ACTIVE member pays
    payer_index: str | None = None  # the blind index the paying member was looked up by (None: not looked up)
    payer_id: str | None = None  # the cooperative's ACTIVE member with that number, if any
    open_reference: str | None = None  # an open payment like the one asked for (see OpenLike), if looked for
    # Looked for among the type's open payments of any amount paying the period (OpenLike.period): a balance's
    # re-check (_balance_refusal) need not look again.
    any_open_checked: bool = False


@dataclass(frozen=True)
class OpenLike:
    """What load_context looks for an open payment like: the same member's, of the same payment type and `amount`
    in the same cooperative, PENDING and still inside its approval window (expires_at), or PROCESSING up to
    `grace` after it (the provider took the request, perhaps late, through a collect retried in an outage: the
    polls wait PAYMENT_PENDING_GRACE_SECONDS for her prompt, and so does this check), so its PIN prompt can still
    be approved and its money still taken. A payment made with `idempotency_key` (the request's own, made before:
    a retry, a copy, a replay) hides any: the request is answered with its own payment, as create_payment's key
    always did.

    A member who dials again because no prompt came (the provider down, its collect job retrying) must not
    make a second payment that the provider collects too once it recovers (channels.ussd.flows).

    `window`: the longest approval window; no payment made more than it and `grace` ago can still be open, so the
    member's payments are read from her (member_id, created_at) index's last minutes only."""

    amount: Money
    idempotency_key: str
    window: timedelta
    grace: timedelta
    # A balance of the period (NewPayment.balance_minor): the period's (due date, core.reminders.PaidFor), as
    # core.reminders.current_period gives it. An open payment of the type that pays that period is like it whatever
    # its amount (the whole price still open beside the underpaid payment would take the balance's money too); one
    # of another period is not (_balance_refusal judges it so).
    period: tuple[date, Any] | None = None


def like_open(settings: Any, amount: Money, idempotency_key: str, *, period: tuple[date, Any] | None = None
              ) -> OpenLike:
    """The OpenLike of a request for `amount` with `idempotency_key` (`period`: see OpenLike)."""
    return OpenLike(amount, idempotency_key, *open_window(settings), period)


def open_window(settings: Any) -> tuple[timedelta, timedelta]:
    """OpenLike's window (the longest approval window) and grace (the SMS BALANCE reads a payment still open with
    the same: core.reminders.balance_now)."""
    longest = max(approval_window(settings, method) for method in METHODS)
    return timedelta(seconds=longest), timedelta(seconds=settings.payment_pending_grace_seconds)


_OWN = aliased(Payment, name="own")


def approvable_by(member: Any, payer: Any) -> Any:
    """SQL: an open payment of the member's is one she can still approve as `payer` (the blind index of the number
    she pays from now): made from that number, made since she got her number, or from a number the membership
    never held (another's number paying for her, her husband's at the office: its prompt is on his phone, and
    can still be approved, whenever it was made). Made before she got it from a number she held (her old SIM's,
    lost: PATCH member with a new number; core.members.number_history reads the same audit rows, by the masked
    number) or the one a TYPO replaced (a stranger's, who ignores the prompt), its prompt waits on a SIM she no
    longer has, approved only with her PIN there: it does not stop her paying from her number (nor is she told it
    is "on your phone"). If it completes all the same, it counts for her period (core.reminders reads her payments
    by member, whatever number paid)."""
    changes = phone_changes(member)
    since = select(func.max(AuditEvent.at)).where(*changes).scalar_subquery()
    held = AuditEvent.before["phone"].as_string()
    return or_(Payment.payment_account_index == payer, since.is_(None), Payment.created_at >= since,
               Payment.payment_account_masked.not_in(select(held).where(*changes, held.is_not(None))))


def still_open(now: Any, processing: Any) -> Any:
    """SQL: the payment is open as OpenLike judges it: PENDING before its expires_at (`now`), or PROCESSING before
    its expires_at plus the grace (`processing`: now less the grace). As the USSD, create_payment and the SMS
    BALANCE (core.reminders.balance_now) judge it: past them the prompt can no longer be approved."""
    return or_(and_(Payment.status == PaymentStatus.PENDING.value, Payment.expires_at > now),
               and_(Payment.status == PaymentStatus.PROCESSING.value, Payment.expires_at > processing))


def _context_with_open(any_amount: bool) -> Any:
    """CONTEXT and, as its column open_reference, the member's newest payment OpenLike describes (`any_amount`: of
    any amount of the type, paying OpenLike.period): in the same query (the confirmation's one read stays one; both
    lookups are index reads: the member's payments, and the cooperative's key). Parameters: CONTEXT's and open_key,
    open_amount, open_currency (unused with `any_amount`), open_since, open_now, open_processing, and with
    `any_amount` the period's open_period_since, open_due_from, open_due_until, open_named."""
    from core.reminders import paid_clause

    coop = bindparam("coop_id", type_=String)
    expires = Payment.__table__.c.expires_at.type
    own = select(_OWN.id).where(_OWN.cooperative_id == coop,
                                _OWN.idempotency_key == bindparam("open_key", type_=String))
    moment = Payment.__table__.c.created_at.type
    same_amount = ((paid_clause(Payment.__table__, *(bindparam(name, type_=moment) for name in (
                       "open_period_since", "open_due_from", "open_due_until", "open_named"))),) if any_amount
                   else (Payment.amount_minor == bindparam("open_amount", type_=BigInteger),
                         Payment.currency == bindparam("open_currency", type_=String)))
    found = (select(Payment.reference)
             .where(Payment.member_id == bindparam("member_id", type_=String), Payment.cooperative_id == coop,
                    Payment.payment_type_id == bindparam("type_id", type_=String), *same_amount,
                    Payment.created_at > bindparam("open_since", type_=Payment.__table__.c.created_at.type),
                    still_open(bindparam("open_now", type_=expires), bindparam("open_processing", type_=expires)),
                    approvable_by(bindparam("member_id", type_=String), bindparam("payer_index", type_=String)),
                    ~exists(own))
             .order_by(Payment.created_at.desc()).limit(1).scalar_subquery())
    return CONTEXT.add_columns(found.label("open_reference"))


_CONTEXT_WITH_OPEN = _context_with_open(any_amount=False)
_CONTEXT_WITH_ANY_OPEN = _context_with_open(any_amount=True)


async def load_context(session: AsyncSession, cooperative_id: str, payment_type_id: str,
                       member_id: str | None, *, payer_index: str | None = None,
                       open_like: OpenLike | None = None) -> PaymentContext:
    """The cooperative, its payment type, whether the member is theirs and, with `payer_index`
    (payer_index_guess), their active member with that number; with `open_like` and a member, her open payment
    like the one asked for (its reference): in one query."""
    params: dict[str, Any] = {"coop_id": cooperative_id, "type_id": payment_type_id, "member_id": member_id,
                              "payer_index": payer_index}
    statement = CONTEXT
    if open_like is not None and member_id is not None:
        statement = _CONTEXT_WITH_ANY_OPEN if open_like.period is not None else _CONTEXT_WITH_OPEN
        # The database's clock (utcnow is aligned to it), which dates expires_at and judges it in the polls.
        now = utcnow()
        params.update(open_key=open_like.idempotency_key, open_amount=open_like.amount.minor,
                      open_currency=open_like.amount.currency, open_since=now - open_like.window - open_like.grace,
                      open_now=now, open_processing=now - open_like.grace)
        if open_like.period is not None:
            from core.reminders import utc_midnight

            due, paid_for = open_like.period
            params.update(open_period_since=paid_for.since, open_due_from=paid_for.due_from,
                          open_due_until=paid_for.due_until, open_named=utc_midnight(due))
    if session.get_bind().dialect.name == "postgresql":
        row: Any = await pgraw.fetchrow(session, pgraw.compiled(statement), params)
    else:
        found = (await session.execute(statement, params)).first()
        row = found._mapping if found is not None else None
    if row is None:
        return PaymentContext(None, None)
    coop = CoopFacts(row["coop_id"], row["coop_status"], row["country"], row["timezone"])
    ptype = None
    if row["type_id"] is not None:
        ptype = TypeFacts(row["type_id"], row["type_coop"], row["name"], row["amount_minor"], row["currency"],
                          row["allow_custom_amount"], row["is_active"])
    return PaymentContext(coop, ptype, row["member_id"] is not None, row["member_status"],
                          payer_index, row["payer_id"], row["open_reference"] if statement is not CONTEXT else None,
                          statement is _CONTEXT_WITH_ANY_OPEN)


def _found_by_account(new: NewPayment) -> bool:
    """Whether the payment's member is the one whose number pays: none named, asked for, and a wallet number
    (a bank method's account is an account number or an e-mail, never a member's)."""
    return new.member_id is None and new.member_from_account and new.method in METHOD_OPERATOR


def payer_index_guess(cipher: PiiCipher, method: str, account: str) -> str | None:
    """The blind index to look the paying member up by in load_context's query (None: nothing to look up, a
    bank account or not a number). The cooperative's country, which a number without its country code is read
    in, comes with that same query: such a number is read as DEFAULT_REGION's here, and paying_member checks the
    guess against the account as create_payment stores it."""
    if method not in METHOD_OPERATOR:
        return None
    try:
        return cipher.blind_index(normalize(account).e164)
    except PhoneError:
        return None  # create_payment refuses it, with the cooperative's country


async def paying_member(session: AsyncSession, context: PaymentContext, cooperative_id: str,
                        index: str) -> str | None:
    """The cooperative's ACTIVE member whose registered number has blind index `index` (the account's, as stored):
    the one a payment that names no member is made by, as USSD attaches the dialling member. A pending or
    suspended member's number, or a number no member has, gives None. Found by load_context's query when its
    guess was right; else (a number without its country code in another country's cooperative) read now."""
    if context.payer_index == index:
        return context.payer_id
    return (await session.execute(
        select(Member.id).where(Member.cooperative_id == cooperative_id, Member.phone_index == index,
                                Member.status == "ACTIVE")
    )).scalar_one_or_none()


def _persistent(session: AsyncSession, payment: Payment) -> Payment:
    """The row just inserted, as a loaded instance in the session, without reading it back."""
    make_transient_to_detached(payment)
    session.add(payment)
    return payment


async def _insert_in_one_statement(session: AsyncSession, values: dict[str, Any], actor: Actor,
                                   audit_after: dict[str, Any], jobs: list[NewJob], zone: tzinfo) -> str | None:
    """WITH p AS (INSERT payment ON CONFLICT (cooperative, key) DO NOTHING RETURNING ...), the audit row and
    the jobs inserted from p: all or nothing, in one round trip. The reference's number comes from the
    sequence inside the statement unless the caller reserved one. None: the key exists."""
    reserved = values["reference"] is not None
    params = {f"p_{k}": v for k, v in values.items() if k != "reference" or reserved}
    if not reserved:
        params["ref_prefix"] = reference_prefix("PAY", zone)
    params.update(a_actor=actor.id, a_channel=actor.channel, a_after=audit_after, a_at=values["created_at"])
    for n, job in enumerate(jobs):
        params.update({f"j{n}_{k}": v for k, v in job.row().items()})
    row = await pgraw.fetchrow(session, pgraw.compiled(create_statement(reserved, len(jobs))), params)
    return None if row is None else row[0]


async def _insert_step_by_step(session: AsyncSession, values: dict[str, Any], actor: Actor,
                               audit_after: dict[str, Any], jobs: list[NewJob], zone: tzinfo) -> str | None:
    """The same rows as _insert_in_one_statement, one statement each (SQLite: no data-modifying CTEs)."""
    row = dict(values, reference=values["reference"] or await next_reference(session, "PAY", zone))
    stmt = row_insert(session.get_bind().dialect.name, Payment,
                      ignore_conflict=("cooperative_id", "idempotency_key"), returning="id")
    if (await session.execute(stmt, row)).scalar_one_or_none() is None:
        return None
    await record(session, actor=actor, action="payment.created", entity_type="payment", entity_id=row["id"],
                 after={**audit_after, "reference": row["reference"]}, cooperative_id=row["cooperative_id"])
    await enqueue_many(session, jobs)
    return str(row["reference"])


def approval_window(settings: Any, method: str) -> int:
    """Seconds a new payment stays open: a PIN prompt's PAYMENT_TIMEOUT_SECONDS for mobile money; for a bank
    payment (an invoice the payer settles on their bank's page, which they reach from the paymentUrl the
    worker adds seconds after the 201) BANK_PAYMENT_TIMEOUT_SECONDS, also the invoice's expiry."""
    if method not in METHOD_OPERATOR:  # no wallet operator: a bank payment
        return int(settings.bank_payment_timeout_seconds)
    return int(settings.payment_timeout_seconds)


def _normalise_account(method: str, account: str, country: str, *,
                       on_network: str | None = None) -> tuple[str, ValidationError | None]:
    """The account as stored (E.164 for a wallet), and why this method cannot collect from it, if so: a number
    of another country than the cooperative's, or of another operator than the method's. A malformed one
    raises. `on_network`: the operator the USSD aggregator reports the number on now (NewPayment.account_operator),
    which decides over the number's range (a ported number)."""
    account = (account or "").strip()
    operator = METHOD_OPERATOR.get(method)
    if operator is None:  # bank payments: an account number or an e-mail for the invoice
        if not 3 <= len(account) <= 120 or not account.isprintable():
            raise ValidationError("paymentAccount must be 3 to 120 characters", field="paymentAccount")
        return account, None
    try:
        phone = normalize(account, country)
    except PhoneError as exc:
        raise ValidationError(f"paymentAccount: {exc.message}", field="paymentAccount") from None
    # A wallet of another country: the provider's account is the cooperative country's (its currency, its
    # market), and no MTN or Airtel market collects from another country's numbers.
    if phone.region != country:
        return phone.e164, ValidationError(f"paymentAccount is a {phone.region or 'foreign'} number; this "
                                           f"cooperative collects mobile money from {country} numbers only",
                                           field="paymentAccount", code=PAYMENT_ACCOUNT_NOT_ACCEPTED)
    # An unknown operator (a range neither phonenumbers' carrier data nor core.phone's table names) is let
    # through: the provider refuses a number not on its network; a known other one is refused here.
    # The network's operator is spelt as ours (or by its code): the carrier data names the range's, not the network's.
    current, spelt_by = (on_network, None) if on_network is not None else (phone.operator, phone.e164)
    if current is not None and current != operator:
        return phone.e164, ValidationError(f"paymentAccount {phone.masked()} is "
                                           f"{_a(_operator_name(current, spelt_by))} "
                                           f"number; {METHOD_NAMES[method]} needs {_a(_operator_name(operator))} "
                                           "number", field="paymentAccount", code=PAYMENT_ACCOUNT_NOT_ACCEPTED)
    return phone.e164, None


def _operator_name(operator: str, e164: str | None = None) -> str:
    """'AIRTEL' -> 'Airtel': the operator as its subscribers write it (core.phone names any other in capitals, its
    spaces as _): the carrier data's own spelling of the number's ('JTL', 'Homeland Media', not 'Jtl')."""
    if operator in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[operator]
    spelt = carrier.name_for_number(phonenumbers.parse(e164), "en") if e164 else ""
    return spelt or operator.replace("_", " ").title()


def _a(name: str) -> str:
    """The name with its article, as it is said: an Airtel, a Safaricom; one said by its letters by the first's
    sound: an MTN (em-tee-en), a UTL (you-tee-el), an NRG Media Limited."""
    word = name.split()[0]
    vowel = name[0] in ("AEFHILMNORSX" if word.isupper() and len(word) <= 4 else "AEIOU")
    return f"{'an' if vowel else 'a'} {name}"


def _mask_account(account: str) -> str:
    if account.startswith("+"):
        from core.phone import mask

        return mask(account)
    if "@" in account:
        user, _, domain = account.partition("@")
        return f"{user[:1]}***@{domain}"
    return "*" * max(0, len(account) - 4) + account[-4:]


async def get_by_reference(session: AsyncSession, reference: str) -> Payment | None:
    return (await session.execute(select(Payment).where(Payment.reference == reference.strip().upper())
                                  )).scalar_one_or_none()


async def recent_payments_of_holder(session: AsyncSession, member_id: str, phone_index: str,
                                    limit: int = 5) -> list[Payment] | None:
    """The member's latest payments (newest first, at most limit) for a caller acting as her from a phone (USSD
    "my payments"): None unless the member still has the number of this blind index (corrected, released or
    erased since: not hers to act on). One query: the member's row, outer-joined to her payments (a member with
    none gives one row without a payment)."""
    rows = (await session.execute(
        select(Member.id, Payment).select_from(Member)
        .outerjoin(Payment, Payment.member_id == Member.id)
        .where(Member.id == member_id, Member.phone_index == phone_index)
        .order_by(Payment.created_at.desc()).limit(limit))).all()
    if not rows:
        return None
    return [payment for _member_id, payment in rows if payment is not None]


def collected_amount(payment: Any) -> Money | None:
    """What the provider reported taken, in the payment's currency; None while nothing is (completed_at is set
    when money is reported taken, also after a failure). The amount asked unless the provider reported another
    (collected_minor: less, more, or 0 when it took another currency, left to a person: mismatch_detail says
    what it reported). Reads a Payment, a _Moved or the SMS worker's PaymentFacts: an underpaid payment's
    webhook, API view and receipt must all state what was taken, never the amount asked."""
    if payment.completed_at is None:
        return None
    taken = payment.amount_minor if payment.collected_minor is None else payment.collected_minor
    return Money(taken, payment.currency)


def collected_to_credit(payment: Any) -> Money:
    """`collectedAmount` as the API, the webhooks and payments.csv all state it: what the provider took and the
    payment still holds (collected_amount: 0 once voided, taken in another currency, or held by another payment),
    and 0 while nothing is taken: one number to credit, never null."""
    taken = collected_amount(payment)
    return Money(0, payment.currency) if taken is None else taken


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
    id_locked: str | None = None  # the transaction id whose lock the callback's first statement took (_ID_LOCK)
    done: bool = False

    def write(self, result: str) -> tuple[Any, dict[str, Any]]:
        """The outcome's UPDATE, to travel with the move; `done` is set once the move has run (moved())."""
        return _SET_OUTCOME, {"b_id": self.event_row_id, "b_outcome": result, "b_payment_id": self.payment_id}

    def moved(self) -> None:
        self.done = True


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


def add_flag(earlier: str | None, said: str) -> str:
    """A payment's `mismatch_detail` once `said` is added after what it said already (`earlier`, None for nothing),
    within its column (fit_detail)."""
    return fit_detail(f"{earlier}; {said}" if earlier else said)


def fit_detail(detail: str) -> str:
    """A payment's `mismatch_detail` within its column (300 characters): the oldest flag's start and the newest
    flags' end, which say what happened first and what a person must do now."""
    limit = int(getattr(Payment.__table__.c.mismatch_detail.type, "length", 300))
    if len(detail) <= limit:
        return detail
    head = limit // 3
    return f"{detail[:head]} … {detail[-(limit - head - 3):]}"


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


def money_moved_at(since: datetime, said: datetime | None) -> datetime:
    """When money moved, as the provider's statement dates it (reports' `settled`): the provider's own time, or
    the one an admin read on its statement, kept between `since` (the request) and now (a provider's clock
    ahead of ours never dates money in the future, one behind never before it was asked for); without one,
    now: when the gateway learnt it."""
    now = utcnow()
    return now if said is None else min(max(said, since), now)


async def apply_collection_outcome(
    session: AsyncSession,
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
    id_locked: str | None = None,
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
    row by the callback's first statement (_store_event_and_lock): not taken again."""
    settle = None if event_row_id is None else _Settle(event_row_id, payment.id, id_locked)
    result = await _apply_outcome(session, rt, payment, outcome, actor=actor, amount=amount,
                                  provider_transaction_id=provider_transaction_id, reason=reason, settle=settle,
                                  provisional_transaction_id=provisional_transaction_id, occurred_at=occurred_at,
                                  audit=audit)
    if settle is not None and not settle.done:
        await _set_outcome(session, settle.event_row_id, result, payment.id)
    return result


async def _apply_outcome(
    session: AsyncSession,
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
    """`checked_transaction_id`: the id the caller found free under its lock (record_collected), not probed again."""
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
                holder = await _held_elsewhere(session, payment, provider_transaction_id, _locked(settle))
                await _record_transaction_id(session, payment, provider_transaction_id, actor=actor)
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
                    if spare:
                        payment.collected_minor = 0
                    payment.mismatch = True
                    payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
            return "already_completed"
        if current is P.VOIDED:
            return await _flag_success_after_void(session, payment, provider_transaction_id, amount, actor=actor)
        if current is P.FAILED:
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
            provider_transaction_id = await _kept_transaction_id(session, payment) or provider_transaction_id
        if provider_transaction_id:
            values["provider_transaction_id"] = provider_transaction_id
        held = provider_transaction_id or payment.provider_transaction_id
        holder = (await _held_elsewhere(session, payment, held, _locked(settle))
                  if held and held not in (provisional_transaction_id, checked_transaction_id) else None)
        if PAYMENT.is_exceptional(current, P.COMPLETED):
            values["late"] = True
        if payment.failure_reason is not None:
            values["failure_reason"] = None  # "not approved in time" no longer holds (the audit log keeps it)
        if payment.mismatch_detail == UNCONFIRMED_FLAG:
            values.update(mismatch=False, mismatch_detail=None)  # the outcome is known now (late says the rest)
        expected = Money(payment.amount_minor, payment.currency)
        if amount is not None and amount != expected:
            values["mismatch"] = True
            values["mismatch_detail"] = f"provider reported {amount}, expected {expected}"
            # Another currency, or a negative amount (a reversal's sign, the provider's bug): nothing we can count or
            # refund automatically (a negative one would be subtracted from what other payments collected); a person
            # must look.
            values["collected_minor"] = max(amount.minor, 0) if amount.currency == expected.currency else 0
            await record(session, actor=actor, action="payment.amount_mismatch", entity_type="payment",
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
            said = await _flag_held_twice(session, payment, held, holder, actor=actor,
                                          collected=values.get("collected_minor", payment.collected_minor))
            earlier = values.get("mismatch_detail", payment.mismatch_detail if payment.mismatch else None)
            values.update(mismatch=True, mismatch_detail=add_flag(earlier, said))
        result = "late_completed" if values.get("late") else "completed"
        # The receipt, the webhook event and the stored callback's outcome are written with the move.
        # Late (after a cancel or a timeout), the payer was told it failed and to pay again: her receipt says the
        # money was taken after all, so that she does not.
        notices = _notices(rt, _Moved(payment, {"status": P.COMPLETED.value, **values}),
                           "payment_late_receipt" if values.get("late") else "payment_receipt", "payment.completed")
        if counted_there:
            # Her money is the other payment's (its receipt is hers): no second receipt for one payment. The
            # cooperative's system is told (payment.completed, flagged, collected 0).
            notices = [job for job in notices if job.kind != "sms.send"]
        await transition(session, PAYMENT, payment.id, current, P.COMPLETED, actor=actor, values=values,
                         jobs=notices, alongside=settle.write(result) if settle else None)
        if settle is not None:
            settle.moved()
        metrics.PAYMENTS.labels(status="COMPLETED", method=payment.method).inc()
        return result
    target, template, event_type = _FAILED_TARGET[outcome]
    if current not in OPEN:
        return "ignored_final"
    result = target.value.lower()
    values = {"failure_reason": (reason or outcome.value.lower())[:200], "updated_at": changed_at(payment.updated_at)}
    if reason == UNCONFIRMED:
        template = "payment_unconfirmed"
        values.update(mismatch=True, mismatch_detail=UNCONFIRMED_FLAG)
    await transition(session, PAYMENT, payment.id, current, target, actor=actor, values=values, audit=audit,
                     jobs=_notices(rt, _Moved(payment, {"status": target.value, **values}), template, event_type),
                     alongside=settle.write(result) if settle else None)
    if settle is not None:
        settle.moved()
    metrics.PAYMENTS.labels(status=target.value, method=payment.method).inc()
    return result


def _by_transaction(event: ProviderEventData) -> bool:
    """The callback names the provider's id for the payment (saved as provider_transaction_id), not ours."""
    return event.raw.get("lookup") == "provider_transaction_id"


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
    # holding it takes: _held_elsewhere) is taken in the statement that locks the payment, one round trip fewer.
    id_lock = txn if outcome is ProviderOutcome.SUCCEEDED and txn and txn != provisional else None
    for _ in range(3):
        try:
            async with rt.sessionmaker.begin() as session:
                stored = {"id": str(uuid.uuid4()), "provider": event.provider, "event_id": event.event_id[:200],
                          "kind": event.kind.value, "status": outcome.value, "payload": payload,
                          "received_at": utcnow()}
                event_row_id, payment, id_locked = await _store_event_and_lock(session, event, stored, found, id_lock)
                if event_row_id is None:
                    return "duplicate"
                if payment is not None and _names_another_request(rt, payment, txn):
                    payment = None  # kept for a person below, as a callback naming no payment of ours is
                if payment is not None:
                    # (Not a voided recording's: its ids were released for the right line, and it takes none back.)
                    if (adopted is not None and payment.provider_transaction_id is None
                            and payment.status != P.VOIDED.value):
                        await _adopt_transaction_id(session, payment, adopted)
                    if (query_error is not None and event.outcome is ProviderOutcome.SUCCEEDED
                            and unconfirmed_success_over(payment)):
                        return await _flag_unconfirmed_success(session, payment, event, query_error, actor=actor,
                                                               event_row_id=event_row_id)
                    if outcome is ProviderOutcome.SUCCEEDED and holds_money(payment):
                        second = await _second_payment(session, payment, payload, event_row_id)
                        if second is not None:
                            return await _flag_paid_twice(session, payment, second, amount, actor=actor,
                                                          event_row_id=event_row_id)
                    return await apply_collection_outcome(session, rt, payment, outcome, actor=actor,
                                                          amount=amount, provider_transaction_id=txn,
                                                          reason=reason, event_row_id=event_row_id,
                                                          provisional_transaction_id=provisional,
                                                          occurred_at=occurred,
                                                          id_locked=id_locked)
                await keep_unmatched(session, event_row_id, event)
        except StaleTransition:
            continue  # the row moved under us (a poll or a parallel callback): re-read and re-apply
        report_unmatched(event)  # once stored: a store that failed is sent again by the provider
        return UNMATCHED
    return "conflict"


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
                                 actor: Actor) -> None:
    """A completed payment takes the provider's final id (a receipt number), audited."""
    before = payment.provider_transaction_id
    table = table_of(Payment)
    same = (table.c.provider_transaction_id.is_(None) if before is None
            else table.c.provider_transaction_id == before)
    await session.execute(update(table).where(table.c.id == payment.id, same)
                          .values(provider_transaction_id=transaction_id, updated_at=utcnow()))
    set_committed_value(payment, "provider_transaction_id", transaction_id)
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
    session: AsyncSession, event: ProviderEventData, stored: dict[str, Any], found: Payment | None = None,
    id_lock: str | None = None,
) -> tuple[str | None, Payment | None, str | None]:
    """Store the callback once and lock its payment: (the stored row's id or None for a duplicate, the
    payment or None, the transaction id locked or None). On PostgreSQL one statement: WITH e AS (INSERT ... ON
    CONFLICT DO NOTHING RETURNING id) SELECT payment, (SELECT id FROM e) ... FOR UPDATE OF payments.

    `found`: the payment a confirmation already identified; it is locked by our reference.
    `id_lock`: a provider transaction id whose lock (_ID_LOCK) the same statement takes once the payment's row is
    locked (PostgreSQL, a payment found: else none is taken and None is returned for it)."""
    by_transaction = _by_transaction(event) if found is None else False
    reference = event.reference if found is None else found.provider_reference
    if session.get_bind().dialect.name != "postgresql":
        stmt = row_insert(session.get_bind().dialect.name, ProviderEvent, ignore_conflict=("provider", "event_id"),
                          returning="id")
        event_row_id = (await session.execute(stmt, stored)).scalar_one_or_none()
        if event_row_id is None:
            return None, None, None
        return event_row_id, await _find_payment(session, event, lock=True, by_transaction=by_transaction,
                                                 reference=reference), None
    params = {f"e_{k}": v for k, v in stored.items()}
    params.update(provider=event.provider, reference=reference)
    if id_lock is not None:
        params["id_key"] = _id_lock_key(event.provider, id_lock)
    row = (await session.execute(stored_and_locked(by_transaction, id_lock is not None), params)).first()
    if row is not None:
        # (A duplicate's statement took the id's lock too: it is held to the rollback, which follows at once.)
        return (row[1], row[0], id_lock) if row[1] is not None else (None, None, None)
    # No such payment: the event row (if it is new) is found by its id, which only this call knows.
    event_row_id = (await session.execute(select(ProviderEvent.id).where(ProviderEvent.id == stored["id"])
                                          )).scalar_one_or_none()
    return event_row_id, None, None


_SET_OUTCOME = (update(table_of(ProviderEvent))
                .where(table_of(ProviderEvent).c.id == bindparam("b_id"))
                .values(outcome=bindparam("b_outcome"), payment_id=bindparam("b_payment_id")))


async def _set_outcome(session: AsyncSession, event_row_id: str, outcome: str, payment_id: str | None) -> None:
    # One UPDATE built once: loading the row just inserted to change two columns cost a SELECT and a flush.
    params = {"b_id": event_row_id, "b_outcome": outcome, "b_payment_id": payment_id}
    if session.get_bind().dialect.name == "postgresql" and await pgraw.in_transaction(session):
        await pgraw.fetchrow(session, pgraw.compiled(_SET_OUTCOME), params)
    else:
        await session.execute(_SET_OUTCOME, params)


# What a callback for no payment (or refund) of ours keeps of its body: anyone who can reach the callback URL can
# send one.
UNMATCHED_PAYLOAD_BYTES = 2048
# The outcome of a stored callback that matched no payment, and of one a person has since accounted for
# (resolve_unmatched); the same for a refund callback that matched no refund (core.refunds). core.retention and
# admin_api.provider_callbacks name them too.
UNMATCHED = "unknown_payment"
UNMATCHED_RESOLVED = "unknown_payment_resolved"
UNMATCHED_REFUND = "unknown_refund"
UNMATCHED_REFUND_RESOLVED = "unknown_refund_resolved"
UNMATCHED_OF = {EventKind.COLLECTION: UNMATCHED, EventKind.REFUND: UNMATCHED_REFUND}
RESOLVED_OF = {UNMATCHED: UNMATCHED_RESOLVED, UNMATCHED_REFUND: UNMATCHED_REFUND_RESOLVED}
# Where a resolved one keeps its note, beside the provider's body (as KEPT_TRANSACTION_ID is kept).
RESOLUTION = "gatewayResolution"
# Where one keeps the reference of ours it named (_our_reference), beside the body: the request a collection's
# callback answers, which a payment recorded for its money takes (record_payment), and an MTN refund names.
CALLBACK_REFERENCE = "gatewayReference"


def _our_reference(event: ProviderEventData) -> str | None:
    """The reference of ours (our request id at the provider) a callback named: its reference, or, for one the
    provider names by its own transaction id (M-Pesa), the one the adapter read from the callback's URL."""
    ours = event.raw.get("provider_reference") if _by_transaction(event) else event.reference
    return ours if isinstance(ours, str) and is_uuid(ours) else None


def _kept_unmatched(event: ProviderEventData) -> dict[str, Any]:
    """What a callback that matched nothing keeps: its body bounded, and the reference of ours it named."""
    kept = bounded_body(dict(event.raw))
    ours = _our_reference(event)
    if ours is not None:
        kept[CALLBACK_REFERENCE] = ours.lower()
    return kept


def bounded_body(raw: dict[str, Any]) -> dict[str, Any]:
    """The body of a callback that matched no payment or refund, if small; else its size and digest (enough to
    match it with the provider's records, not 64 KiB a request kept for ever)."""
    body = json.dumps(raw, sort_keys=True, default=str).encode()
    if len(body) <= UNMATCHED_PAYLOAD_BYTES:
        return dict(raw)
    return {"truncated": {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}}


async def store_unmatched(rt: Runtime, event: ProviderEventData) -> str:
    """An unsigned callback naming no payment (or refund) of ours: kept unconfirmed (there is nothing to ask the
    provider about), its body bounded. Returns its outcome (UNMATCHED_OF), or "duplicate"."""
    outcome = UNMATCHED_OF[event.kind]
    async with rt.sessionmaker.begin() as session:
        stored = (await session.execute(
            insert_ignore(session.get_bind().dialect.name, ProviderEvent)
            .values(id=str(uuid.uuid4()), provider=event.provider, event_id=event.event_id[:200],
                    kind=event.kind.value, status=event.outcome.value, payload=_kept_unmatched(event),
                    outcome=outcome, received_at=utcnow())
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(ProviderEvent.id))).scalar_one_or_none()
    if stored is None:
        return "duplicate"  # a copy sent at the same moment was stored (and reported) first
    report_unmatched(event)
    return outcome


async def keep_unmatched(session: AsyncSession, event_row_id: str, event: ProviderEventData) -> None:
    """A callback just stored (whole, before its payment or refund was looked for) that matched none: its outcome
    (UNMATCHED_OF) and its body bounded, as store_unmatched keeps an unsigned one. Report it (report_unmatched)
    once the transaction has committed."""
    table = table_of(ProviderEvent)
    await session.execute(update(table).where(table.c.id == event_row_id)
                          .values(outcome=UNMATCHED_OF[event.kind], payload=_kept_unmatched(event)))


_UNMATCHED_LOG = {EventKind.COLLECTION: log, EventKind.REFUND: logging.getLogger("gateway.refunds")}
# What report_unmatched says, by the callback's kind and whether it says money moved (logged ERROR) or not.
_UNMATCHED_SAYS = {
    (EventKind.COLLECTION, True): "provider says money was taken for a payment the gateway does not have: check the "
                                  "provider's statement (GET /v1/provider-callbacks?unmatched=true&resolved=false)",
    (EventKind.COLLECTION, False): "provider callback for a payment the gateway does not have",
    (EventKind.REFUND, True): "provider says a refund was paid out that the gateway does not have: money left the "
                              "cooperative's account; check the provider's statement "
                              "(GET /v1/provider-callbacks?unmatched=true&kind=refund&resolved=false)",
    (EventKind.REFUND, False): "provider callback for a refund the gateway does not have",
}


def report_unmatched(event: ProviderEventData) -> None:
    """Say that a callback matched no payment or refund: the counter gateway_callbacks_unmatched_total (by kind),
    and a log line at ERROR when it says money moved, WARNING otherwise. A collection SUCCEEDED: a member's money
    was taken at the provider with no payment of ours to credit (after PostgreSQL was restored to an earlier point,
    say); a refund SUCCEEDED: money left the cooperative's account to a member with no refund of ours to account
    for it. The provider's ids only, never the payer's number (the body, kept on the row, may hold it). A person
    lists and resolves them over the API (GET /v1/provider-callbacks, admin_api.provider_callbacks); `main.py
    prune` keeps an unresolved one under which money may have moved (SUCCEEDED, AMBIGUOUS, PENDING) whatever its
    age (core.retention)."""
    metrics.CALLBACKS_UNMATCHED.labels(provider=event.provider, kind=event.kind.value,
                                       outcome=event.outcome.value).inc()
    fields = {"provider": event.provider, "kind": event.kind.value, "event_id": event.event_id[:200],
              "reference": event.reference[:128],
              "provider_transaction_id": (event.provider_transaction_id or "")[:128] or None,
              "outcome": event.outcome.value, "confirmed": not event.needs_confirmation}
    moved = event.outcome is ProviderOutcome.SUCCEEDED
    _UNMATCHED_LOG[event.kind].log(logging.ERROR if moved else logging.WARNING,
                                   _UNMATCHED_SAYS[event.kind, moved], extra=fields)


async def resolve_unmatched(session: AsyncSession, event_row_id: str, note: str, *, actor: Actor,
                            payment_id: str | None = None) -> ProviderEvent:
    """A person accounts for a callback that matched no payment (credited by hand, refunded by the provider,
    a test) or no refund (the payout entered in the books, recovered from the member): its outcome moves from
    UNMATCHED to UNMATCHED_RESOLVED (UNMATCHED_REFUND to UNMATCHED_REFUND_RESOLVED), the note is kept with it
    (RESOLUTION, next to the provider's body) and in the audit log. NotFound for a row that is not such a callback;
    Conflict once resolved (the first note stands).

    `payment_id`: the payment recorded for its money (record_payment), kept with the note. The callback itself stays
    without a payment (payment_id): it is still listed with the unmatched ones, resolved."""
    note = admin_note(note, "how the callback was accounted for, e.g. what the provider's statement shows")
    row = (await session.execute(
        select(ProviderEvent).where(ProviderEvent.id == event_row_id, ProviderEvent.payment_id.is_(None),
                                    ProviderEvent.outcome.in_((*RESOLVED_OF, *RESOLVED_OF.values())))
        .with_for_update())).scalar_one_or_none()
    if row is None:
        raise NotFound("provider callback not found")
    before = row.outcome
    if before not in RESOLVED_OF:
        raise Conflict("provider callback is resolved already", field="outcome")
    after = RESOLVED_OF[before]
    at = utcnow()
    payload = dict(row.payload) if isinstance(row.payload, dict) else {"body": row.payload}
    resolution = {"note": note, "by": actor.id, "at": iso_z(at)}
    if payment_id is not None:
        resolution["paymentId"] = payment_id
    payload[RESOLUTION] = resolution
    table = table_of(ProviderEvent)
    await session.execute(update(table).where(table.c.id == row.id, table.c.outcome == before)
                          .values(outcome=after, payload=payload))
    await record(session, actor=actor, action="provider_callback.resolved", entity_type="provider_event",
                 entity_id=row.id, before={"outcome": before},
                 after={"outcome": after, "note": note, "provider": row.provider, "kind": row.kind,
                        "eventId": row.event_id, "status": row.status, "paymentId": payment_id})
    await session.flush()
    await session.refresh(row)
    return row


async def _locked_payment(session: AsyncSession, payment_id: str, cooperative_id: str | None) -> Payment:
    """The payment's row, locked for the rest of the transaction, of `cooperative_id` (None: any cooperative's, a
    super admin); NotFound as a missing one otherwise (an admin's act on a payment: review, cancel, an outcome)."""
    payment = await lock_row(session, Payment, payment_id, cooperative_id)
    if payment is None:
        raise NotFound("payment not found")
    return payment


async def review_flags(session: AsyncSession, payment_id: str, cooperative_id: str | None, note: str, *,
                       actor: Actor) -> Payment:
    """A person checked a flagged payment (`mismatch`: another amount taken, money taken after a failure, a provider
    transaction id held twice, a refund contradicted, the outcome never confirmed...) against the provider's
    statement and dealt with it: the flag is cleared so that the flagged lists (GET /v1/payments?mismatch=true, the
    reconciliation's `flagged`) show what is still to do. What it said moves to the payment's review
    (`reviewed_detail`, with who, when and the note; the audit log keeps every review), so its JSON still says it
    was flagged and why.

    Under the payment's lock, read fresh, as every flag is written under it: the review clears the flags written
    before it, and a flag written after it (a new provider event) sets `mismatch` again with only what it says
    (`mismatch_detail` is empty from here). Nothing else changes: no money figure (collected, refunded: refunds are
    capped by what was collected, never by the flag), no status, no webhook event (the flag's events told the
    cooperative's system of the money; the payment sync lists the change by its updatedAt). NotFound for no such
    payment of `cooperative_id` (None: any cooperative's, a super admin); Conflict for a payment not flagged."""
    note = admin_note(note, "what was checked and done, e.g. what the provider's statement shows")
    payment = await _locked_payment(session, payment_id, cooperative_id)
    if not payment.mismatch:
        last = (f": its last flags were reviewed at {iso_z(payment.reviewed_at)}" if payment.reviewed_at is not None
                else "")
        raise Conflict(f"payment is not flagged (mismatch is false), so there is nothing to review{last}",
                       field="mismatch")
    detail = payment.mismatch_detail
    at = changed_at(payment.updated_at)  # the sync's cursor and the webhook events order by it
    await record(session, actor=actor, action="payment.reviewed", entity_type="payment", entity_id=payment.id,
                 before={"mismatch": True, "mismatchDetail": detail},
                 after={"mismatch": False, "mismatchDetail": None, "reviewedDetail": detail, "note": note,
                        "reviewedAt": iso_z(at)},
                 cooperative_id=payment.cooperative_id)
    payment.mismatch, payment.mismatch_detail = False, None
    payment.reviewed_detail, payment.reviewed_by, payment.reviewed_at, payment.review_note = (
        detail, actor.id, at, note)
    payment.updated_at = at
    await session.flush()
    return payment


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
        why = ("the provider said it failed; a final payment is not reopened" if current is P.FAILED
               else f"its recording was voided; {_AFTER_VOID}" if current is P.VOIDED
               else "its money is recorded already")
        raise Conflict(f"payment is {current.value}: {why}", code=INVALID_STATE)
    if amount is not None:
        if amount.currency != payment.currency:
            raise ValidationError(f"amount must be in {payment.currency}", field="amount")
        if not amount.is_positive():
            raise ValidationError("amount must be a positive number", field="amount")
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


async def _lock_transaction_id(session: AsyncSession, provider: str, txn: str) -> None:
    """Two recordings of one transaction id at once take turns (transaction_id_free): on PostgreSQL a lock on the id
    for the rest of the transaction, as core.refunds takes for a reversal; the embedded
    default has one writer at a time."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_ID_LOCK, {"key": _id_lock_key(provider, txn)})


async def transaction_id_free(session: AsyncSession, provider: str, txn: str, cooperative_id: str, *,
                              exclude: str | None = None) -> None:
    """A Conflict when a payment of `provider` (other than `exclude`) holds `txn` as its transaction id: a line of the
    provider's statement is money taken once, credited on one payment (recorded on two, it is counted twice in the
    reconciliation's `settled` and could be refunded twice). Another cooperative's payment is not named. The caller
    holds the id's lock (_lock_transaction_id), so that two recordings of it take turns."""
    held = await _holder(session, provider, txn, exclude)
    if held is not None:
        where = f"by payment {held.reference}" if held.cooperative_id == cooperative_id \
            else "by another cooperative's payment"
        raise Conflict(f"providerTransactionId {txn} is held already {where} of this provider: a statement line is "
                       "recorded once (check the id on the statement)", field="providerTransactionId",
                       code=DUPLICATE_REFERENCE)


@dataclass(frozen=True)
class _Holder:
    """The payment that holds a provider's transaction id (_holder)."""

    id: str
    reference: str
    cooperative_id: str


# _holder's probe and the id's lock (_lock_transaction_id's key), built once: a completion runs them straight on
# asyncpg in its transaction (pgraw: through the session, their two round trips cost more CPU than the rest of a
# callback's statements together).
_HOLDER = (select(Payment.id, Payment.reference, Payment.cooperative_id)
           .where(Payment.provider == bindparam("provider"), Payment.provider_transaction_id == bindparam("txn"),
                  Payment.id != bindparam("exclude"))
           .order_by(Payment.created_at, Payment.id).limit(1))
_ID_LOCK = select(func.pg_advisory_xact_lock(func.hashtext(bindparam("key", type_=String))))


def _id_lock_key(provider: str, txn: str) -> str:
    return f"collected:{provider}:{txn}"


async def _holder(session: AsyncSession, provider: str, txn: str, exclude: str | None) -> _Holder | None:
    """The payment of `provider` other than `exclude` that holds `txn` as its transaction id, or None: one probe of
    ix_payments_transaction_id."""
    row = (await session.execute(_HOLDER, {"provider": provider, "txn": txn, "exclude": exclude or ""})).first()
    return None if row is None else _Holder(*row)


def _locked(settle: _Settle | None) -> str | None:
    return None if settle is None else settle.id_locked


async def _held_elsewhere(session: AsyncSession, payment: Payment, txn: str,
                          locked: str | None = None) -> _Holder | None:
    """The other payment of `payment`'s provider that holds `txn` already (_holder), as `payment` completes with it
    (or is reported paid after a failure): one index probe per completion. Under the id's lock (_lock_transaction_id,
    held to the commit, as a statement line's recording takes it): two completions of one id at once take turns,
    and the second's probe (its own snapshot, READ COMMITTED) sees the first's payment, so that one of them is
    flagged; the payment's row lock, taken before, is never waited for under this one (nothing takes them in the
    other order: a recording takes the id's lock, then only inserts its payment). `locked`: the id whose lock the
    transaction took already (with the payment's row: _store_event_and_lock), not taken again."""
    if session.get_bind().dialect.name == "postgresql" and await pgraw.in_transaction(session):
        if txn != locked:
            await pgraw.fetchrow(session, pgraw.compiled(_ID_LOCK), {"key": _id_lock_key(payment.provider, txn)})
        row = await pgraw.fetchrow(session, pgraw.compiled(_HOLDER),
                                   {"provider": payment.provider, "txn": txn, "exclude": payment.id})
        return None if row is None else _Holder(*row)
    await _lock_transaction_id(session, payment.provider, txn)
    return await _holder(session, payment.provider, txn, payment.id)


async def held_by_another_cooperative(session: AsyncSession, payment: Payment, txn: str) -> bool:
    """Whether a payment of another cooperative than `payment`'s holds `txn` as its transaction id at `payment`'s
    provider (a contested id, _contest): one probe of ix_payments_transaction_id."""
    return (await session.execute(
        select(Payment.id).where(Payment.provider == payment.provider, Payment.provider_transaction_id == txn,
                                 Payment.cooperative_id != payment.cooperative_id).limit(1))).first() is not None


def _same_money(payment: Payment, holder: _Holder) -> bool:
    """Whether `holder`'s recording of the transaction id `payment` completes with is taken for the same money, counted
    there and not on `payment` (_flag_held_twice): only within one cooperative (a restore's recording and the retry
    of the payment it lost). A transaction id names one payment of one cooperative (the provider accounts are the
    deployment's): another cooperative's recording of it (an admin's typo, or a guess) never moves this payment's
    money, its receipt or its reconciliation; both are flagged for a person (_contest)."""
    return holder.cooperative_id == payment.cooperative_id


async def _flag_held_twice(session: AsyncSession, payment: Payment, txn: str, holder: _Holder, *, actor: Actor,
                           collected: int | None) -> str:
    """Audit (payment.transaction_id_held_twice) and log a payment recording the provider's transaction `txn` that
    `holder` (_holder) holds already: the same money recorded on two payments (after a restore, the retry of a lost
    payment completing with the id an admin recorded from the statement). `collected`: the collected_minor this
    payment is left holding (0: the money is counted on `holder` only; None: the amount asked). Returns the flag's
    text, naming the other payment only within the cooperative (as transaction_id_free does); another cooperative's
    holder is told in its own cooperative (_contest)."""
    ours = _same_money(payment, holder)
    await record(session, actor=actor, action="payment.transaction_id_held_twice", entity_type="payment",
                 entity_id=payment.id, before={"status": payment.status},
                 after={"providerTransactionId": txn, "heldBy": holder.reference if ours else None,
                        "heldById": holder.id if ours else None, "collected": collected},
                 cooperative_id=payment.cooperative_id)
    log.error("a provider's transaction id is held by two payments: the same money recorded twice? (flagged)",
              extra={"payment_id": payment.id, "held_by": holder.id, "provider": payment.provider,
                     "provider_transaction_id": txn[:128]})
    if not ours:
        await _contest(session, holder, txn, actor=actor)
        return _contested_detail(txn, "counted here")
    where = "counted there, not here" if collected == 0 else "check the statement before refunding either"
    return f"provider transaction {txn[:64]} is held by payment {holder.reference} too: the same money recorded " \
           f"twice? {where}"


def _contested_detail(txn: str, counted: str) -> str:
    """The flag of a payment whose provider transaction id another cooperative's payment holds too (_contest): which
    cooperative's money it is, only the provider's statement says; the other is never named. `counted`: where the
    money is counted meanwhile, as this cooperative's reconciliation sees it."""
    return f"provider transaction {txn[:64]} is recorded by another cooperative's payment too: {counted}; check " \
           "the provider's statement for whose money it is"


# The outbox job that flags the payment of another cooperative holding a transaction id a completion brings
# (_contest), run by the worker (core.jobs) in its own transaction.
CONTESTED_JOB = "payment.contested"


async def _contest(session: AsyncSession, holder: _Holder, txn: str, *, actor: Actor) -> None:
    """Tell `holder`'s cooperative that a payment of another cooperative completed with the transaction id its
    payment holds (a recording from the statement of what may be the other's money): audited there
    (payment.transaction_id_contested, naming no other cooperative), and its payment flagged for a person by a job
    (CONTESTED_JOB, flag_contested). Not flagged here: this transaction holds the id's lock
    (_lock_transaction_id), and taking the holder's row lock under it could deadlock with that payment's own
    completion or refund, which take its row lock first (see _held_elsewhere). One job per holder and id. The row's
    actor is the provider or the gateway: a person of the other cooperative (an admin replaying its callback) is not
    named there either."""
    if actor.id != "system" and not actor.id.startswith("provider:"):
        actor = Actor.system(actor.channel)
    await record(session, actor=actor, action="payment.transaction_id_contested", entity_type="payment",
                 entity_id=holder.id, after={"providerTransactionId": txn}, cooperative_id=holder.cooperative_id)
    digest = hashlib.sha256(txn.encode()).hexdigest()[:16]
    await enqueue_many(session, [NewJob(CONTESTED_JOB, {"payment_id": holder.id, "provider_transaction_id": txn},
                                        dedupe_key=f"{CONTESTED_JOB}:{holder.id}:{digest}",
                                        cooperative_id=holder.cooperative_id)])


async def flag_contested(session: AsyncSession, payment_id: str, txn: str) -> None:
    """The worker's half of _contest: flag (mismatch) the payment that holds `txn` another cooperative's payment
    completed with, under its row lock alone (in the job's own transaction: no id's lock held). Nothing when it no
    longer holds the id, or says so already (a repeat of the job)."""
    payment = await lock_row(session, Payment, payment_id)
    if payment is None or payment.provider_transaction_id != txn:
        return
    said = _contested_detail(txn, "counted here too")
    if (payment.mismatch and said in (payment.mismatch_detail or "")) or said in (payment.reviewed_detail or ""):
        # A repeat: flagged already, or flagged and reviewed since (the job's dedupe key makes one job per holder
        # and id, so a second run is always the same contest).
        return
    payment.mismatch = True
    payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
    payment.updated_at = changed_at(payment.updated_at)
    log.warning("a payment's provider transaction id was reported for another cooperative's payment too (flagged)",
                extra={"payment_id": payment.id, "provider": payment.provider})


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


async def _reference_holder(session: AsyncSession, provider: str, reference: str) -> Any:
    """The payment (reference, cooperative_id) holding `reference` as its request id at `provider`, or None: one
    probe of the (provider, provider_reference) unique index."""
    return (await session.execute(
        select(Payment.reference, Payment.cooperative_id)
        .where(Payment.provider == provider, Payment.provider_reference == reference))).first()


async def _request_free(session: AsyncSession, provider: str, reference: str, cooperative_id: str) -> None:
    """A Conflict when a payment of `provider` holds `reference` as its provider reference ((provider, provider
    reference) is unique): that request's money is on that payment. Another cooperative's payment is not named."""
    held = await _reference_holder(session, provider, reference)
    if held is not None:
        where = f"by payment {held.reference}" if held.cooperative_id == cooperative_id \
            else "by another cooperative's payment"
        raise Conflict(f"gatewayReference {reference} is held already {where}: that request's money is recorded "
                       "(check it against the provider's statement)", field="gatewayReference",
                       code=DUPLICATE_REFERENCE)


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
    await _request_free(session, provider, reference, coop_id)
    payment.provider_reference = reference
    payment.updated_at = changed_at(payment.updated_at)  # changed: a cooperative's sync lists it again
    try:
        await session.flush()
    except IntegrityError as exc:
        if "provider_reference" not in str(exc.orig):
            raise
        await session.rollback()
        await _request_free(session, provider, reference, coop_id)
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

    Refused: what create_payment refuses for the same fields, a statement time in the future or older than
    RECORDED_PAYMENT_MAX_AGE_DAYS (check_recorded_age), a transaction id a payment of the provider holds
    (transaction_id_free), a reference or an id taken or malformed, and a callback that is not a money-taken
    collection of this provider still unresolved. Without a reference, a new one dated the day the money was taken
    in the cooperative's time zone, as the payment is (its created_at): the member's receipt and the USSD "My
    payments" show that day, not the day it was recorded."""
    new = line.payment
    key = _check_key(new.idempotency_key)
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
    guess = payer_index_guess(rt.cipher, new.method, new.account) if new.account and _found_by_account(new) else None
    context = await load_context(session, new.cooperative_id, new.payment_type_id, new.member_id, payer_index=guess)
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
    if account is None:
        account, account_refused = _normalise_account(new.method, await _members_number(session, rt, new),
                                                       coop.country)
        if account_refused is not None:
            raise ValidationError(f"{account_refused.message} (the member's registered number): give "
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
    member_id = new.member_id
    account_index = rt.cipher.blind_index(account)
    if _found_by_account(new):
        member_id = await paying_member(session, context, coop.id, account_index)
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
        "payment_url": None, "payment_account_enc": rt.cipher.encrypt(account, context=account_context(coop.id)),
        "payment_account_index": account_index, "payment_account_masked": _mask_account(account),
        "idempotency_key": key, "request_hash": keyed_request_hash(rt.cipher, digest),
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
    payment = _persistent(session, Payment(**values))
    await _audit_recorded(session, payment, line, note, actor)
    await enqueue_many(session, _recorded_notices(rt, payment, line.send_receipt))
    if line.callback_id is not None:
        await resolve_unmatched(session, line.callback_id, note, actor=actor, payment_id=payment.id)
    return payment, True


async def _members_number(session: AsyncSession, rt: Runtime, new: NewPayment) -> str:
    """The paying account of a recorded payment that names only its member: her registered number, for a wallet
    method (a bank account is never a member's)."""
    from core.members import member_phone

    if new.method not in METHOD_OPERATOR:
        raise ValidationError(f"paymentAccount is required for {new.method}: the account the statement shows",
                              field="paymentAccount")
    member = await session.get(Member, new.member_id)
    if member is None or member.phone_enc is None:
        raise ValidationError("paymentAccount is required: the member has no registered number",
                              field="paymentAccount")
    return member_phone(rt.cipher, member).e164


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
    """payment.recorded (the statement line and the admin's note), then payment.completed, which every payment's
    completion writes (the reconciliation reads when a completion was recorded from it: core.reports)."""
    money = {"amount": payment.amount_minor, "currency": payment.currency, "method": payment.method,
             "providerTransactionId": payment.provider_transaction_id, "completedAt": iso_z(payment.completed_at)}
    await record(session, actor=actor, action="payment.recorded", entity_type="payment", entity_id=payment.id,
                 after={"status": P.COMPLETED.value, "reference": payment.reference, "note": note, **money,
                        "callbackId": line.callback_id, "sendReceipt": line.send_receipt,
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
    metrics.PAYMENTS.labels(status=P.VOIDED.value, method=payment.method).inc()
    log.warning("a recording of money taken voided by its cooperative",
                extra={"payment": payment.reference, "payment_id": payment.id, "actor": actor.id})
    await session.flush()
    await session.refresh(payment)
    return payment


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
    repeat = said in (payment.mismatch_detail or "") or said in (payment.reviewed_detail or "")
    await record(session, actor=actor, action="payment.success_after_void", entity_type="payment",
                 entity_id=payment.id, before={"status": payment.status, "mismatch": payment.mismatch},
                 after={"providerTransactionId": provider_transaction_id,
                        "mismatch": bool(payment.mismatch) or not repeat,
                        "amount": None if amount is None else amount.minor,
                        "currency": None if amount is None else amount.currency},
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
