"""SMS templates in the member's language, and the loader that fills them from database rows."""

from __future__ import annotations

import string
from collections.abc import Callable
from datetime import date, datetime, timedelta
from types import ModuleType
from typing import Any, NamedTuple
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from channels.sms.catalogs import en, fr, rw, sw
from channels.sms.encoding import measure
from core.cooperatives import zone_of
from core.crypto import PiiCipher
from core.db import utcnow
from core.gsm import is_gsm, to_gsm
from core.models import Cooperative, Dispute, Member, Payment, PaymentType, Refund, WebhookEndpoint
from core.money import Money
from core.notify import SMS_PHONE_CONTEXT
from core.payments import approvable_by, collected_amount, open_window, still_open
from core.phone import Phone
from core.refunds import BY_A_PERSON
from core.reminders import balance_now, reminder_balance
from core.state.payment import COLLECTED, OPEN_VALUES, PaymentStatus, shown_status
from providers.registry import payer_sees

CATALOGS: dict[str, ModuleType] = {"en": en, "rw": rw, "fr": fr, "sw": sw}
LANGUAGES = tuple(CATALOGS)
TEMPLATES = tuple(en.MESSAGES)
# Templates a member may opt out of with STOP; receipts and updates always go.
OPTIONAL_TEMPLATES = frozenset({"payment_reminder"})
DATE_FORMAT = "%d/%m/%Y %H:%M"
# Before each keyword a reply names ("{kw}STOP"): the shared short code's word the member's text began with (value
# "KHHC" gives "KHHC STOP"), as a text without it never reaches the gateway (SMS_SHORTCODE_KEYWORDS); none otherwise.
KEYWORD_PREFIX = "kw"
DAY_FORMAT = "%d/%m/%Y"
# The BALANCE reply lists this many types at most ("+2 more" for the rest), each name cut to BALANCE_NAME
# characters: one SMS for the usual cooperative.
BALANCE_TYPES = 3
BALANCE_NAME = 20
# Types whose balance a BALANCE text reads at most (one query each); the rest are counted in "+N more".
BALANCE_READ = 10


class TemplateError(Exception):
    """A message cannot be built: unknown template, missing value, or a row that does not exist."""


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


NO_TXN = "-"  # a payment's transaction id when it holds none the payer can find (payer_transaction_id)


def render(template: str, language: str, values: dict[str, Any]) -> str:
    """Fill one template; unknown languages fall back to English, missing values are an error."""
    catalog = CATALOGS.get(language, en)
    text = catalog.MESSAGES.get(template)
    if text is None:
        raise TemplateError(f"unknown SMS template {template!r}")
    prefix = values.get(KEYWORD_PREFIX)
    values = {**values, KEYWORD_PREFIX: ""}
    missing = _placeholders(text) - values.keys()
    if missing:
        raise TemplateError(f"template {template!r} needs {sorted(missing)}")
    if values.get("txn") == NO_TXN:
        # No transaction id the payer can find (payer_transaction_id): where a catalog puts it in brackets after the
        # reference (fr, rw, sw: "Réf : PAY_… (8419567321)"), the brackets go too, not "(-)"; a labelled one
        # ("Txn: -") says it has none.
        text = text.replace(" ({txn})", "")
    if is_gsm(text):
        # One character outside GSM-7 in a value (an accent the alphabet lacks, a pasted dash) would send
        # the whole message as UCS-2: 70 characters a part instead of 160, so more parts to pay for.
        flat = {k: to_gsm(_clean(v)) for k, v in values.items()}
    else:
        flat = {k: _clean(v) for k, v in values.items()}
    word = to_gsm(_clean(prefix)) if prefix else ""
    return text.format(**{**flat, KEYWORD_PREFIX: f"{word} " if word else ""})


def _clean(value: Any) -> str:
    # Names typed by admins may carry newlines or braces; an SMS gets one flat line per value.
    return " ".join(str(value).split())


