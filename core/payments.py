"""Payments: creation with idempotency and its refusals, the context one is made in, shared lookups."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

import phonenumbers
from phonenumbers import carrier
from sqlalchemy import BigInteger, String, and_, bindparam, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import aliased, configure_mappers, make_transient_to_detached
from sqlalchemy.orm.instrumentation import manager_of_class

from core import metrics, pgraw
from core.audit import Actor, phone_changes, record
from core.cooperatives import zone_of
from core.db import ADVISORY_XACT_LOCK, iso_z, lock_row, row_insert, serialise_on_sqlite, table_of, utcnow
from core.errors import (
    IDEMPOTENCY_KEY_IN_FLIGHT,
    IDEMPOTENCY_KEY_REUSED,
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
from core.models import AuditEvent, Member, Payment, PaymentType
from core.money import Money
from core.notify import changed_at
from core.outbox import NewJob, enqueue_job, enqueue_many
from core.payment_statements import CONTEXT, create_statement
from core.phone import Phone, PhoneError, normalize, operator_of
from core.ports import ProviderEvent as ProviderEventData
from core.ports import amount_refusal, refusal_for
from core.references import next_reference, reference_prefix
from core.state.machine import _attr_keys
from core.state.payment import PaymentStatus
from core.text import admin_note

if TYPE_CHECKING:
    from core.crypto import PiiCipher
    from core.runtime import Runtime

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


def same_request(cipher: PiiCipher, stored: str, digest: str) -> bool:
    """Whether a payment's stored request hash is of this request's digest: keyed, or a plain one of a row
    written before the hash was keyed and not rewritten yet."""
    if stored.startswith(REQUEST_HASH_VERSION):
        return stored == keyed_request_hash(cipher, digest)
    return stored == digest


# An idempotency key's longest (payments.idempotency_key).
KEY_SIZE = 128


def check_idempotency_key(key: str) -> str:
    """A request's idempotency key, stripped, or a ValidationError: a payment's, a recorded payment's, a dispute's."""
    key = (key or "").strip()
    if not 8 <= len(key) <= KEY_SIZE or not key.isprintable():
        raise ValidationError("idempotencyKey must be 8 to 128 printable characters", field="idempotencyKey")
    return key


# Where an API payment is made on PostgreSQL: a Core connection in autocommit (core.db.autocommit), no ORM session
# (admin_api.payments.initiate_payment: its statements were raw already, each atomic alone, and the session around
# them, its checkout, commit and close, cost more CPU than any of them). Elsewhere, and for USSD, a session.
Db = AsyncSession | AsyncConnection

# The cooperative's payment under a key, every column in the table's order (a replay's read on a Core connection).
_BY_KEY = select(*table_of(Payment).c).where(table_of(Payment).c.cooperative_id == bindparam("coop_id", type_=String),
                                             table_of(Payment).c.idempotency_key == bindparam("key", type_=String))


async def find_by_key(session: Db, cooperative_id: str, key: str) -> Payment | None:
    """The cooperative's payment made with idempotency key `key`, if any. On a Core connection (PostgreSQL) one raw
    SELECT in autocommit, the payment built detached as a load builds it (_loaded): no session, no BEGIN and COMMIT
    around the read."""
    if isinstance(session, AsyncConnection):
        row = await pgraw.fetchrow(session, pgraw.compiled(_BY_KEY), {"coop_id": cooperative_id, "key": key})
        return None if row is None else _loaded(dict(zip(_attr_keys(Payment), row, strict=True)))
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
    if existing.request_hash and not same_request(cipher, existing.request_hash, digest):
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


async def create_payment(session: Db, rt: Runtime, new: NewPayment, *, actor: Actor,
                         context: PaymentContext | None = None) -> tuple[Payment, bool]:
    """Create a PENDING payment and queue its collection; a replayed key returns the first payment.

    The provider reference (a UUID) is on the row before the provider is ever called, so every
    retry of the collection reuses it; an API request's is derived from its key (derived_provider_reference), so
    the same request sent again after a restore lost its payment reuses it too. On PostgreSQL the payment, its
    audit row and both outbox jobs are one statement; a replayed key is found by the INSERT's conflict, not by a
    SELECT before it.
    `context`: the cooperative, type and member as load_context read them, when the caller already did (with
    payer_index_guess's index when `new.member_from_account`: the paying member is then found in that read).
    `session`: on PostgreSQL it may be a Core connection in autocommit (core.db.autocommit: an API payment, Db): the
    same statements run on it, the payment comes back detached, and the rare checks that read through the ORM (a due
    date's type, a balance) get a session on that connection for their read (pgraw.orm).
    """
    key = check_idempotency_key(new.idempotency_key)
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
        async with pgraw.orm(session) as orm:
            refused = await _due_date_refusal(orm, coop, ptype, new.due_date)
    if refused is None and amount.minor != ptype.amount_minor and amount.minor == new.balance_minor:
        async with pgraw.orm(session) as orm:
            refused = await _balance_refusal(orm, rt, new, coop, amount, open_checked=context.any_open_checked,
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
        if pgraw.dialect_name(session) == "postgresql":
            reference = await _insert_in_one_statement(session, values, actor, audit_after, jobs, zone)
        else:
            assert isinstance(session, AsyncSession), "a Core connection is PostgreSQL's"
            reference = await _insert_step_by_step(session, values, actor, audit_after, jobs, zone)
    except IntegrityError as exc:
        if "provider_reference" not in str(exc.orig):
            raise
        # The request id this request derives is held by another payment: after a restore, the lost payment recorded
        # from the statement with its gatewayReference (record_payment). Its money is that payment's. (On a Core
        # connection in autocommit the failed statement was its own transaction: nothing to roll back.)
        if isinstance(session, AsyncSession):
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
    metrics.payment_moved("PENDING", new.method).inc()
    if isinstance(session, AsyncConnection):
        return _loaded(values), True
    return _persistent(session, values), True


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
    when it is another country's number, or one of its country on a network none of its wallets collects from, or
    on one whose wallet this deployment's account of it does not collect `currency` with (AIRTEL_COUNTRY):
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
        if operator is None:
            return None
        if operator in by_operator:
            # Her network's wallet, unless this deployment has no account of it that collects the currency (Airtel
            # Money set up for Rwanda, AIRTEL_COUNTRY, and a Kenyan cooperative): USSD offers her no method then.
            method = by_operator[operator]
            refused = refusal_for(routes, providers, method, Money(1, currency))
            if refused is None or refused[0] != "paymentMethod":
                return None
            provider = providers.get(routes.get(method, ""))
            takes = sorted(getattr(provider, "currencies", None) or ())
            account = (f"this deployment's {METHOD_NAMES[method]} account collects {', '.join(takes)} only, not "
                       f"{currency}" if provider is not None and takes
                       else f"this deployment has no {METHOD_NAMES[method]} account")
            head = f"{phone.masked()} is {_a(_operator_name(operator, phone.e164))} number, and {account}"
            return _how_else(head, currency, routes, providers)
        wallets = " or ".join(f"{METHOD_NAMES[m]} (from {_a(_operator_name(o))} number)"
                              for o, m in by_operator.items())
        head = (f"{phone.masked()} is {_a(_operator_name(operator, phone.e164))} number: this {country} cooperative's "
                f"members pay with {wallets}")
    else:
        wallets = " or ".join(dict.fromkeys(METHOD_NAMES[m] for m in by_operator.values()))
        head = (f"{phone.masked()} is a {region or 'foreign'} number, not {country}: this {country} cooperative's "
                f"members pay with {wallets} from a {country} number")
    return _how_else(head, currency, routes, providers)


def _how_else(head: str, currency: str, routes: Mapping[str, str], providers: Mapping[str, object]) -> str:
    """foreign_number_warning's `head` (why no wallet takes her number), and how she can pay all the same."""
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


async def take_turns_paying(session: AsyncSession, cooperative_id: str, member_id: str, payment_type_id: str) -> None:
    """Make the rest of this transaction wait for any other confirmation of the member's payment of this type (on
    PostgreSQL a transaction-scoped advisory lock, on SQLite the database's write lock), before load_context looks
    for her open payment (OpenLike). Without it the check and the insert that follows were check-then-act: two
    confirmations at the same moment (two USSD sessions: her husband paying for her from his phone while she pays
    from hers, or she dialled again while her first confirmation was still being answered), each on its own serve
    process, both found no open payment and both made one, two PIN prompts and two payments for one. Taken, the
    second reads the first's payment (committed with the lock's release) and is told it awaits her approval."""
    if session.get_bind().dialect.name == "postgresql":
        # The transaction's first statement, straight on asyncpg (BEGIN sent first: pgraw.begin); through the ORM it
        # cost the confirmation hop about a quarter of a millisecond more of CPU.
        await pgraw.begin(session)
        await pgraw.fetchrow(session, pgraw.compiled(ADVISORY_XACT_LOCK),
                             {"key": f"paying:{cooperative_id}:{member_id}:{payment_type_id}"})
    else:
        await serialise_on_sqlite(session, Member, member_id)


async def load_context(session: Db, cooperative_id: str, payment_type_id: str,
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
    if pgraw.dialect_name(session) == "postgresql":
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


async def paying_member(session: Db, context: PaymentContext, cooperative_id: str,
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


_PAYMENTS = manager_of_class(Payment)
_PAYMENT_KEYS = frozenset(attribute.key for attribute in Payment.__mapper__.column_attrs)


def _persistent(session: AsyncSession, values: dict[str, Any]) -> Payment:
    """The row just inserted (every column's value), as a loaded instance in the session, without reading it back
    (_loaded)."""
    payment = _loaded(values)
    session.add(payment)
    return payment


def _loaded(values: dict[str, Any]) -> Payment:
    """A payment's row (every column's value) as a detached instance, as the ORM builds a row it loads: the values go
    in as the instance's committed state, with none of the change events Payment(**values) fires per attribute (a
    sixth of the cost: about 6 us against 36 for the 39 columns), which make_transient_to_detached then threw away.
    Added to a session, it is persistent there without a read (_persistent; core.pgraw.Transaction.attach)."""
    if values.keys() != _PAYMENT_KEYS:  # a column left out would be loaded on access: I/O the caller did not await
        raise ValueError(f"payment row without {sorted(_PAYMENT_KEYS - values.keys())}, "
                         f"or with unknown {sorted(values.keys() - _PAYMENT_KEYS)}")
    if not Payment.__mapper__.configured:
        # What the instrumented __init__ does on a process's first instance, done here as the instance is built
        # without it. (Importing core.payment_statements configures the mappers already; this keeps it so if not.)
        configure_mappers()
    payment: Payment = _PAYMENTS.new_instance()
    payment.__dict__.update(values)
    make_transient_to_detached(payment)
    return payment


async def _insert_in_one_statement(session: Db, values: dict[str, Any], actor: Actor,
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


async def flagged_before(session: AsyncSession, payment: Payment, said: str, action: str,
                         report: Mapping[str, Any]) -> bool:
    """Whether this report was made before (a provider's retry), so it is not flagged again: `said` among the
    payment's flags or those a person reviewed, or else its audit row (`action`, with `report` in its after). The
    text alone missed a report whose flag fit_detail had cut from the middle of a long mismatch_detail: it was
    flagged, audited and logged again at each retry, and set mismatch again on a payment a person had reviewed."""
    if said in (payment.mismatch_detail or "") or said in (payment.reviewed_detail or ""):
        return True
    rows = await session.execute(select(AuditEvent.after).where(
        AuditEvent.entity_type == "payment", AuditEvent.entity_id == payment.id, AuditEvent.action == action))
    return any(after and all(after.get(k) == v for k, v in report.items()) for after in rows.scalars())


def add_flag(earlier: str | None, said: str) -> str:
    """A payment's `mismatch_detail` once `said` is added after what it said already (`earlier`, None for nothing),
    within its column (fit_detail)."""
    return fit_detail(f"{earlier}; {said}" if earlier else said)


def fit_detail(detail: str) -> str:
    """A payment's `mismatch_detail` within its column (300 characters): the oldest flag's start and the newest
    flags' end (detail_tail), which say what happened first and what a person must do now."""
    if len(detail) <= _detail_limit():
        return detail
    return f"{detail[:detail_head()]} … {detail[-detail_tail():]}"


def _detail_limit() -> int:
    return int(getattr(Payment.__table__.c.mismatch_detail.type, "length", 300))


def detail_head() -> int:
    """How much of a long `mismatch_detail`'s start fit_detail keeps (100 characters), before " … "."""
    return _detail_limit() // 3


def detail_tail() -> int:
    """How much of a long `mismatch_detail`'s end fit_detail keeps (197 characters), after " … ": a flag that long
    or shorter, added last, is kept whole."""
    return _detail_limit() - detail_head() - 3


def _by_transaction(event: ProviderEventData) -> bool:
    """The callback names the provider's id for the payment (saved as provider_transaction_id), not ours."""
    return event.raw.get("lookup") == "provider_transaction_id"


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
    capped by what was collected, never by the flag), no status. The cooperative's system that was told of the flags
    (payment.flagged...) is told they were cleared: payment.flag_cleared, queued in the review's transaction
    (core.provider_events.flag_cleared_job). NotFound for no such payment of `cooperative_id` (None: any
    cooperative's, a super admin); Conflict for a payment not flagged, which queues nothing."""
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
    from core.provider_events import flag_cleared_job  # local: it builds on this module

    await enqueue_job(session, flag_cleared_job(payment))
    return payment


async def _reference_holder(session: Db, provider: str, reference: str) -> Any:
    """The payment (reference, cooperative_id, status, completed_at, collected_minor: what its money is) holding
    `reference` as its request id at `provider`, or None: one probe of the (provider, provider_reference) unique
    index."""
    return (await session.execute(
        select(Payment.reference, Payment.cooperative_id, Payment.status, Payment.completed_at,
               Payment.collected_minor)
        .where(Payment.provider == provider, Payment.provider_reference == reference))).first()
