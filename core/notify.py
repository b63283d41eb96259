"""Notifications leave through the outbox: SMS to members and signed events to cooperatives."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.crypto import PiiCipher
from core.outbox import NewJob, enqueue
from core.phone import Phone


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
        "phone_enc": cipher.encrypt(phone.e164, context="sms") if phone else None,
        "context": context,
        "key": dedupe,
    }
    return NewJob("sms.send", payload, dedupe_key=f"sms:{dedupe}", cooperative_id=cooperative_id, max_attempts=10)


def event_job(*, cooperative_id: str, event_type: str, event_id: str, data: dict[str, Any]) -> NewJob:
    """The outbox job for a cooperative webhook event; fan-out to endpoints happens in the worker."""
    return NewJob("webhook.event",
                  {"event_type": event_type, "event_id": event_id, "cooperative_id": cooperative_id, "data": data},
                  dedupe_key=f"wh:{event_id}", cooperative_id=cooperative_id)


async def send_sms(
    session: AsyncSession,
    *,
    template: str,
    cooperative_id: str | None,
    context: dict[str, Any],
    cipher: PiiCipher,
    dedupe: str,
    member_id: str | None = None,
    phone: Phone | None = None,
) -> bool:
    """Queue one SMS; the same `dedupe` key never sends twice (False: it was already queued)."""
    job = sms_job(template=template, cooperative_id=cooperative_id, context=context, cipher=cipher, dedupe=dedupe,
                  member_id=member_id, phone=phone)
    return await enqueue(session, job.kind, job.payload, dedupe_key=job.dedupe_key,
                         cooperative_id=job.cooperative_id, max_attempts=job.max_attempts)


async def emit_event(session: AsyncSession, *, cooperative_id: str, event_type: str, event_id: str,
                     data: dict[str, Any]) -> None:
    """Queue a cooperative webhook event; fan-out to endpoints happens in the worker."""
    job = event_job(cooperative_id=cooperative_id, event_type=event_type, event_id=event_id, data=data)
    await enqueue(session, job.kind, job.payload, dedupe_key=job.dedupe_key, cooperative_id=job.cooperative_id)