def reason_key(reason: str | None) -> str:
    """A provider's failure text, sorted into a reason a payer understands in any language."""
    text = (reason or "").lower().replace("_", " ")
    # The providers' codes and the adapters' own words for them (providers/*/adapter.py REASON_WORDS, REASONS),
    # which are what a payment stores: tests/channels/sms/test_reason_words.py feeds every one of them through.
    rules = (
        # Its cooperative's support desk cancelled it (core.provider_events.CANCELLED_BY_COOPERATIVE): first, as the
        # admin's note after it is free text ("the prompt never reached her") that the rules below would misread.
        ("cancelled_by_cooperative", ("cancelled by the cooperative",)),
        # Our outage, not the payer's doing: the request never reached the provider (core.jobs.PROVIDER_UNREACHABLE).
        ("provider_unreachable", ("provider unreachable", "never reached the provider")),
        # M-Pesa's 1001: another prompt still open on her phone. Before "service" (its words say "M-Pesa service
        # busy") and "cancel": nothing is wrong with the service, and she finishes or cancels that one, then pays.
        ("other_transaction", ("already in process", "in process on the payer", "lock subscriber")),
        # IremboPay's FAILED invoice (providers.irembopay.adapter.FAILED_REASON): declined or not approved, it does not
        # say which; before "declined", whose words it holds.
        ("declined_or_not_approved", ("declined or not approved",)),
        ("insufficient_funds", ("insufficient", "not enough", "enough money", "balance", "funds")),
        ("wrong_pin", ("wrong pin", "invalid pin", "incorrect pin", "wrong m-pesa pin")),
        ("declined", ("declin", "reject", "cancel", "refus")),
        ("phone_unreachable", ("phone could not be reached", "cannot be reached", "user cannot be reached")),
        ("not_approved", ("expire", "timeout", "timed out", "time")),
        ("limit", ("limit", "exceed")),
        ("invalid_account", ("invalid", "not found", "not registered", "unknown account", "payee", "has no",
                             "does not exist")),
        ("provider_error", ("error", "unavailable", "internal", "service", "could not perform")),
    )
    for key, words in rules:
        if any(w in text for w in words):
            return key
    return "unknown"


def refund_reason_key(reason: str | None) -> str:
    """A failed refund's reason, in the refund's own small set (catalog REFUND_REASONS), never the payment's:
    there the payer declined, or had too little money, and in a refund neither is the member's doing (the
    account short of money is the cooperative's). A person's note ("recorded by an admin: ...", free text that
    may say "cancelled") is never classified: the neutral reason. Of a provider's words, only what the member
    can understand is told: her account could not receive it, or the service had a problem."""
    if not reason or reason.startswith(BY_A_PERSON):
        return "not_sent"
    text = reason.lower().replace("_", " ")
    rules = (
        # The receiving side: MTN's PAYEE_NOT_FOUND ("the receiving account does not exist").
        # (Not "receiver": M-Pesa's reversal names the cooperative's own shortcode its ReceiverParty.)
        ("receiving_account", ("payee", "receiving account")),
        ("provider_error", ("internal", "unavailable", "could not perform", "service", "system error")),
    )
    for key, words in rules:
        if any(w in text for w in words):
            return key
    return "not_sent"


def dial_code(service_code: str, extension: str | None) -> str:
    """'*384*123#' with extension '12' -> '*384*123*12#'."""
    if not extension:
        return service_code
    return f"{service_code.rstrip('#')}*{extension}#"


def local_time(moment: datetime | None, timezone: str) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(zone_of(timezone)).strftime(DATE_FORMAT)


async def _one(session: AsyncSession, model: Any, entity_id: Any, what: str) -> Any:
    if not entity_id:
        raise TemplateError(f"{what} id missing from the SMS context")
    row = await session.get(model, entity_id)
    if row is None:
        raise TemplateError(f"{what} {entity_id} not found")
    return row


