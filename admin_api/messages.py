"""The SMS the gateway made for a member or a payment, for the support desk ("I paid yesterday and got no SMS"),
and a payment's receipt sent again at the desk's request."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import ColumnElement, Select, literal, or_, select, union, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from admin_api.common import DATETIME, ID, NULL_DATETIME, NULL_STRING, iso, json_response, obj, one, out, page_of, paged
from admin_api.errors import ApiError
from admin_api.routing import Ctx, Route
from admin_api.validation import LIMIT, PAGE, Param
from channels.sms.routes import REPLY_PREFIX, STATUS_REPLY_TEMPLATES, payment_reply, reply_key
from channels.sms.templates import TEMPLATES, is_payment_template
from core.audit import record
from core.db import lock_row, utcnow
from core.disputes import DISPUTE_TEMPLATES, sms_keys
from core.errors import INVALID_STATE, Conflict
from core.members import number_came_since
from core.models import AuditEvent, Dispute, Member, OutboxJob, Payment, Refund, SmsMessage
from core.notify import sms_dedupe, sms_job
from core.outbox import enqueue_job
from core.payments import METHOD_OPERATOR, payer_phone
from core.phone import Phone
from core.refunds import REFUND_TEMPLATES
from core.state.payment import COLLECTED
from core.state.sms import SmsStatus
from core.text import is_uuid

# The templates about one payment (its receipt, its updates, its status), keyed by it in one of the shapes below.
PAYMENT_TEMPLATES = tuple(t for t in TEMPLATES if is_payment_template(t))
# Besides "<template>:<payment id>" (core.notify.sms_dedupe: the receipt and updates its moves send), the keys
# that carry the payment's id after a prefix, each ending "<prefix>:<payment id>:<origin>": a USSD receipt
# (channels.ussd.flows._receipt_key) and a reply asked for by keyword or by the desk (channels.sms.routes.reply_key).
# Matched with LIKE '<prefix>:<id>:%': neither a prefix nor an id (a UUID) holds LIKE's wildcards, "_" and "%".
ASKED_PREFIXES = ("ussd-receipt", REPLY_PREFIX)
# The notices about one of the payment's refunds (core.refunds.REFUND_TEMPLATES, "<template>:<refund id>"): the
# payment's messages too, found by their exact keys from its refunds' ids (ix_refunds_payment_id).
# And the SMS about one of its disputes (core.disputes: "<template>:<dispute id>:<step>", core.disputes.sms_keys),
# by their exact keys from its disputes' ids (ix_disputes_payment_id).
NOTICE_TEMPLATES = REFUND_TEMPLATES + DISPUTE_TEMPLATES
STATUSES = tuple(s.value for s in SmsStatus)

MESSAGE = out(
    {
        "id": ID,
        "template": {"type": "string",
                     "description": "payment_receipt, payment_failed, payment_status, payment_reminder, ..."},
        "language": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES),
                   "description": "QUEUED (not sent yet: waiting for its turn, or for a retry), SENT (Africa's "
                                  "Talking took it), DELIVERED (the phone got it), FAILED, REJECTED or EXPIRED"},
        "providerStatus": {**NULL_STRING, "description": "Africa's Talking's last word on it (Submitted, Buffered, "
                                                         "Success, ...); RetriesExhausted: QUEUED, its job parked "
                                                         "(replaying it sends it); Unconfirmed: SENT, its answer "
                                                         "lost (never resent)"},
        "failureReason": {**NULL_STRING, "description": "why it failed, was rejected or waits (as Africa's "
                                                        "Talking or the gateway said it)"},
        "phone": {"type": "string", "description": "the number it went to, masked: +25078****456"},
        "segments": {"type": "integer", "description": "SMS parts it took"},
        "memberId": {"type": ["string", "null"], "format": "uuid"},
        "paymentId": {"type": ["string", "null"], "format": "uuid",
                      "description": "the payment it is about (a receipt, a payment's update or status, the "
                                     "notice of one of its refunds or disputes)"},
        "body": {**NULL_STRING, "description": "its text, only with includeBody=true; null otherwise, and once "
                                               "`prune` emptied it (RETENTION_SMS_BODY_DAYS, 180 days)"},
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
        "sentAt": NULL_DATETIME,
        "deliveredAt": NULL_DATETIME,
    }
)
LIST_QUERY = {
    "page": PAGE,
    "limit": LIMIT,
    "includeBody": Param("boolean", "Include each message's text (it may name the member's payments)", False),
}

# A receipt sent again by the desk: at most RESENDS_PER_WINDOW a payment in any RESEND_WINDOW.
RESENDS_PER_WINDOW = 3
RESEND_WINDOW = timedelta(hours=24)
RESENT_ACTION = "payment.receipt_resent"
RESEND = {
    **obj({"note": {"type": "string", "minLength": 1, "maxLength": 300,
                    "description": "why it is sent again (kept in the audit log)"}}),
    "description": "Queue the payment's receipt SMS again (as the member's RECEIPT keyword does), to the member's "
                   "current number (a payment without a member: the number that paid). Only a payment whose money "
                   "was collected (COMPLETED, PARTIALLY_REFUNDED, REFUNDED); 409 otherwise, and when there is no "
                   "number to send it to (without a member: also once a member got the number that paid, by a swap "
                   "or a new SIM); a number that texted STOP still gets it (STOP stops reminders). "
                   "At most 3 a payment in 24 hours: 429 "
                   "with Retry-After and the time it may be sent again.",
}
RESENT = out(
    {
        "jobId": {"type": "integer", "description": "the sms.send job queued (GET /v1/jobs?paymentId=...)"},
        "paymentId": ID,
        "template": {"type": "string"},
        "phone": {"type": "string", "description": "the number it goes to, masked"},
        "remaining": {"type": "integer", "description": "resends of this payment's receipt left in the last "
                                                        "24 hours after this one"},
    }
)


def payment_of(message: SmsMessage, notices: Mapping[str, str]) -> str | None:
    """The payment a message is about, read from its key (see ASKED_PREFIXES), or for a refund's or dispute's
    notice from its refund or dispute (`notices`: refund or dispute id -> payment id, see notices_of); None for
    any other message, and for a keyword reply queued before its key named the payment ("inbound:<aggregator's
    id>")."""
    if message.template in NOTICE_TEMPLATES:
        return notices.get(refund_of(message) or dispute_of(message) or "")
    if not is_payment_template(message.template) and message.template not in STATUS_REPLY_TEMPLATES:
        return None  # (a refund's or dispute's status asked by keyword is keyed as a payment's reply)
    head, _, rest = message.idempotency_key.partition(":")
    found = rest.split(":", 1)[0]
    return found if (head == message.template or head in ASKED_PREFIXES) and is_uuid(found) else None


def refund_of(message: SmsMessage) -> str | None:
    """The refund a refund's notice is about ("<template>:<refund id>"); None for any other message."""
    head, _, found = message.idempotency_key.partition(":")
    return found if message.template in REFUND_TEMPLATES and head == message.template and is_uuid(found) else None


def dispute_of(message: SmsMessage) -> str | None:
    """The dispute a dispute's SMS is about ("<template>:<dispute id>:<step>", one of core.disputes.sms_keys);
    None for any other message."""
    head, _, rest = message.idempotency_key.partition(":")
    found = rest.split(":", 1)[0]
    if message.template not in DISPUTE_TEMPLATES or head != message.template or not is_uuid(found):
        return None
    return found if message.idempotency_key in sms_keys(found) else None


async def notices_of(session: AsyncSession, messages: Sequence[SmsMessage]) -> dict[str, str]:
    """The payment of each refund and dispute a page's notices are about, in one look-up of each by its primary
    key (ids are UUIDs: a refund's and a dispute's are never the same)."""
    found: dict[str, str] = {}
    for table, of in ((Refund, refund_of), (Dispute, dispute_of)):
        ids = {one for one in map(of, messages) if one is not None}
        if ids:
            rows = await session.execute(select(table.id, table.payment_id).where(table.id.in_(sorted(ids))))
            found.update({notice_id: payment_id for notice_id, payment_id in rows})
    return found


def present(message: SmsMessage, *, body: bool = False, payment_id: str | None = None) -> dict[str, Any]:
    """A message as the desk sees it: the masked number, never the number; its text only when asked for.
    `payment_id`: the payment it is about (payment_of)."""
    return {
        "id": message.id,
        "template": message.template,
        "language": message.language,
        "status": message.status,
        "providerStatus": message.provider_status,
        "failureReason": message.failure_reason,
        "phone": message.phone_masked,
        "segments": message.segments,
        "memberId": message.member_id,
        "paymentId": payment_id,
        "body": (message.body or None) if body else None,
        "createdAt": iso(message.created_at),
        "updatedAt": iso(message.updated_at),
        "sentAt": iso(message.sent_at),
        "deliveredAt": iso(message.delivered_at),
    }


def _notice_keys(model: Any, payment_id: str, keys: Sequence[str]) -> list[Select[Any]]:
    """The keys of the notices about the payment's refunds or disputes (`model`), a SELECT each of `keys` (one made
    for a NUL as the id) around the id of each of its rows (ix_refunds_payment_id, ix_disputes_payment_id)."""
    return [select((literal(before) + model.id + literal(after)).label("key")).where(model.payment_id == payment_id)
            for before, after in (key.split("\0") for key in keys)]


def of_payment(payment_id: str) -> ColumnElement[bool]:
    """The messages about one payment, by their keys (see ASKED_PREFIXES), and the notices of its refunds (see
    REFUND_TEMPLATES) and disputes (see NOTICE_TEMPLATES). `payment_id` is a UUID the database holds.

    The exact keys are found by the key's unique index. The prefixes need an index whose order LIKE can use: on
    PostgreSQL under a collation other than "C" only one built with text_pattern_ops is (ix_sms_messages_key_prefix);
    without it the prefixes are found by reading the table, with the same answer. The notices' keys are made in the
    database from its refunds' and disputes' ids, each found by the unique index: a list of them bound one parameter
    a key broke past the driver's 32,767 (16,384 refunds of one payment), and in the OR beside the others a
    subquery would have read the whole table, hence the ids of the three found apart."""
    key = SmsMessage.idempotency_key
    exact = [sms_dedupe(template, payment_id) for template in PAYMENT_TEMPLATES]
    own = select(SmsMessage.id).where(
        or_(key.in_(exact), *(key.like(f"{prefix}:{payment_id}:%") for prefix in ASKED_PREFIXES)))
    notices = union_all(  # one level: SQLite reads no compound SELECT in parentheses
        *_notice_keys(Refund, payment_id, [sms_dedupe(template, "\0") for template in REFUND_TEMPLATES]),
        *_notice_keys(Dispute, payment_id, sms_keys("\0"))).subquery()
    theirs = select(SmsMessage.id).join(notices, key == notices.c.key)
    return SmsMessage.id.in_(union(own, theirs))


async def _listed(ctx: Ctx, where: ColumnElement[bool]) -> web.StreamResponse:
    """Newest first, paged as the other lists. The rows are the member's or payment's that `one` found visible to
    the caller; the messages themselves are not scoped again (a message of no cooperative is still hers)."""
    body = bool(ctx.query.get("includeBody"))
    query = select(SmsMessage).where(where).order_by(SmsMessage.created_at.desc(), SmsMessage.id.desc())
    notices: dict[str, str] = {}

    async def look_up(messages: Sequence[SmsMessage]) -> None:
        notices.update(await notices_of(ctx.session, messages))

    return await paged(ctx, query, lambda message: present(message, body=body,
                                                             payment_id=payment_of(message, notices)),
                       prepare=look_up)


async def member_messages(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    member = await one(ctx, Member, request.match_info["id"], "member")
    return await _listed(ctx, SmsMessage.member_id == member.id)


async def payment_messages(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    return await _listed(ctx, of_payment(payment.id))


# ------------------------------------------------------------------------------------- a receipt sent again


@dataclass(frozen=True)
class _Recipient:
    """Where a resent receipt goes: the member (her number read when it is sent), or the paying phone; its masked
    number and blind index."""

    masked: str
    index: str
    member_id: str | None = None
    phone: Phone | None = None


async def _recipient(ctx: Ctx, payment: Payment) -> _Recipient:
    """The member's current number, or for a payment of no member the mobile-money number that paid it while it is
    still likely the payer's (SMS_PAYER_ANSWER_DAYS) and no member got it since (core.members.number_came_since), as
    the RECEIPT keyword answers it; a 409 saying why there is none. STOP is not a reason: it stops reminders, and
    receipts still come (as the STOP confirmation tells her)."""
    if payment.member_id is not None:
        member = await ctx.session.get(Member, payment.member_id)
        assert member is not None  # a foreign key
        if member.phone_enc is None or member.phone_index is None:
            raise Conflict("the member's number was released (or she was erased): there is no number of hers to "
                           "send the receipt to")
        if member.status == "SUSPENDED":
            raise Conflict("the member is suspended: her number may no longer be hers, so no receipt is sent to it "
                           "(as a RECEIPT keyword from it is not answered)")
        found = _Recipient(member.phone_masked, member.phone_index, member_id=member.id)
    else:
        if payment.method not in METHOD_OPERATOR or not payment.payment_account_enc:
            raise Conflict("the payment has no member and was not paid from a mobile-money number still on record "
                           "(a bank payment, or its account erased): there is no number to send the receipt to")
        days = ctx.rt.settings.sms_payer_answer_days
        if days and payment.created_at < utcnow() - timedelta(days=days):
            raise Conflict(f"the payment has no member and was made more than {days} days ago: the number that "
                           "paid it may have been given to someone else since (SMS_PAYER_ANSWER_DAYS)")
        if await number_came_since(ctx.session, payment.payment_account_index, payment.created_at):
            # A member got the number by a correction since (a swap, a new SIM: it was someone else's when it
            # paid): not told of another's payment, as the RECEIPT keyword from it is not answered
            # (channels.sms.routes._owns) and a refund's SMS is not sent to it (core.refunds.payer_to_tell).
            raise Conflict("the payment has no member and the number that paid it went to a member since (a swap, "
                           "a new SIM): the receipt would tell that member of another's payment")
        phone = payer_phone(ctx.rt.cipher, payment)
        found = _Recipient(payment.payment_account_masked, payment.payment_account_index, phone=phone)
    return found


async def _resent_at(session: AsyncSession, payment_id: str) -> Sequence[datetime]:
    """When the desk sent the payment's receipt again, newest first: its audit rows (ix_audit_entity), never
    deleted, so their number also numbers the next resend's key."""
    return (await session.execute(
        select(AuditEvent.at)
        .where(AuditEvent.entity_type == "payment", AuditEvent.entity_id == payment_id,
               AuditEvent.action == RESENT_ACTION)
        .order_by(AuditEvent.at.desc()))).scalars().all()


def _next_second(moment: datetime) -> datetime:
    """`moment`, or the whole second after it: a time said to the second is never before it."""
    whole = moment.replace(microsecond=0)
    return whole if whole == moment else whole + timedelta(seconds=1)


async def resend_receipt(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Counted in the database, on the payment's audit rows, with the payment row locked: two resends at once are
    counted one after the other, the count and the job commit together (a resend that failed is not counted),
    and the audit log is the record of them anyway (Redis could lose or outlive a count)."""
    found = await one(ctx, Payment, request.match_info["id"], "payment")
    payment: Payment = await lock_row(ctx.session, Payment, found.id)
    if payment.status not in COLLECTED:
        raise Conflict(f"payment {payment.reference} is {payment.status}: only a payment whose money was collected "
                       "(COMPLETED, PARTIALLY_REFUNDED, REFUNDED) has a receipt to send", code=INVALID_STATE)
    to = await _recipient(ctx, payment)
    earlier = await _resent_at(ctx.session, payment.id)
    now = utcnow()
    recent = [at for at in earlier if at > now - RESEND_WINDOW]
    if len(recent) >= RESENDS_PER_WINDOW:
        again = _next_second(recent[RESENDS_PER_WINDOW - 1] + RESEND_WINDOW)  # as the API writes times: seconds
        raise ApiError(429, f"payment {payment.reference}'s receipt was sent again {len(recent)} times in the last "
                            f"24 hours (at most {RESENDS_PER_WINDOW}): it can be sent again from {iso(again)}",
                       headers={"Retry-After": str(max(1, math.ceil((again - now).total_seconds())))})
    template, context, cooperative_id = payment_reply(payment, "RECEIPT")
    # Numbered, and tagged with when it was asked (as a USSD receipt's key with its session's start): after a
    # restore of PostgreSQL the audit rows of the resends since the restore point are gone and the number comes
    # again, while the SMS service's answer to that key's send is still kept in Redis (core.sms: a job run again
    # stores a lost row SENT from it, sending nothing). A key never used before is sent.
    dedupe = reply_key(payment.id, f"desk:{len(earlier) + 1}@{round(now.timestamp() * 1000)}")
    queued = await enqueue_job(ctx.session, sms_job(
        template=template, cooperative_id=cooperative_id, context=context, cipher=ctx.rt.cipher,
        member_id=to.member_id, phone=to.phone, dedupe=dedupe))
    if not queued:  # numbered under the lock, the key is new; should two count at once, the second stops here
        raise Conflict("another resend of this receipt was queued at the same moment; nothing more was queued")
    job_id = (await ctx.session.execute(
        select(OutboxJob.id).where(OutboxJob.dedupe_key == f"sms:{dedupe}"))).scalar_one()
    after: dict[str, Any] = {"template": template, "jobId": job_id, "phone": to.masked, "resend": len(earlier) + 1}
    if ctx.body.get("note"):
        after["note"] = ctx.body["note"]
    await record(ctx.session, actor=ctx.who.actor, action=RESENT_ACTION, entity_type="payment",
                 entity_id=payment.id, after=after, cooperative_id=payment.cooperative_id)
    await ctx.session.commit()
    return json_response({"jobId": job_id, "paymentId": payment.id, "template": template, "phone": to.masked,
                          "remaining": RESENDS_PER_WINDOW - len(recent) - 1}, status=202)


ROUTES = [
    Route(
        "GET",
        "/members/{id}/messages",
        member_messages,
        "The SMS the gateway made for a member (receipts, payment updates, reminders, disputes, refunds, the "
        "replies to her keyword texts), newest first, with their delivery status; masked numbers; texts only with "
        "includeBody",
        "messages",
        "admin",
        query=LIST_QUERY,
        response=page_of(MESSAGE),
    ),
    Route(
        "GET",
        "/payments/{id}/messages",
        payment_messages,
        "The SMS the gateway made about a payment (its receipt or updates, receipts asked for by USSD, by the "
        "RECEIPT or STATUS keyword or by the desk, its refunds' and disputes' notices), newest first, with their "
        "delivery status",
        "messages",
        "admin",
        query=LIST_QUERY,
        response=page_of(MESSAGE),
    ),
    Route(
        "POST",
        "/payments/{id}/receipt",
        resend_receipt,
        "Send a payment's receipt SMS again to the member's current number (at most 3 a payment in 24 hours)",
        "messages",
        "admin",
        status=202,
        body=RESEND,
        body_optional=True,
        response=RESENT,
    ),
]
