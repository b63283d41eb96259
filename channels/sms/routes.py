"""Africa's Talking SMS callbacks: delivery reports and incoming keyword messages."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, NamedTuple, cast

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy import Integer, Table, bindparam, case, func, select, update

from channels.sms.templates import CATALOGS, asked_receipt
from core import metrics, pgraw
from core.audit import Actor, record
from core.auth import callback_secret_ok
from core.config import ConfigError
from core.cooperatives import COUNTRY_CURRENCY
from core.db import autocommit, utcnow
from core.members import number_came_since, number_history, set_number_opt_out
from core.models import Cooperative, Dispute, Member, OutboxJob, Payment, Refund, SmsMessage
from core.notify import SMS_KEY_SIZE, send_sms
from core.outbox import SMS_GIVE_BACK_KIND, NewJob, enqueue_job
from core.phone import Phone, PhoneError, normalize
from core.ratelimit import Limit, RateLimiter, clock
from core.references import REFERENCE_SHAPE
from core.runtime import RUNTIME, Runtime
from core.state import StaleTransition, transition_alone
from core.state.sms import SMS, SmsStatus

log = logging.getLogger("gateway.sms.routes")
PROVIDER = Actor("provider:africastalking", "sms")

# Delivery report status -> core SMS status. Sent/Submitted/Buffered are progress: the row stays SENT.
DELIVERY_STATUS: dict[str, SmsStatus] = {
    "Sent": SmsStatus.SENT,
    "Submitted": SmsStatus.SENT,
    "Buffered": SmsStatus.SENT,
    "Success": SmsStatus.DELIVERED,
    "Rejected": SmsStatus.REJECTED,
    "Failed": SmsStatus.FAILED,
    "Expired": SmsStatus.EXPIRED,
}

# Keyword replies are paid SMS: 5 per number per 10 minutes and 20 per day, each counted as the API's limits are
# (per window, sliding over the previous one: a fixed window let 10 through in 2 seconds across its turn), so a
# loop with another robot (an autoresponder texting back every 2 minutes got 720 replies a day) costs little; the
# help that answers what was not understood, once per number per (UTC) day: the robot's every text is "not
# understood". HELP itself is answered within the first two (the "not understood" reply tells the member to send
# HELP: refusing it would leave her without the keywords for the day). See _reply_limits for the order.
REPLY_LIMIT = Limit("sms:reply", count=5, window=600)
REPLY_DAILY_LIMIT = Limit("sms:reply-day", count=20, window=86_400)
HELP_DAILY_LIMIT = Limit("sms:help", count=1, window=86_400, sliding=False)
# A reply to STOP or START is counted when her text is taken, and may not be sent after all: her other word, taken
# since, changed what it would tell (channels.sms.jobs: switched_since), or came first (a stale text gets none). Such
# a reply gives its count back (give_back_reply), else a member switching a few times found her next keyword refused
# a reply though she got fewer than the limit; and so does any keyword's reply an admin discards, parked, never handed
# to the aggregator (channels.sms.jobs.fail_for_discard). A reply queued and not sent gives it back through an outbox
# job of its own (GIVE_BACK_JOB), committed with the reply's end; a text whose reply is not queued (stale), with the
# text (give_back_job). Its context keeps
# when it was counted (clock()): the windows it counted in: this try's count, or an earlier try's (the aggregator's
# retry after our 503), kept with the text's verdict (_reply_allowed); not one an earlier release's try made, which
# kept no time.
COUNTED_AT = "counted_at"
# The replies to a text not understood: counted in the day's one help too (_reply_limits(None)), and given back there.
NOT_UNDERSTOOD_REPLIES = frozenset({"unknown", "unknown_inactive"})
# Replies go only to numbers of the countries the gateway serves (those a cooperative can be in), or of a member:
# any other sender would cost an international SMS for each text (a wrong number, a robot, a premium-rate scam).
SERVED_COUNTRIES = frozenset(COUNTRY_CURRENCY)
# A reference as a member types it after STATUS or RECEIPT, where "_" is buried in a feature phone's symbols:
# PAY_20260115_001, PAY 20260115 001, PAY-20260115-001, pay20260115001, the date in groups (PAY 2026 01 15 001).
# Searched in the words after the keyword, joined by single spaces with "_" made one too. Only the prefixes the
# gateway issues (core.references.next_reference: payments PAY, refunds RFD, disputes DSP): any other word is no
# reference ("Hali gani", Swahili for "how are you", starts with HALI, Swahili for STATUS).
_TYPED_REFERENCE = re.compile(r"\b(PAY|RFD|DSP) ?((?:\d ?){8})(\d{1,9})\b", re.ASCII)
# A payment's reference as M-Pesa shows it to the payer: its STK prompt and her M-Pesa confirmation SMS name the
# "account" (providers.mpesa.adapter.account_reference: PAY_20261203_018 -> 20261203018, PAY_20261122_12345 ->
# 26112212345), the number a Kenyan member keeps and types after RISITI. 11 or 12 digits alone as a word.
_MPESA_ACCOUNT = re.compile(r"\b(\d{11,12})\b", re.ASCII)
# ...or the receipt her M-Pesa confirmation SMS begins with ("SF65EC9797 Confirmed. Ksh1,000.00 sent to ..."), which
# the payment holds as its provider transaction id once Daraja's callback brought it: ten letters and digits, both.
_MPESA_RECEIPT = re.compile(r"\b(?=[A-Z0-9]*[0-9])(?=[A-Z0-9]*[A-Z])[A-Z0-9]{10}\b", re.ASCII)
# What separates words in a keyword SMS: anything but a letter, a digit or "_" (quotes of any kind, brackets, a
# dash, "#", an emoji, a colon between STATUS and its reference).
_NOT_WORD = re.compile(r"[^\w]+")


def _check_secret(request: web.Request, rt: Runtime, route: str) -> None:
    if not callback_secret_ok(rt.settings, "sms", request.query.get("secret", "")):
        metrics.CALLBACK_REJECTED.labels(source="sms").inc()
        # Said as USSD's and the providers' refusals are: refused silently, a CALLBACK_SECRET_SMS that differs from
        # the URL registered at Africa's Talking lost every inbound text (STOP, BALANCE) and delivery report with
        # nothing in the log.
        log.warning("sms callback refused: wrong or missing secret", extra={"route": route})
        raise web.HTTPForbidden(text="bad callback secret")


# NUL cannot be stored in PostgreSQL and lone surrogates cannot be encoded: neither is a character.
_UNUSABLE = re.compile(r"[\x00\ud800-\udfff]")


def _field(form: Any, name: str, limit: int = 200) -> str:
    return _UNUSABLE.sub("", str(form.get(name, "") or "")).strip()[:limit]


async def _form(request: web.Request) -> Any:
    """The posted form; a body that is not one (bad encoding, multipart without boundary) is a 400."""
    try:
        return await request.post()
    except (ValueError, LookupError):  # UnicodeDecodeError (a body not in UTF-8), a charset no codec knows
        raise web.HTTPBadRequest(text="body is not a readable form") from None


# --------------------------------------------------------------------------------------- delivery reports


async def delivery_report(request: web.Request) -> web.Response:
    rt = request.config_dict[RUNTIME]
    _check_secret(request, rt, "delivery")
    form = await _form(request)
    message_id, status = _field(form, "id", 128), _field(form, "status", 32)
    if not message_id or not status:
        raise web.HTTPBadRequest(text="id and status are required")
    target = DELIVERY_STATUS.get(status)
    if target is None:
        # A status this gateway does not know (Africa's Talking has been seen to send others, AbsentSubscriber):
        # not lost to a 400 the aggregator retries and then drops. It is kept as the provider's word on a message
        # still SENT, as Submitted and Buffered are (a final status stays as it is), and logged for a person to
        # map it.
        log.warning("unknown SMS delivery status: kept as the provider's word, the message still SENT",
                    extra={"status": status})
        target = SmsStatus.SENT
    reason = _field(form, "failureReason", 64) or None
    outcome = await apply_delivery_report(rt, message_id, target, status, reason)
    return web.Response(text=outcome)


async def apply_delivery_report(
    rt: Runtime,
    message_id: str,
    target: SmsStatus,
    provider_status: str,
    reason: str | None,
    *,
    park: bool = True,
) -> str:
    """Idempotent: a repeated or late report leaves a final status alone. Returns what happened.

    A report for an id we do not know yet is kept in Redis for an hour (`park`): the sender stores the
    provider's message id in its own transaction after the HTTP send, and a fast report can beat it.
    """
    async with autocommit(rt.engine) as conn:
        found = await pgraw.first(conn, _BY_PROVIDER_ID, {"m": message_id})
        message = None if found is None else _Known(*found)
        if message is not None and _is_progress(message, target, provider_status):
            # Submitted -> Buffered, ...: the row stays SENT; only the provider's word changes (no audit row).
            moved_on = await pgraw.first(conn, _PROGRESS, {"i": message.id, "p": provider_status, "u": utcnow(),
                                                           "r": PROGRESS_ORDER.get(provider_status, _ANY_RANK)})
            if moved_on is not None:
                return "progress"
            # A final report moved it between the read and the update, or this report is older than the progress
            # stored (Sent arriving after Buffered).
            return "ignored"
    # The connection is back in the pool before the move takes its own.
    outcome = None if message is None else await _apply(rt, message, target, provider_status, reason)
    if outcome is not None:
        if outcome == target.value.lower():
            metrics.SMS.labels(status=target.value).inc()  # counted once the move is stored
        return outcome
    if not park:
        log.warning("delivery report for an unknown message", extra={"provider_message_id": message_id})
        return "unknown"
    await park_report(rt, message_id, provider_status, reason)
    # The sender may have stored the id between our read and the park, and already looked for parked
    # reports: look again, so a report is never left parked for a message that exists.
    applied = await apply_parked_reports(rt, message_id)
    if applied:
        return applied[-1]
    log.warning(
        "delivery report for an unknown message: kept for an hour in case its send is being recorded",
        extra={"provider_message_id": message_id, "status": provider_status},
    )
    return "unknown"


class _Known(NamedTuple):
    id: str
    status: str
    provider_status: str | None


_SMS = cast(Table, SmsMessage.__table__)
# Built once: a report reads three columns (straight on asyncpg on PostgreSQL) instead of the ORM row.
_BY_PROVIDER_ID = (
    select(_SMS.c.id, _SMS.c.status, _SMS.c.provider_status)
    .where(_SMS.c.provider_message_id == bindparam("m"))
    .limit(1)
)
# The order of Africa's Talking's progress reports on a message: its network sent it (Sent), the operator took it
# (Submitted), the operator holds it for a phone off or out of reach (Buffered). Reports come out of order (two
# requests at once, a retry of an earlier one): one older than the progress stored (Sent after Buffered) is not
# written, or the admin API's providerStatus read "Sent" for a message the operator was holding. A status the
# gateway does not know (_ANY_RANK) is written whatever is stored, as before: its place in the order is unknown.
PROGRESS_ORDER = {"Sent": 1, "Submitted": 2, "Buffered": 3}
_ANY_RANK = len(PROGRESS_ORDER) + 1
_PROGRESS = (
    update(_SMS)
    .where(_SMS.c.id == bindparam("i"), _SMS.c.status == SmsStatus.SENT.value,
           case(PROGRESS_ORDER, value=_SMS.c.provider_status, else_=0) < bindparam("r", type_=Integer))
    .values(provider_status=bindparam("p"), updated_at=bindparam("u"))
    .returning(_SMS.c.id)
)


def _is_progress(message: _Known, target: SmsStatus, provider_status: str) -> bool:
    return message.status == target.value == SmsStatus.SENT.value and message.provider_status != provider_status


async def _apply(rt: Runtime, message: _Known, target: SmsStatus, provider_status: str, reason: str | None) -> str:
    current = SmsStatus(message.status)
    if current == target:
        return "duplicate"
    if not SMS.allowed(current, target):
        log.info(
            "late delivery report ignored",
            extra={"sms_id": message.id, "status": current.value, "report": provider_status},
        )
        return "ignored"
    values: dict[str, Any] = {"provider_status": provider_status}
    if target == SmsStatus.DELIVERED:
        values["delivered_at"] = utcnow()
    if reason:
        values["failure_reason"] = reason
    try:
        # One statement on PostgreSQL: the move and its audit row.
        await transition_alone(rt.sessionmaker, SMS, message.id, current, target, actor=PROVIDER, values=values)
    except StaleTransition:
        return "race"
    return target.value.lower()


# ------------------------------------------------------------------------------- reports ahead of the send

PARKED_TTL = 3600  # seconds a report for a not-yet-recorded message id is kept
PARKED_MAX = 5  # reports kept per id (an aggregator sends a few per message: Buffered, Success, ...)


def parked_key(provider_message_id: str) -> str:
    """One list per provider message id; the hash tag keeps it on one slot, the digest keeps it short."""
    digest = hashlib.sha256(provider_message_id.encode()).hexdigest()[:32]
    return f"sms:dlr:{{{digest}}}"


async def park_report(rt: Runtime, provider_message_id: str, provider_status: str, reason: str | None) -> None:
    key = parked_key(provider_message_id)
    value = json.dumps({"s": provider_status, "r": reason}, separators=(",", ":"))
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.rpush(key, value)
        pipe.ltrim(key, -PARKED_MAX, -1)
        pipe.expire(key, PARKED_TTL)
        await pipe.execute()


async def apply_parked_reports(rt: Runtime, provider_message_id: str) -> list[str]:
    """Apply, in arrival order, the reports parked for this id, once its message row exists.

    Called by the sms job right after it stores the id with SENT, and by the route after parking.
    Returns the outcomes (empty when nothing was parked or the message is still unknown).
    """
    async with autocommit(rt.engine) as conn:
        found = await pgraw.first(conn, _BY_PROVIDER_ID, {"m": provider_message_id})
    if found is None:
        return []  # leave them parked: the row is not there yet
    known = found[0]
    key = parked_key(provider_message_id)
    async with rt.redis.pipeline(transaction=True) as pipe:
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        raw, _ = await pipe.execute()  # taken atomically: two callers never both apply one report
    outcomes = []
    for item in raw:
        try:
            report = json.loads(item)
            status, reason = str(report["s"]), report.get("r")
            target = DELIVERY_STATUS.get(status, SmsStatus.SENT)  # one it does not know: as delivery_report
        except (ValueError, KeyError, TypeError):
            log.error("unreadable parked delivery report dropped", extra={"key": key})
            continue
        outcome = await apply_delivery_report(rt, provider_message_id, target, status, reason, park=False)
        log.info(
            "parked delivery report applied",
            extra={"sms_id": known, "report": status, "outcome": outcome},
        )
        outcomes.append(outcome)
    return outcomes


# --------------------------------------------------------------------------------------- inbound keywords


def fold(text: str) -> str:
    """A keyword as typed on any handset, reduced to plain upper-case letters: compatibility forms made
    plain (NFKC: full-width ＳＴＯＰ from CJK or Arabic keyboards, ligatures, no-break spaces), invisible
    format characters dropped (category Cf: a BOM some phones put before a UCS-2 text, zero-width spaces
    and joiners), accents dropped (NFKD, without the combining marks: ARRÊT typed as E + U+0302 or as Ê,
    and ARRET, are one word)."""
    plain = unicodedata.normalize("NFKC", text)
    visible = "".join(c for c in plain if unicodedata.category(c) != "Cf")
    bare = "".join(c for c in unicodedata.normalize("NFKD", visible) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare).upper()


@cache
def _keywords() -> tuple[tuple[str, str, frozenset[str]], ...]:
    """(language, command, folded spellings), English first so STOP/START stay English when another
    catalog shares them. The catalogs' spellings are folded as the text is."""
    languages = ("en", *[lang for lang in CATALOGS if lang != "en"])
    return tuple(
        (language, command, frozenset(fold(spelling) for spelling in spellings))
        for language in languages
        for command, spellings in CATALOGS[language].KEYWORDS.items()
    )