async def balance_items(session: AsyncSession, member: Member, coop: Cooperative, language: str, *,
                        grace: timedelta) -> list[tuple[str, str]]:
    """The BALANCE reply's list: each of the member's cooperative's active fixed-amount recurring types with what
    she still owes of it for the period a payment made now pays (core.reminders.balance_now), "paid" once
    nothing is, and what a payment of it still open asks (BALANCE_WAITING: only the completed ones count as paid,
    and the full price owed with nothing said of the prompt on her phone had her pay again; not one whose prompt
    waits on a SIM she lost, nor one past its approval window, which the USSD lets her pay beside:
    core.payments.approvable_by, still_open, PROCESSING up to `grace` past its window); those with an open payment
    first (no "+N more" hides it: they are the first read), then those owed, then by name. Hers only: her member
    id. One query for the types she has a payment of open, then one per type, BALANCE_READ at most."""
    catalog = CATALOGS.get(language, en)
    types = (await session.execute(
        select(PaymentType).where(PaymentType.cooperative_id == coop.id, PaymentType.is_active.is_(True),
                                  PaymentType.is_recurring.is_(True), PaymentType.allow_custom_amount.is_(False))
        .order_by(PaymentType.name, PaymentType.id))).scalars().all()
    # Her open payments of any period: of a type past BALANCE_READ read anyway (one of another period only moves it).
    # Those still open (still_open) that she can still approve from the number that asked, which she holds
    # (approvable_by), as balance_now reads them.
    now = utcnow()
    opened = set((await session.execute(
        select(Payment.payment_type_id).where(Payment.member_id == member.id, Payment.status.in_(OPEN_VALUES),
                                              still_open(now, now - grace),
                                              approvable_by(member.id, member.phone_index))
        .distinct())).scalars())
    types = sorted(types, key=lambda ptype: ptype.id not in opened)  # stable: by name within each
    owed: list[tuple[bool, bool, str, str]] = []
    for ptype in types[:BALANCE_READ]:
        found = await balance_now(session, member.id, ptype, coop.timezone, payer=member.phone_index, grace=grace)
        if found is None:
            continue  # an amount she chooses, or no period
        amount = (catalog.BALANCE_PAID if found.left == 0 else Money(found.left, ptype.currency).format(language))
        if found.waiting and found.waiting == found.left:
            amount = catalog.BALANCE_ALL_WAITING.format(amount=amount)
        elif found.waiting:
            amount = catalog.BALANCE_WAITING.format(amount=amount, waiting=Money(found.waiting, ptype.currency)
                                                    .format(language))
        owed.append((not found.waiting, found.left == 0, ptype.name, amount))
    owed.sort(key=lambda item: item[:2])  # stable: by name within each
    names = short_names([name for *_order, name, _amount in owed])
    # Past BALANCE_READ, unread (no query each): counted in "+N more" (balance_text), nameless.
    return [(name, amount) for name, (*_item, amount) in zip(names, owed, strict=True)] + [("", "")] * max(
        0, len(types) - BALANCE_READ)


def short_name(name: str) -> str:
    """A type's name in the BALANCE reply: BALANCE_NAME characters at most, cut after the last whole word that fits
    ("Monthly security levy" is "Monthly security", not "Monthly security lev"); mid-word only when its first word
    alone is longer."""
    name = _clean(name)
    if len(name) <= BALANCE_NAME:
        return name
    head = name[:BALANCE_NAME + 1].rpartition(" ")[0].rstrip()  # the character after the cut: a space ends a word
    return head or name[:BALANCE_NAME].rstrip()


def short_names(names: list[str]) -> list[str]:
    """short_name of each, except that names it would make read the same while they differ (which one is paid?)
    keep what tells them apart: cut at BALANCE_NAME characters, mid-word, when their first characters differ
    ("Amafaranga y'umutekano" and "Amafaranga y'ubwisungane" were both "Amafaranga"), else their start and the end
    that differs, as the USSD list names them ("Monthly Rent - Block A" and "... B": "Monthly Ren..Block A")."""
    cut = [short_name(name) for name in names]
    for label in {label for label in cut if cut.count(label) > 1}:
        group = [i for i, other in enumerate(cut) if other == label]
        full = [_clean(names[i]) for i in group]
        labels = [name[:BALANCE_NAME].rstrip() for name in full]
        if len(set(labels)) < len(labels):
            differ = next((k for k in range(1, BALANCE_NAME) if len({name[-k:] for name in full}) == len(full)), None)
            if differ is not None and differ + 6 <= BALANCE_NAME - 6:
                tail = differ + 6
                labels = [name[:BALANCE_NAME - 2 - tail].rstrip() + ".." + name[-tail:] for name in full]
        for i, shown in zip(group, labels, strict=True):
            cut[i] = shown
    return cut


def balance_text(owed: list[tuple[str, str]], language: str, shown: int = BALANCE_TYPES) -> str:
    """The BALANCE reply's {items}: the first `shown` of balance_items, then "+N more" for the rest that may still
    be owed: a type paid for the period is not counted (balance_items puts those last), for "Still to pay ...: ...,
    +1 more" told her of something more to pay where nothing was; a type past BALANCE_READ, unread, is."""
    catalog = CATALOGS.get(language, en)
    if not owed:
        return str(catalog.BALANCE_NONE)
    items = [f"{name} {amount}" for name, amount in owed[:shown] if name]
    more = sum(1 for name, amount in owed[shown:] if not name or amount != catalog.BALANCE_PAID)
    more += sum(1 for name, _amount in owed[:shown] if not name)
    if more:
        items.append(catalog.BALANCE_MORE.format(count=more))
    return ", ".join(items)


