"""Notifications leave through the outbox: SMS to members and signed events to cooperatives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec

from sqlalchemy.ext.asyncio import AsyncSession

from core.crypto import PiiCipher
from core.db import iso_ms, utcnow
from core.outbox import NewJob, enqueue_job
from core.phone import Phone

P = ParamSpec("P")
# The AES-GCM context of an SMS recipient's phone: in a job's payload and on the stored message.
SMS_PHONE_CONTEXT = "sms"
# How much of an SMS's dedupe key is its idempotency key (sms_messages.idempotency_key, channels.sms.jobs.message_key):
# a key that tells two messages apart must do so within it.
SMS_KEY_SIZE = 160


def sms_job(
    *,
    template: str,
    cooperative_id: str | None,
    context: dict[str, Any],
    cipher: PiiCipher,
    dedupe: str,
    member_id: str | None = None,
    phone: Phone | None = None,
) -> NewJob:
    """The outbox job that sends one SMS; the same `dedupe` key never sends twice."""
    if member_id is None and phone is None:
        raise ValueError("an SMS needs a member or a phone number")
    payload = {
        "template": template,
        "cooperative_id": cooperative_id,
        "member_id": member_id,
        "phone_enc": cipher.encrypt(phone.e164, context=SMS_PHONE_CONTEXT) if phone else None,
        "context": context,
        "key": dedupe,
    }
    return NewJob("sms.send", payload, dedupe_key=f"sms:{dedupe}", cooperative_id=cooperative_id, max_attempts=10)


# The precision of webhook events' times (`created`, data's `updatedAt`): what orders one entity's changes.
EVENT_TICK = timedelta(milliseconds=1)


def _to_tick(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def changed_at(previous: datetime | None) -> datetime:
    """The updated_at of a change a webhook event tells (the event's data carries it as `updatedAt`): now, to
    the millisecond, and at least a millisecond after the entity's `previous` updated_at (read under the move's
    compare-and-set or the row's lock). So of two events about one entity the later change always reads
    strictly later, even for two changes in one millisecond or a host whose clock is a little behind the one
    that wrote the change before; a receiver orders them by it (no separate sequence needed)."""
    now = _to_tick(utcnow())
    return now if previous is None else max(now, _to_tick(previous) + EVENT_TICK)


def event_job(*, cooperative_id: str, event_type: str, event_id: str, data: dict[str, Any],
              follows: tuple[str, ...] = ()) -> NewJob:
    """The outbox job for a cooperative webhook event; fan-out to endpoints happens in the worker. The event's
    `created` is now, when it happened, not when a worker (maybe minutes behind) fans it out; to the millisecond.
    Between events about one entity the data's `updatedAt` is what orders them (see changed_at). `follows`: the
    events the cooperative's system was told of this entity that this one follows (core.webhooks.subscribed: it
    also goes to their endpoints)."""
    payload: dict[str, Any] = {"event_type": event_type, "event_id": event_id, "cooperative_id": cooperative_id,
                               "data": data, "created": iso_ms(utcnow())}
    if follows:
        payload["follows"] = list(follows)
    return NewJob("webhook.event", payload, dedupe_key=f"wh:{event_id}", cooperative_id=cooperative_id)


def sms_dedupe(template: str, key: str, step: str | None = None) -> str:
    """The dedupe key (after "sms:") notice_jobs gives the SMS of one change."""
    return f"{template}:{key}" if step is None else f"{template}:{key}:{step}"


def notice_jobs(
    *,
    template: str,
    event_type: str,
    cooperative_id: str,
    key: str,
    context: dict[str, Any],
    data: dict[str, Any],
    cipher: PiiCipher,
    member_id: str | None = None,
    phone: Phone | None = None,
    step: str | None = None,
) -> list[NewJob]:
    """One change told twice: the SMS to the member or payer (when there is one to send it to) and the
    cooperative's webhook event, both keyed by `key` (the entity's id) and `step` (for a change that can
    happen more than once to it)."""
    jobs = []
    if member_id is not None or phone is not None:
        dedupe = sms_dedupe(template, key, step)
        jobs.append(sms_job(template=template, cooperative_id=cooperative_id, context=context, cipher=cipher,
                            member_id=member_id, phone=phone, dedupe=dedupe))
    event_id = f"evt_{event_type.replace('.', '_')}_{key}" + ("" if step is None else f"_{step}")
    jobs.append(event_job(cooperative_id=cooperative_id, event_type=event_type, event_id=event_id, data=data))
    return jobs


def _queued(build: Callable[P, NewJob]) -> Callable[Concatenate[AsyncSession, P], Awaitable[bool]]:
    """`build`, queued in the caller's transaction: False when its dedupe key was already queued."""

    async def queue(session: AsyncSession, *args: P.args, **kwargs: P.kwargs) -> bool:
        return await enqueue_job(session, build(*args, **kwargs))

    return queue


send_sms = _queued(sms_job)  # send_sms(session, template=..., ...): queue one SMS
emit_event = _queued(event_job)  # emit_event(session, cooperative_id=..., ...): queue a webhook event