def parse_keyword(text: str, prefixes: tuple[str, ...] = ()) -> tuple[str | None, str | None, str | None]:
    """'risiti pay_20251016_001' -> ('RECEIPT', 'sw', 'PAY_20251016_001'). Unknown -> (None, None, None).
    Folded first (see fold), then every character that is not a letter, a digit or "_" separates words:
    '"STOP"', '(Stop)', '#STOP', 'STOP🙏' and 'STATUS:PAY_20251016_001' are read as typed without them. A first
    word among `prefixes` (folded: the shared short code's keywords, SMS_SHORTCODE_KEYWORDS) is skipped: 'KHHC
    stop' is STOP. The argument is what follows the keyword (see _argument): 'RISITI PAY 20251016 001' and
    'RISITI PAY-20251016-001' give 'PAY_20251016_001'."""
    words = _NOT_WORD.sub(" ", fold(text or "")).split()
    if shortcode_prefix(text, prefixes):
        words = words[1:]
    if not words:
        return None, None, None
    word = words[0]
    argument = _argument(words[1:])
    for language, command, spellings in _keywords():
        if word in spellings:
            return command, language, argument
    return None, None, argument


def shortcode_prefix(text: str, prefixes: tuple[str, ...]) -> str | None:
    """The shared short code's word the text begins with ('khhc, stop' -> 'KHHC'), None when it begins with none:
    replies name their keywords after it (templates.KEYWORD_PREFIX), as a text without it does not reach us."""
    words = _NOT_WORD.sub(" ", fold(text or "")).split()
    return words[0] if words and words[0] in prefixes else None