class PaymentFacts(NamedTuple):
    """What a payment template says about the payment: read by the ORM here, or by the SMS worker in one
    plain query (channels.sms.jobs), and turned into the same values by `payment_values`."""

    amount_minor: int
    currency: str
    reference: str
    provider_transaction_id: str | None
    completed_at: datetime | None
    updated_at: datetime | None
    status: str
    failure_reason: str | None
    type_name: str | None  # None: the payment type is gone
    coop_name: str
    coop_timezone: str
    coop_ussd_extension: str | None
    collected_minor: int | None  # set when the provider reported taking another amount (core.provider_events)
    coop_ussd_aggregator: str | None  # the aggregator whose code the member dials (None: the default code)
    provider: str  # the payment's provider, asked whether its transaction id is one the payer sees
    refunded_minor: int = 0  # refunds completed (payment_receipt_refunded)


def amount_text(facts: PaymentFacts | Payment, language: str) -> str:
    """The payment's amount as the payer is told it, as her language writes numbers (Money.format: in French
    50 000 RWF): what was taken once money is, and, when the provider took less or more than was asked, both
    ("40,000 RWF of 50,000 RWF"): never the amount asked as if received. A voided recording (VOIDED: collected 0,
    its completed_at kept) took nothing: the amount asked, as a failed payment's, never "0 RWF of 50,000 RWF".
    Money reported taken that is counted as nothing (collected 0: taken in another currency, a negative or zero
    amount, or the money another payment holds; a person looks) was taken from her wallet all the same: received
    and under her cooperative's review (AMOUNT_IN_REVIEW), no figure, never "0 RWF of 50,000 RWF"."""
    asked = Money(facts.amount_minor, facts.currency)
    taken = None if facts.status == PaymentStatus.VOIDED.value else collected_amount(facts)
    if taken is None or taken == asked:
        return asked.format(language)
    if taken.minor == 0:
        return str(CATALOGS.get(language, en).AMOUNT_IN_REVIEW)
    phrase = CATALOGS.get(language, en).AMOUNT_TAKEN["less" if taken < asked else "more"]
    return str(phrase.format(collected=taken.format(language), amount=asked.format(language)))


# The USSD code SMS texts name: one code, or the code of a cooperative's aggregator (Settings.service_code_for).
ServiceCode = str | Callable[[str | None], str]


def code_of(service_code: ServiceCode, aggregator: str | None) -> str:
    return service_code(aggregator) if callable(service_code) else service_code


def payer_transaction_id(provider: str, provider_transaction_id: str | None) -> str:
    """The provider's transaction id as a receipt names it: the one on the payer's own confirmation SMS and
    statement (M-Pesa's receipt 'SKL3ABC123'), "-" when the payment holds none. A CheckoutRequestID was sent as
    'Transaction: ws_CO_03122026105846540253785904', an id she finds nowhere, where she looks for her receipt."""
    # M-Pesa's CheckoutRequestID, held when Daraja's STK query confirmed the payment and the callback with the receipt
    # never came, is told from a receipt by the adapter that knows its form, asked through the registry.
    return provider_transaction_id if provider_transaction_id and payer_sees(provider, provider_transaction_id) \
        else NO_TXN


def payment_values(facts: PaymentFacts, language: str, service_code: ServiceCode) -> dict[str, Any]:
    catalog = CATALOGS.get(language, en)
    return {
        "amount": amount_text(facts, language),
        "type": facts.type_name or "-",
        "coop": facts.coop_name,
        "ref": facts.reference,
        "txn": payer_transaction_id(facts.provider, facts.provider_transaction_id),
        "date": local_time(facts.completed_at or facts.updated_at, facts.coop_timezone),
        "refunded": Money(facts.refunded_minor or 0, facts.currency).format(language),
        "status": catalog.PAYMENT_STATUS.get(shown_status(facts.status, facts.failure_reason, facts.completed_at),
                                              facts.status),
        "reason": catalog.REASONS[reason_key(facts.failure_reason)],
        "dial": dial_code(code_of(service_code, facts.coop_ussd_aggregator), facts.coop_ussd_extension),
    }


