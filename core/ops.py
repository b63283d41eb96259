"""Figures for the operations page: payment flow, provider success, USSD funnel, SMS, outbox, webhooks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import utcnow
from core.models import OutboxJob, Payment, SmsMessage, UssdSession, WebhookDelivery, WebhookEndpoint


def _minute(session: AsyncSession, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.date_trunc("minute", column), literal_column("'YYYY-MM-DD\"T\"HH24:MI'"))
    return func.strftime("%Y-%m-%dT%H:%M", column)


async def dashboard(session: AsyncSession, cooperative_id: str | None = None, *, minutes: int = 60) -> dict[str, Any]:
    """Everything the ops page draws, scoped to one cooperative unless a super admin asks."""
    now = utcnow()
    since = now - timedelta(minutes=minutes)
    day = now - timedelta(hours=24)

    def scoped(query: Any, model: Any) -> Any:
        return query.where(model.cooperative_id == cooperative_id) if cooperative_id else query

    minute = _minute(session, Payment.updated_at)
    per_minute = await session.execute(scoped(
        select(minute, Payment.status, Payment.method, func.count())
        .where(Payment.updated_at >= since).group_by(minute, Payment.status, Payment.method).order_by(minute),
        Payment))
    by_provider = await session.execute(scoped(
        select(Payment.provider, Payment.status, func.count()).where(Payment.created_at >= day)
        .group_by(Payment.provider, Payment.status), Payment))
    providers: dict[str, dict[str, int]] = {}
    for provider, status, count in by_provider.all():
        providers.setdefault(provider, {})[status] = count
    success = {}
    for provider, counts in providers.items():
        settled = sum(v for k, v in counts.items() if k not in ("PENDING", "PROCESSING"))
        good = sum(v for k, v in counts.items() if k in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"))
        success[provider] = {"settled": settled, "succeeded": good,
                             "rate": round(good / settled, 4) if settled else None, "counts": counts}

    open_rows = await session.execute(scoped(
        select(Payment.created_at).where(Payment.status.in_(("PENDING", "PROCESSING")))
        .order_by(Payment.created_at).limit(5000), Payment))
    ages = [(now - created).total_seconds() for (created,) in open_rows.all()]
    buckets = {"under_1m": 0, "1m_to_5m": 0, "over_5m": 0}
    for age in ages:
        buckets["under_1m" if age < 60 else "1m_to_5m" if age < 300 else "over_5m"] += 1

    funnel_rows = await session.execute(scoped(
        select(UssdSession.last_screen, func.count(),
               func.sum(case((UssdSession.payment_id.is_not(None), 1), else_=0)))
        .where(UssdSession.started_at >= day).group_by(UssdSession.last_screen), UssdSession))
    funnel = [{"screen": screen or "(none)", "sessions": count, "paid": int(paid or 0)}
              for screen, count, paid in funnel_rows.all()]
    funnel.sort(key=lambda row: -row["sessions"])

    sms_rows = await session.execute(scoped(
        select(SmsMessage.status, func.count()).where(SmsMessage.created_at >= day).group_by(SmsMessage.status),
        SmsMessage))
    sms = dict(sms_rows.all())
    sent = sum(sms.values()) - sms.get("QUEUED", 0)
    outbox_rows = await session.execute(scoped(
        select(OutboxJob.kind, OutboxJob.status, func.count()).where(OutboxJob.status != "DONE")
        .group_by(OutboxJob.kind, OutboxJob.status), OutboxJob))
    outbox: dict[str, dict[str, int]] = {}
    for kind, status, count in outbox_rows.all():
        outbox.setdefault(status, {})[kind] = count
    hooks = dict((await session.execute(scoped(
        select(WebhookDelivery.status, func.count()).where(WebhookDelivery.created_at >= day)
        .group_by(WebhookDelivery.status), WebhookDelivery))).all())
    disabled = (await session.execute(scoped(
        select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.status == "DISABLED"),
        WebhookEndpoint))).scalar_one()

    return {
        "generatedAt": now.isoformat(),
        "paymentsPerMinute": [{"minute": m, "status": s, "method": meth, "count": c}
                              for m, s, meth, c in per_minute.all()],
        "providers": success,
        "openPayments": {"count": len(ages), "oldestSeconds": round(max(ages), 1) if ages else 0,
                         "buckets": buckets},
        "ussdFunnel": funnel,
        "sms": {"counts": sms, "delivered": sms.get("DELIVERED", 0), "sent": sent,
                "deliveryRate": round(sms.get("DELIVERED", 0) / sent, 4) if sent else None},
        "outbox": {"pending": sum(outbox.get("PENDING", {}).values()),
                   "running": sum(outbox.get("RUNNING", {}).values()),
                   "parked": sum(outbox.get("PARKED", {}).values()), "byStatus": outbox},
        "webhooks": {"deliveries": hooks, "failed": hooks.get("FAILED", 0), "disabledEndpoints": disabled},
    }