def _argument(words: list[str]) -> str | None:
    """The words after the keyword: the reference they hold, rebuilt as it was issued (PAY_20251016_001) however
    it was typed (_TYPED_REFERENCE) or as M-Pesa names it (_MPESA_ACCOUNT), else an M-Pesa receipt among them
    (_MPESA_RECEIPT), else the words as they came, joined by spaces; None when nothing follows."""
    if not words:
        return None
    typed = " ".join(" ".join(words).replace("_", " ").split())
    found = _TYPED_REFERENCE.search(typed)
    if found is None:
        account = _MPESA_ACCOUNT.search(typed)
        receipt = _MPESA_RECEIPT.search(typed)
        return ((account and _from_mpesa_account(account.group(1))) or (receipt and receipt.group(0))
                or " ".join(words))
    prefix, day, number = found.groups()
    return f"{prefix}_{day.replace(' ', '')}_{number}"


def _from_mpesa_account(digits: str) -> str | None:
    """The payment reference an M-Pesa account number was cut from (providers.mpesa.adapter.account_reference keeps
    the whole date with a 3- or 4-digit number, the date without its century with a 5- or 6-digit one), None when
    the digits are neither (a phone number, 254712345678, has no date in it) or a mobile number of a country served:
    a Rwandan Airtel one, 250722123456, reads as 22 July 2025 and 123456 (an account only a payment of 20 to 31 July
    2025 numbered past 99999 could have had). Exactly as written: 270601123456 is 1 June 2027's account, not the
    South African number it makes once normalize drops its trunk 0."""
    try:
        phone = normalize(f"+{digits}")
        if phone.e164 == f"+{digits}" and phone.region in SERVED_COUNTRIES:
            return None
    except PhoneError:
        pass
    for day, number in ((digits[:8], digits[8:]), ("20" + digits[:6], digits[6:])):
        if day.startswith("20"):
            try:
                datetime.strptime(day, "%Y%m%d")
            except ValueError:
                continue
            return f"PAY_{day}_{number}"
    return None