def recipient(cipher: PiiCipher, payload: dict[str, Any], member: Any, default: str | None = None
              ) -> tuple[Phone, str]:
    """Who the message goes to and in which language. `member`: the payload's member (a Member, or any row
    with its phone_enc, cooperative_id and language), None when the payload names none; `default`: the
    language of the cooperative the message is about, for a payer who is none of its members."""
    from core.members import member_phone

    context = payload.get("context") or {}
    if payload.get("phone_enc"):
        phone = Phone(cipher.decrypt(payload["phone_enc"], context=SMS_PHONE_CONTEXT))
    elif member is not None:
        phone = member_phone(cipher, member)
    else:
        raise TemplateError("SMS payload names neither a member nor a phone number")
    language = context.get("language") or (member.language if member is not None else default) or "en"
    return phone, language if language in CATALOGS else "en"


def asked_receipt(status: str, refunded_minor: int | None) -> str:
    """The template that answers a request for a payment's receipt (RECEIPT, the USSD's "send me the receipt", the
    support desk's resend): its receipt once its money was collected, saying what was refunded since when any was
    (the plain receipt of a refunded payment read as proof of money the cooperative no longer holds), else its
    status."""
    if status not in COLLECTED:
        return "payment_status"
    return "payment_receipt_refunded" if refunded_minor else "payment_receipt"


def is_payment_template(template: Any) -> bool:
    """The templates filled from a payment (its receipt and updates; not the reminder, which has none)."""
    return isinstance(template, str) and template.startswith("payment_") and template != "payment_reminder"


def _name_or_code(template: str, language: str, values: dict[str, Any], coop: Cooperative) -> str:
    """The cooperative as a refund's or dispute's text names it: by its name, unless the name makes the text more
    SMS than its short code does (a long name, an amount under review in French: two SMS, each paid for, where the
    code the cooperative's texts begin with keeps it at one)."""
    parts = measure(render(template, language, {**values, "coop": coop.name})).segments
    if parts > 1 and measure(render(template, language, {**values, "coop": coop.short_code})).segments < parts:
        return coop.short_code
    return coop.name


