"""Outbox jobs for messaging: 'sms.send' (templated, throttled, sent once) and the webhook jobs."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from channels.sms.encoding import measure
from channels.sms.routes import apply_parked_reports
from channels.sms.sender import SmsTemporaryError
from channels.sms.templates import OPTIONAL_TEMPLATES, TemplateError, build_message
from core import metrics
from core.audit import Actor
from core.db import insert_ignore, new_id, utcnow
from core.models import Member, SmsMessage
from core.outbox import Handler, Job, PermanentJobError, RetryLater
from core.ratelimit import Limit, RateLimiter
from core.state import StaleTransition, transition
from core.state.sms import SMS, SmsStatus

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.sms.jobs")
WORKER = Actor("system", "worker")
SEND_LOCK_SECONDS = 30


def message_key(payload: dict[str, Any]) -> str:
    """The message's idempotency key: core puts its dedupe key in payload['key']; else a digest of the
    fields that identify the message (phone_enc is left out: it is encrypted with a fresh nonce)."""
    if payload.get("key"):
        return str(payload["key"])[:160]
    ident = {k: payload.get(k) for k in ("template", "cooperative_id", "member_id", "context")}
    return "auto:" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def send_limit(rate_per_second: float) -> Limit:
    """A fixed window per sender id: `rate` per second, or one per ceil(1/rate) seconds when below 1."""
    if rate_per_second >= 1:
        return Limit("sms:send", count=math.floor(rate_per_second), window=1, sliding=False)
    return Limit("sms:send", count=1, window=math.ceil(1 / rate_per_second), sliding=False)


class SmsJobs:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.limiter = RateLimiter(rt.redis, prefix="rl")
        self.limit = send_limit(rt.settings.sms_rate_per_second)
        self.sender_id = rt.settings.sms_sender_id or rt.settings.sms_username

    async def throttle(self) -> None:
        decision = await self.limiter.hit(self.limit, self.sender_id)
        if not decision.allowed:
            raise RetryLater(max(0.2, float(decision.retry_after)), "SMS send rate reached for sender id")

    async def send(self, job: Job) -> None:
        rt = self.rt
        if rt.sms is None:
            raise PermanentJobError("no SMS sender configured")
        payload = job.payload
        key = message_key(payload)
        async with rt.sessionmaker() as session:
            existing = (
                await session.execute(select(SmsMessage).where(SmsMessage.idempotency_key == key))
            ).scalar_one_or_none()
            if existing is not None and existing.status != SmsStatus.QUEUED.value:
                return  # sent (or refused) already: a duplicate job or a re-run after a crash
            if payload.get("template") in OPTIONAL_TEMPLATES and payload.get("member_id"):
                member = await session.get(Member, payload["member_id"])
                if member is not None and member.reminders_opt_out:
                    log.info("reminder skipped: member opted out", extra={"member_id": member.id})
                    return
        await self.throttle()
        # Two runs of one message at once (a lease that lapsed mid-send) must not both send it.
        lock = f"sms:lock:{{{hashlib.sha256(key.encode()).hexdigest()[:32]}}}"
        if not await rt.redis.set(lock, job.id, nx=True, ex=SEND_LOCK_SECONDS):
            raise RetryLater(SEND_LOCK_SECONDS, "message is being sent by another worker")
        try:
            await self._send_once(job, payload, key, existing)
        finally:
            await rt.redis.delete(lock)

    async def _send_once(
        self, job: Job, payload: dict[str, Any], key: str, existing: SmsMessage | None
    ) -> None:
        rt = self.rt
        assert rt.sms is not None
        if existing is None:
            existing = await self._create(payload, key)
        else:
            async with rt.sessionmaker() as session:
                # Re-read under the lock: the other run may have finished while we waited for it.
                existing = await session.get(SmsMessage, existing.id)
            if existing is None or existing.status != SmsStatus.QUEUED.value:
                return
        message = existing
        phone = _phone(rt, message)
        try:
            result = await rt.sms.send(phone, message.body)
        except SmsTemporaryError as exc:
            if job.attempts >= job.max_attempts:
                await self._move(
                    message.id,
                    SmsStatus.FAILED,
                    failure_reason=str(exc)[:64],
                    provider_status="RetriesExhausted",
                )
            raise
        if result.accepted:
            await self._move(
                message.id,
                SmsStatus.SENT,
                provider_message_id=result.provider_message_id,
                provider_status=result.provider_status,
                cost=result.cost,
                sent_at=utcnow(),
            )
            if result.provider_message_id:
                await self._apply_parked(message.id, result.provider_message_id)
            return
        if not result.permanent:
            if job.attempts >= job.max_attempts:
                await self._move(
                    message.id,
                    SmsStatus.FAILED,
                    failure_reason=result.failure_reason,
                    provider_status=result.provider_status,
                )
            raise SmsTemporaryError(f"SMS not accepted: {result.provider_status}")
        # A permanent refusal is an outcome, not a job failure: record it and finish the job.
        target = SmsStatus.FAILED if result.provider_status == "InsufficientBalance" else SmsStatus.REJECTED
        log.warning(
            "SMS refused by the aggregator",
            extra={"sms_id": message.id, "status": result.provider_status, "to": message.phone_masked},
        )
        await self._move(
            message.id,
            target,
            provider_status=result.provider_status,
            failure_reason=(result.failure_reason or result.provider_status)[:64],
        )

    async def _create(self, payload: dict[str, Any], key: str) -> SmsMessage:
        rt = self.rt
        async with rt.sessionmaker.begin() as session:
            try:
                phone, language, body = await build_message(
                    session, rt.cipher, payload, service_code=rt.settings.ussd_service_code
                )
            except TemplateError as exc:
                raise PermanentJobError(f"cannot build SMS: {exc}") from exc
            size = measure(body)
            now = utcnow()
            stmt = (
                insert_ignore(session.get_bind().dialect.name, SmsMessage)
                .values(
                    id=new_id(),
                    cooperative_id=payload.get("cooperative_id"),
                    member_id=payload.get("member_id"),
                    phone_enc=rt.cipher.encrypt(phone.e164, context="sms"),
                    phone_index=rt.cipher.blind_index(phone.e164),
                    phone_masked=phone.masked(),
                    template=payload["template"],
                    language=language,
                    body=body,
                    encoding=size.encoding,
                    length=size.length,
                    segments=size.segments,
                    status=SmsStatus.QUEUED.value,
                    idempotency_key=key,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
            )
            await session.execute(stmt)
            row = (
                await session.execute(select(SmsMessage).where(SmsMessage.idempotency_key == key))
            ).scalar_one()
        metrics.SMS.labels(status="QUEUED").inc()
        return row

    async def _apply_parked(self, message_id: str, provider_message_id: str) -> None:
        """Delivery reports that beat the id's commit were parked by the route: apply them now."""
        try:
            await apply_parked_reports(self.rt, provider_message_id)
        except Exception:
            # The SMS left and is recorded SENT; failing the job would not bring a lost report back.
            log.exception("parked delivery reports not applied", extra={"sms_id": message_id})

    async def _move(self, message_id: str, target: SmsStatus, **values: Any) -> None:
        async with self.rt.sessionmaker.begin() as session:
            try:
                await transition(
                    session,
                    SMS,
                    message_id,
                    SmsStatus.QUEUED,
                    target,
                    actor=WORKER,
                    values={k: v for k, v in values.items() if v is not None},
                )
            except StaleTransition:
                log.info("SMS already moved on", extra={"sms_id": message_id, "target": target.value})
                return
        metrics.SMS.labels(status=target.value).inc()


def _phone(rt: Runtime, message: SmsMessage):  # type: ignore[no-untyped-def]
    from core.phone import Phone

    return Phone(rt.cipher.decrypt(message.phone_enc, context="sms"))


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    from core import webhooks

    jobs = SmsJobs(rt)

    async def webhook_event(job: Job) -> None:
        await webhooks.fan_out(rt, job.payload)

    async def webhook_deliver(job: Job) -> None:
        await webhooks.deliver(rt, job)

    return {"sms.send": jobs.send, "webhook.event": webhook_event, "webhook.deliver": webhook_deliver}