async def _owns(session: Any, rt: Runtime, payment: Payment, phone: Phone) -> bool:
    """The sender is the member it was for (member phone index), or paid it (account index) no more than
    SMS_PAYER_ANSWER_DAYS ago. Operators recycle numbers: a payment for a member who was suspended, or whose
    number was released, is nobody's to ask about by SMS, and the number that paid is asked about only while
    it is likely still the payer's (an anonymous payment has no member to suspend: a number's next holder
    would otherwise read its payments for ever, references being a date and a counter). Nor is it asked about a
    member's payment made before her number was last corrected (a new SIM, PATCH /v1/members) from a number that was
    hers (core.members.number_history: not her husband's paying for her): her old one, which the operator gives to
    someone else. Nor by a number another member got after the payment (core.members.number_came_since: sisters
    swapping phones, or a new SIM whose number was someone else's): she did not pay it."""
    index = rt.cipher.blind_index(phone.e164)
    member = await session.get(Member, payment.member_id) if payment.member_id else None
    if payment.member_id and (member is None or member.status == "SUSPENDED" or member.phone_enc is None):
        return False
    if member is not None and hmac.compare_digest(member.phone_index, index):
        return True
    days = rt.settings.sms_payer_answer_days
    recent = days == 0 or payment.created_at >= utcnow() - timedelta(days=days)
    if not (recent and hmac.compare_digest(payment.payment_account_index, index)):
        return False
    if await number_came_since(session, index, payment.created_at, but=payment.member_id):
        return False  # a member got the number since (a swap, a new SIM): she is not who paid
    if member is None:
        return True
    since, held = await number_history(session, member)
    return payment.created_at >= since or payment.payment_account_masked not in held