async def build_message(
    session: AsyncSession,
    cipher: PiiCipher,
    payload: dict[str, Any],
    *,
    service_code: ServiceCode = "*384*123#",
    settings: Any = None,
) -> tuple[Phone, str, str]:
    """From an 'sms.send' job payload to (phone, language, body), reading the rows the template names. `settings`:
    the runtime's, which BALANCE reads (how long a payment stays open: core.payments.open_window)."""
    template = payload.get("template")
    if template not in TEMPLATES:
        raise TemplateError(f"unknown SMS template {template!r}")
    context: dict[str, Any] = dict(payload.get("context") or {})
    member: Member | None = None
    if payload.get("member_id"):
        member = await _one(session, Member, payload["member_id"], "member")
    coop: Cooperative | None = None
    if payload.get("cooperative_id"):
        coop = await _one(session, Cooperative, payload["cooperative_id"], "cooperative")
    phone, language = recipient(cipher, payload, member, coop.language if coop else None)
    catalog = CATALOGS[language]
    dial = dial_code(code_of(service_code, coop.ussd_aggregator if coop else None),
                     coop.ussd_extension if coop else None)
    values: dict[str, Any] = {"dial": dial, "ref": str(context.get("reference") or "-")[:32]}
    if context.get("keyword_prefix"):
        values[KEYWORD_PREFIX] = context["keyword_prefix"]

    if is_payment_template(template):
        payment = await _one(session, Payment, context.get("payment_id"), "payment")
        coop = coop or await _one(session, Cooperative, payment.cooperative_id, "cooperative")
        ptype = await session.get(PaymentType, payment.payment_type_id)
        facts = PaymentFacts(
            payment.amount_minor, payment.currency, payment.reference, payment.provider_transaction_id,
            payment.completed_at, payment.updated_at, payment.status, payment.failure_reason,
            ptype.name if ptype else None, coop.name, coop.timezone, coop.ussd_extension, payment.collected_minor,
            coop.ussd_aggregator, payment.provider, payment.refunded_minor,
        )
        values.update(payment_values(facts, language, service_code))
    elif template.startswith("refund_"):
        refund = await _one(session, Refund, context.get("refund_id"), "refund")
        payment = await _one(session, Payment, refund.payment_id, "payment")
        coop = coop or await _one(session, Cooperative, refund.cooperative_id, "cooperative")
        values.update(
            amount=Money(refund.amount_minor, refund.currency).format(language),
            ref=refund.reference,
            payment_ref=payment.reference,
            coop=coop.name,
            reason=catalog.REFUND_REASONS[refund_reason_key(refund.failure_reason)],
            status=catalog.REFUND_STATUS.get(refund.status, refund.status),
        )
        values["coop"] = _name_or_code(template, language, values, coop)
    elif template.startswith("dispute_"):
        dispute = await _one(session, Dispute, context.get("dispute_id"), "dispute")
        payment = await _one(session, Payment, dispute.payment_id, "payment")
        coop = coop or await _one(session, Cooperative, dispute.cooperative_id, "cooperative")
        # The status the change being told moved it to (core.disputes puts it in the context): by the time
        # the message is built the dispute may have moved on. Jobs queued without it: the row's status.
        status = str(context.get("status") or dispute.status)
        values.update(
            ref=dispute.reference,
            payment_ref=payment.reference,
            coop=coop.name,
            status=catalog.DISPUTE_STATUS.get(status, status),
            amount=amount_text(payment, language),  # dispute_status: the payment's, as its own messages say it
        )
        values["coop"] = _name_or_code(template, language, values, coop)
    elif template == "payment_reminder":
        ptype = await _one(session, PaymentType, context.get("payment_type_id"), "payment type")
        coop = coop or await _one(session, Cooperative, ptype.cooperative_id, "cooperative")
        due = context.get("due_date")
        due_text = date.fromisoformat(str(due)[:10]).strftime(DAY_FORMAT) if due else "-"
        # A type the member pays what she chooses (a savings contribution): no "0 RWF" to pay.
        free = ptype.allow_custom_amount and not ptype.amount_minor
        price = catalog.ANY_AMOUNT if free else Money(ptype.amount_minor, ptype.currency).format(language)
        # A fixed amount the provider took only part of this period (or partly refunded): the balance, beside the
        # price ("balance 20,000 RWF of 50,000 RWF"), as the USSD then offers it; the price again overpaid.
        balance = None if free else await reminder_balance(session, payload, ptype)
        if balance is not None:
            price = catalog.BALANCE.format(balance=Money(balance, ptype.currency).format(language), amount=price)
        values.update(
            type=ptype.name,
            amount=price,
            coop=coop.name,
            due=due_text,
            dial=dial_code(code_of(service_code, coop.ussd_aggregator), coop.ussd_extension),
        )
        # A balance beside the price in Kinyarwanda or Swahili took two SMS with the cooperative's name (each paid
        # for, to every member reminded): its short code then, as the refund and dispute texts do.
        values["coop"] = _name_or_code(template, language, values, coop)
    elif template == "balance":
        # The cooperative by its short code (the word texts begin with on a shared code): its name would take a
        # quarter of the one SMS the list should fit.
        if member is None:
            raise TemplateError("balance needs a member")
        # Hers to the number that asked only while it is hers: a new SIM since, and the old number (perhaps
        # someone else's by now) is told nothing of what she owes.
        if member.phone_index is None or member.phone_index != cipher.blind_index(phone.e164):
            from core.members import PhoneReleased

            raise PhoneReleased("the member no longer holds the number that asked")
        if settings is None:
            raise TemplateError("balance needs the settings (how long a payment stays open)")
        coop = coop or await _one(session, Cooperative, member.cooperative_id, "cooperative")
        owed = await balance_items(session, member, coop, language, grace=open_window(settings)[1])
        values.update(coop=coop.short_code)
        # As many types as one SMS holds (long names and prices in Kinyarwanda do not fit three), the rest "+N more".
        for shown in range(BALANCE_TYPES, 0, -1):
            values["items"] = balance_text(owed, language, shown)
            if measure(render(template, language, values)).segments == 1:
                break
    elif template == "member_approved":
        if member is None:
            raise TemplateError("member_approved needs a member")
        coop = coop or await _one(session, Cooperative, member.cooperative_id, "cooperative")
        values.update(coop=coop.name, dial=dial_code(code_of(service_code, coop.ussd_aggregator),
                                                     coop.ussd_extension))
    elif template == "webhook_disabled":
        endpoint = await _one(session, WebhookEndpoint, context.get("endpoint_id"), "webhook endpoint")
        coop = coop or await _one(session, Cooperative, endpoint.cooperative_id, "cooperative")
        values.update(
            coop=coop.name,
            host=urlparse(endpoint.url).hostname or endpoint.url,
            failures=context.get("failures") or endpoint.consecutive_failures,
        )
    return phone, language, render(template, language, values)