async def inbound(request: web.Request) -> web.Response:
    rt = request.config_dict[RUNTIME]
    _check_secret(request, rt, "inbound")
    form = await _form(request)
    sender, text = _field(form, "from", 32), _field(form, "text", 480)
    if not sender:
        raise web.HTTPBadRequest(text="from is required")
    try:
        phone = normalize(sender)
    except PhoneError:
        log.warning("inbound SMS from an unusable number")
        raise web.HTTPBadRequest(text="from is not a valid mobile number") from None
    given_id, date = _field(form, "id", 128), _field(form, "date")
    inbound_id = given_id or hashlib.sha256(f"{sender}|{date}|{text}".encode()).hexdigest()[:32]
    command, keyword_language, argument = parse_keyword(text, rt.settings.sms_shortcode_keywords)
    named_code = shortcode_prefix(text, rt.settings.sms_shortcode_keywords)  # a cooperative's short code, perhaps
    if named_code is None and command in ("BALANCE", "HELP") and argument and " " not in argument:
        # "BALANCE TWISU": a member of two cooperatives names the one she asks about after the keyword, as she can
        # before it on a shared code ("TWISU BALANCE"); without this the word was dropped and she was answered for
        # her first membership, with no way to ask about the other. A word that is none of her cooperatives' codes
        # changes nothing (_named_membership).
        named_code = argument
    index = rt.cipher.blind_index(phone.e164)
    actor = Actor(f"phone:{phone.masked()}", "sms")
    # A STOP or START the aggregator posts again (our answer was late, though we took it) changes nothing again: her
    # START retried after the STOP she sent next would turn the reminders back on.
    switch = command in ("STOP", "START")
    # Without an id or a date, every STOP of the number reads alike: each is taken (her STOP after a START is no retry).
    retried = switch and bool(given_id or date) and await _taken_before(rt, index, inbound_id)
    if phone.region not in SERVED_COUNTRIES and not await _has_membership(rt, index):
        return await _unserved(rt, phone, index, command, inbound_id, retried, date)
    # Checked before, and outside, the transaction that records a STOP or START: Redis failing costs the
    # reply, never the opt-out (a STOP rolled back keeps the reminders coming).
    reply_allowed, counted_at, counted = await _reply_allowed(rt, index, phone, command, inbound_id, clock())

    async with rt.sessionmaker.begin() as session:
        # Every membership of the number (STOP and START apply to all), the one the reply speaks for first:
        # an active one in an active cooperative, then a pending one; a suspended one (perhaps the number's
        # previous holder) only when there is nothing else.
        # Locked FOR KEY SHARE (in id order, as a swap, a release or an erasure locks memberships; ranked here): a
        # release or an erasure of one under way is waited for, and PostgreSQL reads the row again, no longer the
        # number's. Read without it, her membership was read as the number's before her erasure committed, and the
        # reply queued meanwhile named her and carried her number (its job and its SMS row), after her erasure had
        # cleared her texts' jobs. Holding it, the erasure waits for this text, and then clears its reply's job too.
        # KEY SHARE (read=True; key_share alone is FOR NO KEY UPDATE): two texts of the number read them at once. Taken
        # FOR NO KEY UPDATE, a STOP that then locked a membership the number got meanwhile (its id before hers: she
        # joined another cooperative) waited for another text of the number holding it and waiting for hers: a deadlock.
        ranked = sorted(
            (
                await session.execute(
                    select(Member, _REPLY_RANK)
                    .join(Cooperative, Cooperative.id == Member.cooperative_id)
                    .where(Member.phone_index == index)
                    .order_by(Member.id)
                    .with_for_update(of=Member, read=True, key_share=True)
                )
            ).all(),
            key=lambda row: (row[1], row[0].created_at),
        )
        members = [member for member, _rank in ranked]
        # The membership the reply speaks for: on a shared code the one whose short code her text begins with, else
        # the first. A language is a membership's (Jean is English at one cooperative, French at another): the
        # reply is in that membership's (of a payment's, refund's or dispute's cooperative, that cooperative's: see
        # below), unless she wrote her keyword in another language than English.
        named = await _named_membership(session, ranked, named_code)
        reply: tuple[str, dict[str, Any], str | None] | None = None  # template, context, cooperative
        stale = False  # a STOP or START sent before the number's latest one taken
        dedupe = f"inbound:{inbound_id}"  # one reply per inbound text (an aggregator's retry sends none)
        if command in ("STOP", "START"):
            opt_out = command == "STOP"
            # The number's, for the memberships it does not have yet (core.members), and each one it has; unless she
            # sent a later STOP or START, taken already (two texts taken at once, or out of order): then this one
            # changes nothing (`stale`). The number's row stays locked to the commit: her other word waits for this.
            # Her memberships are locked before it (in id order), as a release or an erasure locks her membership
            # before it forgets the number's row: taken the other way, the two deadlocked.
            held = [] if retried else (await session.execute(
                select(Member.id).where(Member.phone_index == index).order_by(Member.id)
                .with_for_update(key_share=True))).scalars().all()
            stale = not retried and not await set_number_opt_out(session, index, opt_out, _said_at(date))
            if stale and counted_at is not None and (await session.execute(
                    select(OutboxJob.id).where(OutboxJob.dedupe_key == f"sms:{dedupe}"))).first() is not None:
                # Another try of this text queued its reply (taken, its mark lost, or this retry in before it was
                # written; or a try at once, which took this one's count): the count is that reply's, whichever try
                # made it (one per text), kept if it went, else given back by its job.
                counted_at = None
            if held and not (retried or stale):
                # The flags as they are now, not as read above: a STOP of hers committed while this waited for the
                # number's row has set them since (and of the memberships holding the number now: one released
                # meanwhile is no longer hers).
                changed = (await session.execute(
                    update(Member)
                    .where(Member.id.in_(held), Member.reminders_opt_out != opt_out)
                    .values(reminders_opt_out=opt_out, updated_at=utcnow())
                    .returning(Member.id, Member.cooperative_id)
                    .execution_options(synchronize_session=False)
                )).all()
                for changed_id, member_cooperative in sorted(changed):
                    await record(
                        session,
                        actor=actor,
                        action="member.reminders_opt_out",
                        entity_type="member",
                        entity_id=changed_id,
                        before={"remindersOptOut": not opt_out},
                        after={"remindersOptOut": opt_out},
                        cooperative_id=member_cooperative,
                    )
            reply = ("opted_out" if opt_out else "opted_in", {}, None)
        elif command in ("RECEIPT", "STATUS") and not (argument and (REFERENCE_SHAPE.match(argument)
                                                                      or _MPESA_RECEIPT.fullmatch(argument))):
            # The keyword alone, or words that are no reference ("Hali gani"): how to ask, in her language, with
            # its keyword; never "no payment GANI" or "no payment -".
            reply = (f"no_reference_{command.lower()}", {}, None)
        elif command in ("RECEIPT", "STATUS") and reference_of(cast(str, argument)) is not None:
            # A refund's or a dispute's reference (RFD_..., DSP_...: their SMS gave it to her): its status, when the
            # payment it is of is hers (_owns), as a payment's; anyone else's gets what a made-up one gets.
            reference = cast(str, argument)
            model, template = cast(tuple[Any, str], reference_of(reference))
            row = (await session.execute(select(model).where(model.reference == reference))).scalar_one_or_none()
            payment = None if row is None else await session.get(Payment, row.payment_id)
            if row is not None and payment is not None and await _owns(session, rt, payment, phone):
                reply = (template, {f"{template.partition('_')[0]}_id": row.id}, payment.cooperative_id)
                dedupe = reply_key(payment.id, f"in:{inbound_id}")  # the payment's messages list it (admin_api)
            else:
                reply = ("not_found", {"reference": reference}, None)
        elif command in ("RECEIPT", "STATUS"):
            reference = cast(str, argument)
            # A reference, or a receipt (ix_payments_transaction_id leads with the id).
            by = Payment.reference if REFERENCE_SHAPE.match(reference) else Payment.provider_transaction_id
            payment = (await session.execute(select(Payment).where(by == reference).order_by(Payment.created_at)
                                             .limit(1))).scalar_one_or_none()
            if payment is not None and await _owns(session, rt, payment, phone):
                reply = payment_reply(payment, command)
                dedupe = reply_key(payment.id, f"in:{inbound_id}")
            else:
                # Someone else's reference gets exactly the answer a made-up one gets.
                reply = ("not_found", {"reference": reference}, None)
        elif command == "HELP":
            # RECEIPT and STATUS answer a member of a suspended cooperative, never a suspended member (_owns):
            # HELP offers them only to a number with a membership that is not suspended. The code to dial is that of
            # the membership the text names on a shared code (as BALANCE), else the one the reply speaks for.
            asks = any(member.status != "SUSPENDED" for member in members)
            help_ = ("help_inactive" if asks else "help_suspended") if _cannot_pay(named) else "help"
            reply = (help_, {}, named[0].cooperative_id if named else None)
        elif command == "BALANCE":
            # What she owes, of the membership the reply speaks for (built when it is sent: templates.balance_items);
            # a number no member has is told so, one that cannot pay (suspended, or her cooperative) nothing of it.
            # On a shared code, the membership of the cooperative whose short code her text begins with.
            if named is None:
                reply = ("not_member", {}, None)
            elif _cannot_pay(named):
                reply = ("help_suspended", {}, named[0].cooperative_id)
            else:
                reply = ("balance", {}, named[0].cooperative_id)
        else:
            reply = ("unknown_inactive" if _cannot_pay(named) else "unknown", {},
                     named[0].cooperative_id if named else None)

        template, context, cooperative_id = reply
        # Else what the keyword changed commits, without a reply. A retried STOP or START gets none either: its first
        # try's reply went (the same dedupe key), or was skipped, and she may have switched since: "opted in" then
        # told her the opposite of what holds. Nor does one sent before her latest word, taken already (stale).
        if reply_allowed and not retried and not stale:
            cooperative_id, member_id = _reply_membership(members, cooperative_id)
            # The reply's own membership first: STATUS of her savings cooperative's payment, texted by a member of a
            # housing cooperative too (her first membership), was answered in the housing cooperative's language
            # while listed with her savings membership, whose language is another (each membership has its own).
            own = next((member for member in members if member.id == member_id), None)
            language = (
                (keyword_language if keyword_language not in (None, "en") else None)
                or (own.language if own is not None else None)
                or (named[0].language if named else None)
                or keyword_language
                or "en"
            )
            context = {**context, "language": language}
            prefix = shortcode_prefix(text, rt.settings.sms_shortcode_keywords)
            if prefix:
                context["keyword_prefix"] = prefix
            if counted_at is not None:
                context[COUNTED_AT] = counted_at
            await send_sms(
                session,
                template=template,
                cooperative_id=cooperative_id,
                context=context,
                cipher=rt.cipher,
                member_id=member_id,
                phone=phone,  # to the number that texted, whatever number the membership holds when it is sent
                dedupe=dedupe,
            )
        # Counted, and no reply queued. A retry of a text taken already gives back only a count it made itself: the
        # count its first try made is that try's reply's (queued, or given back by it).
        give_back = switch and counted_at is not None and ((retried and counted) or stale)
        if give_back:
            # By a GIVE_BACK_JOB committed with the text (retried until Redis takes it): given back only after the
            # commit, in this request, a process lost or Redis failing in between left it counted for good.
            await enqueue_job(session, give_back_job(index, dedupe, cast(float, counted_at), template,
                                                     own=retried))
    if switch and not retried:
        await _mark_taken(rt, index, inbound_id)  # once committed: a retry of a text not taken still applies it
    if give_back:
        # At once too (best effort), so her next text is not refused by a count the job gives back moments later;
        # given back once however both go (give_back_reply's mark).
        await give_back_reply(rt, index, dedupe, cast(float, counted_at), template)
    if not reply_allowed:
        return web.Response(text="")
    log.info("keyword SMS", extra={"command": command or "unknown", "reply": template})
    return web.Response(text="")


async def _named_membership(session: Any, ranked: Sequence[Any], prefix: str | None) -> Any:
    """(member, rank) of `ranked` in the cooperative whose short code is `prefix` (the shared code's word her
    text began with), else the first: a member of two cooperatives asks each for its own. None when none."""
    if not ranked:
        return None
    if prefix:
        named = (await session.execute(select(Cooperative.id).where(
            Cooperative.id.in_([row[0].cooperative_id for row in ranked]),
            func.upper(Cooperative.short_code) == prefix))).scalar()
        return next((row for row in ranked if row[0].cooperative_id == named), ranked[0])
    return ranked[0]


def _cannot_pay(named: Any) -> bool:
    """Whether the (member, rank) a reply speaks for (_named_membership) is a membership that cannot pay: suspended,
    still awaiting approval (PENDING: a registration on USSD), or of a suspended cooperative. USSD tells her it is
    not active, or awaiting approval (channels.ussd.flows.enter), and so do HELP and the reply to a word not
    understood, rather than "Dial <her cooperative's code> to pay" or "Send HELP or dial <it>" (as BALANCE does).
    Without a short code's word that is the first of `ranked`, which can pay if any of hers can."""
    return named is not None and (named[1] >= _INACTIVE_RANK or named[0].status != "ACTIVE")


def _reply_membership(members: list[Member], cooperative_id: str | None) -> tuple[str | None, str | None]:
    """(cooperative, member) a reply is stored with: the number's membership in the cooperative the reply is
    for, so the support desk finds it in her messages (GET /v1/members/{id}/messages: "did she get the receipt she
    asked for?") as it finds a receipt the desk resent. The reply's cooperative is the payment's for a RECEIPT or
    STATUS, the one HELP names the code of (the first of `members`); a number in that cooperative is at most one
    member of it. A reply about the number rather than one cooperative (STOP, START, "not found", how to ask) is
    the cooperative's only when the number has no other membership: its STOP already shows on that membership
    (its flag, its audit row). Of a number in several cooperatives it is none's (choosing one would show it to
    that cooperative only, as if sent there), and of a number no member has, no one's."""
    if cooperative_id is None and len(members) == 1:
        cooperative_id = members[0].cooperative_id
    member_id = next((member.id for member in members if member.cooperative_id == cooperative_id), None)
    return cooperative_id, member_id


# An SMS about one payment that someone asked for (the RECEIPT or STATUS keyword, the support desk's resend:
# admin_api.messages) is keyed "reply:<payment id>:<origin>", the payment's id in a fixed place: the payment's
# messages are found by their key's prefix (admin_api.messages), as its receipt and updates are by theirs
# (core.notify.sms_dedupe) and a USSD receipt by "ussd-receipt:<payment id>:" (channels.ussd.flows).
REPLY_PREFIX = "reply"


def payment_reply(payment: Payment, command: str) -> tuple[str, dict[str, Any], str]:
    """What answers a request for a payment's receipt or status (the RECEIPT and STATUS keywords, the support
    desk's resend): (template, context, cooperative id). RECEIPT of a payment whose money was collected
    (COLLECTED) is its receipt, with what was refunded since (templates.asked_receipt); STATUS, or RECEIPT of one
    that holds none, its status."""
    template = asked_receipt(payment.status, payment.refunded_minor) if command == "RECEIPT" else "payment_status"
    return template, {"payment_id": payment.id}, payment.cooperative_id


# The reply to STATUS (or RECEIPT) with a refund's or a dispute's reference: its status (keyed as a payment's reply,
# reply_key with the payment's id, and judged at send time as a refund's or dispute's notice: channels.sms.jobs).
STATUS_REPLY_TEMPLATES = ("refund_status", "dispute_status")
_REFERENCE_KINDS: dict[str, tuple[Any, str]] = {"RFD": (Refund, "refund_status"), "DSP": (Dispute, "dispute_status")}


def reference_of(argument: str) -> tuple[Any, str] | None:
    """(model, reply template) of a refund's or a dispute's reference (core.references: RFD_..., DSP_...), None
    for any other argument (a payment's reference, an M-Pesa receipt, words)."""
    if not REFERENCE_SHAPE.match(argument):
        return None
    return _REFERENCE_KINDS.get(argument.partition("_")[0])


def reply_key(payment_id: str, origin: str) -> str:
    """The dedupe key of a reply about the payment asked for from `origin` (one inbound text, one resend by the
    desk): the same origin gives the same key, so one SMS. Kept within the message's idempotency key
    (SMS_KEY_SIZE): a longer origin (an aggregator's id of up to 128 characters) is digested."""
    key = f"{REPLY_PREFIX}:{payment_id}:{origin}"
    if len(key) <= SMS_KEY_SIZE:
        return key
    return f"{REPLY_PREFIX}:{payment_id}:{hashlib.sha256(origin.encode()).hexdigest()[:32]}"


_REPLY_RANK = case(
    (Cooperative.status != "ACTIVE", 3),
    (Member.status == "ACTIVE", 0),
    (Member.status == "PENDING", 1),
    else_=2,
)
_INACTIVE_RANK = 2  # ranks from which a membership cannot pay: a suspended member, a suspended cooperative


def _reply_limits(command: str | None) -> tuple[Limit, ...]:
    """The limits a reply to `command` must fit, all counted or none (_reply_allowed): the help to what was not
    understood (None) first, so a robot's texts refused it use none of the number's other replies (the first
    refusing is the one logged)."""
    if command is None:
        return HELP_DAILY_LIMIT, REPLY_LIMIT, REPLY_DAILY_LIMIT
    return REPLY_LIMIT, REPLY_DAILY_LIMIT


async def _reply_allowed(rt: Runtime, index: str, phone: Phone, command: str | None,
                         inbound_id: str, at: float) -> tuple[bool, float | None, bool]:
    """May this phone get a reply to `command` now (see REPLY_LIMIT)? Counted in each of its limits when all have
    room for it, else in none (RateLimiter.hit_all_once, as hit_all: one counted in turn up to the first that
    refused kept the counts before it, so a reply the daily limit refused used one of the 10 minutes' five). When
    they cannot be checked (Redis down or restarting), no: the reply is skipped and logged, and the keyword itself
    still takes effect. With when its reply was counted (COUNTED_AT: at `at`, or by another try of the text,
    earlier or at once; None when not, or not known) and whether it was counted here.

    Counted once per text: the verdict is kept by its inbound id (TAKEN_SECONDS), and the aggregator's retry of the
    text (our answer was late, or failed after the count) gets it again without counting. Counted again, a retry
    of a text not understood found the day's one help used by its own first try, and she never got it; the reply
    itself goes once whatever the tries (its dedupe key names the inbound id). The verdict, with when it was
    counted, is kept by the very command that counts (RateLimiter.hit_all_once, under the number's tag): a retry
    arriving while the first try is still at work finds it too. Kept only after the count, both tries counted
    before either kept it, and one text used two of her replies.

    Also kept as the release before keeps it, and read there first (a text whose first try such a process took):
    "1" or "0" ("reply", of the text's own tag) and when it was counted beside it ("reply-at", the same slot,
    written in the same transaction)."""
    verdict_key = _taken_key(index, inbound_id, "reply")
    at_key = _taken_key(index, inbound_id, "reply-at")
    limiter = RateLimiter(rt.redis)
    try:
        kept, kept_at = await rt.redis.mget([verdict_key, at_key])
        if kept is not None:
            allowed = kept in (b"1", "1")
            return allowed, _counted_at(kept_at) if allowed else None, False
        limits = _reply_limits(command)
        verdict = await limiter.hit_all_once(limits, index, inbound_id, ttl=TAKEN_SECONDS, now=at)
        if not verdict.decisions:  # an earlier try of the text, or one at work at once, counted it (or was refused)
            return verdict.allowed, verdict.at, False
        refused = next((limit for limit, decision in zip(limits, verdict.decisions, strict=True)
                        if not decision.allowed), None)
        allowed = verdict.allowed
        if refused is not None:
            log.info("keyword reply suppressed: rate limit", extra={"phone": phone.masked(), "limit": refused.name})
        try:
            async with rt.redis.pipeline(transaction=True) as pipe:  # one slot: the digest's tag
                pipe.set(verdict_key, "1" if allowed else "0", ex=TAKEN_SECONDS)
                if allowed:
                    pipe.set(at_key, repr(at), ex=TAKEN_SECONDS)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # Counted and kept already (the verdict above): only a process of the release before misses it. Taken
            # as a failure to check, the reply was skipped while its count stood: one of her five for nothing.
            log.warning("keyword reply's verdict not kept for the release before",
                        extra={"phone": phone.masked(), "error": type(exc).__name__})
        return allowed, at if allowed else None, allowed
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "keyword reply skipped: its rate limit could not be checked",
            extra={"phone": phone.masked(), "error": type(exc).__name__},
        )
        return False, None, False


def _counted_at(kept: bytes | str | None) -> float | None:
    """When an earlier try of a text counted its reply (_reply_allowed), None when not kept (a try of the release
    before, which kept none) or not a time."""
    try:
        return None if kept is None else float(kept)
    except ValueError:
        return None


# The outbox job that gives back the count of a keyword's reply not sent (channels.sms.jobs.give_back_unsent): queued
# with the reply's end by the worker or a discard (naming the reply's 'sms.send' job), or with the text's transaction
# here, for a STOP or START that queued no reply (give_back_job).
GIVE_BACK_JOB = SMS_GIVE_BACK_KIND


def give_back_job(index: str, key: str, counted_at: float, template: str, *, own: bool) -> NewJob:
    """The GIVE_BACK_JOB of a text whose reply was counted at `counted_at` against the number's (`index`) reply limits
    and not queued (a stale STOP or START; or a retry of one taken already that counted again, `own`: that count is
    the retry's own, given back whatever became of the reply its first try queued). `key`: the reply's dedupe key,
    which the reply's own give-back shares (one mark: given back once). One per text (its dedupe key), of no
    cooperative: a STOP is the number's, and no cooperative sees one sent elsewhere."""
    payload = {"index": index, "key": key, COUNTED_AT: counted_at, "template": template, "own": own}
    return NewJob(GIVE_BACK_JOB, payload, dedupe_key=f"{GIVE_BACK_JOB}:{key}")


async def give_back_reply(rt: Runtime, index: str, key: str, counted_at: float, template: str, *,
                          best_effort: bool = True) -> None:
    """A reply (`template`) counted at `counted_at` against the number's (`index`) reply limits and not sent after
    all (COUNTED_AT) counts no more: each window it was counted in loses it, once for the reply (`key`, its dedupe
    key: one per text), however often this is asked and by whichever way (its job run again, two runs at once, an
    admin's discard after it). `best_effort`: Redis failing leaves it counted, as before (logged); else the error is
    raised, for an outbox job (channels.sms.jobs: an admin's discard) to try again."""
    # A keyword's: REPLY_LIMIT, REPLY_DAILY_LIMIT; the help to what was not understood, the day's help as well.
    limits = _reply_limits(None if template in NOT_UNDERSTOOD_REPLIES else "STOP")
    try:
        await RateLimiter(rt.redis).uncount_once(limits, index, key, now=counted_at)
    except (RedisError, OSError, TimeoutError) as exc:
        if not best_effort:
            raise
        log.warning("a reply not sent could not give its count back: it stays counted",
                    extra={"error": type(exc).__name__})


def _said_at(date: str) -> datetime:
    """When the number sent a text: the aggregator's `date` of it (Africa's Talking's "2026-01-15 10:00:00", read as
    UTC; an ISO 8601 time with its offset too), by which her STOP and START are put in the order she sent them
    (core.members.set_number_opt_out); the time it reached us when it has none, or none that reads as a time. Never
    later than now: a date ahead of our clock (an aggregator writing local time, or a clock gone wrong) would make
    every word she sends after it, until that time, change nothing; those are taken in the order they arrive.

    A date in whole seconds (Africa's Talking's) that is ahead, and a text without a date, are taken as the start of
    our current second, not our microsecond: the START she sends right after her STOP, dated this same second, ties
    with it and is taken (a tie is; core.members.set_number_opt_out). Taken to the microsecond, it read as sent
    before her STOP and changed nothing. A date with a fraction of a second that is ahead is taken as now, to the
    microsecond, as the dates it is ordered with are."""
    now = utcnow()
    try:
        moment = datetime.fromisoformat(date)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):  # not a time; or one an offset takes past year 1 or 9999
        return now.replace(microsecond=0)
    if moment <= now:
        return moment
    return now.replace(microsecond=0) if moment.microsecond == 0 else now


# How long a STOP or START taken is remembered by its inbound id (_taken_before): past the aggregator's retries of it.
TAKEN_SECONDS = 2 * 86_400


def _taken_key(index: str, inbound_id: str, what: str = "switch") -> str:
    """The key of what was taken of the number's text of this inbound id: its STOP or START ("switch"), its reply's
    verdict ("reply") and when that reply was counted ("reply-at"). The first keeps its old name."""
    digest = hashlib.sha256(f"{index}|{inbound_id}".encode()).hexdigest()[:32]
    return f"sms:in:{{{digest}}}" if what == "switch" else f"sms:in:{what}:{{{digest}}}"


async def _taken_before(rt: Runtime, index: str, inbound_id: str) -> bool:
    """Whether this STOP or START (the number's text of this inbound id) was taken already: the aggregator posts a
    text again when our answer was late. Redis unreachable: no (taken again, as before: a STOP is never lost)."""
    try:
        return bool(await rt.redis.exists(_taken_key(index, inbound_id)))
    except (RedisError, OSError, TimeoutError):
        return False


async def _mark_taken(rt: Runtime, index: str, inbound_id: str) -> None:
    """Remember a STOP or START committed (best effort), for _taken_before."""
    try:
        await rt.redis.set(_taken_key(index, inbound_id), 1, ex=TAKEN_SECONDS)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("STOP/START taken but not remembered: a retry of it would be taken again",
                    extra={"error": type(exc).__name__})


_ANY_MEMBERSHIP = select(Member.id).where(Member.phone_index == bindparam("i")).limit(1)


async def _has_membership(rt: Runtime, index: str) -> bool:
    """Whether the number is a member's (any cooperative, any status): asked only of numbers from outside the
    served countries, which get a reply only then."""
    async with autocommit(rt.engine) as conn:
        return await pgraw.first(conn, _ANY_MEMBERSHIP, {"i": index}) is not None


async def _unserved(rt: Runtime, phone: Phone, index: str, command: str | None, inbound_id: str,
                    retried: bool, date: str) -> web.Response:
    """A text from a number outside the served countries that no member has: no reply (an international SMS
    each, not counted either). Its STOP is still kept (and START: the number might be registered one day), but for
    the aggregator's retry of one taken already (`retried`); anything else is logged, masked, and dropped."""
    if command in ("STOP", "START") and not retried:
        async with rt.sessionmaker.begin() as session:
            await set_number_opt_out(session, index, command == "STOP", _said_at(date))
        await _mark_taken(rt, index, inbound_id)
    log.info("keyword SMS from a number outside the served countries: no reply",
             extra={"phone": phone.masked(), "command": command or "unknown"})
    return web.Response(text="")


def setup(app: web.Application) -> None:
    from core.runtime import SETTINGS

    settings = app.get(SETTINGS)
    if settings is not None and not settings.callback_secrets.get("sms"):
        log.warning("SMS callbacks accepted without a URL secret; set CALLBACK_SECRET_SMS")
    for word in settings.sms_shortcode_keywords if settings is not None else ():
        if parse_keyword(word)[0] is not None:  # members could no longer send that command
            raise ConfigError("SMS_SHORTCODE_KEYWORDS", f"{word!r} is an SMS command (in one of the languages)")
    app.router.add_post("/sms/africastalking/delivery", delivery_report)
    app.router.add_post("/sms/africastalking/inbound", inbound)
